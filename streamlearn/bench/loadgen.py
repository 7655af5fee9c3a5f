"""The load generator: Mosquitto's own C clients, so the load costs the 2-core box little CPU.

A Python paho publisher plus a paho subscriber for the replies cost about
0.4 ms of CPU per message here, more than the echo process under test; on a
2-core machine that load generator, not the consumer, set the "ceiling". So:

* :class:`Feeder` is ``mosquitto_pub -l`` (QoS 1, MQTT 5, TCP_NODELAY, up to
  1,000 in flight): each line written to its stdin is one message. Flooding
  writes every line at once; a paced run writes each line at its scheduled
  time and stamps the send time (``time.time()``) just before the write.
* :class:`Collector` is ``mosquitto_sub -F "%U %p"`` (QoS 1) writing each reply
  with its receive time (CLOCK_REALTIME, nanoseconds) to a file. Replies are
  paired with readings by the ``id`` they carry (``<boot>|<seq>``).

Both are child processes stopped by their PID; every wait is bounded.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import orjson

from streamlearn.bench.common import TOPIC


def tools_available() -> bool:
    return all(shutil.which(t) for t in ("mosquitto_pub", "mosquitto_sub"))


def _base(tool: str, port: int, client_id: str) -> list[str]:
    return [tool, "-h", "127.0.0.1", "-p", str(port), "-V", "5", "-q", "1", "--nodelay", "-i", client_id]


def _line_buffered(args: list[str]) -> list[str]:
    """Line-buffered stdout (``stdbuf -oL``), so output can be followed while it runs."""
    stdbuf = shutil.which("stdbuf")
    return [stdbuf, "-oL", *args] if stdbuf else args


class Feeder:
    """``mosquitto_pub -l`` on the readings topic.

    mosquitto_pub 2.0 disconnects at the end of its input without sending the
    lines it has read but not yet published (they are lost, and the broker logs
    a bogus "out of memory"), so input must stay open until every message is
    acknowledged. ``track_acks`` counts the PUBACKs (from ``-d`` output) for
    that; timed runs do not need it, because they wait for every reply first.
    """

    def __init__(self, port: int, name: str, topic: str = TOPIC, track_acks: bool = False) -> None:
        exe = shutil.which("mosquitto_pub")
        if exe is None:
            raise FileNotFoundError("mosquitto_pub is not installed (Debian/Ubuntu: apt-get install mosquitto-clients)")
        args = _base(exe, port, f"bench-feed-{name}") + ["-M", "1000", "-l", "-t", topic]
        if track_acks:
            args = _line_buffered(args + ["-d"])
        self.acked = 0
        self._reader: threading.Thread | None = None
        self.proc = subprocess.Popen(
            args, stdin=subprocess.PIPE,
            stdout=subprocess.PIPE if track_acks else subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        if track_acks:
            self._reader = threading.Thread(target=self._count_acks, daemon=True)
            self._reader.start()
        self.pid = self.proc.pid
        self.sent = 0

    def _count_acks(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if b"received PUBACK" in line:
                self.acked += 1

    def wait_acked(self, n: int, timeout: float) -> bool:
        """Until the broker acknowledged ``n`` messages (needs ``track_acks``)."""
        deadline = time.monotonic() + timeout
        while self.acked < n:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                return False
            time.sleep(0.01)
        return True

    def feed(self, payloads: list[bytes]) -> float:
        """Write every line now (blocks while the pipe is full); returns the start time."""
        assert self.proc.stdin is not None
        data = b"".join(p + b"\n" for p in payloads)
        t0 = time.time()
        self.proc.stdin.write(data)
        self.proc.stdin.flush()
        self.sent += len(payloads)
        return t0

    def feed_background(self, payloads: list[bytes]) -> tuple[float, threading.Thread]:
        """:meth:`feed` in a thread (the caller keeps polling); returns the start time and the thread."""
        t0 = time.time()
        thread = threading.Thread(target=self.feed, args=(payloads,), daemon=True)
        thread.start()
        return t0, thread

    def feed_paced(self, payloads: list[bytes], rate: float, deadline: float) -> np.ndarray:
        """One line every 1/rate s (catching up in bursts after an oversleep); send times."""
        assert self.proc.stdin is not None
        fd = self.proc.stdin
        sent = np.full(len(payloads), np.nan)
        clock, wall = time.monotonic, time.time
        start = clock() + 0.01
        for i, payload in enumerate(payloads):
            due = start + i / rate
            delay = due - clock()
            if delay > 0:
                time.sleep(delay)
            sent[i] = wall()
            fd.write(payload + b"\n")
            fd.flush()
            if clock() > deadline:
                break
        self.sent += int(np.sum(~np.isnan(sent)))
        return sent

    def close(self, timeout: float = 120.0) -> bool:
        """End of input: mosquitto_pub sends what is queued, waits for the acks and exits."""
        try:
            if self.proc.stdin is not None and not self.proc.stdin.closed:
                self.proc.stdin.close()
        except BrokenPipeError:
            pass
        try:
            self.proc.wait(timeout=timeout)
            return self.proc.returncode == 0
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)
            return False
        finally:
            if self._reader is not None:
                self._reader.join(timeout=5)
            if self.proc.stdout is not None:
                self.proc.stdout.close()


class Collector:
    """``mosquitto_sub`` on reply topics (plus a status topic to know it is subscribed)."""

    def __init__(self, port: int, name: str, topics: list[str], path: Path) -> None:
        exe = shutil.which("mosquitto_sub")
        if exe is None:
            raise FileNotFoundError("mosquitto_sub is not installed (Debian/Ubuntu: apt-get install mosquitto-clients)")
        args = _base(exe, port, f"bench-collect-{name}") + ["-F", "%U %p"]
        for t in topics:
            args += ["-t", t]
        args = _line_buffered(args)
        self.path = path
        self._out = open(path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(args, stdout=self._out, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        self.pid = self.proc.pid
        self._offset = 0
        self._lines = 0
        self._replies = 0

    def _poll(self) -> None:
        with open(self.path, "rb") as fh:
            fh.seek(self._offset)
            data = fh.read()
        end = data.rfind(b"\n") + 1  # only whole lines
        chunk = data[:end]
        self._offset += end
        self._lines += chunk.count(b"\n")
        self._replies += chunk.count(b'"id"')

    def replies(self) -> int:
        self._poll()
        return self._replies

    def wait_lines(self, n: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            self._poll()
            if self._lines >= n:
                return True
            if time.monotonic() > deadline or self.proc.poll() is not None:
                return False
            time.sleep(0.01)

    def wait_replies(self, n: int, timeout: float, idle: float = 15.0) -> bool:
        """Until ``n`` replies in all, the timeout, or ``idle`` s without a new one."""
        deadline = time.monotonic() + timeout
        last, last_change = -1, time.monotonic()
        while True:
            count = self.replies()
            now = time.monotonic()
            if count >= n:
                return True
            if count != last:
                last, last_change = count, now
            if now > deadline or now - last_change > idle or self.proc.poll() is not None:
                return False
            time.sleep(0.005)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._out.close()

    def receive_times(self, boot: str, n: int) -> tuple[np.ndarray, int]:
        """Receive time of the reply to each reading ``seq`` 0..n-1 of ``boot`` (NaN: none); duplicates."""
        recv = np.full(n, np.nan)
        dup = 0
        prefix = boot + "|"
        with open(self.path, "rb") as fh:
            for line in fh:
                ts, _, payload = line.partition(b" ")
                if b'"id"' not in payload:
                    continue
                try:
                    rid = str(orjson.loads(payload).get("id"))
                except orjson.JSONDecodeError:
                    continue
                if not rid.startswith(prefix):
                    continue
                i = int(rid[len(prefix):])
                if 0 <= i < n:
                    if np.isnan(recv[i]):
                        recv[i] = float(ts)
                    else:
                        dup += 1
        return recv, dup
