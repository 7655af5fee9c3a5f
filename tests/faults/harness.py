"""Real parts for the fault tests: the agent process, sensors, a prediction watcher.

* :class:`Agent` runs ``python -m streamlearn run -c CONFIG`` as a child process
  (optionally behind a command prefix such as ``nsenter``), stops it only by its
  PID, pumps its output through a pipe into a log file (so a file-size limit on
  the agent cannot swallow its log) and parses the timestamps of its log lines.
* :class:`Sensors` publishes simulated readings at QoS 1 with a bounded window,
  survives broker restarts (paho reconnects and resends unacknowledged
  publishes) and records when the broker acknowledged each message.
* :class:`Watch` subscribes to the agent's predictions, dead letters and status
  and keeps each with its arrival time.
"""

from __future__ import annotations

import bisect
import collections
import datetime as _dt
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from streamlearn.sim import SimMessage
from tests.helpers import ROOT, base_config, wait_for, write_config

__all__ = ["ROOT", "Agent", "Sensors", "Watch", "agent_config", "wait_for", "wait_settled", "wait_until", "write_config", "rss_kb", "file_size"]

_LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


def agent_config(store: Path, port: int, client_id: str, **stream: Any) -> dict[str, Any]:
    """tests.helpers.base_config with a fixed client id and fault-test defaults."""
    data = base_config(store, port, **stream)
    data["mqtt"]["client_id"] = client_id
    data["mqtt"]["reconnect_max_delay"] = 5
    return data


def wait_until(condition: Callable[[], Any], timeout: float, interval: float = 0.02) -> bool:
    """Like wait_for, but returns False at the timeout instead of failing (the test records it)."""
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)


def wait_settled(db: Path, target: int, timeout: float, quiet_s: float = 3.0) -> bool:
    """Wait until ``target`` messages are stored and checkpointed (True), or until nothing new
    was stored for ``quiet_s`` and the checkpoint caught up with what was (False: some never came)."""
    from tests.faults.checker import checkpoint_position, inbox_max_seq

    deadline = time.monotonic() + timeout
    last, changed = -1, time.monotonic()
    while time.monotonic() < deadline:
        stored, position = inbox_max_seq(db), checkpoint_position(db)
        if stored != last:
            last, changed = stored, time.monotonic()
        if position >= stored and (stored >= target or time.monotonic() - changed >= quiet_s):
            return stored >= target
        time.sleep(0.1)
    return False


def rss_kb(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


class Agent:
    """The agent as a child process, stopped by its PID."""

    def __init__(self, config_path: Path, log_path: Path, prefix: list[str] | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.config_path = config_path
        self.log_path = log_path
        self.prefix = prefix or []
        self.env = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.started_at = 0.0
        self.exit_codes: list[int] = []
        self._pump: threading.Thread | None = None
        self._log_lock = threading.Lock()

    def start(self, extra_env: dict[str, str] | None = None, config_path: Path | None = None) -> Agent:
        assert self.proc is None or self.proc.poll() is not None, "agent already running"
        env = {**os.environ, **self.env}
        env.pop("STREAMLEARN_FAULT", None)  # only where a test asks for it
        env.update(extra_env or {})
        cmd = [*self.prefix, sys.executable, "-m", "streamlearn", "run", "-c", str(config_path or self.config_path),
               "--log-level", "info"]
        with self._log_lock, open(self.log_path, "ab") as log:
            log.write(f"=== start {self.starts + 1} at {time.time():.3f}: {' '.join(cmd[-5:])}\n".encode())
        self.started_at = time.time()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        self._pump = threading.Thread(target=self._copy_output, args=(self.proc,), daemon=True)
        self._pump.start()
        self.starts += 1
        return self

    def _copy_output(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        for line in iter(proc.stdout.readline, b""):
            with self._log_lock, open(self.log_path, "ab") as log:
                log.write(line)
        proc.stdout.close()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_exit(self, timeout: float) -> int:
        assert self.proc is not None
        code = self.proc.wait(timeout=timeout)
        if self._pump is not None:
            self._pump.join(timeout=10)
        self.exit_codes.append(code)
        self.proc = None
        return code

    def terminate(self, timeout: float = 60.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.wait_exit(timeout)

    def kill(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        return self.wait_exit(30)

    def stop_quietly(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        if self._pump is not None:
            self._pump.join(timeout=5)
        self.proc = None

    def rss_kb(self) -> int | None:
        return rss_kb(self.pid) if self.alive() else None

    # -- the log ----------------------------------------------------------------------

    def log(self) -> str:
        with self._log_lock:
            return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_of_start(self, n: int | None = None) -> str:
        """The log of the n-th start (default: the latest)."""
        parts = self.log().split("=== start ")
        n = self.starts if n is None else n
        return parts[n] if 0 < n < len(parts) else ""

    def events(self, pattern: str, since: float = 0.0, current: bool = False) -> list[tuple[float, str]]:
        """(epoch time, line) of log lines matching ``pattern`` at or after ``since``
        (only in the log of the latest start with ``current``)."""
        rx = re.compile(pattern)
        out = []
        text = self.log_of_start() if current else self.log()
        for line in text.splitlines():
            m = _LOG_TIME.match(line)
            if m and rx.search(line):
                t = _dt.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
                if t >= since:
                    out.append((t, line))
        return out

    def wait_log(self, pattern: str, timeout: float, since: float = 0.0) -> tuple[float, str]:
        """The first line matching ``pattern`` logged by the current process (after ``since``)."""

        def found() -> Any:
            ev = self.events(pattern, since, current=True)
            if ev:
                return ev[0]
            if not self.alive():
                raise AssertionError(f"agent exited while waiting for {pattern!r}:\n{self.log()[-3000:]}")
            return None

        return wait_for(found, timeout, interval=0.05, what=f"log line {pattern!r}")

    def final_status(self) -> dict[str, Any] | None:
        """The counters the agent logs when it stops after SIGTERM ("stopped: {...}")."""
        lines = [ln for ln in self.log().splitlines() if "stopped: {" in ln]
        if not lines:
            return None
        text = lines[-1].split("stopped: ", 1)[1]
        try:
            import ast

            return ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return None


class Sensors:
    """A QoS 1 publisher that survives broker restarts and timestamps every PUBACK."""

    def __init__(self, port: int, client_id: str, window: int = 200, host: str = "127.0.0.1") -> None:
        self.window = window
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._outstanding = 0
        self._mid_index: dict[int, int] = {}
        self._early: dict[int, tuple[float, int]] = {}
        self.ack_time: dict[int, float] = {}
        self.refused: dict[int, int] = {}
        self.sent = 0
        self.error: BaseException | None = None
        self.connects = 0
        self._connected = threading.Event()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id,
                             protocol=MQTTProtocolVersion.MQTTv5)
        client.max_inflight_messages_set(min(window, 1000))
        client.max_queued_messages_set(0)
        client.reconnect_delay_set(0.1, 1)
        client.on_publish = self._on_publish
        client.on_connect = self._on_connect
        client.on_disconnect = lambda c, u, f, rc, p: self._connected.clear()
        self._client = client
        client.connect(host, port, keepalive=30)
        client.loop_start()
        if not self._connected.wait(10):
            self.close()
            raise ConnectionError(f"sensors could not connect to {host}:{port}")

    def _on_connect(self, client: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        if not rc.is_failure:
            self.connects += 1
            self._connected.set()

    def _on_publish(self, client: Any, userdata: Any, mid: int, rc: Any, props: Any) -> None:
        now = time.time()
        code = getattr(rc, "value", 0) or 0
        with self._cond:
            index = self._mid_index.pop(mid, None)
            if index is None:
                self._early[mid] = (now, code)
            else:
                self._record(index, now, code)
            self._outstanding -= 1
            self._cond.notify_all()

    def _record(self, index: int, now: float, code: int) -> None:
        if code >= 0x80:
            self.refused[index] = code
        else:
            self.ack_time[index] = now

    def publish(self, index: int, msg: SimMessage, timeout: float = 120.0) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: self._outstanding < self.window, timeout):
                raise TimeoutError(f"{self._outstanding} publishes unacknowledged after {timeout} s")
            self._outstanding += 1
        info = self._client.publish(msg.topic, msg.payload, qos=1)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            with self._cond:
                self._outstanding -= 1
                self.refused[index] = -int(info.rc)
            return
        with self._cond:
            early = self._early.pop(info.mid, None)
            if early is not None:
                self._record(index, *early)
            else:
                self._mid_index[info.mid] = index
        self.sent += 1

    def publish_all(self, messages: list[SimMessage], rate: float | None = None, start: int = 0,
                    on_progress: Callable[[int], None] | None = None) -> int:
        t0 = time.perf_counter()
        for n, msg in enumerate(messages):
            if self._stop.is_set():
                break
            if rate:
                delay = t0 + n / rate - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
            self.publish(start + n, msg)
            if on_progress is not None:
                on_progress(start + n + 1)
        return len(messages)

    def start_background(self, messages: list[SimMessage], rate: float | None = None) -> Sensors:
        def run() -> None:
            try:
                self.publish_all(messages, rate)
                self.flush(300)
            except BaseException as exc:  # noqa: BLE001 - reported to the test thread
                self.error = exc

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        return self

    def join(self, timeout: float) -> None:
        assert self._thread is not None
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise AssertionError(f"publisher still running after {timeout} s ({self.sent} sent)")
        if self.error is not None:
            raise AssertionError(f"publisher failed: {self.error!r}")

    @property
    def acked(self) -> int:
        return len(self.ack_time)

    def flush(self, timeout: float = 120.0) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._outstanding == 0, timeout)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread.is_alive():
            self._thread.join(10)
        self._client.disconnect()
        self._client.loop_stop()


class Watch:
    """Keeps every prediction, dead letter and status message with its arrival time."""

    def __init__(self, port: int, client_id: str, gateway: str = "gw", prefix: str = "streamlearn",
                 extra_topics: Iterable[str] = ()) -> None:
        self.lock = threading.Condition()
        self.predictions: list[tuple[float, dict[str, Any]]] = []
        self._live_times: list[float] = []
        self.dead_letters: list[tuple[float, dict[str, Any]]] = []
        self.status: list[tuple[float, str, bytes]] = []
        self.other: list[tuple[float, str, bytes]] = []
        self.first_seen: dict[tuple[str, Any], float] = {}
        self.live_ids: set[tuple[str, Any]] = set()
        base = f"{prefix}/{gateway}"
        self.topics = [f"{base}/+/+/prediction", f"{base}/dead-letter", f"{base}/status", f"{base}/status/#",
                       *extra_topics]
        self._ready = threading.Event()
        client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id,
                             protocol=MQTTProtocolVersion.MQTTv5)
        client.reconnect_delay_set(0.1, 1)
        client.on_message = self._on_message
        client.on_connect = self._on_connect
        client.on_subscribe = lambda c, u, mid, rc, p: self._ready.set()
        self._client = client
        # no session expiry: the broker forgets this watcher when it disconnects (a session left
        # behind would make the broker queue and persist every later message of the test for it)
        client.connect("127.0.0.1", port, keepalive=30)
        client.loop_start()
        if not self._ready.wait(10):
            self.close()
            raise AssertionError("the watcher could not subscribe")

    def _on_connect(self, client: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        if not rc.is_failure:
            client.subscribe([(t, 1) for t in self.topics])

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        now = time.time()
        topic = msg.topic
        with self.lock:
            if topic.endswith("/prediction"):
                try:
                    body = orjson.loads(msg.payload)
                except orjson.JSONDecodeError:
                    return
                self.predictions.append((now, body))
                ident = (body.get("device"), body.get("id"))
                self.first_seen.setdefault(ident, now)
                if not body.get("replay"):
                    self.live_ids.add(ident)
                    self._live_times.append(now)
            elif topic.endswith("/dead-letter"):
                try:
                    self.dead_letters.append((now, orjson.loads(msg.payload)))
                except orjson.JSONDecodeError:
                    pass
            elif "/status" in topic:
                self.status.append((now, topic, bytes(msg.payload)))
            else:
                self.other.append((now, topic, bytes(msg.payload)))
            self.lock.notify_all()

    def distinct(self) -> int:
        with self.lock:
            return len(self.first_seen)

    def first_live_after(self, t: float) -> float | None:
        """Arrival time of the first non-replay prediction that arrived after ``t``."""
        with self.lock:
            i = bisect.bisect_left(self._live_times, t)
            return self._live_times[i] if i < len(self._live_times) else None

    def wait_distinct(self, n: int, timeout: float) -> int:
        with self.lock:
            ok = self.lock.wait_for(lambda: len(self.first_seen) >= n, timeout)
            got = len(self.first_seen)
        if not ok:
            raise AssertionError(f"only {got} of {n} readings got a prediction within {timeout} s")
        return got

    def per_reading(self) -> dict[tuple[str, Any], list[dict[str, Any]]]:
        out: dict[tuple[str, Any], list[dict[str, Any]]] = collections.defaultdict(list)
        with self.lock:
            for _, body in self.predictions:
                out[(body.get("device"), body.get("id"))].append(body)
        return out

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()
