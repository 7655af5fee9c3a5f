"""Per-stage profile of the agent's message path, measured in-process.

The real :class:`~streamlearn.agent.Agent` runs over a
:class:`~streamlearn.transport.memory.MemoryTransport` and a
:class:`~streamlearn.store.SQLiteStore` (shipped settings: WAL,
synchronous=FULL), and the library functions it calls are timed with
``time.perf_counter`` by wrapping them in this process (:class:`Probe`; nothing
is edited, and the wrappers are removed afterwards). Stages, per message:

``receive``      MqttTransport receive + manual ack: process CPU per message (paho's
                 network thread included), against a real broker
``decode``       Codec.decode (route, orjson, validation)
``hash``         dedupe.payload_hash (blake2b of topic + payload)
``dedupe``       Deduper.check (an SQLite lookup of the message id per message)
``store``        SQLiteStore.append (INSERT per row + COMMIT, fsync at synchronous=FULL)
``features``     FeatureState.transform (lags, running standardisation)
``predict``      Learner.predict_one
``learn``        Learner.learn_one
``monitors``     DriftMonitor.update (when the code under test has drift monitors)
``serialize``    orjson.dumps of the prediction payload (as called by the stream runner)
``runner_other`` the rest of StreamRunner.handle (slot lookup, metrics, lr policy, ...)
``publish``      MqttTransport.publish: process CPU per QoS 1 publish (paho thread included)
``agent_other``  the rest of Agent.ingest (InboxRow objects, ack, loop)
``checkpoint``   Agent.checkpoint (collect dirty state, safetensors/JSON, one transaction)

plus the un-instrumented in-process agent (messages/s without MQTT), a cProfile
of it, the memory of one per-device model (tracemalloc) and the full stall of a
checkpoint with 1, 100 and 1,000 dirty models.
"""

from __future__ import annotations

import cProfile
import gc
import io
import pstats
import shutil
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

import orjson

from streamlearn.bench.common import (
    STREAM,
    agent_config,
    console,
    device_name,
    environment,
    fmt,
    make_messages,
    median,
    percentile,
    proc_status,
    write_json,
)

STAGES = ("receive", "decode", "hash", "dedupe", "store", "features", "predict", "learn", "monitors",
          "serialize", "runner_other", "publish", "agent_other", "checkpoint")


def _config(store: Path, port: int, gateway: str = "prof", **store_overrides: Any) -> Any:
    from streamlearn.config import parse_config

    return parse_config(agent_config(store, port, gateway, f"streamlearn-{gateway}", **store_overrides))


class Probe:
    """Times calls of chosen functions by wrapping them in this process (restored on exit).

    Wrapping the real classes instead of re-implementing the agent's loop keeps
    the profile true to the code under test as it changes. Each wrapped call
    costs about 0.3 us, which lands in the enclosing stage.
    """

    def __init__(self) -> None:
        self.t: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self._patches: list[tuple[Any, str, Any]] = []
        self.stall_ms: list[float] = []

    def wrap(self, owner: Any, attr: str, stage: str, record_each: bool = False) -> None:
        original = getattr(owner, attr, None)
        if original is None:
            return
        t, calls, stalls, pc = self.t, self.calls, self.stall_ms, time.perf_counter
        t.setdefault(stage, 0.0)
        calls.setdefault(stage, 0)

        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = pc()
            try:
                return original(*args, **kwargs)
            finally:
                dt = pc() - t0
                t[stage] += dt
                calls[stage] += 1
                if record_each:
                    stalls.append(dt * 1000.0)

        self._patches.append((owner, attr, original))
        setattr(owner, attr, timed)

    def __enter__(self) -> Probe:
        return self

    def __exit__(self, *exc: object) -> None:
        for owner, attr, original in reversed(self._patches):
            setattr(owner, attr, original)
        self._patches.clear()


class _OrjsonShim:
    """``orjson`` as seen by one module, with ``dumps`` replaceable."""

    def __init__(self) -> None:
        self.dumps = orjson.dumps

    def __getattr__(self, name: str) -> Any:
        return getattr(orjson, name)


def _make_agent(store_path: Path, batch_max: int = 512, store: dict[str, Any] | None = None,
                freeze_gc: bool = False) -> tuple[Any, Any]:
    from streamlearn.agent import Agent, open_store
    from streamlearn.config import parse_config
    from streamlearn.transport.memory import MemoryTransport

    data = agent_config(store_path, 1883, "prof", "streamlearn-prof")
    data["agent"]["batch_max"] = batch_max
    data["store"].update(store or {})
    cfg = parse_config(data)
    transport = MemoryTransport()
    agent = Agent(cfg, transport, open_store(cfg), freeze_gc=freeze_gc)
    agent.recover()
    transport.start(agent.codec.subscriptions)
    return agent, transport


def _drain(agent: Any, n: int) -> None:
    """Step until ``n`` more messages are processed (bounded)."""
    target = agent.counters["processed"] + n
    steps = 0
    while agent.counters["processed"] < target and steps < n + 10:
        agent.step(timeout=0.0)
        steps += 1
    agent.commit_group()


def _warm(agent: Any, transport: Any, devices: int, n: int = 500) -> None:
    """Every device's model exists and one-time imports are done before timing."""
    warm = make_messages(max(n, devices), devices, boot="warm", seed=7)
    for topic, payload in warm:
        transport.inject(topic, payload)
    _drain(agent, len(warm))


def stage_profile(workdir: Path, n: int, batch: int, devices: int = 1) -> dict[str, Any]:
    """The real Agent over a MemoryTransport, with its stages timed; us per message per stage."""
    import streamlearn.agent as agent_mod
    import streamlearn.stream as stream_mod
    from streamlearn.codec import Codec
    from streamlearn.dedupe import Deduper
    from streamlearn.features import FeatureState
    from streamlearn.learner import Learner
    from streamlearn.store.sqlite import SQLiteStore
    from streamlearn.stream import StreamRunner
    from streamlearn.transport.memory import MemoryTransport

    agent, transport = _make_agent(workdir / f"stages-b{batch}-d{devices}.db", batch)
    _warm(agent, transport, devices)
    processed0 = agent.counters["processed"]
    for topic, payload in make_messages(n, devices, boot="p"):
        transport.inject(topic, payload)
    shim = _OrjsonShim()
    saved_orjson = stream_mod.orjson
    with Probe() as probe:
        probe.wrap(agent_mod.Agent, "ingest", "ingest")
        probe.wrap(Codec, "decode", "decode")
        probe.wrap(agent_mod, "payload_hash", "hash")
        probe.wrap(Deduper, "check", "dedupe")
        probe.wrap(SQLiteStore, "begin", "store_begin")
        probe.wrap(SQLiteStore, "stage", "store")
        probe.wrap(SQLiteStore, "commit", "store_commit")
        probe.wrap(StreamRunner, "handle", "handle")
        probe.wrap(StreamRunner, "handle_many", "handle")
        probe.wrap(FeatureState, "transform", "features")
        probe.wrap(Learner, "predict_one", "predict")
        probe.wrap(Learner, "learn_one", "learn")
        probe.wrap(Learner, "learn_many", "learn")
        try:  # drift monitors exist from issue 3 on
            from streamlearn import monitors

            probe.wrap(getattr(monitors, "DriftMonitor", None), "update", "monitors")
        except ImportError:
            pass
        probe.wrap(shim, "dumps", "serialize")
        probe.wrap(MemoryTransport, "publish", "publish_call")
        # a checkpoint: begun (stream states named), then written in steps (in a batch's
        # transaction, or alone while no message waits); each call is one pause
        from streamlearn.checkpointing import PendingCheckpoint

        probe.wrap(agent_mod.Agent, "_begin_checkpoint", "checkpoint", record_each=True)
        probe.wrap(PendingCheckpoint, "step", "checkpoint", record_each=True)
        probe.wrap(SQLiteStore, "write_models", "checkpoint_store")
        probe.wrap(SQLiteStore, "finish_checkpoint", "checkpoint_store")
        stream_mod.orjson = shim  # type: ignore[assignment]
        try:
            gc.collect()
            t0 = time.perf_counter()
            _drain(agent, n)
            wall = time.perf_counter() - t0
        finally:
            stream_mod.orjson = saved_orjson
    processed = agent.counters["processed"] - processed0
    agent.store.flush_durations()
    recorded = [r[0] for r in agent.store._conn.execute("SELECT duration_ms FROM checkpoints")]
    agent.store.close()
    t = probe.t
    # inbox rows are staged in the batch transaction and committed once per batch; checkpoints
    # join that transaction, so their time is inside ingest and is taken out of agent_other
    t["store"] = t["store_begin"] + t["store"] + t["store_commit"]
    inner = ("features", "predict", "learn", "monitors", "serialize")
    stages = {
        "decode": t["decode"], "hash": t["hash"], "dedupe": t["dedupe"], "store": t["store"],
        "features": t["features"], "predict": t["predict"], "learn": t["learn"],
        "monitors": t.get("monitors", 0.0), "serialize": t["serialize"],
        "runner_other": t["handle"] - sum(t.get(k, 0.0) for k in inner),
        "agent_other": t["ingest"] - sum(t[k] for k in ("decode", "hash", "dedupe", "store", "handle",
                                                          "checkpoint"))
        - t["publish_call"],
        "checkpoint": t["checkpoint"],
    }
    us = {k: round(v / max(1, processed) * 1e6, 2) for k, v in stages.items()}
    return {
        "n": n, "processed": processed, "batch": batch, "devices": devices,
        "us_per_msg": us,
        "sum_us_per_msg": round(sum(us.values()), 2),
        "wall_us_per_msg": round(wall / max(1, processed) * 1e6, 2),
        "store_commits": probe.calls["store_commit"],
        "store_ms_per_commit": round(t["store"] / max(1, probe.calls["store_commit"]) * 1000.0, 3),
        "checkpoints": probe.calls["checkpoint"],
        "checkpoint_stall_ms": sorted(round(s, 3) for s in probe.stall_ms),
        "checkpoint_store_ms_total": round(t["checkpoint_store"] * 1000.0, 3),
        "checkpoint_recorded_ms": sorted(round(r, 3) for r in recorded),
    }


def agent_in_process(workdir: Path, n: int, batch: int = 512, profile: bool = False) -> dict[str, Any]:
    """The real Agent over a MemoryTransport: every stage but MQTT. Messages/s, or a cProfile."""
    agent, transport = _make_agent(workdir / f"agent-{'prof' if profile else 'run'}.db", batch)
    _warm(agent, transport, 1)
    processed0 = agent.counters["processed"]
    for topic, payload in make_messages(n, 1, boot="a"):
        transport.inject(topic, payload)
    prof = cProfile.Profile() if profile else None
    gc.collect()
    t0 = time.perf_counter()
    if prof:
        prof.enable()
    _drain(agent, n)
    agent.checkpoint("bench")
    if prof:
        prof.disable()
    elapsed = time.perf_counter() - t0
    processed = agent.counters["processed"] - processed0
    agent.store.close()
    out: dict[str, Any] = {"n": n, "processed": processed, "msgs_per_s": round(processed / elapsed, 1),
                           "us_per_msg": round(elapsed / max(1, processed) * 1e6, 2)}
    if prof:
        buf = io.StringIO()
        stats = pstats.Stats(prof, stream=buf)
        stats.sort_stats("tottime").print_stats(18)
        out["cprofile_top_tottime"] = _trim_pstats(buf.getvalue())
    return out


def _trim_pstats(text: str) -> list[str]:
    lines = [ln.rstrip() for ln in text.splitlines()]
    start = next((i for i, ln in enumerate(lines) if ln.strip().startswith("ncalls")), 0)
    root = str(Path(__file__).resolve().parents[2]) + "/"
    return [ln.replace(root, "").replace(sys.prefix + "/", "") for ln in lines[start:] if ln.strip()]


def transport_costs(port: int, workdir: Path, n: int) -> dict[str, Any]:
    """Process CPU per message of the agent's MqttTransport under load: receive + manual ack, publish.

    ``n`` readings are queued by the broker for the transport's persistent session
    first, so the receive side is measured draining a backlog (as under a burst),
    not waiting for a publisher.
    """
    from streamlearn.bench.common import TOPIC, own_cpu_seconds
    from streamlearn.bench.loadgen import Feeder
    from streamlearn.bench.procs import drop_session
    from streamlearn.transport.mqtt import MqttTransport

    import logging

    # paho logs a harmless "not connected" error when its thread sees the socket closed at stop
    logging.getLogger("paho").addHandler(logging.NullHandler())
    cfg = _config(workdir / "transport.db", port, gateway="proftransport")
    client_id = cfg.client_id + "-t"
    status = "streamlearn/proftransport/status"
    first = MqttTransport(cfg.mqtt, client_id, status)
    first.start([TOPIC])
    if not first.wait_connected(10):
        first.stop()
        raise ConnectionError("transport did not connect")
    time.sleep(0.3)  # SUBACK
    first.stop()  # the session (and its subscription) stays at the broker
    feeder = Feeder(port, "transport", track_acks=True)
    feeder.feed([p for _, p in make_messages(n, 1, boot="tp")])
    out: dict[str, Any] = {"n": n, "queued": feeder.wait_acked(n, 120)}
    feeder.close(30)
    transport = None
    try:
        transport = MqttTransport(cfg.mqtt, client_id, status)
        cpu0 = own_cpu_seconds()
        t0 = time.monotonic()
        transport.start([TOPIC])
        got = 0
        deadline = time.monotonic() + 120
        while got < n and time.monotonic() < deadline:
            batch = transport.receive(512, 0.2)
            if batch:
                transport.ack(batch)
                got += len(batch)
        cpu1 = own_cpu_seconds()
        out["received"] = got
        out["receive_ack_us_per_msg"] = round((cpu1 - cpu0) / max(1, got) * 1e6, 2)
        out["receive_wall_msgs_per_s"] = round(got / (time.monotonic() - t0), 1)
        body = orjson.dumps({"stream": STREAM, "device": "d0000", "seq": 123456, "id": "b0|123456",
                             "prediction": 12.345678, "model_version": 12345, "lr": 0.01, "latency_ms": 0.123})
        topic = f"streamlearn/proftransport/{STREAM}/d0000/prediction"
        m = min(n, cfg.mqtt.max_queued_publishes)  # more would be dropped by the bounded queue
        cpu0 = own_cpu_seconds()
        t0 = time.monotonic()
        dropped = 0
        for _ in range(m):
            if not transport.publish(topic, body, qos=1):
                dropped += 1
        client = transport._client
        deadline = time.monotonic() + 60
        while client is not None and len(getattr(client, "_out_messages", {})) and time.monotonic() < deadline:
            time.sleep(0.002)
        cpu1 = own_cpu_seconds()
        out["published"] = m
        out["publish_us_per_msg"] = round((cpu1 - cpu0) / m * 1e6, 2)
        out["publish_wall_msgs_per_s"] = round(m / (time.monotonic() - t0), 1)
        out["publish_dropped"] = dropped
        out["note"] = "CPU of this process (caller + paho network thread) per message, MqttTransport as the agent uses it"
    finally:
        if transport is not None:
            transport.stop()
        drop_session(port, client_id)
    return out


def model_memory(devices: int = 1000) -> dict[str, Any]:
    """Python heap per per-device model (tracemalloc), and its checkpoint size."""
    from safetensors.numpy import save as save_tensors

    from streamlearn.bench.common import make_messages as mk
    from streamlearn.codec import Codec
    from streamlearn.store import InboxRow
    from streamlearn.stream import StreamRunner

    cfg = _config(Path(tempfile.gettempdir()) / "unused.db", 1883)
    codec = Codec(cfg.streams)
    runner = StreamRunner(cfg.streams[0], "streamlearn", "mem")
    msgs = mk(devices * 2, devices, boot="m")
    rows = []
    for topic, payload in msgs:
        r = codec.decode(topic, payload, 0.0)
        rows.append((InboxRow(0.0, topic, r.stream, r.kind, r.device, None, 0, payload), r))
    # one warm device first, so shared caches are not charged to the models
    runner.handle(*rows[0], None, 0.0)
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.take_snapshot()
    for row, reading in rows[1:]:
        runner.handle(row, reading, None, 0.0)
    gc.collect()
    snap = tracemalloc.take_snapshot()
    tracemalloc.stop()
    grown = sum(s.size_diff for s in snap.compare_to(base, "filename"))
    slot = runner.slots[device_name(1)]
    st = slot.to_state(STREAM)
    tensors = len(save_tensors({k: v for k, v in st.tensors.items()}))
    state_json = len(orjson.dumps(st.state, option=orjson.OPT_SERIALIZE_NUMPY))
    return {
        "devices": devices,
        "heap_bytes_per_model": round(grown / max(1, devices - 1)),
        "checkpoint_bytes_per_model": tensors + state_json,
        "checkpoint_tensor_bytes": tensors,
        "checkpoint_state_json_bytes": state_json,
        "n_params": int(slot.learner.net.n_params),
    }


def checkpoint_stalls(workdir: Path, models: int, repeats: int = 5) -> dict[str, Any]:
    """Pauses of a checkpoint with ``models`` changed models, as the agent's loop writes it
    (begun, then in steps of ``checkpoint_step_ms`` each committed alone), and the pause of
    writing it all in one step (``Agent.checkpoint``, at shutdown) for comparison."""
    agent, transport = _make_agent(workdir / f"ckpt-{models}.db")
    for topic, payload in make_messages(models * 2, models, boot="c"):
        transport.inject(topic, payload)
    _drain(agent, models * 2)
    agent.checkpoint("bench")

    def mark_dirty() -> None:
        for runner in agent.runners.values():
            for slot in runner.slots.values():
                slot.mark_changed()

    stalls, totals, steps, one_shot, every = [], [], [], [], []
    for _ in range(repeats):
        # as after a checkpoint interval in the agent: the WAL copied (outside the timing)
        agent.store._conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
        mark_dirty()
        t0 = time.perf_counter()
        agent._begin_checkpoint("bench")
        pauses = [(time.perf_counter() - t0) * 1000.0]
        n = 0
        while agent._pending is not None:
            t1 = time.perf_counter()
            agent._checkpoint_step_alone()
            pauses.append((time.perf_counter() - t1) * 1000.0)
            n += 1
        totals.append((time.perf_counter() - t0) * 1000.0)
        stalls.append(max(pauses))
        every.extend(pauses)
        steps.append(n)
    for _ in range(repeats):
        agent.store._conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
        mark_dirty()
        t0 = time.perf_counter()
        agent.checkpoint("bench")
        one_shot.append((time.perf_counter() - t0) * 1000.0)
    agent.store.flush_durations()
    recorded = [r[0] for r in agent.store._conn.execute(
        "SELECT duration_ms FROM checkpoints WHERE reason = 'bench' ORDER BY id DESC LIMIT ?", (2 * repeats,))][repeats:]
    step_ms = agent.config.store.checkpoint_step_ms
    agent.store.close()
    return {
        "models": models,
        "step_budget_ms": step_ms,
        "stall_ms_median": round(median(stalls) or 0.0, 3),
        "stall_ms_max": round(max(stalls), 3),
        "pause_ms_p50": round(percentile(sorted(every), 50) or 0.0, 3),
        "pause_ms_p99": round(percentile(sorted(every), 99) or 0.0, 3),
        "steps_median": median(steps),
        "total_ms_median": round(median(totals) or 0.0, 3),
        "one_step_ms_median": round(median(one_shot) or 0.0, 3),
        "recorded_duration_ms_median": round(median(recorded) or 0.0, 3),
    }


def checkpoint_pauses_steady(workdir: Path, models: int, intervals: int = 10,
                             leave_behind: bool = True, settle: int | None = None) -> dict[str, Any]:
    """Checkpoint pauses as a gateway with ``models`` per-device models sees them: readings
    round-robin over the devices, one at a time (each its own batch, as at a steady rate),
    through the real Agent over a MemoryTransport and a real SQLite store. First
    ``checkpoint_replay_max`` readings, so that which models each checkpoint leaves behind has
    settled, then ``intervals`` checkpoint intervals timed: the longest pause each checkpoint
    recorded (``duration_ms``: its longest step, with its COMMIT when alone), the longest and
    p99 of the agent's steps that took a checkpoint step against those that did not, and the
    models and bytes written per checkpoint. ``leave_behind=False``: every changed model at
    every checkpoint (``checkpoint_models_max`` above ``models``), as before ``m006``.
    ``settle``: readings before the timing, instead of ``checkpoint_replay_max`` (quick runs)."""
    from streamlearn.cli import SWITCH_INTERVAL_S

    settings = {} if leave_behind else {"checkpoint_models_max": models + 1}
    # as `streamlearn run` does: what is imported is frozen, and so are the models once made (a
    # full collection walked them for 50 ms with a thousand); and with the default 5 ms GIL switch
    # interval, each time the store's threads (the WAL copy, the fsync) want the GIL back the
    # agent's step can take 5 ms longer
    agent, transport = _make_agent(workdir / f"steady-{models}-{int(leave_behind)}.db", store=settings,
                                   freeze_gc=True)
    cfg = agent.config.store
    settle = min(cfg.checkpoint_replay_max, cfg.inbox_retention) if settle is None else settle
    timed = intervals * cfg.checkpoint_every_messages
    messages = make_messages(settle + timed, models, boot="steady", seed=11)  # (frozen too: not the agent's)
    gc.collect()
    gc.freeze()
    switch_interval = sys.getswitchinterval()
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    first_timed = None
    with_ckpt: list[float] = []
    without: list[float] = []
    try:
        _warm(agent, transport, models, n=models)
        agent.checkpoint("bench")  # every model saved once
        for i, (topic, payload) in enumerate(messages):
            if i == settle:
                agent.commit_group()
                first_timed = agent.store.next_checkpoint_id()
            transport.inject(topic, payload)
            busy = agent._pending is not None
            t0 = time.perf_counter()
            agent.step(timeout=0.0)
            ms = (time.perf_counter() - t0) * 1000.0
            if i >= settle:
                (with_ckpt if busy or agent._pending is not None else without).append(ms)
        agent.commit_group()
    finally:
        sys.setswitchinterval(switch_interval)
        gc.unfreeze()
    writer_busy = getattr(agent.store, "writer_busy", None)  # (absent before commits could wait for it)
    getattr(agent.store, "flush_durations", lambda: None)()  # (absent too: for side-by-side runs on old commits)
    rows = agent.store._conn.execute(
        "SELECT duration_ms, slots_written, bytes_written, position - coalesce(replay_from, position)"
        " FROM checkpoints WHERE id >= ? AND reason = 'interval' ORDER BY id", (first_timed,)).fetchall()
    agent.store.close()
    durations = [r[0] for r in rows]
    return {
        "models": models,
        "leave_behind": leave_behind,
        "checkpoints": len(rows),
        "pause_ms_median": round(median(durations) or 0.0, 3),
        "pause_ms_max": round(max(durations, default=0.0), 3),
        "models_written_median": median([r[1] for r in rows]),
        "bytes_written_median": median([r[2] for r in rows]),
        "replay_rows_max": max((r[3] for r in rows), default=0),
        "step_ms_with_checkpoint_p99": round(percentile(sorted(with_ckpt), 99) or 0.0, 3),
        "step_ms_with_checkpoint_max": round(max(with_ckpt, default=0.0), 3),
        "step_ms_without_p99": round(percentile(sorted(without), 99) or 0.0, 3),
        "step_ms_without_max": round(max(without, default=0.0), 3),
        "steps_over_5ms": sum(1 for ms in with_ckpt + without if ms > 5.0),
        "steps": len(with_ckpt) + len(without),
        "writer_busy": writer_busy,
    }


def run_profile(out_json: Path | None = Path("reports/bench-profile.json"), quick: bool = False,
                port: int | None = None, workdir: Path | None = None, n: int | None = None,
                print_table: bool = True) -> dict[str, Any]:
    """Per-stage profile; starts a private Mosquitto for the transport figures unless ``port`` is given."""
    n = n or (2_000 if quick else 20_000)
    own_dir = workdir is None
    workdir = Path(workdir or tempfile.mkdtemp(prefix="streamlearn-profile-"))
    workdir.mkdir(parents=True, exist_ok=True)
    broker = None
    results: dict[str, Any] = {"benchmark": "profile", "quick": quick, "environment": environment(), "n": n}
    try:
        if port is None:
            from streamlearn.transport.broker import MosquittoProcess

            broker = MosquittoProcess(workdir=workdir / "broker").start()
            port = broker.port
        results["stages_batch512"] = stage_profile(workdir, n, 512)
        results["stages_batch1"] = stage_profile(workdir, min(n, 1_000 if quick else 3_000), 1)
        results["stages_1000_devices"] = stage_profile(workdir, n, 512, devices=1000)
        results["transport"] = transport_costs(port, workdir, min(n, 20_000))
        results["agent_in_process"] = agent_in_process(workdir, n)
        results["agent_in_process_cprofile"] = agent_in_process(workdir, min(n, 10_000), profile=True)
        results["model_memory"] = model_memory(200 if quick else 1000)
        results["checkpoint"] = {str(m): checkpoint_stalls(workdir, m, 2 if quick else 5) for m in (1, 100, 1000)}
        results["checkpoint_steady"] = {
            str(m): checkpoint_pauses_steady(workdir, m, intervals=2 if quick else 10, settle=2_000 if quick else None)
            for m in (100, 1000)}
        results["process_rss_kb"] = proc_status(__import__("os").getpid())
        b512 = results["stages_batch512"]["us_per_msg"]
        tr = results["transport"]
        results["estimated_agent_cpu_us_per_msg"] = round(
            sum(b512.values()) + (tr.get("receive_ack_us_per_msg") or 0) + (tr.get("publish_us_per_msg") or 0), 1)
        results["probe_overhead_us_per_msg"] = round(
            results["stages_batch512"]["wall_us_per_msg"] - results["agent_in_process"]["us_per_msg"], 2)
    finally:
        if broker is not None:
            broker.stop()
        if own_dir:
            shutil.rmtree(workdir, ignore_errors=True)
    write_json(out_json, results)
    if print_table:
        print_profile(results)
    return results


def print_profile(results: dict[str, Any]) -> None:
    from rich.table import Table

    c = console()
    b512, b1, d1000 = results["stages_batch512"], results["stages_batch1"], results["stages_1000_devices"]
    tr = results.get("transport", {})
    table = Table(title="per-stage cost, us per message (in-process, perf_counter)")
    for col in ("stage", "batch 512, 1 device", "batch 1, 1 device", "batch 512, 1,000 devices", "share (b512)"):
        table.add_column(col, justify="left" if col == "stage" else "right")
    est = results.get("estimated_agent_cpu_us_per_msg") or 1.0
    for stage in STAGES:
        if stage == "receive":
            v = tr.get("receive_ack_us_per_msg")
            table.add_row("receive + ack (paho, CPU)", fmt(v), fmt(v), fmt(v), _pct(v, est))
            continue
        if stage == "publish":
            v = tr.get("publish_us_per_msg")
            table.add_row("publish (paho QoS 1, CPU)", fmt(v), fmt(v), fmt(v), _pct(v, est))
            continue
        table.add_row(stage, fmt(b512["us_per_msg"].get(stage)), fmt(b1["us_per_msg"].get(stage)),
                      fmt(d1000["us_per_msg"].get(stage)), _pct(b512["us_per_msg"].get(stage), est))
    table.add_row("[b]estimated agent CPU/msg[/b]", fmt(est), "", "", "100%")
    ai = results.get("agent_in_process", {})
    table.add_row("in-process Agent (no MQTT) wall us/msg", fmt(ai.get("us_per_msg")), "", "",
                  f"{fmt(ai.get('msgs_per_s'))} msg/s")
    c.print(table)
    mm = results.get("model_memory", {})
    cp = results.get("checkpoint", {})
    c.print(f"per-device model: {fmt(mm.get('heap_bytes_per_model'))} B Python heap, "
            f"{fmt(mm.get('checkpoint_bytes_per_model'))} B per checkpoint "
            f"({mm.get('n_params')} parameters)")
    c.print("checkpoint pauses, ms: longest single pause median/max (begin, or one step incl. its COMMIT), "
            "steps, whole checkpoint, and the same checkpoint written in one step (Agent.checkpoint):")
    for m, v in cp.items():
        c.print(f"  {m} changed model(s): {fmt(v['stall_ms_median'])}/{fmt(v['stall_ms_max'])} ms "
                f"(every pause p50 {fmt(v.get('pause_ms_p50'))}, p99 {fmt(v.get('pause_ms_p99'))}) in "
                f"{fmt(v.get('steps_median'))} steps of {fmt(v.get('step_budget_ms'))} ms, whole "
                f"{fmt(v.get('total_ms_median'))} ms; in one step {fmt(v.get('one_step_ms_median'))} ms")
    c.print("as messages flow, one at a time round-robin over the devices (checkpoints leave models behind):")
    for m, v in results.get("checkpoint_steady", {}).items():
        c.print(f"  {m} models: {fmt(v['models_written_median'])} models, {fmt(v['bytes_written_median'])} B a "
                f"checkpoint; longest step with checkpoint work {fmt(v['step_ms_with_checkpoint_max'])} ms, "
                f"without {fmt(v['step_ms_without_max'])} ms; {v['steps_over_5ms']} of {v['steps']} steps over 5 ms")
    c.print(f"store commit: {fmt(b512['store_ms_per_commit'])} ms per batch of 512, "
            f"{fmt(b1['store_ms_per_commit'])} ms per single-message batch")


def _pct(v: float | None, total: float) -> str:
    return "-" if v is None else f"{100.0 * v / total:.0f}%"
