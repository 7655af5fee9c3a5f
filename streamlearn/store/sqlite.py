"""The agent's SQLite store: the single writer of one file.

Durability rules this module keeps:

* A batch of received messages is staged (``begin``, ``stage``: inbox rows and
  dead letters, positions assigned) and made durable by ``commit``; the transport
  acknowledges them only after ``commit`` returns. The agent may predict and learn
  from staged rows before committing (so the fsync is not on the prediction
  path); if the commit fails it discards that in-memory state and reloads.
* A checkpoint is the state of every model and stream at one inbox position; a
  restart loads the latest complete one and replays the inbox rows after its
  position. It may be written in steps, a few models per transaction
  (``write_models``), so that no step stalls message handling for long; the
  step that completes it (``finish_checkpoint``) writes the stream states and
  its row in ``checkpoints``. Until then every model keeps its row of the
  previous complete checkpoint, and a restart ignores (and deletes) the rows of
  a checkpoint that did not complete. Steps join the batch's transaction, or
  commit alone without an fsync (``synchronous=NORMAL``): a checkpoint lost to a
  power cut only means a longer replay.
* The WAL is copied into the main file by a background thread with its own
  connection (:class:`WalCheckpointer`). SQLite's automatic checkpoint, at 4 MiB
  by default, would copy it all and fsync the file inside whichever commit
  crossed the threshold: a pause of 10-50 ms on the message path. It stays on at
  32 MiB, as a backstop should the thread fall behind. That thread also cuts the
  WAL file back to 4 MiB once it has copied it all (the writer's connection never
  truncates it: ``journal_size_limit = -1``), holding the writer off meanwhile; the
  agent processes what arrives meanwhile and stages it afterwards
  (``begin(wait=False)``).
* Tensors are stored with safetensors, small state as JSON: loading a store never
  unpickles anything.
* One process at a time: an exclusive ``flock`` on ``<store>.lock``.
"""

from __future__ import annotations

import fcntl
import logging
import os
import sqlite3
import threading
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
from streamlearn.store.wal_sync import WalSyncer

logger = logging.getLogger(__name__)

FaultHook = Callable[[str], None]

# rows past their retention that a batch deletes, per row it stages and in all (see _prune_some)
PRUNE_PER_ROW = 2
PRUNE_EXTRA = 4
WAL_BACKSTOP_PAGES = 8192  # 32 MiB of 4 KiB pages: the agent's own commit checkpoints from here
WAL_RESTART_WAIT_S = 1.0  # a writer that may wait waits at most this for the WAL to start over (WalCheckpointer)


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


def _inbox_floor(position: int, replay_from: int | None, retention: int) -> int:
    """Inbox rows at or below this seq may go: past the retention behind the checkpoint's
    position, and not needed by a replay from ``replay_from``."""
    floor = position - retention
    if replay_from is not None:
        floor = min(floor, replay_from)
    return max(0, floor)


class SQLiteStore:
    """The store, opened for writing by one agent.

    Parameters
    ----------
    path
        The SQLite file (created, with its directory, when missing).
    synchronous
        ``"full"``: what a commit holds is on disk before ``commit``'s ``on_durable``
        runs (survives power loss); ``"normal"`` only survives a crash of the process.
    background_fsync
        With ``"full"``: the fsync runs on a thread of its own after the COMMIT
        (:class:`~streamlearn.store.wal_sync.WalSyncer`), not inside it on the
        caller's thread; ``on_durable`` waits for it either way.
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
        background_fsync: bool = True,
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
        background = background_fsync and self.synchronous == "FULL"
        # the connection's own setting: with the fsync on the WalSyncer's thread, COMMIT does not sync
        self._sync_pragma = "NORMAL" if background else self.synchronous
        self._syncer: WalSyncer | None = None
        self._in_batch = False
        self._tx_bytes = 0  # about how much the open transaction writes, for the WalCheckpointer
        self._tx_staged = False  # it holds received messages (a batch), not only checkpoint work
        self._durable = True  # the open transaction fsyncs at COMMIT (False: a checkpoint step alone)
        # checkpoint steps in the open transaction: per checkpoint id, its longest step (ms; a
        # batch may hold the last step of one checkpoint and the first of the next), and the ids
        # it completes
        self._tx_steps: dict[int, float] = {}
        self._tx_finishes: list[int] = []
        self._stall_max_ms: dict[int, float] = {}  # per checkpoint being written: its longest pause
        self._durations_due: dict[int, float] = {}  # of checkpoints completed, for the next transaction
        self._tx_checkpoint_bytes = 0  # checkpoint data (models) in the open transaction
        self.last_checkpoint_ms = 0.0
        # inbox rows at or below this seq are past the retention behind the last committed
        # checkpoint; batches delete them a few at a time (see stage)
        self._inbox_floor = 0
        self._tx_inbox_floor: int | None = None  # what the open transaction's checkpoint sets
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create the directory of {self.path}: {exc.strerror}") from None
        self._lock_file = self._acquire_lock()
        try:
            self._conn = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute(f"PRAGMA synchronous={self._sync_pragma}")
            self._conn.execute("PRAGMA busy_timeout=5000")
            # the writer never cuts the WAL file back itself: an ftruncate of a 10 MB file took 9 ms
            # on the agent's thread here (the WAL started over by its own transaction, after the
            # background thread had copied it all); the WalCheckpointer does it, holding it off
            self._conn.execute("PRAGMA journal_size_limit=-1")
            # the WalCheckpointer copies the WAL from its own thread; SQLite's own checkpoint in
            # our commits stays as a backstop, should that thread fall behind
            self._conn.execute(f"PRAGMA wal_autocheckpoint={WAL_BACKSTOP_PAGES}")
            migrations.apply(Database(self._conn))
            last = self._conn.execute(
                "SELECT position, replay_from FROM checkpoints ORDER BY id DESC LIMIT 1").fetchone()
            self._inbox_floor = 0 if last is None else _inbox_floor(last[0], last[1], inbox_retention)
        except sqlite3.DatabaseError as exc:
            self._release_lock()
            raise StoreError(f"{self.path}: cannot open the store: {exc}") from None
        self._tx_lock = WriterLock()  # held from begin() to commit()/rollback(); see WalCheckpointer
        self._holding_tx_lock = False
        self.writer_busy = 0  # begin(wait=False) found the WAL thread's last copy under way
        self._wal_checkpointer = WalCheckpointer(self.path, self._tx_lock)
        if background:
            self._syncer = WalSyncer(self.path.with_name(self.path.name + "-wal"))

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
        """Finish the fsyncs asked for, checkpoint the WAL into the main file and release the lock."""
        if getattr(self, "_conn", None) is None:
            return
        self.flush_durations()
        if self._syncer is not None:
            self._syncer.stop()
        self._wal_checkpointer.stop()
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

    @property
    def checkpoint_bytes_in_tx(self) -> int:
        """Model states written in the open transaction so far (its COMMIT costs about 1.5 ms
        and 2 ms more per MB of them here)."""
        return self._tx_checkpoint_bytes

    def begin(self, durable: bool = True, wait: bool = True, restart_wal: bool = False) -> bool:
        """Open the batch transaction (``durable=False``: commit it without an fsync); True.

        ``wait=False``: False at once, and no transaction, while the WAL thread's last copy
        holds the writer off (:class:`WalCheckpointer`; 5-15 ms here, longer on a slow disk).
        ``restart_wal`` (with ``wait``; for a writer committing back to back, never the agent's
        message path): first let the WAL thread start the WAL over once the file has grown to
        ``WalCheckpointer.HARD_BYTES`` (``WalCheckpointer.wait_restart``).
        """
        if self._in_batch:
            raise StoreError(f"{self.path}: a transaction is already open")
        if restart_wal and wait and not self._wal_checkpointer.wait_restart(WAL_RESTART_WAIT_S):
            logger.info("the WAL of %s was not started over within %.0f s (a reader holds it?); writing on",
                        self.path, WAL_RESTART_WAIT_S)
        if not self._tx_lock.acquire(blocking=wait):
            self.writer_busy += 1
            return False
        self._holding_tx_lock = True
        if not durable:
            self._conn.execute("PRAGMA synchronous=NORMAL")
        try:
            self._conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            self._restore_synchronous(durable)
            self._release_tx_lock()
            raise StoreError(f"{self.path}: cannot start a transaction: {exc}") from None
        self._in_batch = True
        self._durable = durable
        if self._durations_due:
            self._record_durations()
        self._tx_checkpoint_bytes = 0
        self._tx_steps = {}
        self._tx_finishes = []
        self._tx_bytes = 0
        self._tx_staged = False
        self._tx_inbox_floor = None
        return True

    def _release_tx_lock(self) -> None:
        if self._holding_tx_lock:
            self._holding_tx_lock = False
            self._tx_lock.release()

    def _restore_synchronous(self, durable: bool) -> None:
        if not durable:
            self._conn.execute(f"PRAGMA synchronous={self._sync_pragma}")

    def stage(self, rows: list[InboxRow], dead: list[DeadLetter]) -> None:
        """Insert rows and dead letters into the open batch. A row's ``seq`` is its given one
        (the writer numbers rows as it takes them) or, when 0, the next free one (set on it)."""
        assert self._in_batch, "stage() needs begin()"
        self._tx_staged = True
        cur = self._conn.cursor()
        try:
            for row in rows:
                cur.execute(
                    "INSERT INTO inbox (seq, received_at, topic, stream, kind, device, msg_key, payload_hash, payload,"
                    " micro_batch) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (row.seq or None, row.received_at, row.topic, row.stream, row.kind, row.device, row.msg_key,
                     row.payload_hash, row.payload, row.micro_batch),
                )
                row.seq = int(cur.lastrowid or 0)
                self._tx_bytes += len(row.payload) + 200  # the row, its index entries, page slack
            if dead:
                limit = self.dead_letter_payload_bytes
                cur.executemany(
                    "INSERT INTO dead_letter (received_at, topic, stream, reason, detail, payload_size, payload)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [(d.received_at, d.topic, d.stream, d.reason, d.detail, len(d.payload), d.payload[:limit])
                     for d in dead],
                )
            self._prune_some(cur, rows, dead)
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: write failed: {exc}") from None

    def _prune_some(self, cur: sqlite3.Cursor, rows: list[InboxRow], dead: list[DeadLetter]) -> None:
        """Delete a few rows past their retention: at most ``PRUNE_PER_ROW`` per row staged (and
        ``PRUNE_EXTRA`` more), oldest first, so that the backlog a checkpoint makes eligible (a
        whole interval, 1,000 rows by default) goes over the next batches instead of stalling
        one: deleting 1,000 inbox rows at once took 4-18 ms here."""
        if rows and self._inbox_floor > 0:
            budget = PRUNE_PER_ROW * len(rows) + PRUNE_EXTRA
            cur.execute("DELETE FROM inbox WHERE seq <= min(?, (SELECT min(seq) FROM inbox) + ?)",
                        (self._inbox_floor, budget - 1))
            self._tx_bytes += cur.rowcount * 100
        if dead:
            budget = PRUNE_PER_ROW * len(dead) + PRUNE_EXTRA
            cur.execute(
                "DELETE FROM dead_letter WHERE id <= min((SELECT max(id) FROM dead_letter) - ?,"
                " (SELECT min(id) FROM dead_letter) + ?)",
                (self.dead_letter_retention, budget - 1),
            )
            self._tx_bytes += cur.rowcount * 100

    def mark_micro_batches(self, groups: list[list[int]]) -> None:
        """Record, in the open batch, which staged rows were learned together: each group's
        rows (seqs, first first) get the seq of its first row."""
        assert self._in_batch, "mark_micro_batches() needs begin()"
        try:
            self._conn.executemany("UPDATE inbox SET micro_batch = ? WHERE seq = ?",
                                   [(group[0], seq) for group in groups for seq in group])
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: write failed: {exc}") from None

    def commit(self, on_durable: Callable[[], None] | None = None) -> None:
        """Commit the batch; on failure everything staged is gone and StoreError is raised.

        ``on_durable`` runs once the transaction is on disk (``synchronous = "full"``): on
        the WalSyncer's thread after its fsync (background_fsync), else before this returns.
        Nothing may be acknowledged to the broker before it runs.
        """
        assert self._in_batch, "commit() needs begin()"
        steps, finishes, n_bytes, staged = self._tx_steps, self._tx_finishes, self._tx_bytes, self._tx_staged
        floor = self._tx_inbox_floor
        durable = self._durable
        if steps:
            self._fault("checkpoint:before_commit")
        commit_started = time.perf_counter()
        try:
            self._conn.execute("COMMIT")
        except sqlite3.Error as exc:
            self.rollback()
            raise StoreError(f"{self.path}: commit failed: {exc}") from None
        finally:
            self._end_transaction()
        self._wal_checkpointer.wrote(n_bytes)
        if self._syncer is not None and durable:
            self._syncer.after(on_durable)
        elif on_durable is not None:
            on_durable()
        if floor is not None:
            self._inbox_floor = max(self._inbox_floor, floor)
        if steps:
            self._fault("checkpoint:after_commit")
            # the pause a step of a checkpoint caused: its own work, and the COMMIT when the
            # transaction is the step's alone (a batch commits, and fsyncs, with or without it)
            commit_ms = 0.0 if staged else (time.perf_counter() - commit_started) * 1000.0
            self.last_checkpoint_ms = max(steps.values()) + commit_ms
            for checkpoint_id, work_ms in steps.items():
                stall = work_ms + commit_ms
                self._stall_max_ms[checkpoint_id] = max(self._stall_max_ms.get(checkpoint_id, 0.0), stall)
            for checkpoint_id in finishes:
                # written with the next transaction: on its own, outside the writer's lock, it
                # waited up to 9 ms for the WAL thread's last copy
                self._durations_due[checkpoint_id] = self._stall_max_ms.pop(checkpoint_id, 0.0)

    @property
    def sync_error(self) -> str | None:
        """Why the fsync thread stopped (nothing committed since is acknowledged), or None."""
        return None if self._syncer is None else self._syncer.error

    def sync_stats(self) -> dict[str, int] | None:
        """The fsync thread's figures for the health report (None: the COMMIT fsyncs itself):
        fsyncs done, and commits still waiting for one (their messages not yet acknowledged)."""
        if self._syncer is None:
            return None
        return {"fsyncs": self._syncer.syncs, "waiting": self._syncer.behind}

    def wait_durable(self, timeout: float = 10.0) -> bool:
        """Wait until every commit so far is on disk and its ``on_durable`` has run."""
        return True if self._syncer is None else self._syncer.wait(timeout)

    def rollback(self) -> None:
        self._stall_max_ms = {}
        try:
            self._conn.execute("ROLLBACK")
        except sqlite3.Error as exc:
            # no transaction is active after some failed commits; that is fine
            logger.debug("rollback of %s: %s", self.path, exc)
        finally:
            self._end_transaction()

    def _end_transaction(self) -> None:
        """After COMMIT or ROLLBACK: no transaction open, ``synchronous`` restored, the lock
        released (a second call, as after a failed COMMIT, changes nothing)."""
        durable = self._durable
        self._in_batch = False
        self._durable = True
        self._tx_steps = {}
        self._tx_finishes = []
        self._restore_synchronous(durable)
        self._release_tx_lock()

    def inbox_after(self, position: int, limit: int) -> list[InboxRow]:
        """Up to ``limit`` inbox rows after ``position``, in order."""
        cur = self._conn.execute(
            "SELECT seq, received_at, topic, stream, kind, device, msg_key, payload_hash, payload, micro_batch"
            " FROM inbox WHERE seq > ? ORDER BY seq LIMIT ?",
            (position, limit),
        )
        return [
            InboxRow(r[1], r[2], r[3], r[4], r[5], r[6], r[7], bytes(r[8]), seq=r[0], micro_batch=r[9])
            for r in cur
        ]

    def last_seq(self) -> int:
        row = self._conn.execute("SELECT max(seq) FROM inbox").fetchone()
        return int(row[0] or 0)

    # -- checkpoints ---------------------------------------------------------------

    def load_checkpoint(self) -> Checkpoint | None:
        """The latest complete checkpoint, with each model's newest state in it, or None.

        Model rows of a checkpoint that never completed (the process stopped between
        its steps) are deleted first.
        """
        self.discard_incomplete()
        row = self._conn.execute(
            "SELECT id, created_at, position, replay_from FROM checkpoints ORDER BY id DESC LIMIT 1"
        ).fetchone()
        if row is None:
            return None
        checkpoint = Checkpoint(id=row[0], created_at=row[1], position=row[2],
                                replay_from=row[2] if row[3] is None else min(row[3], row[2]))
        for stream, key, tensors, state, position in self._conn.execute(
            "SELECT stream, model_key, tensors, state, position FROM current_models ORDER BY stream, model_key"
        ):
            try:
                arrays = load_tensors(bytes(tensors))
                checkpoint.slots.append(SlotState(stream, key, arrays, orjson.loads(state),
                                                  position=checkpoint.position if position is None else position))
            except (orjson.JSONDecodeError, SafetensorError) as exc:
                raise StoreError(
                    f"{self.path}: checkpoint of model {stream}/{key} is unreadable: {exc}"
                ) from None
        for stream, state in self._conn.execute("SELECT stream, state FROM stream_state"):
            checkpoint.streams[stream] = orjson.loads(state)
        return checkpoint

    def discard_incomplete(self) -> int:
        """Delete the model rows of a checkpoint that never completed; returns how many."""
        try:
            cur = self._conn.execute(
                "DELETE FROM models WHERE checkpoint_id > (SELECT coalesce(max(id), 0) FROM checkpoints)"
            )
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: cannot delete an incomplete checkpoint: {exc}") from None
        if cur.rowcount:
            logger.info("deleted %d model rows of a checkpoint that did not complete", cur.rowcount)
        return cur.rowcount

    def next_checkpoint_id(self) -> int:
        """The id the next checkpoint will complete under (its model rows carry it meanwhile)."""
        try:
            return int(self._conn.execute("SELECT coalesce(max(id), 0) FROM checkpoints").fetchone()[0]) + 1
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: cannot read the checkpoints: {exc}") from None

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
        """A whole checkpoint in one step: changed slots, stream states, metrics and drift events.

        Inside a staged batch it becomes part of the batch's transaction; otherwise it
        is its own transaction, committed without an fsync.
        """
        started = time.perf_counter() if started is None else started
        checkpoint_id = self.next_checkpoint_id()
        own = not self._in_batch
        if own:
            self.begin(durable=False, restart_wal=True)  # (back to back: a burst of them grows the WAL)
        try:
            n_bytes = self.write_models(checkpoint_id, slots, started=started, position=position)
            self.finish_checkpoint(checkpoint_id, position, streams, metrics, reason, events,
                                   slots_written=len(slots), bytes_written=n_bytes, started=started)
        except StoreError:
            if own:
                self.rollback()
            raise
        if own:
            self.commit()
        return checkpoint_id

    def _note_work(self, checkpoint_id: int, started: float | None) -> None:
        """A step of ``checkpoint_id`` that began at ``started`` has worked until now (each
        call of one step passes the same ``started``, so the last call gives its length)."""
        ms = 0.0 if started is None else (time.perf_counter() - started) * 1000.0
        self._tx_steps[checkpoint_id] = max(self._tx_steps.get(checkpoint_id, 0.0), ms)

    def write_models(self, checkpoint_id: int, slots: list[SlotState], started: float | None = None,
                     position: int | None = None) -> int:
        """One step of a checkpoint: store these models under ``checkpoint_id``; returns bytes written.

        Needs an open transaction. A model keeps its row of the last complete
        checkpoint until this one completes; older rows of it are deleted here.
        ``started`` (a ``time.perf_counter()`` value) is when the caller began the
        step, so the pause recorded at COMMIT includes collecting the state.
        ``position``: the inbox position the states belong to (the checkpoint's; None
        reads back as the position of the checkpoint loaded).
        """
        assert self._in_batch, "write_models() needs begin()"
        now = time.time()
        n_bytes = 0
        cur = self._conn.cursor()
        try:
            for slot in slots:
                tensors = save_tensors({k: np.ascontiguousarray(v) for k, v in slot.tensors.items()})
                state = slot.state_json if slot.state_json is not None else _json(slot.state)
                n_bytes += len(tensors) + len(state)
                self._tx_bytes += len(tensors) + len(state)
                self._tx_checkpoint_bytes += len(tensors) + len(state)
                cur.execute(
                    "INSERT OR REPLACE INTO models (stream, model_key, checkpoint_id, tensors, state, updated_at,"
                    " position) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (slot.stream, slot.model_key, checkpoint_id, tensors, state, now, position),
                )
                cur.execute(
                    "DELETE FROM models WHERE stream = ? AND model_key = ? AND checkpoint_id < ("
                    "SELECT max(checkpoint_id) FROM models WHERE stream = ? AND model_key = ? AND checkpoint_id < ?)",
                    (slot.stream, slot.model_key, slot.stream, slot.model_key, checkpoint_id),
                )
            self._fault("checkpoint:models_written")
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: checkpoint write failed: {exc}") from None
        self._note_work(checkpoint_id, started)
        return n_bytes

    def finish_checkpoint(
        self, checkpoint_id: int, position: int, streams: dict[str, dict[str, Any]],
        metrics: list[dict[str, Any]], reason: str, events: list[DriftEvent] | None,
        slots_written: int, bytes_written: int, started: float | None = None,
        replay_from: int | None = None,
    ) -> None:
        """The last step of a checkpoint: stream states, metrics, drift events and its row in
        ``checkpoints`` (which makes its models the ones a restart loads), at ``position``.
        ``replay_from``: below ``position`` when changed models were left with older rows,
        the oldest of their positions (a restart replays their readings from there)."""
        assert self._in_batch, "finish_checkpoint() needs begin()"
        now = time.time()
        cur = self._conn.cursor()
        try:
            for stream, state in streams.items():
                text = _json(state)
                bytes_written += len(text)
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
            self._prune(cur, position, now, replay_from)
            cur.execute(
                "INSERT INTO checkpoints (id, created_at, position, slots_written, bytes_written, duration_ms, reason,"
                " replay_from) VALUES (?, ?, ?, ?, ?, 0, ?, ?)",
                (checkpoint_id, now, position, slots_written, bytes_written, reason,
                 None if replay_from is None or replay_from >= position else replay_from),
            )
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: checkpoint write failed: {exc}") from None
        self._note_work(checkpoint_id, started)
        self._tx_finishes.append(checkpoint_id)

    def flush_durations(self) -> None:
        """Write the pauses of completed checkpoints not yet recorded (``close`` does; readers of
        ``checkpoints.duration_ms`` in the same process, like the benchmarks, may)."""
        if not self._durations_due or self._in_batch:
            return
        try:
            self._conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            logger.warning("could not record the checkpoints' durations: %s", exc)
            return
        self._record_durations()
        self._conn.execute("COMMIT")

    def _record_durations(self) -> None:
        """In the transaction just begun: the longest pause among the steps (collecting and
        writing; the COMMIT too when the step had a transaction of its own) of each checkpoint
        completed since the last one."""
        due, self._durations_due = self._durations_due, {}
        try:
            self._conn.executemany("UPDATE checkpoints SET duration_ms = ? WHERE id = ?",
                                   [(ms, checkpoint_id) for checkpoint_id, ms in due.items()])
        except sqlite3.Error as exc:  # only a figure is lost
            logger.warning("could not record the checkpoints' durations: %s", exc)

    def _prune(self, cur: sqlite3.Cursor, position: int, now: float, replay_from: int | None = None) -> None:
        """What a checkpoint deletes (a few rows each); the inbox and the dead letters past their
        retention go a few at a time with later batches (``_prune_some``), from the floor this
        checkpoint sets once it commits (never above where a restart must replay from)."""
        self._tx_inbox_floor = _inbox_floor(position, replay_from, self.inbox_retention)
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


class WriterLock:
    """The lock the store's writer holds for each transaction, which the WAL thread's last copy
    takes ahead of the writer's next turn.

    A plain ``threading.Lock`` is not fair: a writer committing back to back (a checkpoint of
    many models written in one go) released it and took it again before the waiting WAL thread
    ran, so the WAL was not started over until the burst ended (39 MB for a 48 MB burst, where
    ``HARD_BYTES`` is 16 MB). While the WAL thread waits for it (``acquire_first``), the
    writer's ``acquire`` waits for the WAL thread's turn, or with ``blocking=False`` gives up at
    once (the agent stages its rows later: ``SQLiteStore.begin(wait=False)``).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._turn = threading.Condition(threading.Lock())
        self._wanted = 0  # acquire_first calls waiting for the lock

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        """The writer's turn (after the WAL thread's, when it waits for one)."""
        if self._wanted:
            if not blocking:
                return False
            with self._turn:
                # (bounded: acquire_first gives up after its own timeout and says so here)
                self._turn.wait_for(lambda: not self._wanted, timeout if timeout >= 0 else None)
        return self._lock.acquire(blocking, timeout)

    def acquire_first(self, timeout: float) -> bool:
        """The WAL thread's turn, before any writer that asks after this call."""
        with self._turn:
            self._wanted += 1
        try:
            return self._lock.acquire(timeout=timeout)
        finally:
            with self._turn:
                self._wanted -= 1
                self._turn.notify_all()

    def release(self) -> None:
        self._lock.release()


class WalCheckpointer:
    """Copies the WAL into the main database file from a thread of its own.

    A PASSIVE checkpoint never waits for the writer or for readers (it copies what
    no reader still needs), and the sqlite3 module releases the GIL while SQLite
    works, so the agent's thread goes on handling messages meanwhile. But the WAL
    only starts over when a write transaction begins after a checkpoint copied all
    of it, and under a steady stream of commits a concurrent checkpoint rarely ends
    with nothing left. So once the WAL holds ``restart_bytes``, the thread copies
    the bulk first, then takes ``tx_lock`` (the store holds it from BEGIN to
    COMMIT; the WAL thread's turn comes before the writer's next: :class:`WriterLock`),
    so that no transaction starts meanwhile, copies the last few frames (at
    most about ``FINAL_BYTES_MAX``) and truncates the file; the agent does not
    wait for it (``SQLiteStore.begin(wait=False)``: it stages what it took
    meanwhile afterwards).

    Parameters
    ----------
    path
        The store's file.
    tx_lock
        Held by the store's writer for each transaction.
    interval
        Seconds between checkpoints at the latest.
    wake_bytes
        The writer wakes the thread (``wrote``) each time it has written about this
        much, so that a burst (the checkpoint of a thousand models) is copied as it
        comes, while a slow trickle costs one checkpoint (and fsync) a second.
    restart_bytes
        WAL content from which the thread makes sure it starts over.
    truncate_bytes
        A WAL file larger than this (content started over in a file a burst had grown) is
        cut back by the same last copy, once all of it is copied: the writer's own
        connection never truncates it (``journal_size_limit = -1``), since that ftruncate
        took ~9 ms on the agent's thread.
    """

    FINAL_BYTES_MAX = 64 << 10  # at most about this much is left for the copy the agent may wait for
    HARD_BYTES = 16 << 20  # beyond this the WAL is started over even if the agent has to wait longer

    def __init__(self, path: Path, tx_lock: WriterLock, interval: float = 1.0,
                 restart_bytes: int = 4 << 20, wake_bytes: int = 1 << 20, truncate_bytes: int = 4 << 20) -> None:
        self.path = path
        self.wal_path = path.with_name(path.name + "-wal")
        self.truncate_bytes = truncate_bytes
        self.tx_lock = tx_lock
        self.interval = interval
        self.restart_bytes = restart_bytes
        self.checkpoints = 0
        self.wake_bytes = wake_bytes
        self._written = 0
        self._since_copy = 0  # written since the last checkpoint began
        self._wait_from = self.HARD_BYTES  # a writer waits for the WAL to start over past this file size
        self._restarted = threading.Event()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="streamlearn-wal", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            conn = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
            page = int(conn.execute("PRAGMA page_size").fetchone()[0])
            conn.execute("PRAGMA busy_timeout=20")  # the final copy holds the writer's lock meanwhile
            # (checkpoints sync the WAL before and the database after either way; NORMAL spares the
            # one commit this thread makes, below, the sync of its frame)
            conn.execute("PRAGMA synchronous=NORMAL")
        except sqlite3.Error as exc:
            logger.error("the WAL checkpointer cannot open %s (the agent's own commits will copy the WAL): %s",
                         self.path, exc)
            return
        failing = False
        try:
            while True:
                self._wake.wait(self.interval)
                self._wake.clear()
                if self._stop.is_set():
                    break
                try:
                    for _ in range(8):  # copy until what the agent wrote meanwhile is little
                        self._since_copy = 0
                        _, frames, copied = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                        self.checkpoints += 1
                        if frames * page < self.restart_bytes or copied < frames:
                            # small, or a reader still needs old frames: nothing to start over; but a
                            # file left large by a burst (the WAL started over in it) is cut back
                            if copied == frames and self._since_copy <= self.FINAL_BYTES_MAX \
                                    and self._wal_size() > self.truncate_bytes:
                                self._final_copy(conn)
                            break
                        # the agent writing back to back (a checkpoint of many models with no
                        # message waiting) never leaves little: past HARD_BYTES, it waits longer
                        if self._since_copy <= self.FINAL_BYTES_MAX or frames * page >= self.HARD_BYTES:
                            self._final_copy(conn)
                            break
                    if failing:
                        logger.info("the WAL checkpointer works again")
                        failing = False
                except sqlite3.Error as exc:  # a full disk: the WAL keeps the data, try again later
                    if not failing:
                        logger.warning("WAL checkpoint of %s failed (retrying): %s", self.path, exc)
                        failing = True
        finally:
            conn.close()

    def _wal_size(self) -> int:
        try:
            return self.wal_path.stat().st_size
        except OSError:
            return 0

    def _final_copy(self, conn: sqlite3.Connection) -> None:
        """Copy what the agent wrote since, with no transaction of its under way."""
        if not self.tx_lock.acquire_first(timeout=1.0):
            return
        try:
            # TRUNCATE: with no writer, copy the rest and start the WAL over now (an agent that has
            # gone idle would never begin the transaction that does it); it waits at most
            # busy_timeout for readers, and if one stays, the next write starts it over instead
            busy, frames, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            if not busy and frames == 0:
                self._wait_from = self.HARD_BYTES
                self._restarted.set()
                # the first commit into a WAL started over writes its header and syncs it (0.19 ms
                # against 0.02 for the next, on an idle disk in a one-off check); make it this
                # thread's, still holding the writer off, so that the agent's next COMMIT appends
                conn.execute("BEGIN IMMEDIATE")
                conn.execute("INSERT OR REPLACE INTO agent_info (key, value) VALUES ('wal_started_over_at', ?)",
                             (repr(time.time()),))
                conn.execute("COMMIT")
        finally:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            self.tx_lock.release()

    def wrote(self, n_bytes: int) -> None:
        """Called by the writer after a commit with about how much it wrote."""
        self._written += n_bytes
        self._since_copy += n_bytes
        if self._written >= self.wake_bytes:
            self._written = 0
            self._wake.set()

    def wait_restart(self, timeout: float) -> bool:
        """A writer committing back to back (``begin(restart_wal=True)``: ``write_checkpoint``'s
        own transactions) waits here, once the WAL file has
        grown to ``HARD_BYTES``, for this thread to copy it and start it over (truncated): its
        copies ran behind such a writer, a 48 MB burst grew the WAL to 39 MB. False after
        ``timeout`` (a reader holding old frames, say); then not again for another ``HARD_BYTES``.
        (A file the writer's own transactions started over in stays large with little in it:
        the thread's copy is short then, and it cuts the file back.)"""
        if self._wal_size() < self._wait_from:
            return True
        self._restarted.clear()
        if self._wal_size() < self._wait_from:  # (cut back meanwhile)
            return True
        self._wake.set()
        if self._restarted.wait(timeout):
            return True
        self._wait_from = self._wal_size() + self.HARD_BYTES
        return False

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=10.0)
        if self._thread.is_alive():
            logger.warning("the WAL checkpointer of %s did not stop within 10 s", self.path)
