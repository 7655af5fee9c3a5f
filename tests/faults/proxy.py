"""A small loopback TCP proxy that can blackhole, reset connections and add latency.

The agent's config points at the proxy; the proxy forwards to the broker. The
faults it makes:

* :meth:`TcpProxy.blackhole` / :meth:`TcpProxy.heal`: a network partition. Bytes
  read from either side are held, not delivered (like packets TCP keeps
  retransmitting); new connections are accepted but their upstream connection is
  only opened on heal (the SYN "gets through" late). On heal, connections whose
  other end closed during the partition are reset (that end would answer the
  retransmissions with RST); the others get their held bytes and carry on.
* :meth:`TcpProxy.reset`: every open connection is closed with RST on both sides.
* :meth:`TcpProxy.set_latency`: each chunk is delivered ``seconds`` after it was
  read, in each direction (bandwidth is not limited).

Only 127.0.0.1. Threads are daemons and :meth:`TcpProxy.close` stops them all.
"""

from __future__ import annotations

import select
import socket
import struct
import threading
import time
from collections import deque

_TICK = 0.005


def _rst(sock: socket.socket | None) -> None:
    if sock is None:
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass


class _Link:
    """One client connection and its upstream connection."""

    def __init__(self, proxy: TcpProxy, client: socket.socket) -> None:
        self.proxy = proxy
        self.client = client
        self.upstream: socket.socket | None = None
        self.queues: dict[str, deque[tuple[float, bytes]]] = {"up": deque(), "down": deque()}
        self.eof: dict[str, bool] = {"up": False, "down": False}  # "up": the client stopped sending
        self.broken_in_blackhole = False
        self.dead = False
        self.cond = threading.Condition()
        self.threads: list[threading.Thread] = []

    def start(self) -> None:
        self._spawn(self._read, "up")
        self._spawn(self._write)

    def _spawn(self, target, *args) -> None:  # type: ignore[no-untyped-def]
        t = threading.Thread(target=target, args=args, daemon=True)
        self.threads.append(t)
        t.start()

    def _read(self, direction: str) -> None:
        sock = self.client if direction == "up" else self.upstream
        assert sock is not None
        while not self.dead and not self.proxy.closed:
            try:
                ready, _, _ = select.select([sock], [], [], 0.1)
                if not ready:
                    continue
                data = sock.recv(65536)
            except (OSError, ValueError):
                data = b""
            with self.cond:
                if not data:
                    self.eof[direction] = True
                    if self.proxy.blackholed:
                        self.broken_in_blackhole = True
                    self.cond.notify_all()
                    return
                self.queues[direction].append((time.monotonic(), data))
                self.proxy._count(direction, len(data))
                self.cond.notify_all()

    def _write(self) -> None:
        while not self.dead and not self.proxy.closed:
            with self.cond:
                self.cond.wait(_TICK)
            if self.proxy.blackholed:
                continue
            if self.broken_in_blackhole:
                self.kill()
                return
            if self.upstream is None:
                try:
                    self.upstream = socket.create_connection(("127.0.0.1", self.proxy.upstream_port), timeout=5)
                    self.upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                except OSError:
                    self.kill()
                    return
                self._spawn(self._read, "down")
            now = time.monotonic()
            latency = self.proxy.latency
            for direction, dst in (("up", self.upstream), ("down", self.client)):
                q = self.queues[direction]
                while True:
                    with self.cond:
                        if not q or q[0][0] + latency > now or self.proxy.blackholed:
                            break
                        _, data = q.popleft()
                    try:
                        dst.sendall(data)
                    except OSError:
                        self.kill()
                        return
            with self.cond:
                for direction, dst in (("up", self.upstream), ("down", self.client)):
                    if self.eof[direction] and not self.queues[direction]:
                        # one side closed and everything it sent is delivered: close the link
                        self.dead = True
            if self.dead:
                for s in (self.client, self.upstream):
                    try:
                        s.shutdown(socket.SHUT_RDWR)  # type: ignore[union-attr]
                    except OSError:
                        pass
                    try:
                        s.close()  # type: ignore[union-attr]
                    except OSError:
                        pass
                return

    def kill(self) -> None:
        """Close both sides with RST."""
        self.dead = True
        _rst(self.client)
        _rst(self.upstream)


class TcpProxy:
    """Forwards 127.0.0.1:``port`` to 127.0.0.1:``upstream_port``."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.latency = 0.0
        self.blackholed = False
        self.closed = False
        self.links: list[_Link] = []
        self.stats = {"accepted": 0, "bytes_up": 0, "bytes_down": 0, "resets": 0, "blackholes": 0}
        self._lock = threading.Lock()
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.port = int(self._listener.getsockname()[1])
        self._thread = threading.Thread(target=self._accept, daemon=True)

    def start(self) -> TcpProxy:
        self._thread.start()
        return self

    def _count(self, direction: str, n: int) -> None:
        with self._lock:
            self.stats["bytes_up" if direction == "up" else "bytes_down"] += n

    def _accept(self) -> None:
        while not self.closed:
            try:
                ready, _, _ = select.select([self._listener], [], [], 0.1)
                if not ready:
                    continue
                client, _ = self._listener.accept()
            except (OSError, ValueError):
                if self.closed:
                    return
                continue
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            link = _Link(self, client)
            with self._lock:
                self.stats["accepted"] += 1
                self.links = [lk for lk in self.links if not lk.dead] + [link]
            link.start()

    # -- faults ---------------------------------------------------------------------

    def blackhole(self) -> None:
        self.stats["blackholes"] += 1
        self.blackholed = True

    def heal(self) -> None:
        self.blackholed = False

    def reset(self) -> int:
        """RST every open connection; returns how many."""
        with self._lock:
            links = [lk for lk in self.links if not lk.dead]
        for link in links:
            link.kill()
        self.stats["resets"] += len(links)
        return len(links)

    def set_latency(self, seconds: float) -> None:
        self.latency = float(seconds)

    def open_links(self) -> int:
        with self._lock:
            return sum(1 for lk in self.links if not lk.dead)

    def close(self) -> None:
        self.closed = True
        try:
            self._listener.close()
        except OSError:
            pass
        with self._lock:
            links = list(self.links)
        for link in links:
            link.kill()
        self._thread.join(timeout=2)
        for link in links:
            for t in link.threads:
                t.join(timeout=2)
