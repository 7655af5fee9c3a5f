"""The agent's SQLite store: the single writer of one file.

Durability rules this module keeps:

* ``append`` commits the received messages (inbox rows and dead letters) in one
  transaction; the transport acknowledges them only after it returns.
* ``write_checkpoint`` stores every changed model, the per-stream state and the
  inbox position they reflect in one transaction, so a restart resumes from a
  state and a position that belong together; the inbox rows after the position
  are replayed.
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
            self._conn.execute("PRAGMA journal_size_limit=67108864")
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

    # -- transactions --------------------------------------------------------------

    def _transaction(self) -> _Transaction:
        return _Transaction(self._conn, self.path)

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
        with self._transaction() as cur:
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
    ) -> int:
        """Store changed slots, stream states, metrics and drift events at ``position`` atomically."""
        started = time.perf_counter()
        now = time.time()
        n_bytes = 0
        with self._transaction() as cur:
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
                    "INSERT INTO metrics (at, stream, messages, labelled, learned, skipped, dead_letters,"
                    " loss, error, baseline_error, lr) VALUES (:at, :stream, :messages, :labelled, :learned,"
                    " :skipped, :dead_letters, :loss, :error, :baseline_error, :lr)",
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
            cur.execute(
                "UPDATE checkpoints SET bytes_written = ?, duration_ms = ? WHERE id = ?",
                (n_bytes, (time.perf_counter() - started) * 1000.0, checkpoint_id),
            )
            self._fault("checkpoint:before_commit")
        self._fault("checkpoint:after_commit")
        return checkpoint_id

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

    def set_info(self, key: str, value: str) -> None:
        with self._transaction() as cur:
            cur.execute("INSERT OR REPLACE INTO agent_info (key, value) VALUES (?, ?)", (key, value))

    def integrity_check(self) -> str:
        return str(self._conn.execute("PRAGMA integrity_check").fetchone()[0])


class _Transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``, rolled back on any error.

    SQLite errors become a StoreError naming the file; nothing of a failed
    transaction stays in the database.
    """

    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        self._conn = conn
        self._path = path

    def __enter__(self) -> sqlite3.Cursor:
        try:
            self._conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise StoreError(f"{self._path}: cannot start a transaction: {exc}") from None
        return self._conn.cursor()

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            try:
                self._conn.execute("COMMIT")
                return
            except sqlite3.Error as commit_error:
                self._rollback()
                raise StoreError(f"{self._path}: commit failed: {commit_error}") from None
        self._rollback()
        if isinstance(exc, sqlite3.Error):
            raise StoreError(f"{self._path}: write failed: {exc}") from None

    def _rollback(self) -> None:
        try:
            self._conn.execute("ROLLBACK")
        except sqlite3.Error as exc:
            # no transaction is active after some failed commits; that is fine
            logger.debug("rollback of %s: %s", self._path, exc)

