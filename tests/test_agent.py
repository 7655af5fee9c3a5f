"""The agent's loop with an in-memory transport: dedupe, acks, replay, dead letters."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from streamlearn.agent import Agent, open_store
from streamlearn.clock import ManualClock
from streamlearn.config import Config, parse_config
from streamlearn.errors import ConfigError, StoreError, StoreSyncError
from streamlearn.sim import SensorSimulator
from streamlearn.store import SQLiteStore
from streamlearn.transport.memory import MemoryTransport


def config(store: Path, micro_batch: bool = False, step_ms: float = 2.0, batch_max: int = 64,
           micro_batch_size_max: int = 8, store_settings: dict[str, Any] | None = None, **stream: Any) -> Config:
    """Strict test-then-train unless ``micro_batch``: bit-exact replay needs it (micro-batches
    depend on how messages happened to arrive). Micro-batches of 8 whatever the backlog,
    unless ``micro_batch_size_max``."""
    s = {
        "name": "boiler", "topic": "s/+/boiler", "device": {"topic_level": 1},
        "features": ["t_in", "t_out", "flow", "load"], "label": {"field": "power"},
        "id_fields": ["boot", "seq"], "sequence_field": "seq",
    }
    s.update(stream)
    return parse_config({"store": {"path": str(store), "checkpoint_every_messages": 250,
                                   "checkpoint_step_ms": step_ms, **(store_settings or {})},
                         "agent": {"batch_max": batch_max, "micro_batch": micro_batch, "micro_batch_backlog": 8,
                                   "micro_batch_size_max": micro_batch_size_max},
                         "streams": [s]})


def drain(agent: Agent) -> None:
    """Step until nothing is left, then wait for the commits' fsync (and the acknowledgements
    after it, which the store's fsync thread sends)."""
    while agent.step(timeout=0):
        pass
    assert agent.store.wait_durable(10.0)


def make(store_path: Path, micro_batch: bool = False, step_ms: float = 2.0, micro_batch_size_max: int = 8,
         store_settings: dict[str, Any] | None = None, **stream: Any) -> tuple[Agent, MemoryTransport, Config]:
    cfg = config(store_path, micro_batch, step_ms, micro_batch_size_max=micro_batch_size_max,
                 store_settings=store_settings, **stream)
    transport = MemoryTransport()
    agent = Agent(cfg, transport, open_store(cfg))
    agent.recover()
    transport.start(agent.codec.subscriptions)
    return agent, transport, cfg


def test_redeliveries_are_dropped_and_reused_ids_dead_lettered(store_path: Path) -> None:
    agent, t, _ = make(store_path)
    body = {"t_in": 1, "t_out": 2, "flow": 3, "load": 4, "power": 5, "boot": "b", "seq": 1}
    t.inject("s/d1/boiler", orjson.dumps(body))
    drain(agent)
    t.inject("s/d1/boiler", orjson.dumps(body), dup=True)  # the broker's redelivery
    t.inject("s/d1/boiler", orjson.dumps({**body, "power": 6}))  # a sensor reusing an id
    t.inject("s/d2/boiler", orjson.dumps(body))  # same id on another device: a new reading
    drain(agent)
    assert agent.counters["redeliveries"] == 1
    assert agent.counters["processed"] == 2
    dead = [orjson.loads(p) for topic, p, _, _ in t.published if topic.endswith("dead-letter")]
    assert [d["reason"] for d in dead] == ["duplicate_id"]
    assert sorted(t.acked) == [1, 2, 3, 4]  # everything is acknowledged, drops included
    agent.store.close()


def test_identical_readings_without_ids_count_twice_unless_redelivered(store_path: Path) -> None:
    agent, t, _ = make(store_path, id_fields=[], sequence_field=None)
    payload = b'{"t_in": 1, "t_out": 2, "flow": 3, "load": 4, "power": 5}'
    t.inject("s/d1/boiler", payload)
    t.inject("s/d1/boiler", payload)
    t.inject("s/d1/boiler", payload, dup=True)
    drain(agent)
    assert agent.counters["processed"] == 2 and agent.counters["redeliveries"] == 1
    fsync = agent.status()["fsync"]  # the store's fsync thread: every commit is on disk and acknowledged
    assert fsync["waiting"] == 0 and fsync["fsyncs"] >= 1
    agent.store.close()


class FailingStore:
    """Wraps a real store; its next ``failures`` commits fail like a full disk."""

    def __init__(self, store: SQLiteStore, failures: int) -> None:
        self._store = store
        self.failures = failures

    def commit(self, on_durable: Any = None) -> None:
        if self.failures > 0:
            self.failures -= 1
            self._store.rollback()
            raise StoreError("database or disk is full")
        self._store.commit(on_durable)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


def test_nothing_is_acknowledged_before_it_is_committed_nor_learned_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = config(tmp_path / "failing.db")
    t = MemoryTransport()
    store = FailingStore(open_store(cfg), failures=2)
    agent = Agent(cfg, t, store)  # type: ignore[arg-type]
    agent.recover()
    t.start(agent.codec.subscriptions)
    acked_during_failure: list[list[int]] = []
    real_wait = agent._stop.wait

    def wait(delay: float) -> bool:
        acked_during_failure.append(list(t.acked))
        return real_wait(0)

    monkeypatch.setattr(agent._stop, "wait", wait)
    messages = list(SensorSimulator(cfg.streams[0], seed=1).messages(10))
    for m in messages:
        t.inject(m.topic, m.payload)
    drain(agent)
    assert acked_during_failure == [[], []]  # two failed commits, no ack meanwhile
    assert sorted(t.acked) == list(range(1, 11))
    assert agent.counters["store_errors"] == 2 and agent.counters["reloads"] == 2
    runner = agent.runners["boiler"]
    assert runner.counters["learned_count"] == 10  # the failed attempts were forgotten, not learned twice
    clean, t2, _ = make(tmp_path / "clean.db")
    run_messages(clean, t2, messages)
    for key, slot in clean.runners["boiler"].slots.items():
        np.testing.assert_array_equal(slot.learner.net.params, runner.slots[key].learner.net.params)
    store.close()
    clean.store.close()


def run_messages(agent: Agent, t: MemoryTransport, messages: list) -> None:
    for m in messages:
        t.inject(m.topic, m.payload)
    drain(agent)


def test_a_failed_fsync_stops_the_agent_with_nothing_acknowledged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Once the WAL's fsync fails the agent cannot know what is on disk: it acknowledges nothing
    more, writes nothing more, and stops with the reason (its service manager restarts it; the
    broker delivers again what was not acknowledged)."""
    import threading

    from streamlearn.store import wal_sync

    def fdatasync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(wal_sync.os, "fdatasync", fdatasync)
    cfg = config(tmp_path / "eio.db")
    t = MemoryTransport()
    agent = Agent(cfg, t, open_store(cfg))
    for m in SensorSimulator(cfg.streams[0], seed=3).messages(20):
        t.inject(m.topic, m.payload)
    stop = threading.Event()
    guard = threading.Timer(30.0, stop.set)  # bounds the test should the agent not stop by itself
    guard.start()
    try:
        with pytest.raises(StoreSyncError, match="fsync of .* failed: Input/output error; stopping"):
            agent.run(stop)
    finally:
        guard.cancel()
        agent.store.close()
    assert not stop.is_set()
    assert agent.counters["processed"] == 20 and t.acked == []
    assert agent.status()["last_error"].startswith("store: fsync of")


def test_batches_within_the_commit_delay_share_one_commit_and_are_acknowledged_after_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Three batches arriving within ``commit_delay_ms`` of the first: their predictions go out at
    once, one COMMIT makes them durable, and only then are they acknowledged. A failed COMMIT
    takes the whole group again, and nothing is learned twice."""
    cfg = config(tmp_path / "g.db")
    assert cfg.agent.commit_delay_ms == 5.0  # the shipped default
    clock = ManualClock(start=10.0)
    t = MemoryTransport()
    store = FailingStore(open_store(cfg), failures=1)
    agent = Agent(cfg, t, store, clock=clock)  # type: ignore[arg-type]
    agent.recover()
    t.start(agent.codec.subscriptions)
    monkeypatch.setattr(agent._stop, "wait", lambda delay: False)  # no back-off sleep after the failure
    messages = list(SensorSimulator(cfg.streams[0], seed=2).messages(9))
    for i in range(3):
        for m in messages[3 * i:3 * i + 3]:
            t.inject(m.topic, m.payload)
        assert agent.step(timeout=0) == 3
        clock.advance(0.001)  # 1 ms apart: within the delay
    predictions = [p for p in t.published if p[0].endswith("/prediction")]
    assert len(predictions) == 9 and t.acked == []  # predicted and learned, not yet committed
    assert agent.counters["commits"] == 0 and store.in_batch
    clock.advance(0.005)
    assert agent.step(timeout=0) == 0  # due: the commit fails once, the group is taken again, commits
    assert store.wait_durable(10.0)  # and the store's fsync thread acknowledges it once on disk
    assert sorted(t.acked) == list(range(1, 10)) and agent.counters["commits"] == 1
    assert agent.counters["store_errors"] == 1 and agent.runners["boiler"].counters["learned_count"] == 9
    rows = store._conn.execute("SELECT count(*) FROM inbox").fetchone()[0]
    assert rows == 9
    # with commit_delay_ms = 0 every batch commits at once
    cfg0 = cfg.model_copy(update={"agent": cfg.agent.model_copy(update={"commit_delay_ms": 0.0}),
                                  "store": cfg.store.model_copy(update={"path": tmp_path / "g0.db"})})
    t0 = MemoryTransport()
    agent0 = Agent(cfg0, t0, open_store(cfg0), clock=ManualClock())
    agent0.recover()
    t0.start(agent0.codec.subscriptions)
    for m in messages[:3]:
        t0.inject(m.topic, m.payload)
    agent0.step(timeout=0)
    assert agent0.store.wait_durable(10.0)
    assert sorted(t0.acked) == [1, 2, 3] and agent0.counters["commits"] == 1
    store.close()
    agent0.store.close()


@pytest.mark.parametrize("source", ["payload", "forecast", "topic"])
def test_a_crash_and_replay_land_on_the_same_model(tmp_path: Path, source: str) -> None:
    """Learn 2,000 readings straight through, and again with a crash after 1,170:
    the models end bit-for-bit identical."""
    stream: dict[str, Any] = {}
    if source == "forecast":
        stream = {"features": ["t_in", "flow"], "label": {"source": "forecast", "field": "t_in", "horizon": 3},
                  "lags": 2, "optimizer": {"name": "adam", "lr": 0.003}}
    elif source == "topic":
        stream = {"task": "binary", "label": {"source": "topic", "topic": "s/+/boiler/label",
                                              "id_field": "rid", "field": "hot"}}
    cfg = config(tmp_path / "x.db", **stream)
    messages = list(SensorSimulator(cfg.streams[0], devices=3, seed=7).messages(2000))

    straight, t1, _ = make(tmp_path / "straight.db", **stream)
    run_messages(straight, t1, messages)
    straight.checkpoint("end")

    crashing, t2, _ = make(tmp_path / "crash.db", **stream)
    run_messages(crashing, t2, messages[:1170])
    assert crashing.store.load_checkpoint().position < crashing.position  # rows after the checkpoint
    crashing.store.close()  # the process dies: no final checkpoint
    resumed, t3, _ = make(tmp_path / "crash.db", **stream)
    assert resumed.counters["replayed"] > 0
    run_messages(resumed, t3, messages[1170:])
    resumed.checkpoint("end")

    for name, runner in straight.runners.items():
        other = resumed.runners[name]
        assert set(runner.slots) == set(other.slots)
        for key, slot in runner.slots.items():
            np.testing.assert_array_equal(slot.learner.net.params, other.slots[key].learner.net.params)
        assert runner.counters == other.counters
    straight.store.close()
    resumed.store.close()


def test_a_checkpoint_written_in_steps_resumes_exactly(tmp_path: Path) -> None:
    """One model per step (a tiny step budget) and twelve device models: a checkpoint takes
    twelve batches to complete, and the models learn meanwhile. Kill the agent while one is
    half written: the restart ignores its rows, loads the previous one, and lands on the
    same models as a run straight through."""
    cfg = config(tmp_path / "x.db", step_ms=1e-6)
    messages = list(SensorSimulator(cfg.streams[0], devices=12, seed=11).messages(3000))
    straight, t1, _ = make(tmp_path / "straight.db", step_ms=1e-6)
    run_messages(straight, t1, messages)
    straight.checkpoint("end")
    spans = [r[0] for r in straight.store._conn.execute("SELECT slots_written FROM checkpoints WHERE reason = 'interval'")]
    assert spans and max(spans) == 12

    crashing, t2, _ = make(tmp_path / "crash.db", step_ms=1e-6)
    sent = 0
    while sent < 2000 or crashing._pending is None or crashing._pending.slots_written < 3:
        assert sent < len(messages), "no checkpoint was caught half written"
        run_messages(crashing, t2, messages[sent:sent + 64])
        sent += 64
    conn = crashing.store._conn
    half = conn.execute("SELECT count(*) FROM models WHERE checkpoint_id > (SELECT coalesce(max(id), 0) FROM checkpoints)").fetchone()[0]
    assert half >= 3  # model rows of the checkpoint under way are committed...
    assert conn.execute("SELECT count(*) FROM current_models").fetchone()[0] == 12  # ...and not the current ones
    crashing.store.close()  # the process dies mid-checkpoint
    resumed, t3, _ = make(tmp_path / "crash.db", step_ms=1e-6)
    conn = resumed.store._conn
    assert conn.execute("SELECT count(*) FROM models WHERE checkpoint_id > (SELECT coalesce(max(id), 0) FROM checkpoints)").fetchone()[0] == 0
    run_messages(resumed, t3, messages[sent:])
    resumed.checkpoint("end")
    for key, slot in straight.runners["boiler"].slots.items():
        np.testing.assert_array_equal(slot.learner.net.params, resumed.runners["boiler"].slots[key].learner.net.params)
    assert straight.runners["boiler"].counters == resumed.runners["boiler"].counters
    # at most two rows per model: the current one and the one before it
    assert conn.execute("SELECT max(n) FROM (SELECT count(*) AS n FROM models GROUP BY model_key)").fetchone()[0] <= 2
    straight.store.close()
    resumed.store.close()


def test_a_model_about_to_learn_before_its_step_is_written_not_copied(tmp_path: Path) -> None:
    """While a checkpoint is written in steps, a model that learns before its step is written
    first, in the batch's transaction: no copy of it is held (with a thousand device models
    those copies were the agent's peak memory), and the checkpoint still holds every model as
    it was at its position (a restart from it lands on the same models as a run straight through)."""
    cfg = config(tmp_path / "x.db", step_ms=1e-6)
    messages = list(SensorSimulator(cfg.streams[0], devices=12, seed=5).messages(1500))
    agent, transport, _ = make(tmp_path / "x.db", step_ms=1e-6)
    early = 0
    for i in range(0, len(messages), 16):
        for m in messages[i:i + 16]:
            transport.inject(m.topic, m.payload)
        agent.step(timeout=0)  # one batch: at most one step of a checkpoint under way
        runner = agent.runners["boiler"]
        assert not runner._captured, "a model was copied instead of written"
        if agent._pending is not None:
            early = max(early, agent._pending.written_early)
    agent.commit_group()
    assert early >= 4  # 12 models, 4 a step: the batch after a step touches models not yet written
    spans = [r[0] for r in agent.store._conn.execute("SELECT slots_written FROM checkpoints WHERE reason = 'interval'")]
    assert spans and set(spans) == {12}
    live = {k: s.learner.net.params.copy() for k, s in agent.runners["boiler"].slots.items()}
    position = agent.position
    agent.store.close()  # a crash: the last complete interval checkpoint and a replay of the rows after it
    resumed, _, _ = make(tmp_path / "x.db", step_ms=1e-6)
    assert resumed.position == position
    for key, params in live.items():
        np.testing.assert_array_equal(params, resumed.runners["boiler"].slots[key].learner.net.params)
    resumed.store.close()


def test_the_prediction_goes_out_before_the_model_learns_from_the_reading(
        store_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Test-then-train: the sender's answer does not wait for the learning step. The
    prediction is published before the learner steps, and names the model version that made it."""
    agent, t, cfg = make(store_path)
    order: list[str] = []
    real_publish = t.publish

    def publish(topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> bool:
        order.append("publish")
        return real_publish(topic, payload, qos, retain)

    monkeypatch.setattr(t, "publish", publish)
    first, second = SensorSimulator(cfg.streams[0], devices=1, seed=3).messages(2)
    run_messages(agent, t, [first])
    slot = agent.runners["boiler"].slots["dev000"]
    real_learn = slot.learner.learn_one

    def learn_one(*args: Any, **kwargs: Any) -> Any:
        order.append("learn")
        return real_learn(*args, **kwargs)

    monkeypatch.setattr(slot.learner, "learn_one", learn_one)
    order.clear()
    version = slot.learner.version
    run_messages(agent, t, [second])
    assert order[:2] == ["publish", "learn"]
    body = orjson.loads(t.published[-1][1])
    assert body["model_version"] == version and slot.learner.version == version + 1
    agent.store.close()


def test_checkpoints_that_take_long_to_write_are_spaced_out(tmp_path: Path) -> None:
    """A checkpoint begins at most once per (its predecessor's write time / checkpoint_max_share):
    with a thousand changed models a flood would otherwise spend much of its time writing them.
    The agent counts each stretched interval."""
    cfg = config(tmp_path / "s.db")
    clock = ManualClock(start=5.0)
    t = MemoryTransport()
    agent = Agent(cfg, t, open_store(cfg), clock=clock)
    agent.recover()
    t.start(agent.codec.subscriptions)
    messages = list(SensorSimulator(cfg.streams[0], seed=4).messages(1200))
    run_messages(agent, t, messages[:300])  # checkpoint_every_messages = 250: one complete
    assert agent.counters["checkpoints"] == 1 and agent._checkpoint_cost_s > 0
    # as if writing it had taken a second (share 0.1: 10 s apart), in several steps
    agent._checkpoint_cost_s, agent._checkpoint_steps = 1.0, 2
    run_messages(agent, t, messages[300:900])
    assert agent.counters["checkpoints"] == 1 and agent.counters["checkpoints_stretched"] == 1
    assert agent.status()["checkpoint_write_ms"] == 1000.0
    clock.advance(10.0)
    run_messages(agent, t, messages[900:910])
    assert agent.counters["checkpoints"] == 2 and agent.counters["checkpoints_stretched"] == 1
    agent.store.close()


def test_a_checkpoint_written_in_one_step_never_stretches_the_interval(tmp_path: Path) -> None:
    """However long one step took (a cold first write after a restart, a slow disk), a few
    models' checkpoint does not space out the next: a restart replays at most N (CI once
    replayed 588 with N = 500 right after a restart)."""
    cfg = config(tmp_path / "s.db")
    clock = ManualClock(start=5.0)
    t = MemoryTransport()
    agent = Agent(cfg, t, open_store(cfg), clock=clock)
    agent.recover()
    t.start(agent.codec.subscriptions)
    messages = list(SensorSimulator(cfg.streams[0], seed=4).messages(900))
    run_messages(agent, t, messages[:300])
    assert agent.counters["checkpoints"] == 1 and agent._checkpoint_steps == 1
    agent._checkpoint_cost_s = 1.0
    run_messages(agent, t, messages[300:900])
    assert agent.counters["checkpoints"] == 3 and agent.counters["checkpoints_stretched"] == 0
    agent.store.close()


def test_replayed_predictions_are_marked(store_path: Path) -> None:
    agent, t, cfg = make(store_path)
    run_messages(agent, t, list(SensorSimulator(cfg.streams[0], seed=2).messages(300)))
    checkpointed = agent.store.load_checkpoint().position
    agent.store.close()
    again, t2, _ = make(store_path)
    replayed = [orjson.loads(p) for topic, p, _, _ in t2.published if topic.endswith("/prediction")]
    again.store.close()
    assert 0 < len(replayed) == 300 - checkpointed
    assert all(p["replay"] for p in replayed)


def test_a_bug_in_one_message_does_not_stop_the_agent(store_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    agent, t, cfg = make(store_path)
    runner = agent.runners["boiler"]
    real = runner.handle
    calls = {"n": 0}

    def flaky(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 3:
            raise ZeroDivisionError("a bug")
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "handle", flaky)
    run_messages(agent, t, list(SensorSimulator(cfg.streams[0], seed=3).messages(10)))
    assert agent.counters["internal_errors"] == 1 and agent.counters["processed"] == 10
    agent.store.close()


def test_a_shared_model_serves_every_device(store_path: Path) -> None:
    agent, t, cfg = make(store_path, per_device=False)
    run_messages(agent, t, list(SensorSimulator(cfg.streams[0], devices=5, seed=4).messages(200)))
    runner = agent.runners["boiler"]
    assert list(runner.slots) == ["*"]
    assert runner.slots["*"].learner.n_learned == 200
    devices = {orjson.loads(p)["device"] for topic, p, _, _ in t.published if topic.endswith("/prediction")}
    assert len(devices) == 5
    agent.store.close()


def test_too_many_devices_become_dead_letters(store_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("streamlearn.agent.MAX_DEVICES_PER_STREAM", 3)
    agent, t, cfg = make(store_path)
    run_messages(agent, t, list(SensorSimulator(cfg.streams[0], devices=5, seed=4).messages(50)))
    assert len(agent.runners["boiler"].slots) == 3
    reasons = {orjson.loads(p)["reason"] for topic, p, _, _ in t.published if topic.endswith("dead-letter")}
    assert reasons == {"too_many_devices"}
    agent.store.close()


def test_under_a_backlog_models_learn_in_micro_batches_and_say_so(tmp_path: Path) -> None:
    messages = list(SensorSimulator(config(tmp_path / "x.db").streams[0], devices=2, seed=8).messages(3000))
    strict, t1, _ = make(tmp_path / "strict.db")
    run_messages(strict, t1, messages)
    batched, t2, _ = make(tmp_path / "batched.db", micro_batch=True)
    run_messages(batched, t2, messages)  # 64 at a time: a backlog, 32 per model
    row = batched.runners["boiler"].metrics_row()
    # runs end at checkpoint boundaries (every 250), where a model may have fewer than 8 readings
    assert row["labelled"] == 3000 and 2500 < row["batched"] < 3000
    assert strict.runners["boiler"].metrics_row()["batched"] == 0
    bodies = [orjson.loads(p) for topic, p, _, _ in t2.published if topic.endswith("/prediction")]
    assert len(bodies) == 3000
    assert sum(1 for b in bodies if "micro_batch" in b) == row["batched"]
    assert all(b["micro_batch"] == 8 for b in bodies if "micro_batch" in b)
    counters = batched.runners["boiler"].counters
    assert counters["learned_count"] == 3000  # every reading learned once
    # fewer, averaged steps learn less from this fast-moving stream, but still learn
    assert row["error"] < 0.5 * row["baseline_error"]
    strict.store.close()
    batched.store.close()


def test_the_further_behind_the_larger_the_micro_batches_up_to_the_maximum(tmp_path: Path) -> None:
    cfg = config(tmp_path / "deep.db", micro_batch=True, micro_batch_size_max=32)  # backlog 8, size 8
    t = MemoryTransport()
    agent = Agent(cfg, t, open_store(cfg))
    agent.recover()
    t.start(agent.codec.subscriptions)
    # each further micro_batch_backlog (8) messages behind doubles the size, up to the maximum
    assert [agent._micro_batch_size(n) for n in (8, 15, 16, 23, 24, 1000)] == [8, 8, 16, 16, 32, 32]
    t.inject("s/d1/boiler", b"{}")  # what waits behind the batch counts too
    assert agent._micro_batch_size(15) == 16
    agent.step(timeout=0)
    messages = list(SensorSimulator(cfg.streams[0], devices=1, seed=3).messages(1012))
    for m in messages[:1000]:  # 1,000 waiting: batches of 64 with hundreds behind them
        t.inject(m.topic, m.payload)
    drain(agent)
    for m in messages[1000:]:  # then 12 at once: a backlog, but a shallow one
        t.inject(m.topic, m.payload)
    drain(agent)
    sizes = [orjson.loads(p).get("micro_batch") for topic, p, _, _ in t.published if topic.endswith("/prediction")]
    assert len(sizes) == 1012
    assert sizes[:900].count(32) > 700
    # a run ends at a checkpoint boundary: what is left of it is one smaller micro-batch, if at
    # least micro_batch_size readings, else learned one by one
    assert all(s is None or 8 <= s <= 32 for s in sizes[:1000])
    assert sizes[1000:] == [8] * 8 + [None] * 4  # each prediction says how it was learned
    assert agent.runners["boiler"].counters["learned_count"] == 1012
    agent.store.close()


def test_micro_batch_size_max_below_the_size_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"micro_batch_size_max \(8\) is below micro_batch_size \(16\)"):
        parse_config({"agent": {"micro_batch_size": 16, "micro_batch_size_max": 8},
                      "store": {"path": str(tmp_path / "x.db")},
                      "streams": [{"name": "s", "topic": "s/#", "features": ["a"]}]})


@pytest.mark.parametrize("micro_batch", [True, False])
def test_a_batch_larger_than_the_checkpoint_interval_leaves_at_most_that_interval_to_replay(
        tmp_path: Path, micro_batch: bool) -> None:
    """1,000 readings taken as one batch with a checkpoint due every 250: each checkpoint
    completes before the rows past the next boundary are committed with it, so a crash after
    the commit replays at most 250 readings (CI once replayed 511 with N = 500: the checkpoint
    begun at a boundary completed only at the end of the batch)."""
    cfg = config(tmp_path / "big.db", micro_batch=micro_batch, batch_max=1000)
    t = MemoryTransport()
    agent = Agent(cfg, t, open_store(cfg))
    agent.recover()
    t.start(agent.codec.subscriptions)
    for m in SensorSimulator(cfg.streams[0], devices=3, seed=5).messages(1000):
        t.inject(m.topic, m.payload)
    assert agent.step(timeout=0) == 1000  # one batch, one commit
    assert agent.store.wait_durable(10.0)
    assert sorted(t.acked) == list(range(1, 1001))
    assert (agent.runners["boiler"].metrics_row()["batched"] > 0) == micro_batch
    last = agent.store._conn.execute("SELECT max(seq) FROM inbox").fetchone()[0]
    assert last - agent.store.load_checkpoint().position <= 250
    agent.store.close()  # the process dies before it writes another checkpoint
    resumed, _, _ = make(tmp_path / "big.db", micro_batch=micro_batch)
    assert resumed.counters["replayed"] <= 250
    resumed.store.close()


@pytest.mark.parametrize("size_max", [8, 32])
def test_micro_batches_are_recorded_so_a_restart_replays_them_exactly(tmp_path: Path, size_max: int) -> None:
    """Which readings shared a micro-batch depends on how they arrived; the inbox rows record
    it, so the models a restart rebuilds by replaying them are bit-identical to the ones the
    agent had when it died (here: three devices, a checkpoint every 250 readings, the process
    gone 1,170 readings in; readings of both kinds in the replay; with ``size_max`` 32,
    micro-batches of 8 to 32)."""
    messages = list(SensorSimulator(config(tmp_path / "x.db").streams[0], devices=3, seed=9).messages(1170))
    live, t1, _ = make(tmp_path / "mb.db", micro_batch=True, micro_batch_size_max=size_max)
    run_messages(live, t1, messages[:1000])
    for m in messages[1000:]:  # a trickle at the end: some readings learned on their own
        t1.inject(m.topic, m.payload)
        drain(live)
    assert live.store.load_checkpoint().position < live.position  # rows after the checkpoint
    marked = live.store._conn.execute(
        "SELECT count(*), count(DISTINCT micro_batch) FROM inbox WHERE micro_batch IS NOT NULL").fetchone()
    row = live.runners["boiler"].metrics_row()
    assert marked[0] == row["batched"] and 0 < row["batched"] < 1170
    if size_max == 8:
        assert marked[1] == row["batched"] // 8
    else:  # a model's share of each batch of 64 (~21) as one micro-batch, smaller ones at run ends
        sizes = {r[0] for r in live.store._conn.execute(
            "SELECT count(*) FROM inbox WHERE micro_batch IS NOT NULL GROUP BY micro_batch")}
        assert min(sizes) >= 8 and max(sizes) > 16 and len(sizes) > 3
    live.store.close()  # the process dies: no final checkpoint

    resumed, _, _ = make(tmp_path / "mb.db", micro_batch=True, micro_batch_size_max=size_max)
    assert resumed.counters["replayed"] > 0
    runner, other = live.runners["boiler"], resumed.runners["boiler"]
    assert set(runner.slots) == set(other.slots)
    for key, slot in runner.slots.items():
        for name, arr in slot.learner.state_arrays().items():
            np.testing.assert_array_equal(arr, other.slots[key].learner.state_arrays()[name], err_msg=f"{key} {name}")
        assert slot.metrics.state() == other.slots[key].metrics.state()
        assert slot.policy.state() == other.slots[key].policy.state()
    assert runner.counters == other.counters
    resumed.store.close()


def assert_same_models(live: Agent, resumed: Agent) -> None:
    for name, runner in live.runners.items():
        other = resumed.runners[name]
        assert set(runner.slots) == set(other.slots)
        for key, slot in runner.slots.items():
            theirs = other.slots[key]
            for arr_name, arr in slot.learner.state_arrays().items():
                np.testing.assert_array_equal(arr, theirs.learner.state_arrays()[arr_name], err_msg=f"{key} {arr_name}")
            assert slot.metrics.state() == theirs.metrics.state(), key
            assert slot.policy.state() == theirs.policy.state(), key
            assert slot.drift.state() == theirs.drift.state(), key
            assert slot.features.state() == theirs.features.state(), key
            assert set(slot.waiting) == set(theirs.waiting), key  # forecast: readings waiting for targets
            for device, queue in slot.waiting.items():
                assert [(x.tolist(), p, h) for x, p, h in queue] == \
                    [(x.tolist(), p, h) for x, p, h in theirs.waiting[device]], key
        assert runner.counters == other.counters  # no reading learned twice, none missed
        assert runner.last_seq == other.last_seq


LEAVE_BEHIND = {"checkpoint_models_max": 3, "checkpoint_replay_max": 20_000, "inbox_retention": 600}


FORECAST = {"features": ["t_in", "flow"], "label": {"source": "forecast", "field": "t_in", "horizon": 3},
            "lags": 2}


@pytest.mark.parametrize("micro_batch,stream", [(False, {}), (True, {}), (False, FORECAST)],
                         ids=["strict", "micro-batches", "forecast"])
def test_checkpoints_leave_models_behind_and_a_restart_catches_them_up_exactly(
        tmp_path: Path, micro_batch: bool, stream: dict[str, Any]) -> None:
    """Twelve device models, a checkpoint every 250 readings writing at most 3 of the changed
    ones (those saved longest ago first) and every one saved 600 rows ago (the inbox keeps
    600 behind the checkpoint, which bounds the setting of 20,000): the others keep older
    rows. The process dies 1,170 readings in; the restart replays, to each model left
    behind, its readings since its own row (and everything after the checkpoint, as
    before), and lands on the models, counters and sequence numbers the agent had, with
    drift events stored once."""
    messages = list(SensorSimulator(config(tmp_path / "x.db", **stream).streams[0], devices=12, seed=5).messages(1170))
    live, t1, _ = make(tmp_path / "lb.db", micro_batch=micro_batch, store_settings=LEAVE_BEHIND, **stream)
    run_messages(live, t1, messages[:900])
    for m in messages[900:]:  # a trickle at the end: some readings learned on their own
        t1.inject(m.topic, m.payload)
        drain(live)
    rows = live.store._conn.execute(
        "SELECT position, replay_from, slots_written FROM checkpoints WHERE reason = 'interval'").fetchall()
    assert len(rows) >= 4
    assert all(written < 12 for _, _, written in rows[1:])  # the first: every model new
    behind = [position - replay_from for position, replay_from, _ in rows if replay_from is not None]
    assert behind and max(behind) < 600  # no model left 600 rows behind: the inbox keeps them
    assert live.counters["models_left_behind"] > 0
    events = live.store._conn.execute("SELECT count(*) FROM drift_events").fetchone()[0]
    assert live.store.load_checkpoint().position < live.position
    live.store.close()  # the process dies: no final checkpoint

    resumed, _, _ = make(tmp_path / "lb.db", micro_batch=micro_batch, store_settings=LEAVE_BEHIND, **stream)
    assert resumed.counters["caught_up"] > 0 and resumed.counters["replayed"] > 0
    assert_same_models(live, resumed)
    assert resumed.store._conn.execute("SELECT count(*) FROM drift_events").fetchone()[0] == \
        events + sum(len(r.events) for r in live.runners.values())
    # the replay's checkpoint writes every changed model: nothing is behind any more
    last = resumed.store.load_checkpoint()
    assert last.replay_from == last.position and all(s.position == last.position for s in last.slots)
    resumed.store.close()


def visited_every_model(agent: Agent) -> list[tuple[set[tuple[int, str]], dict[str, Any]]]:
    """Per stream, the changed models and the metrics row, found by visiting every model (as
    before the runner kept them up to date)."""
    out = []
    for runner in agent.runners.values():
        changed = {(slot.since, key) for key, slot in runner.slots.items() if slot.dirty}
        rows = [slot.metric_values() for slot in runner.slots.values()]
        row: dict[str, Any] = {"stream": runner.name, "dead_letters": runner.counters["dead_letters"]}
        for i, name in enumerate(("messages", "labelled", "batched", "learned", "skipped")):
            row[name] = sum(r[i] for r in rows)
        for i, name in enumerate(("loss", "error", "baseline_error", "lr"), start=5):
            values = [r[i] for r in rows if not np.isnan(r[i])]
            row[name] = pytest.approx(sum(values) / len(values), rel=1e-12) if values else None
        out.append((changed, row))
    return out


TOPIC_LABELS = {"task": "binary", "label": {"source": "topic", "topic": "s/+/boiler/label", "id_field": "rid",
                                             "field": "hot"}}


@pytest.mark.parametrize("micro_batch,stream", [(False, {}), (True, {}), (False, FORECAST), (False, TOPIC_LABELS)],
                         ids=["strict", "micro-batches", "forecast", "topic-labels"])
def test_the_changed_models_and_metrics_kept_up_to_date_are_those_of_every_model(
        tmp_path: Path, micro_batch: bool, stream: dict[str, Any]) -> None:
    """A checkpoint takes the changed models and the metrics row from what the runner keeps up
    to date as readings come, not by visiting every model (2-5 ms with a thousand): at every
    point, through checkpoints under way, models left behind, a crash and a restart that
    catches them up, they are what a visit to every model finds."""
    messages = list(SensorSimulator(config(tmp_path / "x.db", **stream).streams[0], devices=12, seed=5).messages(900))
    live, t1, _ = make(tmp_path / "m.db", micro_batch=micro_batch, store_settings=LEAVE_BEHIND, **stream)
    seen_pending = 0
    for start in range(0, len(messages), 37):
        for m in messages[start:start + 37]:
            t1.inject(m.topic, m.payload)
        live.step(timeout=0)
        seen_pending += live._pending is not None
        runner = live.runners["boiler"]
        ((changed, row),) = visited_every_model(live)
        assert set(runner.changed()) == changed and runner.changed_count() == len(changed)
        assert runner.metrics_row() == row
    drain(live)
    assert live.counters["checkpoints"] >= 3 and live.counters["models_left_behind"] + (stream is TOPIC_LABELS) > 0
    # between batches with a checkpoint under way (micro-batches complete theirs at the end of a
    # batch, and the topic-label stream writes its 12 models in one step)
    assert seen_pending or micro_batch or stream is TOPIC_LABELS
    assert live.runners["boiler"].metrics_row()["learned"] > 0
    live.store.close()  # the process dies: no final checkpoint
    resumed, _, _ = make(tmp_path / "m.db", micro_batch=micro_batch, store_settings=LEAVE_BEHIND, **stream)
    ((changed, row),) = visited_every_model(resumed)
    assert set(resumed.runners["boiler"].changed()) == changed
    assert resumed.runners["boiler"].metrics_row() == row == visited_every_model(live)[0][1]
    resumed.store.close()


def test_with_freeze_gc_models_are_kept_out_of_full_collections_once_made(tmp_path: Path) -> None:
    """As ``streamlearn run`` sets it: every 32 new models, one collection and ``gc.freeze()``,
    so that Python's full collections no longer walk the models (50 ms with a thousand)."""
    import gc

    messages = list(SensorSimulator(config(tmp_path / "x.db").streams[0], devices=80, seed=5).messages(160))
    agent, t, _ = make(tmp_path / "gc.db")
    agent.freeze_gc = True
    try:
        run_messages(agent, t, messages[:40])
        slots = list(agent.runners["boiler"].slots.values())
        assert len(slots) == 40
        walked = {id(o) for o in gc.get_objects()}  # (frozen objects are not among them)
        assert not any(id(slot) in walked or id(slot.learner) in walked for slot in slots)
        run_messages(agent, t, messages[40:60])  # 60 models: fewer than 32 new, none frozen yet
        first = {id(slot) for slot in slots}
        newer = [s for s in agent.runners["boiler"].slots.values() if id(s) not in first]
        walked = {id(o) for o in gc.get_objects()}
        assert len(newer) == 20 and all(id(slot) in walked for slot in newer)
        run_messages(agent, t, messages[60:])
        walked = {id(o) for o in gc.get_objects()}
        assert not any(id(slot) in walked for slot in agent.runners["boiler"].slots.values())
    finally:
        gc.unfreeze()
        agent.store.close()


def test_streams_with_labels_on_a_topic_leave_no_model_behind(tmp_path: Path) -> None:
    """A label on a topic of its own joins its reading through the stream's state, which a
    catch-up does not replay: such a stream's checkpoints write every changed model."""
    topic = {"task": "binary", "label": {"source": "topic", "topic": "s/+/boiler/label", "id_field": "rid",
                                          "field": "hot"}}
    messages = list(SensorSimulator(config(tmp_path / "x.db", **topic).streams[0], devices=12, seed=5).messages(1000))
    agent, t, _ = make(tmp_path / "t.db", store_settings=LEAVE_BEHIND, **topic)
    run_messages(agent, t, messages)
    rows = agent.store._conn.execute(
        "SELECT replay_from, slots_written FROM checkpoints WHERE reason = 'interval'").fetchall()
    assert rows and all(replay_from is None for replay_from, _ in rows)
    assert max(written for _, written in rows) > LEAVE_BEHIND["checkpoint_models_max"]
    assert agent.counters["models_left_behind"] == 0
    agent.store.close()


def test_a_catch_up_changes_the_model_and_nothing_else(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows at or before the checkpoint's position, replayed to a model left behind: the model
    learns them, but the stream's counters, sequence numbers and drift events are already past
    them, and nothing is published (a learning step here reports a drift event each time)."""
    from streamlearn.codec import Codec
    from streamlearn.store import InboxRow
    from streamlearn.stream import Slot, StreamRunner

    cfg = config(tmp_path / "x.db")
    codec, runner = Codec(cfg.streams), StreamRunner(cfg.streams[0], "s", "gw")
    real_learn = Slot.learn

    def learn_with_event(self: Slot, *args: Any) -> Any:
        score, events = real_learn(self, *args)
        return score, [*events, ("adwin", 1.0, "reset", 0.01, 0.02, 0.5)]

    monkeypatch.setattr(Slot, "learn", learn_with_event)
    rows = []
    for seq, m in enumerate(SensorSimulator(cfg.streams[0], devices=1, seed=3).messages(12), start=1):
        reading = codec.decode(m.topic, m.payload, 0.0)
        rows.append((InboxRow(0.0, m.topic, "boiler", "reading", reading.device, None, 0, m.payload, seq=seq), reading))
    for row, reading in rows[:6]:
        assert runner.handle(row, reading, 0.0, 0.0)  # a prediction and a drift event each
    counters, last_seq, n_events = dict(runner.counters), dict(runner.last_seq), len(runner.events)
    (slot,) = runner.slots.values()
    learned = slot.learner.n_learned
    for row, reading in rows[6:10]:
        assert runner.behind(row)
        runner.catch_up(row, reading, 0.0)
    assert slot.learner.n_learned == learned + 4
    assert runner.counters == counters and dict(runner.last_seq) == last_seq and len(runner.events) == n_events
    runner.handle(*rows[10], 0.0, 0.0)
    assert runner.counters["learned_count"] == counters["learned_count"] + 1 and len(runner.events) == n_events + 1
    slot.since = 11
    assert not runner.behind(rows[10][0]) and runner.behind(rows[11][0])


def test_a_restart_that_did_not_catch_up_would_differ(tmp_path: Path) -> None:
    """The catch-up matters: loading the models left behind as they were saved, without their
    readings since, lands elsewhere."""
    messages = list(SensorSimulator(config(tmp_path / "x.db").streams[0], devices=12, seed=5).messages(1000))
    live, t1, _ = make(tmp_path / "lb.db", store_settings=LEAVE_BEHIND)
    run_messages(live, t1, messages)
    assert live.store.load_checkpoint().replay_from < live.store.load_checkpoint().position
    live.store._conn.execute("UPDATE checkpoints SET replay_from = NULL")
    live.store.close()
    resumed, _, _ = make(tmp_path / "lb.db", store_settings=LEAVE_BEHIND)
    assert resumed.counters["caught_up"] == 0
    with pytest.raises(AssertionError):
        assert_same_models(live, resumed)
    resumed.store.close()


def test_a_replay_without_the_micro_batch_record_would_differ(tmp_path: Path) -> None:
    """The record matters: replaying the same rows one by one lands elsewhere."""
    messages = list(SensorSimulator(config(tmp_path / "x.db").streams[0], devices=1, seed=9).messages(200))
    live, t1, _ = make(tmp_path / "mb.db", micro_batch=True)
    run_messages(live, t1, messages)
    live.store._conn.execute("DELETE FROM checkpoints")  # replay everything
    live.store._conn.execute("DELETE FROM models")
    live.store._conn.execute("UPDATE inbox SET micro_batch = NULL")
    live.store.close()
    strict, _, _ = make(tmp_path / "mb.db", micro_batch=True)
    assert strict.counters["replayed"] == 200
    (slot,), (replayed,) = live.runners["boiler"].slots.values(), strict.runners["boiler"].slots.values()
    assert slot.metrics.batched > 0 and replayed.metrics.batched == 0
    assert not np.array_equal(slot.learner.net.params, replayed.learner.net.params)
    strict.store.close()


def _reading(seq: int, boot: str = "b", power: float = 5.0) -> bytes:
    return orjson.dumps({"t_in": 1, "t_out": 2, "flow": 3, "load": 4, "power": power, "boot": boot, "seq": seq})


def test_late_readings_are_learned_and_redeliveries_dropped(store_path: Path) -> None:
    agent, t, _ = make(store_path)
    for seq in (1, 2, 5):
        t.inject("s/d1/boiler", _reading(seq))
    drain(agent)
    t.inject("s/d1/boiler", _reading(3))  # late (brokers reorder after reconnects): learned
    t.inject("s/d1/boiler", _reading(2), dup=True)  # the broker redelivering a stored reading
    t.inject("s/d1/boiler", _reading(3))  # the late one again: now a redelivery
    t.inject("s/d1/boiler", _reading(4, power=9.0))
    t.inject("s/d1/boiler", _reading(4, power=1.0))  # same id, other content: a dead letter
    drain(agent)
    dead = [orjson.loads(p)["reason"] for topic, p, _, _ in t.published if topic.endswith("dead-letter")]
    assert dead == ["duplicate_id"]
    assert agent.counters["late"] == 2 and agent.counters["redeliveries"] == 2
    assert agent.counters["processed"] == 5
    assert agent.runners["boiler"].counters["learned_count"] == 5
    agent.store.close()


def test_with_out_of_order_dead_letter_sequence_numbers_going_back_are_dead_letters(store_path: Path) -> None:
    agent, t, _ = make(store_path, out_of_order="dead_letter")
    for seq in (1, 2, 5):
        t.inject("s/d1/boiler", _reading(seq))
    drain(agent)
    t.inject("s/d1/boiler", _reading(3))  # late: out of order
    t.inject("s/d1/boiler", _reading(2), dup=True)  # the broker redelivering a stored reading
    t.inject("s/d1/boiler", _reading(1, boot="b2"))  # the sensor rebooted: a new sequence
    t.inject("s/d2/boiler", _reading(1))  # another device has its own sequence
    drain(agent)
    dead = [orjson.loads(p) for topic, p, _, _ in t.published if topic.endswith("dead-letter")]
    assert [(d["reason"], d["detail"]) for d in dead] == [("out_of_order", "sequence 3 after 5 on d1|b")]
    assert agent.counters["redeliveries"] == 1 and agent.counters["processed"] == 5
    agent.store.close()
    # the highest sequence per device and boot survives a restart
    again, t2, _ = make(store_path, out_of_order="dead_letter")
    t2.inject("s/d1/boiler", _reading(4))
    drain(again)
    assert [orjson.loads(p)["reason"] for topic, p, _, _ in t2.published if topic.endswith("dead-letter")] == [
        "out_of_order"]
    again.store.close()


def test_health_is_reported_on_mqtt_and_next_to_the_store(tmp_path: Path) -> None:
    cfg = config(tmp_path / "h.db")
    t = MemoryTransport()
    store = FailingStore(open_store(cfg), failures=1)
    agent = Agent(cfg, t, store)  # type: ignore[arg-type]
    agent.recover()
    agent.publish_health()
    for m in SensorSimulator(cfg.streams[0], seed=1).messages(5):
        t.inject(m.topic, m.payload)
    drain(agent)
    health = [(orjson.loads(p), retain) for topic, p, _, retain in t.published if topic == "streamlearn/gateway/health"]
    assert all(retain for _, retain in health)
    states = [(h["state"], h["last_error"]) for h, _ in health]
    assert states[0] == ("ok", None)
    assert ("error", "store: database or disk is full") in states  # reported while it lasted
    assert states[-1] == ("ok", None)  # and cleared when the store took writes again
    on_disk = orjson.loads((tmp_path / "h.db.health.json").read_bytes())
    assert on_disk["state"] == "ok" and on_disk["position"] == 5
    store.close()


def test_before_a_receive_that_reconnects_the_agent_lets_what_is_committed_be_acknowledged(store_path: Path) -> None:
    """The transport reconnects (to get back what it shed) in the receive after it reports
    ``resync_due``; what the agent committed must be acknowledged before, or it comes again."""
    agent, t, cfg = make(store_path)
    for m in SensorSimulator(cfg.streams[0], seed=5).messages(5):
        t.inject(m.topic, m.payload)
    assert agent.step(timeout=0) == 5
    agent.commit_group()
    waits: list[list[int]] = []
    real_wait = agent.store.wait_durable

    def wait_durable(timeout: float = 10.0) -> bool:
        done = real_wait(timeout)
        waits.append(list(t.acked))
        return done

    agent.store.wait_durable = wait_durable  # type: ignore[method-assign]
    t.resync_due = False  # type: ignore[attr-defined]
    agent.step(timeout=0)
    assert waits == []  # no reconnect coming: the agent does not wait for the disk
    t.resync_due = True  # type: ignore[attr-defined]
    agent.step(timeout=0)
    assert waits == [[1, 2, 3, 4, 5]]  # waited, and everything committed was acknowledged by then
    agent.store.close()


@pytest.mark.parametrize("micro_batch", [False, True])
def test_while_the_writer_is_held_off_readings_are_answered_and_stored_after(tmp_path: Path, micro_batch: bool) -> None:
    """The WAL thread's last copy holds the writer off (here: the test holds its lock). The
    agent goes on: it numbers, answers and learns the readings that arrive meanwhile,
    acknowledging none, and a checkpoint that comes due among them waits to be written.
    Once the writer is free they are stored before the group commits, in order, with
    the micro-batches they were learned in; a restart after the process dies lands on
    the same models."""
    cfg = config(tmp_path / "w.db", micro_batch=micro_batch)
    messages = list(SensorSimulator(cfg.streams[0], devices=3, seed=8).messages(300))
    transport = MemoryTransport()
    agent = Agent(cfg, transport, open_store(cfg), clock=ManualClock())  # the group never comes overdue
    agent.recover()
    transport.start(agent.codec.subscriptions)
    run_messages(agent, transport, messages[:240])
    assert agent.store.load_checkpoint() is None and agent.position == 240  # the interval is 250
    acked, predictions = len(transport.acked), len(transport.published)

    held = agent.store._tx_lock
    assert held.acquire(timeout=5.0)
    fired: list[bool] = []

    def end_the_wait() -> None:  # should a step wait for the writer, the test ends instead of hanging
        fired.append(True)
        held.release()

    guard = threading.Timer(30.0, end_the_wait)
    guard.start()
    try:
        for m in messages[240:280]:
            transport.inject(m.topic, m.payload)
        for _ in range(20):  # bounded: each step returns at once
            agent.step(timeout=0)
        guard.cancel()
        assert not fired, "a step waited for the writer"
        assert len(transport.published) - predictions == 40  # answered while the writer waits
        assert agent.position == 280 and agent._unstaged and not agent.store.in_batch
        assert agent._pending is not None and agent._pending.position == 250  # due, not written
        assert agent.store.writer_busy > 0
        assert agent.store.last_seq() == 240  # nothing stored
    finally:
        if not fired:
            held.release()
    assert agent.store.wait_durable(10.0)
    assert len(transport.acked) == acked  # and nothing acknowledged
    drain(agent)
    assert len(transport.acked) == acked + 40
    for _ in range(10):  # the checkpoint's steps come after the rows are stored
        if agent._pending is None:
            break
        agent.step(timeout=0)
    seqs = [r[0] for r in agent.store._conn.execute("SELECT seq FROM inbox ORDER BY seq")]
    assert seqs == list(range(1, 281))
    checkpoint = agent.store.load_checkpoint()
    assert checkpoint is not None and checkpoint.position == 250
    marked = agent.store._conn.execute("SELECT count(*) FROM inbox WHERE micro_batch IS NOT NULL").fetchone()[0]
    assert marked == agent.runners["boiler"].metrics_row()["batched"]
    assert (marked > 0) == micro_batch
    late = agent.store._conn.execute("SELECT count(*) FROM inbox WHERE micro_batch IS NOT NULL AND seq > 240").fetchone()
    assert (late[0] > 0) == micro_batch  # marked on the rows before they were stored
    agent.store.close()  # the process dies: no final checkpoint

    resumed, _, _ = make(tmp_path / "w.db", micro_batch=micro_batch)
    assert resumed.counters["replayed"] == 30
    assert_same_models(agent, resumed)
    resumed.store.close()
