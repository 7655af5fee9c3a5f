"""Child processes and broker helpers of the benchmarks (stopped by PID, bounded waits)."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parents[2]


class Child:
    """A child process; stdout lines go to a queue (or to a log file)."""

    def __init__(self, args: list[str], log_path: Path | None = None, stdin: bool = False) -> None:
        self.lines: queue.Queue[str] = queue.Queue()
        self.log_path = log_path
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self._reader = None
        if log_path is not None:
            with open(log_path, "ab") as log:
                self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env,
                                             stdin=subprocess.DEVNULL)
        else:
            self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=ROOT,
                                         env=env, stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                                         text=True)
            self._reader: threading.Thread | None = threading.Thread(target=self._read, daemon=True)
            self._reader.start()
        self.pid = self.proc.pid

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put("\x00EOF")

    def expect(self, tag: str, timeout: float) -> dict[str, Any]:
        """Wait for a line ``TAG [json]``; returns the JSON (or {})."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"pid {self.pid}: no {tag} within {timeout:g} s")
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            if line == "\x00EOF":
                raise RuntimeError(f"pid {self.pid} exited (code {self.proc.poll()}) before {tag}")
            if line == tag or line.startswith(tag + " "):
                rest = line[len(tag):].strip()
                return orjson.loads(rest) if rest else {}

    def send(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, wait; SIGKILL if it does not exit. Only this child, by its PID."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=timeout)
        if self._reader is not None:
            self._reader.join(timeout=5)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None and not pipe.closed:
                try:
                    pipe.close()
                except OSError:
                    pass
        return self.proc.returncode


class StatusWatcher:
    """Watches retained ``online``/``offline`` status topics of agents and echoes."""

    def __init__(self, port: int) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

        self._cond = threading.Condition()
        self.last: dict[str, tuple[bytes, float]] = {}
        self._client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                                   client_id=f"bench-watcher-{os.getpid()}", protocol=MQTTProtocolVersion.MQTTv5)
        ready = threading.Event()
        self._client.on_connect = lambda c, u, f, rc, p: c.subscribe(
            [("streamlearn/+/status", 1), ("bench/+/status", 1)])
        self._client.on_subscribe = lambda c, u, mid, rc, p: ready.set()
        self._client.on_message = self._on_message
        self._client.connect("127.0.0.1", port)
        self._client.loop_start()
        if not ready.wait(10):
            raise ConnectionError("status watcher could not subscribe")

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        with self._cond:
            self.last[msg.topic] = (msg.payload, time.monotonic())
            self._cond.notify_all()

    def wait_online(self, topic: str, after: float, timeout: float) -> float:
        """Monotonic time when ``topic`` said ``online`` (after ``after``)."""
        def ok() -> bool:
            v = self.last.get(topic)
            return v is not None and v[0] == b"online" and v[1] >= after
        with self._cond:
            if not self._cond.wait_for(ok, timeout):
                raise TimeoutError(f"{topic} did not say online within {timeout:g} s")
            return self.last[topic][1]

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


def drop_session(port: int, client_id: str) -> None:
    """Delete the broker's persistent session of a stopped client (so it queues no more)."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    c = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id,
                    protocol=MQTTProtocolVersion.MQTTv5)
    done = threading.Event()
    c.on_connect = lambda *a: done.set()
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 0
    c.connect("127.0.0.1", port, clean_start=True, properties=props)
    c.loop_start()
    done.wait(10)
    c.disconnect()
    c.loop_stop()
