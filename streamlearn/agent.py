"""The agent: wires transport, codec, store and stream runners, and runs the loop.

One pass of the loop::

    transport.receive(batch)
      -> decode + validate each message (bad ones become dead letters)
      -> drop redeliveries (late readings are learned; see _is_new)
      -> positions assigned; store.begin; store.stage(inbox rows, dead letters)
         (while the WAL thread's last copy holds the writer off, the rows are
         processed first and staged once it is free, before the commit)
      -> for each new row, in order: StreamRunner.handle -> publish predictions;
         every N rows or T seconds a checkpoint begins (at that row's position)
      -> one step of a checkpoint under way (a few models; see checkpointing.py)
      -> store.commit  -> publish dead letters
                       -> (the store's fsync thread, once it is on disk) transport.ack(batch)

Predictions go out before the commit, and the fsync runs on a thread of its own,
so neither is on their path. If the
commit fails, nothing is acknowledged (the broker will deliver the batch again)
and the in-memory state, which has learned from rows that are not stored, is
thrown away and rebuilt from the last checkpoint and the stored inbox.

On start the agent connects, loads the last checkpoint and replays the inbox rows
after its position through the same runners (their predictions are published
again, marked ``"replay": true``), so every stored message is learned exactly
once however the previous run ended.
"""

from __future__ import annotations

import gc
import logging
import os
import threading
import time
from typing import Any

import orjson

from streamlearn.checkpointing import MIN_MODELS_PER_STEP, PendingCheckpoint, room_for_step
from streamlearn.clock import Clock, SystemClock
from streamlearn.codec import Codec, Reading
from streamlearn.config import Config
from streamlearn.dedupe import NEW, Deduper, payload_hash
from streamlearn.errors import DecodeError, StoreError, StoreSyncError, TransportError
from streamlearn.store import Checkpoint, DeadLetter, InboxRow, SQLiteStore, Store
from streamlearn.stream import StreamRunner
from streamlearn.transport import Message, Transport

logger = logging.getLogger(__name__)

REPLAY_CHUNK = 1000
MAX_DEVICES_PER_STREAM = 10_000
HEALTH_EVERY_SECONDS = 10.0
# While the WAL thread's last copy holds the writer off (5-15 ms here), a due commit group is
# tried again this often, and waited for once this long past due
WRITER_POLL_S = 0.001
GROUP_DEFER_MAX_S = 0.5
# A full garbage collection walks every object the models are made of (~70 a model: 13-50 ms with
# a thousand models here); they are frozen once this many more are made (see _maybe_freeze_gc)
GC_FREEZE_EVERY_MODELS = 32


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
    freeze_gc
        Keep the models out of the garbage collector's full collections (``gc.freeze``) once
        they are made, as ``streamlearn run`` does; it changes the whole process, so off by default.
    """

    def __init__(self, config: Config, transport: Transport, store: Store, clock: Clock | None = None,
                 freeze_gc: bool = False) -> None:
        self.config = config
        self.transport = transport
        self.store = store
        self.clock = clock or SystemClock()
        self.codec = Codec(config.streams)
        self.deduper = Deduper(store)
        prefix, gateway = config.mqtt.topic_prefix, config.agent.gateway
        self.runners = self._new_runners()
        self.dead_letter_topic = f"{prefix}/{gateway}/dead-letter"
        self.health_topic = f"{prefix}/{gateway}/health"
        self.position = 0
        self.counters = {"received": 0, "redeliveries": 0, "late": 0, "dead_letters": 0, "processed": 0,
                         "replayed": 0, "caught_up": 0, "checkpoints": 0, "store_errors": 0, "internal_errors": 0,
                         "reloads": 0, "commits": 0, "checkpoints_stretched": 0, "models_left_behind": 0}
        self._since_checkpoint = 0
        self._last_checkpoint = self.clock.monotonic()
        self._pending: PendingCheckpoint | None = None  # a checkpoint being written in steps
        self._checkpoint_cost_s = 0.0  # time the last complete checkpoint took to write
        self._checkpoint_steps = 0  # and in how many steps
        self._stretching = False  # the checkpoint due now waits for checkpoint_max_share
        self._completed_in_batch = 0  # checkpoints the open batch transaction completes
        # the commit group: messages staged and processed in the open transaction, acknowledged
        # (and their dead letters published) once it commits
        self._group: list[Message] = []
        self._group_dead: list[DeadLetter] = []
        self._group_deadline = 0.0
        # rows (with their dead letters) of the open group taken while the WAL thread's last
        # copy held the writer off: processed, numbered, staged once the writer is free
        self._unstaged: list[tuple[list[InboxRow], list[DeadLetter]]] = []
        self._staged_late = False  # the open transaction began by staging such rows
        self._step_deferred = False  # the last step alone found the writer held off
        self._next_seq = 1  # the inbox seq the next accepted row gets
        self._last_health = 0.0
        self._recovered = False
        self._uncommitted = False  # the in-memory state has learned from rows not yet committed
        self._stop = threading.Event()
        self.last_error: str | None = None
        self.last_checkpoint_ms: float | None = None
        self.max_checkpoint_ms = 0.0
        self.freeze_gc = freeze_gc
        self._frozen_models = 0  # models there were at the last gc.freeze

    def _new_runners(self) -> dict[str, StreamRunner]:
        prefix, gateway = self.config.mqtt.topic_prefix, self.config.agent.gateway
        return {s.name: StreamRunner(s, prefix, gateway) for s in self.config.streams}

    # -- start-up ------------------------------------------------------------------

    def recover(self) -> int:
        """Load the last checkpoint and replay the inbox after it; returns rows replayed."""
        self._pending = None
        checkpoint = self.store.load_checkpoint()
        self.position = 0
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
        self._since_checkpoint = 0
        caught_up = self._catch_up(checkpoint) if checkpoint is not None else 0
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
                # no checkpoint begins mid-replay: a micro-batch may still be gathering
                self._process(row, reading, None, checkpoint=False)
            replayed += len(rows)
        for runner in self.runners.values():
            for topic, payload in runner.finish_replay(self.clock.monotonic()):
                self.transport.publish(topic, payload, qos=1)
        self.counters["replayed"] += replayed
        if replayed:
            logger.info("replayed %d inbox rows after the checkpoint", replayed)
        if replayed or caught_up:
            self.checkpoint("replay")
        self._next_seq = self._first_free_seq()
        self._recovered = True
        return replayed

    def _catch_up(self, checkpoint: Checkpoint) -> int:
        """Replay the rows between ``replay_from`` and the checkpoint's position to the models
        the checkpoint left behind (their saved states are older); returns how many."""
        cursor, end = checkpoint.replay_from or checkpoint.position, checkpoint.position
        if cursor >= end:
            return 0
        caught_up = 0
        while cursor < end:
            rows = [r for r in self.store.inbox_after(cursor, REPLAY_CHUNK) if r.seq <= end]
            if not rows:
                break
            cursor = rows[-1].seq
            for row in rows:
                runner = self.runners.get(row.stream)
                if runner is None or not runner.behind(row):
                    continue
                try:
                    reading = self.codec.decode(row.topic, row.payload, row.received_at)
                except DecodeError as exc:  # the config changed since the row was stored
                    logger.warning("inbox row %d no longer decodes (%s); skipped", row.seq, exc)
                    continue
                runner.catch_up(row, reading, self.clock.monotonic())
                caught_up += 1
        for runner in self.runners.values():
            runner.finish_replay(self.clock.monotonic())  # (caught-up groups publish nothing)
        self.counters["caught_up"] += caught_up
        if caught_up:
            logger.info("replayed %d inbox rows at or before the checkpoint to the models it had left behind",
                        caught_up)
        return caught_up

    def _reload(self) -> None:
        """Forget the in-memory state and rebuild it from the store (after a failed commit)."""
        self.counters["reloads"] += 1
        self.runners = self._new_runners()
        self._frozen_models = 0  # the models loaded again are new objects: frozen at the next step
        self.recover()

    # -- the loop --------------------------------------------------------------------

    def run(self, stop: threading.Event, max_messages: int | None = None) -> None:
        """Connect, recover and process until ``stop`` is set (or ``max_messages`` processed)."""
        self._stop = stop
        self.transport.start(self.codec.subscriptions)
        try:
            if not self._recovered:
                self.recover()
            self.publish_health()
            while not stop.is_set():
                self.step(timeout=0.2)
                fatal = getattr(self.transport, "fatal_error", None)
                if fatal:
                    raise TransportError(fatal)
                self._check_sync()
                if max_messages is not None and self.counters["processed"] >= max_messages:
                    break
        finally:
            try:
                if getattr(self.store, "sync_error", None) is None:  # (else nothing more is written)
                    if self._group:
                        self.commit_group()
                    if self._since_checkpoint or self._pending is not None:
                        self.checkpoint("shutdown")
                    wait = getattr(self.store, "wait_durable", None)
                    if wait is not None and not wait(10.0):  # the acknowledgements go out before we disconnect
                        logger.warning("the last commits were not on disk within 10 s; the broker will "
                                       "deliver their messages again")
            finally:
                self.publish_health(state="stopped")
                self.transport.stop()

    def _check_sync(self) -> None:
        """A failed fsync stops the agent: it cannot know what reached the disk (see
        ``streamlearn.store.wal_sync``); nothing since the last good one was acknowledged."""
        error = getattr(self.store, "sync_error", None)
        if error is not None:
            self.last_error = f"store: {error}"
            raise StoreSyncError(f"{error}; stopping. Messages not acknowledged are delivered again after a "
                                 "restart, and the inbox replays what the store holds")

    def step(self, timeout: float = 0.2) -> int:
        """Take one batch from the transport and process it; returns messages taken.

        Batches join the open commit group until it is due (``commit_delay_ms`` after its
        first message, ``batch_max`` messages, or nothing more arrived meanwhile): then one
        COMMIT stores them all, and they are acknowledged once it is on disk (one fsync).
        """
        batch_max = self.config.agent.batch_max
        if not self._group and getattr(self.transport, "resync_due", False):
            # the transport reconnects in this receive: let the fsync thread acknowledge what is
            # committed first, or the broker sends it again
            wait = getattr(self.store, "wait_durable", None)
            if wait is not None:
                wait(5.0)
        if self._group:
            wait, room = max(0.0, self._group_deadline - self.clock.monotonic()), batch_max - len(self._group)
            if self._unstaged and wait == 0.0:
                wait = WRITER_POLL_S  # due, but the writer is held off: look again shortly, not in a spin
        else:
            # with a checkpoint under way, take what is there and write the next step of it (or,
            # while the writer is held off, look again shortly)
            wait, room = (timeout if not self._pending else WRITER_POLL_S if self._step_deferred else 0.0), batch_max
        batch = self.transport.receive(max(1, room), wait)
        if batch:
            self.ingest(batch, commit=False)
            if self._group and (len(self._group) >= batch_max or self.clock.monotonic() >= self._group_deadline):
                self.commit_group(wait=False)
        elif self._group:
            self.commit_group(wait=False)
        elif self._pending is not None:
            self._checkpoint_step_alone(wait=False)
        try:
            self.maybe_checkpoint()
        except StoreError as exc:  # only raised inside the open group's transaction: take it again
            self._retry_group(exc)
        if self.clock.monotonic() - self._last_health >= HEALTH_EVERY_SECONDS:
            self.publish_health()
        if self.freeze_gc:
            self._maybe_freeze_gc()
        return len(batch)

    def _maybe_freeze_gc(self) -> None:
        """Once ``GC_FREEZE_EVERY_MODELS`` models have been made since the last time (after a
        restart: once they are loaded), one full collection, then ``gc.freeze()``: the full
        collections Python runs every few thousand readings no longer walk them (with a
        thousand models each took 13-50 ms, the longest pauses of the steady checkpoint
        benchmark). The collection here walks only what is not frozen yet (0.2-0.3 ms for
        32 models here).

        (A frozen object is never collected as part of a cycle: only what is alive after a
        collection is frozen, mostly the models; those of a reload after a store error stay,
        as cycles of them, if any, would.)"""
        models = sum(len(runner.slots) for runner in self.runners.values())
        if models < self._frozen_models + GC_FREEZE_EVERY_MODELS:
            return
        self._frozen_models = models
        gc.collect()
        gc.freeze()

    def ingest(self, batch: list[Message], commit: bool = True) -> None:
        """Validate, stage and process one batch of messages in the open commit group (opening
        one); with ``commit``, commit the group and acknowledge what it holds.

        On a store error nothing is acknowledged; the agent waits and tries the whole
        group again (after rebuilding its state if it had processed rows).
        """
        self.counters["received"] += len(batch)
        if not self._group:
            self._group_deadline = self.clock.monotonic() + self.config.agent.commit_delay_ms / 1000.0
            self._uncommitted = False
            self._completed_in_batch = 0
            self.deduper.begin_batch()  # what earlier groups staged is committed (or rolled back)
        self._group.extend(batch)
        try:
            self._group_dead += self._ingest_once(batch)
        except StoreError as exc:
            self._retry_group(exc)
            return
        if commit or self.config.agent.commit_delay_ms <= 0:
            self.commit_group(wait=commit)

    def commit_group(self, wait: bool = True) -> None:
        """Commit the open group and publish its dead letters; its messages are acknowledged once
        the commit is on disk (by the store's fsync thread, while this one goes on).

        ``wait=False``: when the group's rows are not staged yet and the writer is still held
        off (the WAL thread's last copy), leave it open for a later call; it waits once the
        group is ``GROUP_DEFER_MAX_S`` past due or four times ``batch_max``."""
        if not self._group:
            return
        try:
            if self._unstaged:
                overdue = (self.clock.monotonic() - self._group_deadline > GROUP_DEFER_MAX_S
                           or not self._group_can_wait())
                if not self._open_and_stage(wait=wait or overdue):
                    return
            self.store.commit(on_durable=self._acknowledge(self._group))
        except StoreError as exc:
            self._retry_group(exc)
            return
        self._after_commit()

    def _acknowledge(self, batch: list[Message]) -> Any:
        transport = self.transport
        return lambda: transport.ack(batch)

    def _retry_group(self, exc: StoreError) -> None:
        """The store refused the open group: roll back, and try it again as one batch until the
        store takes it (or the agent is stopped)."""
        batch = self._group
        delay = 0.1
        while True:
            self._store_failed(exc, len(batch))
            if getattr(self.store, "in_batch", False):
                self.store.rollback()
            self._unstaged, self._staged_late = [], False
            if self._uncommitted:  # learned from rows that are not stored: start again from the store
                self._reload()
            else:  # numbered, not stored: number them again
                self._next_seq = self._first_free_seq()
            if self._pause(delay):
                self._group, self._group_dead = [], []
                raise StoreError(f"stopped while the store refused writes: {exc}") from None
            delay = min(delay * 2, 5.0)
            self._uncommitted = False
            self._completed_in_batch = 0
            self.deduper.begin_batch()
            try:
                self._group_dead = self._ingest_once(batch, wait=True)
                self.store.commit(on_durable=self._acknowledge(batch))
            except StoreError as again:
                exc = again
                continue
            break
        self._after_commit()

    def _pause(self, seconds: float) -> bool:
        """Wait ``seconds`` (True once the agent is stopped); a transport whose network loop
        runs on this thread keeps its connection going meanwhile."""
        pump_for = getattr(self.transport, "pump_for", None)
        if pump_for is not None:
            return bool(pump_for(seconds, self._stop))
        return self._stop.wait(seconds)

    def _after_commit(self) -> None:
        self._staged_late = False
        dead = self._group_dead
        self._group, self._group_dead = [], []
        self._uncommitted = False
        self.counters["commits"] += 1
        self.counters["checkpoints"] += self._completed_in_batch
        self._completed_in_batch = 0
        self._note_checkpoint_duration()  # of a checkpoint step that joined the batch
        if self.last_error is not None and self.last_error.startswith("store"):
            logger.info("the store accepts writes again")
            self.last_error = None
            self.publish_health()
        for d in dead:
            self._publish_dead_letter(d)

    def _open_and_stage(self, wait: bool) -> bool:
        """Begin the group's transaction and stage the rows taken while the writer was held off
        (they come first: a checkpoint step in it may be at a position among them); False,
        with nothing done, when ``wait`` is False and the writer is still held off."""
        if not self.store.begin(wait=wait):
            return False
        unstaged, self._unstaged = self._unstaged, []
        # this transaction commits soon (its group is due) after the WAL started over (its first
        # COMMIT into the new file took ~3 ms here): no checkpoint step joins it unless it must
        self._staged_late = bool(unstaged)
        for rows, dead in unstaged:
            self.store.stage(rows, dead)
        return True

    def _ingest_once(self, batch: list[Message], wait: bool = False) -> list[DeadLetter]:
        """Validate, number, stage and process ``batch`` in the group's transaction (beginning
        one), with a step of the checkpoint under way before and after its rows; returns its
        dead letters.

        When the transaction is not open and the WAL thread's last copy holds the writer off
        (and not ``wait``), the rows are processed now and staged later (``_open_and_stage``),
        before the group commits: their predictions need not wait for the disk. Until then
        no checkpoint step is written (a model about to change is copied instead)."""
        rows: list[InboxRow] = []
        readings: list[tuple[InboxRow, Reading, float]] = []
        dead: list[DeadLetter] = []
        new_devices: dict[str, set[str]] = {}
        batch_seq: dict[str, int] = {}
        for msg in batch:
            phash = payload_hash(msg.topic, msg.payload)
            try:
                reading = self.codec.decode(msg.topic, msg.payload, msg.received_at)
                key = f"{reading.stream}|{reading.device}|{reading.msg_id}" if reading.msg_id else None
                if not self._is_new(msg, reading, key, phash, batch_seq):
                    self.counters["redeliveries"] += 1
                    continue
                self._check_device_room(reading, new_devices)
            except DecodeError as exc:
                dead.append(DeadLetter(msg.received_at, msg.topic, self._stream_of(msg.topic),
                                       exc.reason, exc.detail, msg.payload))
                continue
            row = InboxRow(msg.received_at, msg.topic, reading.stream, reading.kind, reading.device,
                           key, phash, msg.payload, seq=self._next_seq)
            self._next_seq += 1
            rows.append(row)
            readings.append((row, reading, msg.received_mono))
        if not self.store.in_batch and not self._open_and_stage(wait=wait or not self._group_can_wait()):
            self._unstaged.append((rows, dead))
        else:
            self.store.stage(rows, dead)
        self._uncommitted = True
        if self._pending is not None and self._may_step(self._pending):
            # one begun before this batch: a step now, so that (with a few models) it is complete
            # before these rows come due for the next one, and that one begins at its own row
            self._completed_in_batch += self._checkpoint_step()
        pending_before = self._pending
        agent_cfg = self.config.agent
        # behind by micro_batch_backlog messages, good or bad: counting only the good readings,
        # an agent fed bad messages too crossed the threshold later than a clean one as far behind
        if agent_cfg.micro_batch and len(batch) >= agent_cfg.micro_batch_backlog:
            self._process_batched(readings, self._micro_batch_size(len(batch)))
        else:
            for row, reading, received_mono in readings:
                self._process(row, reading, received_mono)
        for runner in self.runners.values():
            runner.refresh_metrics()  # (while the models it just used are in the cache)
        pending = self._pending
        if pending is not None and self._may_step(pending) and (
                pending is pending_before or pending.remaining <= MIN_MODELS_PER_STEP):
            # one begun among this batch's rows: with a few models it completes now; with more,
            # its first step waits for the next batch, not to add to this one's pause the
            # taking of it (~0.7 ms with a thousand models)
            self._completed_in_batch += self._checkpoint_step()
        return dead

    def _may_step(self, pending: PendingCheckpoint) -> bool:
        """Whether the open transaction (if any) takes a step of ``pending`` now: one that
        completes it (a few models: a restart then replays at most the interval), or, while
        it holds little model state, any (its COMMIT grows with it)."""
        return self.store.in_batch and (pending.remaining <= MIN_MODELS_PER_STEP
                                        or (room_for_step(self.store) and not self._staged_late))

    def _first_free_seq(self) -> int:
        """The inbox seq after every stored row and the position (rows pruned may be below it)."""
        return max(self.store.last_seq(), self.position) + 1

    def _group_can_wait(self) -> bool:
        """Whether the open group may go on taking rows without staging them."""
        return len(self._group) < 4 * self.config.agent.batch_max

    def _micro_batch_size(self, taken: int) -> int:
        """``micro_batch_size``, doubled for each further ``micro_batch_backlog`` messages behind
        (``taken`` and those waiting behind them), up to ``micro_batch_size_max``. (Linear steps,
        not one per doubling of the backlog: the broker's in-flight window, ``receive_maximum``
        = 1,000, bounds how far behind the agent can see, however many wait at the broker.)"""
        cfg = self.config.agent
        steps = (taken + self.transport.backlog()) // cfg.micro_batch_backlog - 1
        size = cfg.micro_batch_size
        while steps > 0 and size < cfg.micro_batch_size_max:
            size, steps = min(2 * size, cfg.micro_batch_size_max), steps - 1
        return size

    def _process_batched(self, readings: list[tuple[InboxRow, Reading, float]], size: int) -> None:
        """A backlog: process in runs that end at checkpoint boundaries; within a run each
        payload-label stream learns per model in micro-batches of ``size``, everything else row
        by row."""
        every = self.config.store.checkpoint_every_messages
        i = 0
        while i < len(readings):
            room = every - self._since_checkpoint
            # none can begin at the boundary (one under way, or spaced out after a long one): a
            # whole interval, not runs of one reading each
            run = readings[i:i + (room if room > 0 else every)]
            i += len(run)
            by_stream: dict[str, list[tuple[InboxRow, Reading, float | None]]] = {}
            for item in run:
                runner = self.runners[item[1].stream]
                if runner.batchable and item[1].kind == "reading":
                    by_stream.setdefault(item[1].stream, []).append(item)
                else:
                    self._process(*item, checkpoint=False)
            for name, items in by_stream.items():
                try:
                    outgoing = self.runners[name].handle_many(items, self.clock.monotonic(), size,
                                                              emit=self._publish,
                                                              min_size=self.config.agent.micro_batch_size)
                except StoreError:
                    raise  # a model written early for a checkpoint was refused: the batch fails as a whole
                except Exception:  # a bug must not stop the gateway; the rows are kept in the inbox
                    self.counters["internal_errors"] += 1
                    logger.exception("internal error processing %d rows of stream %s; skipped", len(items), name)
                    outgoing = []
                groups = self.runners[name].take_micro_batches()
                if groups:
                    if self.store.in_batch:
                        self.store.mark_micro_batches(groups)
                    else:  # not staged yet: the rows carry it
                        by_seq = {item[0].seq: item[0] for item in items}
                        for group in groups:
                            for seq in group:
                                by_seq[seq].micro_batch = group[0]
                for topic, payload in outgoing:
                    self.transport.publish(topic, payload, qos=1)
                self.counters["processed"] += len(items)
                self._since_checkpoint += len(items)
            self.position = run[-1][0].seq
            self.maybe_checkpoint()
            if self._pending is not None and self.store.in_batch:
                # a step now, as the row-by-row path takes one at the end of its batch: with a few
                # models the checkpoint completes here, and a crash before the next one replays at
                # most checkpoint_every_messages readings, not the rest of a large batch as well
                self._completed_in_batch += self._checkpoint_step()

    def _is_new(self, msg: Message, reading: Reading, key: str | None, phash: int,
                batch_seq: dict[str, int]) -> bool:
        """False for a redelivery; DecodeError for a reused id (and, with ``out_of_order =
        "dead_letter"``, for a sequence number going back).

        With a sequence field, a number above the highest seen for its device and
        boot is new without asking the store. One below it that the store has not
        seen is a late reading: learned by default, because Mosquitto 2.0.11 itself
        sends first deliveries out of order after a reconnect under back-pressure
        (measured in tests/faults/test_network.py: sequence 1573 after 1901, DUP
        not set), and dropping them would lose readings the broker handed us.
        """
        scope = reading.sequence_scope
        if scope is not None and reading.sequence is not None:
            runner = self.runners[reading.stream]
            last = batch_seq.get(scope, runner.last_seq.get(scope, -1))
            if reading.sequence > last:
                batch_seq[scope] = reading.sequence
                self.deduper.remember(key, phash)
                return True
            if self.deduper.check(msg.topic, key, phash, msg.dup) != NEW:
                return False
            if runner.config.out_of_order == "learn":
                self.counters["late"] += 1
                return True
            raise DecodeError(
                "out_of_order",
                f"sequence {reading.sequence} after {last} on {scope.split('|', 1)[1]}"
                + (" (sent again by the broker)" if msg.dup else ""),
            )
        return self.deduper.check(msg.topic, key, phash, msg.dup) == NEW

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

    def _store_failed(self, exc: StoreError, n: int) -> None:
        self.counters["store_errors"] += 1
        first = self.last_error is None or not self.last_error.startswith("store")
        self.last_error = f"store: {exc}"
        logger.error("cannot commit %d messages (not acknowledged; retrying): %s", n, exc)
        if first:
            self.publish_health()

    def _process(self, row: InboxRow, reading: Reading, received_mono: float | None,
                 checkpoint: bool = True) -> None:
        runner = self.runners[reading.stream]
        try:
            if received_mono is None:  # a replay: micro-batches are learned as they were live
                outgoing = runner.replay(row, reading, self.clock.monotonic(), emit=self._publish)
            else:
                outgoing = runner.handle(row, reading, received_mono, self.clock.monotonic(), emit=self._publish)
        except StoreError:
            raise  # a model written early for a checkpoint was refused: the batch fails as a whole
        except Exception:  # a bug must not stop the gateway; the row is kept in the inbox
            self.counters["internal_errors"] += 1
            logger.exception("internal error processing inbox row %d (%s); skipped", row.seq, row.topic)
            outgoing = []
        for topic, payload in outgoing:
            self.transport.publish(topic, payload, qos=1)
        self.position = row.seq
        self.counters["processed"] += 1
        self._since_checkpoint += 1
        if checkpoint:
            self.maybe_checkpoint()
            if (self._pending is not None and self.store.in_batch
                    and self._since_checkpoint >= self.config.store.checkpoint_every_messages):
                # a batch larger than the interval: the one under way must complete before the
                # rows past the next boundary are committed with it (at most N replayed)
                self._completed_in_batch += self._checkpoint_step()

    def _publish(self, topic: str, payload: bytes) -> None:
        self.transport.publish(topic, payload, qos=1)

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
        """Begin a checkpoint when one is due (and none is under way)."""
        if self._since_checkpoint == 0 or self._pending is not None:
            return
        cfg = self.config.store
        since = self.clock.monotonic() - self._last_checkpoint
        due = self._since_checkpoint >= cfg.checkpoint_every_messages or since >= cfg.checkpoint_every_seconds
        if due and self._checkpoint_steps > 1 and since < self._checkpoint_cost_s / cfg.checkpoint_max_share:
            # writing the last one took long, in several steps (many changed models): wait, so that
            # checkpoints take at most checkpoint_max_share of the agent's time; a restart may
            # replay more. One written in a single step (a few models) never stretches the
            # interval, however long that step took (a cold first write after a restart, a slow
            # disk): with a few models a restart replays at most checkpoint_every_messages
            if not self._stretching:
                self._stretching = True
                self.counters["checkpoints_stretched"] += 1
            return
        if due:
            self._stretching = False
            try:
                self._begin_checkpoint("interval")
            except StoreError as exc:
                if getattr(self.store, "in_batch", False):
                    raise  # the batch fails with it and is retried after a reload
                logger.error("cannot begin a checkpoint (retried later): %s", exc)
                self._last_checkpoint = self.clock.monotonic()

    def _begin_checkpoint(self, reason: str) -> None:
        """Name what the checkpoint at the current position holds; steps write it.

        (Rows left by one abandoned after a failed step carry the same id; every model
        they hold is written again, because abandoning marked them all changed.)
        """
        cfg = self.config.store
        # an interval's checkpoint may leave models behind (many per-device models); one at
        # shutdown, after a replay or asked for writes every changed model
        leave = reason == "interval"
        self._pending = PendingCheckpoint(
            self.store.next_checkpoint_id(), self.position, reason, self.runners, store=self.store,
            models_max=cfg.checkpoint_models_max if leave else None,
            replay_max=max(1, min(cfg.checkpoint_replay_max, cfg.inbox_retention)), rows=self._since_checkpoint)
        self.counters["models_left_behind"] = self._pending.left_behind
        self._since_checkpoint = 0
        self._last_checkpoint = self.clock.monotonic()

    def _checkpoint_step(self, budget_s: float | None = None) -> bool:
        """One step of the checkpoint under way, in the open transaction (and of its fate);
        True when it completes the checkpoint."""
        pending = self._pending
        assert pending is not None
        budget = self.config.store.checkpoint_step_ms / 1000.0 if budget_s is None else budget_s
        if not pending.step(self.store, budget):
            return False
        self._pending = None
        self._checkpoint_cost_s = pending.work_s
        self._checkpoint_steps = pending.steps
        return True

    def _checkpoint_step_alone(self, budget_s: float | None = None, wait: bool = True) -> bool:
        """One step in a transaction of its own, committed without an fsync; False when the
        store refused it (the checkpoint is abandoned, its models stay in memory).
        ``wait=False``: no step, and True, while the WAL thread's last copy holds the writer off."""
        pending = self._pending
        assert pending is not None
        try:
            self._step_deferred = not self.store.begin(durable=False, wait=wait)
            if self._step_deferred:
                return True
            try:
                completes = self._checkpoint_step(budget_s)
                self.store.commit()
            except StoreError:
                if self.store.in_batch:
                    self.store.rollback()
                raise
        except StoreError as exc:
            self._pending = None
            pending.abandon()
            self.counters["store_errors"] += 1
            self.last_error = f"store: {exc}"
            logger.error("checkpoint failed (state stays in memory, retried later): %s", exc)
            self._since_checkpoint = max(self._since_checkpoint, 1)
            self._last_checkpoint = self.clock.monotonic()
            self.publish_health()
            return False
        self._note_checkpoint_duration()
        if completes:
            self.counters["checkpoints"] += 1
            if self.last_error is not None and self.last_error.startswith("store"):
                self.last_error = None
        return True

    def checkpoint(self, reason: str) -> bool:
        """Write a complete checkpoint of the current state now, in as many steps as it takes
        (first completing one under way); False when the store refused it.

        Outside a staged batch only (shutdown, the end of a replay, tests, benchmarks).
        """
        assert not getattr(self.store, "in_batch", False), "checkpoint() inside a batch: use maybe_checkpoint"
        if self._pending is not None:
            position = self._pending.position
            # finished in one go: its pause is not one of the loop's steps (see the bench)
            self._pending.reason = f"{self._pending.reason}+{reason}"
            if not self._complete_alone():
                return False
            if position == self.position and not self._any_dirty():
                return True
        self._begin_checkpoint(reason)
        return self._complete_alone()

    def _complete_alone(self) -> bool:
        while self._pending is not None:
            if not self._checkpoint_step_alone(budget_s=float("inf")):
                return False
        return True

    def _any_dirty(self) -> bool:
        return any(runner.changed_count() for runner in self.runners.values())

    def _note_checkpoint_duration(self) -> None:
        """The store's figure of its last committed checkpoint, for the health report."""
        duration = getattr(self.store, "last_checkpoint_ms", None)
        if duration is not None:
            self.last_checkpoint_ms = duration
            self.max_checkpoint_ms = max(self.max_checkpoint_ms, duration)

    # -- health ---------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        transport = self.transport.stats()
        return {
            "state": "error" if self.last_error else "ok",
            "last_error": self.last_error,
            "pid": os.getpid(),
            "at": time.time(),
            "position": self.position,
            **self.counters,
            "last_checkpoint_ms": self.last_checkpoint_ms,
            "max_checkpoint_ms": self.max_checkpoint_ms,
            "checkpoint_models_left": None if self._pending is None else self._pending.remaining,
            "checkpoint_write_ms": round(self._checkpoint_cost_s * 1000.0, 3),
            "fsync": getattr(self.store, "sync_stats", lambda: None)(),
            # batches processed before they could be stored: the WAL thread's last copy held the writer
            "writer_busy": getattr(self.store, "writer_busy", 0),
            "transport": transport,
            "streams": {name: {"models": len(r.slots), **r.counters} for name, r in self.runners.items()},
        }

    def publish_health(self, state: str | None = None) -> None:
        """A retained JSON status on ``<prefix>/<gateway>/health`` and in ``<store>.health.json``."""
        self._last_health = self.clock.monotonic()
        body = self.status()
        if state is not None:
            body["state"] = state
        payload = orjson.dumps(body, option=orjson.OPT_NON_STR_KEYS)
        self.transport.publish(self.health_topic, payload, qos=1, retain=True)
        write = getattr(self.store, "write_health", None)
        if write is not None:
            write(payload)


def open_store(config: Config, fault_hook: Any = None) -> SQLiteStore:
    """The SQLite store a config names."""
    cfg = config.store
    return SQLiteStore(
        cfg.path,
        synchronous=cfg.synchronous,
        background_fsync=cfg.background_fsync,
        inbox_retention=cfg.inbox_retention,
        dead_letter_retention=cfg.dead_letter_retention,
        dead_letter_payload_bytes=cfg.dead_letter_payload_bytes,
        fault_hook=fault_hook,
    )
