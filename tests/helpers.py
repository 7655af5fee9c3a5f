"""Test helpers: waiting for conditions, an MQTT collector, the agent as a process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import tomli_w
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

ROOT = Path(__file__).resolve().parent.parent


def wait_for(condition: Callable[[], Any], timeout: float, interval: float = 0.02, what: str = "") -> Any:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or condition}")
        time.sleep(interval)


def base_config(store: Path, port: int, **stream_overrides: Any) -> dict[str, Any]:
    """A one-stream regression config against a private broker."""
    stream: dict[str, Any] = {
        "name": "boiler",
        "topic": "sensors/+/boiler",
        "device": {"topic_level": 1},
        "features": ["t_in", "t_out", "flow", "load"],
        "task": "regression",
        "label": {"source": "payload", "field": "power"},
        "id_fields": ["boot", "seq"],
        "sequence_field": "seq",
        "model": {"kind": "mlp", "hidden": [32, 32]},
        "optimizer": {"name": "sgd", "lr": 0.02},
    }
    stream.update(stream_overrides)
    return {
        "agent": {"gateway": "gw"},
        "mqtt": {"host": "127.0.0.1", "port": port, "client_id": f"streamlearn-test-{port}"},
        "store": {"path": str(store), "checkpoint_every_messages": 200, "checkpoint_every_seconds": 2.0},
        "streams": [stream],
    }


def write_config(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(tomli_w.dumps(data))
    return path


class Collector:
    """Subscribes and keeps every message received, with a condition to wait on."""

    def __init__(self, port: int, topics: list[str], client_id: str = "test-collector") -> None:
        self.messages: list[tuple[str, bytes]] = []
        self._cond = threading.Condition()
        self._ready = threading.Event()
        self._client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id,
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        self._client.on_message = self._on_message
        self._client.on_subscribe = lambda c, u, mid, rc, p: self._ready.set()
        self._client.on_connect = lambda c, u, f, rc, p: c.subscribe([(t, 1) for t in topics])
        self._client.connect("127.0.0.1", port)
        self._client.loop_start()
        if not self._ready.wait(10):
            raise AssertionError("collector could not subscribe")

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        with self._cond:
            self.messages.append((msg.topic, msg.payload))
            self._cond.notify_all()

    def matching(self, suffix: str) -> list[tuple[str, bytes]]:
        with self._cond:
            return [m for m in self.messages if m[0].endswith(suffix)]

    def wait_count(self, suffix: str, n: int, timeout: float) -> list[tuple[str, bytes]]:
        with self._cond:
            ok = self._cond.wait_for(lambda: sum(1 for m in self.messages if m[0].endswith(suffix)) >= n, timeout)
        found = self.matching(suffix)
        assert ok, f"only {len(found)} of {n} messages on *{suffix} within {timeout} s"
        return found

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


class AgentProcess:
    """``streamlearn run -c CONFIG`` as a child process, stopped by its PID."""

    def __init__(self, config_path: Path, log_path: Path, env: dict[str, str] | None = None) -> None:
        self.config_path = config_path
        self.log_path = log_path
        self.env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self, extra_env: dict[str, str] | None = None) -> AgentProcess:
        env = {**os.environ, **self.env, **(extra_env or {})}
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "streamlearn", "run", "-c", str(self.config_path), "--log-level", "info"],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
        )
        log.close()
        self.starts += 1
        return self

    def terminate(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=timeout)
        self.proc = None
        return code

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(timeout=30)
        self.proc = None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop_quietly(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        self.proc = None
