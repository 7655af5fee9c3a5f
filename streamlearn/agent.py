"""The agent: wires transport, codec, store and stream runners, and runs the loop.

One pass of the loop::

    transport.receive(batch)
      -> decode + validate each message (bad ones become dead letters)
      -> drop redeliveries (Deduper)
      -> store.append(inbox rows, dead letters)   one committed transaction
      -> transport.ack(batch)                      only now
      -> for each new inbox row, in order: StreamRunner.handle -> publish predictions
      -> every N messages or T seconds: store.write_checkpoint(position, state)

On start the agent loads the last checkpoint and replays the inbox rows after its
position through the same runners before it connects, so every stored message is
learned exactly once however the previous run ended.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import orjson

from streamlearn.clock import Clock, SystemClock
from streamlearn.codec import Codec, Reading
from streamlearn.config import Config
from streamlearn.dedupe import NEW, Deduper, payload_hash
from streamlearn.errors import DecodeError, StoreError
from streamlearn.store import DeadLetter, InboxRow, SQLiteStore, Store
from streamlearn.stream import StreamRunner
from streamlearn.transport import Message, Transport

logger = logging.getLogger(__name__)

REPLAY_CHUNK = 1000
MAX_DEVICES_PER_STREAM = 10_000


class Agent:
    """The streamlearn agent.

    Parameters
    ----------
    config
        The validated configuration.
    transport
        Where messages come from and predictions go.
    store
        The agent's SQLite store (it is the only writer).
    clock
        Time source (tests inject a manual one).
    """

    def __init__(self, config: Config, transport: Transport, store: Store, clock: Clock | None = None) -> None:
        self.config = config
        self.transport = transport
        self.store = store
        self.clock = clock or SystemClock()
        self.codec = Codec(config.streams)
        self.deduper = Deduper(store)
        prefix, gateway = config.mqtt.topic_prefix, config.agent.gateway
        self.runners = {s.name: StreamRunner(s, prefix, gateway) for s in config.streams}
        self.dead_letter_topic = f"{prefix}/{gateway}/dead-letter"
        self.position = 0
        self.counters = {"received": 0, "redeliveries": 0, "dead_letters": 0, "processed": 0,
                         "replayed": 0, "checkpoints": 0, "store_errors": 0, "internal_errors": 0}
        self._since_checkpoint = 0
        self._last_checkpoint = self.clock.monotonic()
        self._recovered = False
        self._stop = threading.Event()
        self.last_error: str | None = None

    # -- start-up ------------------------------------------------------------------

    def recover(self) -> int:
        """Load the last checkpoint and replay the inbox after it; returns rows replayed."""
        checkpoint = self.store.load_checkpoint()
        if checkpoint is not None:
            by_stream: dict[str, list[Any]] = {}
            for slot in checkpoint.slots:
                by_stream.setdefault(slot.stream, []).append(slot)
            for name, runner in self.runners.items():
                try:
                    runner.load(by_stream.get(name, []), checkpoint.streams.get(name))
                except ValueError as exc:
                    raise StoreError(
                        f"the checkpoint does not fit the config: {exc}. Use a new store path, "
                        "or restore the config the store was written with"
                    ) from None
            unknown = sorted(set(by_stream) - set(self.runners))
            if unknown:
                logger.warning("the store holds models of streams no longer configured: %s", unknown)
            self.position = checkpoint.position
            logger.info("resumed checkpoint %d at inbox position %d (%d models)",
                        checkpoint.id, checkpoint.position, len(checkpoint.slots))
        replayed = 0
        while True:
            rows = self.store.inbox_after(self.position, REPLAY_CHUNK)
            if not rows:
                break
            for row in rows:
                try:
                    reading = self.codec.decode(row.topic, row.payload, row.received_at)
                except DecodeError as exc:  # the config changed since the row was stored
                    logger.warning("inbox row %d no longer decodes (%s); skipped", row.seq, exc)
                    self.position = row.seq
                    continue
                self._process(row, reading, None)
            replayed += len(rows)
        self.counters["replayed"] += replayed
        if replayed:
            logger.info("replayed %d inbox rows after the checkpoint", replayed)
            self.checkpoint("replay")
        self._recovered = True
        return replayed

    # -- the loop --------------------------------------------------------------------

    def run(self, stop: threading.Event, max_messages: int | None = None) -> None:
        """Recover, connect and process until ``stop`` is set (or ``max_messages`` processed)."""
        self._stop = stop
        if not self._recovered:
            self.recover()
        self.transport.start(self.codec.subscriptions)
        try:
            while not stop.is_set():
                self.step(timeout=0.2)
                if max_messages is not None and self.counters["processed"] >= max_messages:
                    break
        finally:
            self._final_checkpoint()
            self.transport.stop()

    def step(self, timeout: float = 0.2) -> int:
        """Take one batch from the transport and process it; returns messages taken."""
        batch = self.transport.receive(self.config.agent.batch_max, timeout)
        if batch:
            self.ingest(batch)
        self.maybe_checkpoint()
        return len(batch)

    def ingest(self, batch: list[Message]) -> None:
        """Validate, store, acknowledge, then process one batch of messages."""
        self.counters["received"] += len(batch)
        rows: list[InboxRow] = []
        readings: list[tuple[InboxRow, Reading, float]] = []
        dead: list[DeadLetter] = []
        self.deduper.begin_batch()
        new_devices: dict[str, set[str]] = {}
        for msg in batch:
            phash = payload_hash(msg.topic, msg.payload)
            try:
                reading = self.codec.decode(msg.topic, msg.payload, msg.received_at)
                key = f"{reading.stream}|{reading.device}|{reading.msg_id}" if reading.msg_id else None
                if self.deduper.check(msg.topic, key, phash, msg.dup) != NEW:
                    self.counters["redeliveries"] += 1
                    continue
                self._check_device_room(reading, new_devices)
            except DecodeError as exc:
                dead.append(DeadLetter(msg.received_at, msg.topic, self._stream_of(msg.topic),
                                       exc.reason, exc.detail, msg.payload))
                continue
            row = InboxRow(msg.received_at, msg.topic, reading.stream, reading.kind, reading.device,
                           key, phash, msg.payload)
            rows.append(row)
            readings.append((row, reading, msg.received_mono))
        self._append_with_retry(rows, dead)
        self.transport.ack(batch)
        for d in dead:
            self._publish_dead_letter(d)
        for row, reading, received_mono in readings:
            self._process(row, reading, received_mono)

    def _check_device_room(self, reading: Reading, new_devices: dict[str, set[str]]) -> None:
        runner = self.runners[reading.stream]
        if reading.kind != "reading" or runner.slot_key(reading.device) in runner.slots:
            return
        pending = new_devices.setdefault(reading.stream, set())
        key = runner.slot_key(reading.device)
        if key in pending:
            return
        if len(runner.slots) + len(pending) >= MAX_DEVICES_PER_STREAM:
            raise DecodeError(
                "too_many_devices",
                f"stream {reading.stream!r} already has {MAX_DEVICES_PER_STREAM} device models",
            )
        pending.add(key)

    def _stream_of(self, topic: str) -> str | None:
        route = self.codec.route(topic)
        return None if route is None else route[0]

    def _append_with_retry(self, rows: list[InboxRow], dead: list[DeadLetter]) -> None:
        """Commit the batch; on a store error wait and retry, never acknowledging before."""
        delay = 0.1
        while True:
            try:
                self.store.append(rows, dead)
                if self.last_error is not None and self.last_error.startswith("store"):
                    logger.info("the store accepts writes again")
                    self.last_error = None
                return
            except StoreError as exc:
                self.counters["store_errors"] += 1
                self.last_error = f"store: {exc}"
                logger.error("cannot commit %d messages, retrying in %.1f s: %s", len(rows) + len(dead), delay, exc)
                if self._stop.wait(delay):
                    raise StoreError(f"stopped while the store refused writes: {exc}") from None
                delay = min(delay * 2, 5.0)

    def _process(self, row: InboxRow, reading: Reading, received_mono: float | None) -> None:
        runner = self.runners[reading.stream]
        try:
            outgoing = runner.handle(row, reading, received_mono, self.clock.monotonic())
        except Exception:  # a bug must not stop the gateway; the row is kept in the inbox
            self.counters["internal_errors"] += 1
            logger.exception("internal error processing inbox row %d (%s); skipped", row.seq, row.topic)
            outgoing = []
        for topic, payload in outgoing:
            self.transport.publish(topic, payload, qos=1)
        self.position = row.seq
        self.counters["processed"] += 1
        self._since_checkpoint += 1

    def _publish_dead_letter(self, d: DeadLetter) -> None:
        self.counters["dead_letters"] += 1
        if d.stream is not None and d.stream in self.runners:
            self.runners[d.stream].counters["dead_letters"] += 1
        body = {
            "topic": d.topic,
            "stream": d.stream,
            "reason": d.reason,
            "detail": d.detail,
            "size": len(d.payload),
            "received_at": d.received_at,
            "payload_head": d.payload[:200].decode("utf-8", "replace"),
        }
        self.transport.publish(self.dead_letter_topic, orjson.dumps(body), qos=1)

    # -- checkpoints ------------------------------------------------------------------

    def maybe_checkpoint(self) -> None:
        if self._since_checkpoint == 0:
            return
        cfg = self.config.store
        due = self._since_checkpoint >= cfg.checkpoint_every_messages or (
            self.clock.monotonic() - self._last_checkpoint >= cfg.checkpoint_every_seconds
        )
        if due:
            self.checkpoint("interval")

    def checkpoint(self, reason: str) -> bool:
        """Write every changed model and the position in one transaction."""
        slots = []
        for runner in self.runners.values():
            slots.extend(runner.dirty_slots())
        streams = {name: r.state() for name, r in self.runners.items()}
        metrics = [r.metrics_row() for r in self.runners.values()]
        events = [e for r in self.runners.values() for e in r.take_events()]
        try:
            self.store.write_checkpoint(self.position, slots, streams, metrics, reason, events)
        except StoreError as exc:
            self.counters["store_errors"] += 1
            self.last_error = f"store: {exc}"
            logger.error("checkpoint failed (state stays in memory, retried later): %s", exc)
            for runner in self.runners.values():  # write them again next time
                for slot in runner.slots.values():
                    slot.dirty = True
                runner.events[:0] = [e for e in events if e.stream == runner.name]
            self._last_checkpoint = self.clock.monotonic()
            return False
        self.counters["checkpoints"] += 1
        self._since_checkpoint = 0
        self._last_checkpoint = self.clock.monotonic()
        return True

    def _final_checkpoint(self) -> None:
        if self._since_checkpoint:
            self.checkpoint("shutdown")

    def status(self) -> dict[str, Any]:
        return {"position": self.position, **self.counters, "transport": self.transport.stats(),
                "last_error": self.last_error}


def open_store(config: Config, fault_hook: Any = None) -> SQLiteStore:
    """The SQLite store a config names."""
    cfg = config.store
    return SQLiteStore(
        cfg.path,
        synchronous=cfg.synchronous,
        inbox_retention=cfg.inbox_retention,
        dead_letter_retention=cfg.dead_letter_retention,
        dead_letter_payload_bytes=cfg.dead_letter_payload_bytes,
        fault_hook=fault_hook,
    )
