"""Simulated sensors for demos, tests and benchmarks.

:class:`SensorSimulator` makes plausible readings for any configured stream:
each device's fields follow slow sinusoids plus noise, and the target is a fixed
random smooth function of the fields that changes abruptly at ``drift_at`` (a
concept drift, as when a sensor is replaced). Classification targets threshold
that function; forecast streams get a field that is a noisy periodic signal.
Every reading carries the stream's id fields (a boot id and a per-device
sequence number) so a checker can count what was lost or learned twice.

:class:`Publisher` sends messages at QoS 1 with a bounded window of unacknowledged
publishes, and can wait until the broker has acknowledged all of them.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from streamlearn.config import StreamConfig


@dataclass(slots=True)
class SimMessage:
    topic: str
    payload: bytes
    kind: str  # "reading", "label" or "bad"
    device: str
    seq: int


BAD_PAYLOADS: list[bytes] = [
    b'{"t_in": NaN}',
    b"not json at all",
    b"",
    b'{"unterminated": ',
    b"\xff\xfe\x00garbage",
    b"[1, 2, 3]",
    b'{"a": 1e400}',
]


def topic_for(filter_text: str, device: str, level: int | None) -> str:
    """A concrete topic matching ``filter_text`` with ``device`` at ``level``.

    >>> topic_for("sensors/+/boiler", "d1", 1)
    'sensors/d1/boiler'
    """
    parts = filter_text.split("/")
    out = []
    for i, part in enumerate(parts):
        if part == "+":
            out.append(device if i == level else "x")
        elif part == "#":
            out.append(device if i == level else "data")
        else:
            out.append(part)
    return "/".join(out)


class SensorSimulator:
    """Readings (and labels) for one stream from ``devices`` simulated sensors.

    Parameters
    ----------
    stream
        The stream config the readings must satisfy.
    devices
        Number of devices.
    seed
        Everything is reproducible from it.
    drift_at
        Reading index (over all devices) where the target function changes; None: never.
    noise
        Standard deviation of the target noise, relative to the target's spread.
    bad_every
        Every n-th message is a bad payload (0: none).
    boot
        The boot id stamped into readings (a restarted sensor gets a new one).
    period_range
        The fields' periods, in readings of one device: short periods make a
        stream whose inputs keep moving (a model only knows the recent past).
    """

    def __init__(
        self,
        stream: StreamConfig,
        devices: int = 3,
        seed: int = 0,
        drift_at: int | None = None,
        noise: float = 0.05,
        bad_every: int = 0,
        boot: str = "b0",
        period_range: tuple[float, float] = (50.0, 400.0),
    ) -> None:
        self.stream = stream
        self.devices = [f"dev{i:03d}" for i in range(devices)]
        self.rng = np.random.default_rng(seed)
        self.drift_at = drift_at
        self.noise = noise
        self.bad_every = bad_every
        self.boot = boot
        n = len(stream.features)
        self._phase = self.rng.uniform(0, 2 * math.pi, size=(devices, n))
        self._period = self.rng.uniform(*period_range, size=(devices, n))
        self._offset = self.rng.uniform(10, 30, size=(devices, n))
        self._amp = self.rng.uniform(2, 10, size=(devices, n))
        self._w = [self.rng.normal(size=(n, 16)), self.rng.normal(size=(n, 16))]
        self._v = [self.rng.normal(size=16), self.rng.normal(size=16)]
        self._seq = [0] * devices
        self._i = 0
        self._thresholds: list[float] = []

    def _fields(self, d: int, t: int) -> np.ndarray:
        phase = self._phase[d] + 2 * math.pi * t / self._period[d]
        return self._offset[d] + self._amp[d] * np.sin(phase) + self.rng.normal(0, 0.3, size=phase.shape)

    def _truth(self, x: np.ndarray, concept: int) -> float:
        z = (x - 20.0) / 8.0
        return float(np.tanh(z @ self._w[concept]) @ self._v[concept]) * 3.0 + 20.0

    def target_of(self, x: np.ndarray, concept: int) -> Any:
        y = self._truth(x, concept)
        task = self.stream.task
        y_noisy = y + self.rng.normal(0, self.noise * 5.0)
        if task == "regression":
            return round(y_noisy, 4)
        classes = self.stream.classes
        if task == "binary":
            cls = int(y_noisy > 20.0)
            return classes[cls] if classes else bool(cls)
        assert classes is not None
        k = len(classes)
        edges = [20.0 + 4.0 * (j - (k - 2) / 2) for j in range(k - 1)]
        return classes[int(np.searchsorted(edges, y_noisy))]

    def messages(self, count: int) -> Iterator[SimMessage]:
        """``count`` readings (labels for a label topic come on top, bad payloads count)."""
        s = self.stream
        level = s.device.topic_level
        produced = 0
        while produced < count:
            i = self._i
            self._i += 1
            d = i % len(self.devices)
            device = self.devices[d]
            topic = topic_for(s.topic, device, level)
            produced += 1
            if self.bad_every and i % self.bad_every == self.bad_every - 1:
                bad = BAD_PAYLOADS[(i // self.bad_every) % len(BAD_PAYLOADS)]
                yield SimMessage(topic, bad, "bad", device, -1)
                continue
            t = self._seq[d]
            self._seq[d] += 1
            concept = 1 if (self.drift_at is not None and i >= self.drift_at) else 0
            x = self._fields(d, t)
            body: dict[str, Any] = {f: round(float(v), 4) for f, v in zip(s.features, x)}
            if s.device.field is not None:
                body[s.device.field] = device
            for field in s.id_fields:
                body[field] = t if field == (s.sequence_field or "seq") else self.boot
            if s.timestamp_field is not None:
                body[s.timestamp_field] = round(time.time(), 3)
            label = s.label
            if label.source == "payload":
                body[label.field] = self.target_of(x, concept)
            elif label.source == "forecast":
                if label.field not in body:
                    body[label.field] = round(self._truth(x, concept), 4)
            else:
                assert label.id_field is not None
                join = f"{device}-{self.boot}-{t}"
                body[label.id_field] = join
            yield SimMessage(topic, orjson.dumps(body), "reading", device, t)
            if label.source == "topic":
                assert label.topic is not None
                label_body = {label.label_id: join, label.field: self.target_of(x, concept)}
                yield SimMessage(topic_for(label.topic, device, level), orjson.dumps(label_body),
                                 "label", device, t)


class Publisher:
    """A QoS 1 publisher with a bounded window of unacknowledged messages.

    Parameters
    ----------
    host, port
        The broker.
    window
        At most this many publishes await their PUBACK (back-pressure instead of
        paho's silent rc 15 at 65,535). Keep it at or below the broker's receive
        maximum (Mosquitto's ``max_inflight_messages``, 20 by default).
    client_id
        Its MQTT client id.
    """

    def __init__(self, host: str, port: int, window: int = 20, client_id: str = "streamlearn-sim") -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

        self._mqtt = mqtt
        self.window = window
        self._cond = threading.Condition()
        self._outstanding = 0
        self.acked = 0
        self._client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id,
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        self._client.max_inflight_messages_set(min(window, 1000))
        self._client.on_publish = self._on_publish
        self._connected = threading.Event()
        self._client.on_connect = lambda c, u, f, rc, p: self._connected.set()
        self._client.connect(host, port, keepalive=30)
        self._client.loop_start()
        if not self._connected.wait(10):
            self.close()
            raise ConnectionError(f"publisher could not connect to {host}:{port}")

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason_code: Any, properties: Any) -> None:
        with self._cond:
            self._outstanding -= 1
            self.acked += 1
            self._cond.notify_all()

    def publish(self, topic: str, payload: bytes, qos: int = 1, timeout: float = 30.0) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: self._outstanding < self.window, timeout):
                raise TimeoutError(f"{self._outstanding} publishes unacknowledged after {timeout} s")
            self._outstanding += 1
        info = self._client.publish(topic, payload, qos=qos)
        if info.rc not in (0, self._mqtt.MQTT_ERR_NO_CONN):
            with self._cond:
                self._outstanding -= 1
            raise RuntimeError(f"publish failed: rc {info.rc}")
        if qos == 0:
            with self._cond:
                self._outstanding -= 1

    def publish_all(self, messages: list[SimMessage] | Iterator[SimMessage], rate: float | None = None) -> int:
        """Publish every message (at ``rate`` per second, or as fast as the window allows)."""
        n = 0
        start = time.perf_counter()
        for msg in messages:
            if rate:
                due = start + n / rate
                delay = due - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
            self.publish(msg.topic, msg.payload)
            n += 1
        return n

    def flush(self, timeout: float = 60.0) -> bool:
        """Wait until the broker acknowledged every publish."""
        with self._cond:
            return self._cond.wait_for(lambda: self._outstanding == 0, timeout)

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()
