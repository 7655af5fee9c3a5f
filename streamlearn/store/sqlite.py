"""The agent's SQLite store: the single writer of one file.

Durability rules this module keeps:

* A batch of received messages is staged (``begin``, ``stage``: inbox rows and
  dead letters, positions assigned) and made durable by ``commit``; the transport
  acknowledges them only after ``commit`` returns. The agent may predict and learn
  from staged rows before committing (so the fsync is not on the prediction
  path); if the commit fails it discards that in-memory state and reloads.
* ``write_checkpoint`` stores every changed model, the per-stream state and the
  inbox position they reflect in one transaction, so a restart resumes from a
  state and a position that belong together; the inbox rows after the position
  are replayed. Inside a staged batch it joins the batch's transaction; alone it
  commits without an fsync (``synchronous=NORMAL``): a checkpoint lost to a power
  cut only means a longer replay, because the next fsynced commit of the WAL
  carries it anyway.
* The WAL is truncated back to 4 MiB after readers let go (``journal_size_limit``).
* Tensors are stored with safetensors, small state as JSON: loading a store never
  unpickles anything.
* One process at a time: an exclusive ``flock`` on ``<store>.lock``.
"""

from __future__ import annotations

import fcntl
import logging
import os
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import orjson
from safetensors import SafetensorError
from safetensors.numpy import load as load_tensors
from safetensors.numpy import save as save_tensors
from sqlite_utils import Database

from streamlearn.errors import StoreError, StoreLockedError
from streamlearn.store.records import Checkpoint, DeadLetter, DriftEvent, InboxRow, SlotState
from streamlearn.store.schema import migrations

logger = logging.getLogger(__name__)

FaultHook = Callable[[str], None]


class Store(Protocol):
    """What the agent needs from a store (the seam tests plug fakes into)."""

    def find_key(self, msg_key: str) -> int | None: ...

    def seen_hash(self, topic: str, payload_hash: int) -> bool: ...

    def append(self, rows: list[InboxRow], dead: list[DeadLetter]) -> None: ...

    def inbox_after(self, position: int, limit: int) -> list[InboxRow]: ...

    def load_checkpoint(self) -> Checkpoint | None: ...

    def write_checkpoint(
        self,
        position: int,
        slots: list[SlotState],
        streams: dict[str, dict[str, Any]],
        metrics: list[dict[str, Any]],
        reason: str,
        events: list[DriftEvent] | None = None,
    ) -> int: ...

    def close(self) -> None: ...


def _json(value: Any) -> str:
    return orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY).decode()


class SQLiteStore:
    """The store, opened for writing by one agent.

    Parameters
    ----------
    path
        The SQLite file (created, with its directory, when missing).
    synchronous
        ``"full"`` fsyncs every commit (survives power loss); ``"normal"`` only
        survives a crash of the process.
    inbox_retention
        Inbox rows kept behind the checkpoint position, as a replay log and for
        dropping late redeliveries.
    fault_hook
        Called with a point name inside checkpoints; tests use it to crash there.
    """

    def __init__(
        self,
        path: str | Path,
        synchronous: str = "full",
        inbox_retention: int = 100_000,
        dead_letter_retention: int = 100_000,
        dead_letter_payload_bytes: int = 4096,
        metrics_retention_seconds: float = 30 * 86400,
        fault_hook: FaultHook | None = None,
    ) -> None:
        if synchronous not in ("full", "normal"):
            raise ValueError(f"synchronous must be 'full' or 'normal', got {synchronous!r}")
        self.path = Path(path)
        self.inbox_retention = inbox_retention
        self.dead_letter_retention = dead_letter_retention
        self.dead_letter_payload_bytes = dead_letter_payload_bytes
        self.metrics_retention_seconds = metrics_retention_seconds
        self._fault = fault_hook or (lambda point: None)
        self.synchronous = synchronous.upper()
        self._in_batch = False
        self._batch_checkpoint: tuple[int, float] | None = None  # (id, ms to write) of a checkpoint in the batch
        self.last_checkpoint_ms = 0.0
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create the directory of {self.path}: {exc.strerror}") from None
        self._lock_file = self._acquire_lock()
        try:
            self._conn = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute(f"PRAGMA synchronous={synchronous.upper()}")
            self._conn.execute("PRAGMA busy_timeout=5000")
            self._conn.execute("PRAGMA journal_size_limit=4194304")
            migrations.apply(Database(self._conn))
        except sqlite3.DatabaseError as exc:
            self._release_lock()
            raise StoreError(f"{self.path}: cannot open the store: {exc}") from None

    # -- lock -------------------------------------------------------------------

    def _acquire_lock(self) -> Any:
        lock_path = self.path.with_name(self.path.name + ".lock")
        handle = open(lock_path, "a+")  # noqa: SIM115 - held for the store's lifetime
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise StoreLockedError(
                f"{self.path} is in use by another streamlearn agent (pid {holder}); "
                "stop it first, or give this agent its own store"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        return handle

    def _release_lock(self) -> None:
        if self._lock_file is not None:
            fcntl.flock(self._lock_file.fileno(), fcntl.LOCK_UN)
            self._lock_file.close()
            self._lock_file = None

    def close(self) -> None:
        """Checkpoint the WAL into the main file and release the lock."""
        if getattr(self, "_conn", None) is None:
            return
        try:
            self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.DatabaseError as exc:
            logger.warning("could not truncate the WAL of %s: %s", self.path, exc)
        self._conn.close()
        self._conn = None  # type: ignore[assignment]
        self._release_lock()

    # -- inbox -------------------------------------------------------------------

    def find_key(self, msg_key: str) -> int | None:
        """The payload hash stored under a message id, or None if never seen."""
        row = self._conn.execute(
            "SELECT payload_hash FROM inbox WHERE msg_key = ? LIMIT 1", (msg_key,)
        ).fetchone()
        return None if row is None else int(row[0])

    def seen_hash(self, topic: str, payload_hash: int) -> bool:
        row = self._conn.execute(
            "SELECT 1 FROM inbox WHERE payload_hash = ? AND topic = ? LIMIT 1", (payload_hash, topic)
        ).fetchone()
        return row is not None

    def append(self, rows: list[InboxRow], dead: list[DeadLetter]) -> None:
        """Store accepted and rejected messages in one committed transaction.

        Sets ``seq`` on every row. When this returns the messages are durable and
        may be acknowledged; when it raises, nothing was stored.
        """
        self.begin()
        try:
            self.stage(rows, dead)
        except StoreError:
            self.rollback()
            raise
        self.commit()

    # -- staged batches ----------------------------------------------------------------

    @property
    def in_batch(self) -> bool:
        return self._in_batch

    def begin(self) -> None:
        """Open the batch transaction."""
        try:
            self._conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: cannot start a transaction: {exc}") from None
        self._in_batch = True
        self._batch_checkpoint = None

    def stage(self, rows: list[InboxRow], dead: list[DeadLetter]) -> None:
        """Insert rows (setting their ``seq``) and dead letters into the open batch."""
        assert self._in_batch, "stage() needs begin()"
        cur = self._conn.cursor()
        try:
            for row in rows:
                cur.execute(
                    "INSERT INTO inbox (received_at, topic, stream, kind, device, msg_key, payload_hash, payload)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (row.received_at, row.topic, row.stream, row.kind, row.device, row.msg_key,
                     row.payload_hash, row.payload),
                )
                row.seq = int(cur.lastrowid or 0)
            if dead:
                limit = self.dead_letter_payload_bytes
                cur.executemany(
                    "INSERT INTO dead_letter (received_at, topic, stream, reason, detail, payload_size, payload)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [(d.received_at, d.topic, d.stream, d.reason, d.detail, len(d.payload), d.payload[:limit])
                     for d in dead],
                )
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: write failed: {exc}") from None

    def commit(self) -> None:
        """Make the batch durable; on failure everything staged is gone and StoreError is raised."""
        assert self._in_batch, "commit() needs begin()"
        checkpoint = self._batch_checkpoint
        if checkpoint is not None:
            self._fault("checkpoint:before_commit")
        commit_started = time.perf_counter()
        try:
            self._conn.execute("COMMIT")
        except sqlite3.Error as exc:
            self.rollback()
            raise StoreError(f"{self.path}: commit failed: {exc}") from None
        finally:
            self._in_batch = False
            self._batch_checkpoint = None
        if checkpoint is not None:
            self._fault("checkpoint:after_commit")
            checkpoint_id, write_ms = checkpoint
            self._record_duration(checkpoint_id, write_ms + (time.perf_counter() - commit_started) * 1000.0)

    def rollback(self) -> None:
        self._in_batch = False
        self._batch_checkpoint = None
        try:
            self._conn.execute("ROLLBACK")
        except sqlite3.Error as exc:
            # no transaction is active after some failed commits; that is fine
            logger.debug("rollback of %s: %s", self.path, exc)

    def inbox_after(self, position: int, limit: int) -> list[InboxRow]:
        """Up to ``limit`` inbox rows after ``position``, in order."""
        cur = self._conn.execute(
            "SELECT seq, received_at, topic, stream, kind, device, msg_key, payload_hash, payload"
            " FROM inbox WHERE seq > ? ORDER BY seq LIMIT ?",
            (position, limit),
        )
        return [
            InboxRow(r[1], r[2], r[3], r[4], r[5], r[6], r[7], bytes(r[8]), seq=r[0]) for r in cur
        ]

    def last_seq(self) -> int:
        row = self._conn.execute("SELECT max(seq) FROM inbox").fetchone()
        return int(row[0] or 0)

    # -- checkpoints ---------------------------------------------------------------

    def load_checkpoint(self) -> Checkpoint | None:
        """The latest checkpoint with every slot and stream state, or None."""
        row = self._conn.execute(
            "SELECT id, created_at, position FROM checkpoints ORDER BY id DESC LIMIT 1"
        ).fetchone()
        if row is None:
            return None
        checkpoint = Checkpoint(id=row[0], created_at=row[1], position=row[2])
        for stream, key, tensors, state in self._conn.execute(
            "SELECT stream, model_key, tensors, state FROM models ORDER BY stream, model_key"
        ):
            try:
                arrays = load_tensors(bytes(tensors))
                checkpoint.slots.append(SlotState(stream, key, arrays, orjson.loads(state)))
            except (orjson.JSONDecodeError, SafetensorError) as exc:
                raise StoreError(
                    f"{self.path}: checkpoint of model {stream}/{key} is unreadable: {exc}"
                ) from None
        for stream, state in self._conn.execute("SELECT stream, state FROM stream_state"):
            checkpoint.streams[stream] = orjson.loads(state)
        return checkpoint

    def write_checkpoint(
        self,
        position: int,
        slots: list[SlotState],
        streams: dict[str, dict[str, Any]],
        metrics: list[dict[str, Any]],
        reason: str,
        events: list[DriftEvent] | None = None,
        started: float | None = None,
    ) -> int:
        """Store changed slots, stream states, metrics and drift events at ``position`` atomically.

        Inside a staged batch the checkpoint becomes part of the batch's transaction;
        otherwise it is its own transaction, committed without an fsync. ``started``
        (a ``time.perf_counter()`` value) is when the caller began collecting the
        state, so the recorded duration is the whole stall: collecting, writing and
        the COMMIT (in a batch, not the rest of the batch's work around it).
        """
        started = time.perf_counter() if started is None else started
        if self._in_batch:
            checkpoint_id = self._write_checkpoint_rows(position, slots, streams, metrics, reason, events)
            self._batch_checkpoint = (checkpoint_id, (time.perf_counter() - started) * 1000.0)
            return checkpoint_id
        self._conn.execute("PRAGMA synchronous=NORMAL")
        try:
            self.begin()
            try:
                checkpoint_id = self._write_checkpoint_rows(position, slots, streams, metrics, reason, events)
            except StoreError:
                self.rollback()
                raise
            self._batch_checkpoint = (checkpoint_id, (time.perf_counter() - started) * 1000.0)
            self.commit()
        finally:
            self._conn.execute(f"PRAGMA synchronous={self.synchronous}")
        return checkpoint_id

    def _write_checkpoint_rows(
        self, position: int, slots: list[SlotState], streams: dict[str, dict[str, Any]],
        metrics: list[dict[str, Any]], reason: str, events: list[DriftEvent] | None,
    ) -> int:
        now = time.time()
        n_bytes = 0
        cur = self._conn.cursor()
        try:
            cur.execute(
                "INSERT INTO checkpoints (created_at, position, slots_written, bytes_written, duration_ms, reason)"
                " VALUES (?, ?, ?, 0, 0, ?)",
                (now, position, len(slots), reason),
            )
            checkpoint_id = int(cur.lastrowid or 0)
            for slot in slots:
                tensors = save_tensors({k: np.ascontiguousarray(v) for k, v in slot.tensors.items()})
                state = _json(slot.state)
                n_bytes += len(tensors) + len(state)
                cur.execute(
                    "INSERT OR REPLACE INTO models (stream, model_key, tensors, state, checkpoint_id, updated_at)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    (slot.stream, slot.model_key, tensors, state, checkpoint_id, now),
                )
            self._fault("checkpoint:models_written")
            for stream, state in streams.items():
                text = _json(state)
                n_bytes += len(text)
                cur.execute(
                    "INSERT OR REPLACE INTO stream_state (stream, state, updated_at) VALUES (?, ?, ?)",
                    (stream, text, now),
                )
            if metrics:
                cur.executemany(
                    "INSERT INTO metrics (at, stream, messages, labelled, batched, learned, skipped, dead_letters,"
                    " loss, error, baseline_error, lr) VALUES (:at, :stream, :messages, :labelled, :batched,"
                    " :learned, :skipped, :dead_letters, :loss, :error, :baseline_error, :lr)",
                    [{"at": now, **m} for m in metrics],
                )
            if events:
                cur.executemany(
                    "INSERT INTO drift_events (at, stream, model_key, step, detector, statistic, action,"
                    " lr_before, lr_after, loss_before) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [(e.at, e.stream, e.model_key, e.step, e.detector, e.statistic, e.action, e.lr_before,
                      e.lr_after, e.loss_before) for e in events],
                )
            self._prune(cur, position, now)
            cur.execute("UPDATE checkpoints SET bytes_written = ? WHERE id = ?", (n_bytes, checkpoint_id))
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: checkpoint write failed: {exc}") from None
        return checkpoint_id

    def _record_duration(self, checkpoint_id: int, duration_ms: float) -> None:
        """Store the whole stall (collecting, writing, committing) of a committed checkpoint."""
        self.last_checkpoint_ms = duration_ms
        try:
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.execute("UPDATE checkpoints SET duration_ms = ? WHERE id = ?",
                               (self.last_checkpoint_ms, checkpoint_id))
        except sqlite3.Error as exc:  # only a figure is lost
            logger.warning("could not record the checkpoint's duration: %s", exc)
        finally:
            self._conn.execute(f"PRAGMA synchronous={self.synchronous}")

    def _prune(self, cur: sqlite3.Cursor, position: int, now: float) -> None:
        cur.execute("DELETE FROM inbox WHERE seq <= ?", (position - self.inbox_retention,))
        cur.execute(
            "DELETE FROM dead_letter WHERE id <= (SELECT max(id) FROM dead_letter) - ?",
            (self.dead_letter_retention,),
        )
        cur.execute("DELETE FROM metrics WHERE at < ?", (now - self.metrics_retention_seconds,))
        cur.execute("DELETE FROM drift_events WHERE at < ?", (now - self.metrics_retention_seconds,))
        cur.execute(
            "DELETE FROM checkpoints WHERE id <= (SELECT max(id) FROM checkpoints) - 10000"
        )

    # -- info ------------------------------------------------------------------------


    def write_health(self, payload: bytes) -> None:
        """Best effort: the agent's health JSON next to the store, replaced atomically.

        It is how ``streamlearn status`` learns about errors the store itself cannot
        record (a full disk); when even this small write fails, only the log has it.
        """
        target = self.path.with_name(self.path.name + ".health.json")
        tmp = target.with_suffix(".tmp")
        try:
            tmp.write_bytes(payload)
            os.replace(tmp, target)
        except OSError as exc:
            logger.debug("could not write %s: %s", target, exc)

    def integrity_check(self) -> str:
        return str(self._conn.execute("PRAGMA integrity_check").fetchone()[0])
