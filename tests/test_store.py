"""The SQLite store: transactions, checkpoints, lock, read-only readers."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from streamlearn.errors import StoreError, StoreLockedError
from streamlearn.store import DeadLetter, InboxRow, SlotState, SQLiteStore, reader


def row(i: int, key: str | None = None) -> InboxRow:
    return InboxRow(float(i), "a/b", "s", "reading", "dev", key, i * 7919, b'{"x": %d}' % i)


def test_append_assigns_positions_and_stores_dead_letters(store_path: Path) -> None:
    store = SQLiteStore(store_path)
    rows = [row(i, f"k{i}") for i in range(3)]
    store.append(rows, [DeadLetter(1.0, "a/b", "s", "not_json", "bad", b"x" * 10_000)])
    assert [r.seq for r in rows] == [1, 2, 3]
    assert store.find_key("k1") == 7919 and store.find_key("nope") is None
    assert store.seen_hash("a/b", 2 * 7919) and not store.seen_hash("a/c", 2 * 7919)
    assert [r.seq for r in store.inbox_after(1, 10)] == [2, 3]
    conn = reader.open_readonly(store_path)
    size, kept = conn.execute("SELECT payload_size, length(payload) FROM dead_letter").fetchone()
    assert (size, kept) == (10_000, 4096)
    store.close()


def test_a_failed_transaction_leaves_nothing(store_path: Path) -> None:
    store = SQLiteStore(store_path)
    bad = InboxRow(1.0, "a/b", "s", "reading", "dev", None, 1, None)  # type: ignore[arg-type]
    with pytest.raises(StoreError, match="write failed"):
        store.append([row(1), bad], [])
    assert store.inbox_after(0, 10) == []
    store.append([row(2)], [])
    assert [r.seq for r in store.inbox_after(0, 10)] == [1]
    store.close()


def test_checkpoints_round_trip_exactly(store_path: Path) -> None:
    store = SQLiteStore(store_path)
    params = np.random.default_rng(0).normal(size=(1, 50)).astype(np.float32)
    slot = SlotState("s", "dev", {"params": params}, {"x": [0.1, 1 / 3], "n": 5})
    store.write_checkpoint(7, [slot], {"s": {"pending": []}}, [], "test")
    store.close()
    again = SQLiteStore(store_path)
    cp = again.load_checkpoint()
    assert cp is not None and cp.position == 7
    np.testing.assert_array_equal(cp.slots[0].tensors["params"], params)
    assert cp.slots[0].state == {"x": [0.1, 1 / 3], "n": 5}
    assert cp.streams == {"s": {"pending": []}}
    assert again.integrity_check() == "ok"
    again.close()


def test_a_checkpoint_that_did_not_complete_is_ignored_and_deleted(store_path: Path) -> None:
    store = SQLiteStore(store_path)
    first = np.ones((1, 4), dtype=np.float32)
    store.write_checkpoint(3, [SlotState("s", "a", {"params": first}, {"v": 1}),
                               SlotState("s", "b", {"params": first}, {"v": 1})], {"s": {"n": 1}}, [], "test")
    cid = store.next_checkpoint_id()
    store.begin(durable=False)  # a checkpoint written in steps: one model, then the process dies
    store.write_models(cid, [SlotState("s", "a", {"params": first * 2}, {"v": 2})])
    store.commit()
    store.close()
    again = SQLiteStore(store_path)
    cp = again.load_checkpoint()
    assert cp is not None and cp.id == cid - 1 and cp.position == 3
    assert [(s.model_key, s.state["v"]) for s in cp.slots] == [("a", 1), ("b", 1)]
    assert again._conn.execute("SELECT count(*) FROM models").fetchone() == (2,)  # its row is gone
    again.close()


def test_each_checkpoint_records_its_own_steps_not_the_batch_between_them(store_path: Path) -> None:
    """A batch transaction may hold the last step of one checkpoint, the processing of its
    messages, and the first step of the next: the pause recorded is each step's own work."""
    import time

    store = SQLiteStore(store_path)
    params = np.ones((1, 4), dtype=np.float32)
    first, second = store.next_checkpoint_id(), store.next_checkpoint_id() + 1
    store.begin()
    store.stage([row(1)], [])
    started = time.perf_counter()
    store.write_models(first, [SlotState("s", "a", {"params": params}, {"v": 1})], started=started)
    store.finish_checkpoint(first, 1, {}, [], "interval", [], slots_written=1, bytes_written=0, started=started)
    processing_until = time.perf_counter() + 0.2  # the batch's messages, handled between the steps
    while time.perf_counter() < processing_until:
        pass
    started = time.perf_counter()
    store.write_models(second, [SlotState("s", "a", {"params": params * 2}, {"v": 2})], started=started)
    store.finish_checkpoint(second, 1, {}, [], "interval", [], slots_written=1, bytes_written=0, started=started)
    store.commit()
    store.flush_durations()  # (else written with the next transaction)
    durations = store._conn.execute("SELECT id, duration_ms FROM checkpoints ORDER BY id").fetchall()
    assert [d[0] for d in durations] == [first, second]
    assert all(0 < d[1] < 100 for d in durations), durations  # not the 200 ms between them
    store.close()


def test_a_model_keeps_at_most_two_rows(store_path: Path) -> None:
    store = SQLiteStore(store_path)
    for v in range(1, 5):
        store.write_checkpoint(v, [SlotState("s", "a", {"params": np.full((1, 4), v, np.float32)}, {"v": v})],
                               {}, [], "test")
    rows = store._conn.execute("SELECT checkpoint_id FROM models ORDER BY checkpoint_id").fetchall()
    assert rows == [(3,), (4,)]
    assert store.load_checkpoint().slots[0].state == {"v": 4}
    store.close()


def seqs(store: SQLiteStore) -> list[int]:
    return [r.seq for r in store.inbox_after(0, 1000)]


def test_batches_prune_the_inbox_behind_the_retention_a_few_rows_at_a_time(store_path: Path) -> None:
    from streamlearn.store.sqlite import PRUNE_EXTRA, PRUNE_PER_ROW

    store = SQLiteStore(store_path, inbox_retention=5)
    store.append([row(i) for i in range(40)], [])
    store.write_checkpoint(40, [], {}, [], "test")
    assert seqs(store) == list(range(1, 41))  # the checkpoint itself deletes none of them
    store.append([row(40)], [])  # one row staged: PRUNE_PER_ROW + PRUNE_EXTRA old ones go
    first = PRUNE_PER_ROW + PRUNE_EXTRA
    assert seqs(store) == list(range(first + 1, 42))
    for i in range(41, 50):
        store.append([row(i)], [])
    # never past the checkpoint's position less the retention: rows 36 to 40 stay for a replay
    assert seqs(store)[0] == 36 and seqs(store)[-1] == 50
    store.close()


def test_an_uncommitted_checkpoint_lets_nothing_be_pruned_and_a_reopened_store_goes_on(store_path: Path) -> None:
    store = SQLiteStore(store_path, inbox_retention=5)
    store.append([row(i) for i in range(20)], [])
    store.begin()
    store.finish_checkpoint(1, 20, {}, [], "test", [], slots_written=0, bytes_written=0)
    store.rollback()
    store.append([row(20)], [])
    assert seqs(store)[0] == 1
    store.write_checkpoint(21, [], {}, [], "test")
    store.close()
    store = SQLiteStore(store_path, inbox_retention=5)
    store.append([row(i) for i in range(21, 30)], [])  # 9 rows: a budget of 22
    assert seqs(store)[0] == 17 and len(seqs(store)) == 30 - 16
    store.close()


def test_batches_prune_dead_letters_behind_their_retention(store_path: Path) -> None:
    def ids(store: SQLiteStore) -> list[int]:
        return [r[0] for r in store._conn.execute("SELECT id FROM dead_letter ORDER BY id")]

    dead = DeadLetter(1.0, "a/b", "s", "not_json", "bad", b"x")
    store = SQLiteStore(store_path)
    store.append([], [dead] * 50)
    store.close()
    store = SQLiteStore(store_path, dead_letter_retention=3)  # the retention lowered: 48 past it
    store.append([], [dead])  # 2 + 4 of them go with one new dead letter
    assert ids(store) == list(range(7, 52))
    for _ in range(20):
        store.append([], [dead])
    assert ids(store) == [69, 70, 71]
    store.close()


def test_one_agent_per_store(store_path: Path) -> None:
    first = SQLiteStore(store_path)
    with pytest.raises(StoreLockedError, match="in use by another streamlearn agent"):
        SQLiteStore(store_path)
    assert reader.agent_running(store_path)
    first.close()
    assert not reader.agent_running(store_path)
    SQLiteStore(store_path).close()


def test_readers_cannot_write(store_path: Path) -> None:
    SQLiteStore(store_path).close()
    conn = reader.open_readonly(store_path)
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        conn.execute("DELETE FROM inbox")


def test_reader_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no such store"):
        reader.open_readonly(tmp_path / "missing.db")
    other = tmp_path / "other.db"
    sqlite3.connect(other).execute("CREATE TABLE t (x)")
    with pytest.raises(StoreError, match="not a streamlearn store"):
        reader.open_readonly(other)


def test_an_old_store_is_migrated_and_migrations_are_recorded(store_path: Path) -> None:
    from sqlite_utils import Database

    from streamlearn.store.schema import migrations

    old = Database(store_path)
    migrations.apply(old, stop_before="m002_drift_events")  # a store written by the first release
    old.execute("INSERT INTO checkpoints (created_at, position, slots_written, bytes_written, duration_ms, reason)"
                " VALUES (1, 5, 0, 0, 0, 'old')")
    old.execute("INSERT INTO models (stream, model_key, tensors, state, checkpoint_id, updated_at)"
                " VALUES ('s', 'd1', x'00', '{}', 1, 1)")
    old.conn.commit()
    old.close()
    SQLiteStore(store_path).close()
    conn = sqlite3.connect(store_path)
    assert [r[0] for r in conn.execute("SELECT name FROM _sqlite_migrations")] == [
        "m001_initial", "m002_drift_events", "m003_metrics_batched", "m004_model_versions",
        "m005_inbox_micro_batch", "m006_model_positions"]
    assert conn.execute("SELECT position, replay_from FROM checkpoints").fetchone() == (5, None)
    # a model row takes the position of the checkpoint that wrote it
    assert conn.execute("SELECT stream, model_key, checkpoint_id, position FROM current_models").fetchall() == [
        ("s", "d1", 1, 5)]
    assert conn.execute("SELECT count(*) FROM drift_events").fetchone() == (0,)
    SQLiteStore(store_path).close()  # applying again is a no-op


def test_the_wal_threads_turn_comes_before_the_writers_next() -> None:
    """A plain lock let a writer committing back to back take it again before the waiting WAL
    thread ran; the writer lock hands it to the WAL thread at the writer's next release."""
    from streamlearn.store.sqlite import WriterLock

    lock = WriterLock()
    assert lock.acquire()  # the writer's transaction
    order: list[str] = []
    got = threading.Event()

    def wal_thread() -> None:
        if lock.acquire_first(timeout=10.0):
            order.append("wal")
            got.set()
            order.append("wal done")  # its last copy, holding the writer off
            lock.release()

    t = threading.Thread(target=wal_thread)
    t.start()
    deadline = time.monotonic() + 10.0
    while not lock._wanted and time.monotonic() < deadline:  # until the WAL thread waits
        time.sleep(0.001)
    assert lock._wanted
    assert not lock.acquire(blocking=False)  # the agent's begin(wait=False): held off at once
    for i in range(200):  # the writer, back to back: release and take it again at once
        lock.release()
        assert lock.acquire(timeout=10.0)
        order.append(f"writer {i}")
        if got.is_set():
            break
    lock.release()
    t.join(10.0)
    assert order[:2] == ["wal", "wal done"], order[:5]  # its turn came at the writer's first release
    assert order[2] == "writer 0"


def test_the_wal_is_copied_off_the_writer_and_starts_over(store_path: Path) -> None:
    """A 48 MB burst of checkpoints written back to back: the WAL stays well below that (the
    background thread starts it over past 16 MB even when the writer never pauses); once the writer
    is idle the background thread copies it all and cuts the file back (the writer's own commits
    never truncate it: that took 9 ms on the agent's thread)."""
    from tests.helpers import wait_for

    store = SQLiteStore(store_path, synchronous="normal")
    wal = store_path.with_name(store_path.name + "-wal")
    rng = np.random.default_rng(0)
    blob = rng.normal(size=(1, 25_000)).astype(np.float32)  # 100 KB a model
    largest = 0
    for i in range(480):
        store.write_checkpoint(i, [SlotState("s", f"m{i % 40}", {"params": blob}, {"i": i})], {}, [], "test")
        largest = max(largest, wal.stat().st_size)
    assert largest < 24 * 2**20  # it started over during the burst
    checkpointer = store._wal_checkpointer
    after = checkpointer.checkpoints
    # the thread's second checkpoint after the burst began after it: everything is copied
    wait_for(lambda: wal.stat().st_size <= 4 * 2**20, 30, what="the background thread to cut the WAL back")
    store.append([row(1)], [])  # the writer appends to it
    assert wal.stat().st_size <= 4 * 2**20
    assert store.load_checkpoint().position == 479
    store.close()


def test_a_commit_runs_what_waits_for_it_only_after_the_fsync_threads_fsync(
        store_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from streamlearn.store import wal_sync

    real = wal_sync.os.fdatasync
    gate = threading.Event()
    synced: list[int] = []

    def fdatasync(fd: int) -> None:
        assert gate.wait(10)
        real(fd)
        synced.append(fd)

    monkeypatch.setattr(wal_sync.os, "fdatasync", fdatasync)
    store = SQLiteStore(store_path)
    acked: list[int] = []
    for i in range(3):
        store.begin()
        store.stage([row(i)], [])
        store.commit(on_durable=lambda i=i: acked.append(i))
    assert acked == [] and store._syncer is not None and store._syncer.behind == 3  # the fsync is held up
    gate.set()
    assert store.wait_durable(10)
    assert acked == [0, 1, 2] and 1 <= len(synced) <= 2  # commits made while one fsync ran share the next
    store.close()
    inline = SQLiteStore(store_path, background_fsync=False)
    inline.begin()
    inline.stage([row(4)], [])
    inline.commit(on_durable=lambda: acked.append(4))
    assert acked[-1] == 4  # the fsync was the COMMIT's own
    inline.close()


def test_a_failed_fsync_runs_nothing_that_waits_for_it_and_is_not_tried_again(
        store_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from streamlearn.store import wal_sync

    calls: list[int] = []

    def fdatasync(fd: int) -> None:
        calls.append(fd)
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(wal_sync.os, "fdatasync", fdatasync)
    store = SQLiteStore(store_path)
    acked: list[int] = []
    store.begin()
    store.stage([row(1)], [])
    store.commit(on_durable=lambda: acked.append(1))
    assert store.wait_durable(10)
    assert store.sync_error is not None and "Input/output error" in store.sync_error
    store.begin()
    store.stage([row(2)], [])
    store.commit(on_durable=lambda: acked.append(2))
    assert store._syncer is not None and store._syncer.behind == 1  # the second asked nothing of the disk
    assert store.wait_durable(0)  # nothing to wait for: it failed
    assert acked == [] and len(calls) == 1
    store.close()
