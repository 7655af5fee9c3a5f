"""The benchmark harness itself: processes reply, results have their keys (no timing assertions)."""

from __future__ import annotations

import sys
import time
import tomllib
from pathlib import Path

import orjson
import pytest

from streamlearn.bench import echo as echo_mod
from streamlearn.bench.common import (
    CpuMeter,
    agent_config,
    latency_summary,
    make_messages,
    percentile,
    to_toml,
)
from streamlearn.bench.loadgen import Collector, Feeder, tools_available
from streamlearn.bench.procs import Child, StatusWatcher
from streamlearn.config import parse_config
from streamlearn.transport.broker import MosquittoProcess

needs_clients = pytest.mark.skipif(not tools_available(), reason="mosquitto_pub/mosquitto_sub not installed")


def test_the_agent_config_round_trips_through_toml(tmp_path: Path) -> None:
    data = agent_config(tmp_path / "s.db", 1883, "gw", "cid")
    cfg = parse_config(tomllib.loads(to_toml(data)))
    assert cfg.streams[0].features == [f"f{i}" for i in range(8)]
    assert cfg.streams[0].model.hidden == [32, 32]
    assert cfg.mqtt.client_id == "cid"


def test_what_if_settings_go_to_the_store_or_with_agent_dot_to_the_agent(tmp_path: Path) -> None:
    data = agent_config(tmp_path / "s.db", 1883, "gw", "cid", synchronous="normal",
                        **{"agent.micro_batch_backlog": 32})
    cfg = parse_config(tomllib.loads(to_toml(data)))
    assert cfg.store.synchronous == "normal" and cfg.agent.micro_batch_backlog == 32
    assert cfg.agent.gateway == "gw"


def test_messages_are_unique_and_decode_for_the_stream(tmp_path: Path) -> None:
    from streamlearn.codec import Codec

    cfg = parse_config(agent_config(tmp_path / "s.db", 1883, "gw", "cid"))
    codec = Codec(cfg.streams)
    msgs = make_messages(30, devices=3, boot="t")
    readings = [codec.decode(t, p, 0.0) for t, p in msgs]
    assert len({r.msg_id for r in readings}) == 30
    assert {r.device for r in readings} == {"d0000", "d0001", "d0002"}
    assert all(r.target is not None for r in readings)


def test_latency_summary_and_percentiles() -> None:
    s = latency_summary([0.001] * 98 + [0.002, 0.010])
    assert set(s) == {"n", "p50_ms", "p90_ms", "p99_ms", "p99_9_ms", "max_ms"}
    assert s["p50_ms"] == 1.0 and s["max_ms"] == 10.0
    assert percentile([], 50) is None


@needs_clients
def test_the_echo_replies_to_every_message(broker: MosquittoProcess, tmp_path: Path) -> None:
    watcher = StatusWatcher(broker.port)
    echo = Child([sys.executable, "-m", "streamlearn.bench.echo", "--port", str(broker.port), "--name", "techo",
                  "--max-seconds", "60"])
    coll = None
    try:
        import time

        watcher.wait_online(echo_mod.status_topic("techo"), time.monotonic() - 60, 30)
        coll = Collector(broker.port, "techo", [echo_mod.reply_filter("techo"), echo_mod.status_topic("techo")],
                         tmp_path / "replies.txt")
        assert coll.wait_lines(1, 15)
        feeder = Feeder(broker.port, "techo", track_acks=True)
        feeder.feed([p for _, p in make_messages(25, devices=2, boot="e")])
        assert feeder.wait_acked(25, 30)
        assert feeder.close(30)
        assert coll.wait_replies(25, 30)
        recv, dup = coll.receive_times("e", 25)
        assert not any(x != x for x in recv) and dup == 0
    finally:
        if coll is not None:
            coll.stop()
        echo.stop()
        watcher.close()
    counters = orjson.loads(echo.lines.get(timeout=10))
    assert counters["received"] == counters["replied"] == 25 and counters["errors"] == 0


@needs_clients
def test_a_flood_run_of_the_agent_reports_every_figure(tmp_path: Path) -> None:
    from streamlearn.bench.throughput import bench_context, flood_run, summarise, targets

    with bench_context(tmp_path) as ctx:
        agent = flood_run(ctx, "agent", n=150, warmup=50)
        echo = flood_run(ctx, "echo", n=150, warmup=50)
    for run in (agent, echo):
        assert run["complete"] and run["missing"] == 0
        for key in ("msgs_per_s", "cpu_us_per_msg", "broker_cpu_us_per_msg", "vmhwm_kb", "cpu", "startup_s"):
            assert key in run
    assert agent["all_learned"] and agent["all_committed"]
    assert agent["store"]["learned"] == 200 and agent["store"]["checkpoints"] >= 1
    agent["repeat"] = echo["repeat"] = 0
    summary = summarise({"flood": [echo, agent]})
    assert summary["throughput_ratio"] is not None
    assert {r["target"].split(" ")[0] for r in targets(summary)} >= {"throughput", "latency", "peak"}


def test_the_stage_profile_covers_every_stage(tmp_path: Path) -> None:
    from streamlearn.bench.stages import checkpoint_pauses_steady, checkpoint_stalls, model_memory, stage_profile

    prof = stage_profile(tmp_path, n=300, batch=64)
    assert prof["processed"] == 300
    for stage in ("decode", "hash", "dedupe", "store", "features", "predict", "learn", "serialize",
                  "runner_other", "agent_other", "checkpoint"):
        assert stage in prof["us_per_msg"]
    assert prof["store_commits"] >= 300 // 64
    ck = checkpoint_stalls(tmp_path, models=3, repeats=1)
    assert set(ck) >= {"stall_ms_median", "stall_ms_max", "steps_median", "one_step_ms_median"}
    assert ck["steps_median"] >= 1 and ck["stall_ms_max"] > 0
    leaving = checkpoint_pauses_steady(tmp_path, models=40, intervals=2, settle=500)
    every = checkpoint_pauses_steady(tmp_path, models=40, intervals=2, settle=500, leave_behind=False)
    assert leaving["checkpoints"] >= 1 and every["checkpoints"] >= 1 and leaving["steps"] == 2000
    assert leaving["models_written_median"] == 32 and every["models_written_median"] == 40  # checkpoint_models_max
    assert 0 < leaving["replay_rows_max"] <= 20_000 and every["replay_rows_max"] == 0
    mem = model_memory(devices=5)
    assert mem["n_params"] == 8 * 32 + 32 + 32 * 32 + 32 + 32 + 1
    assert mem["checkpoint_bytes_per_model"] > 4 * mem["n_params"]


def test_the_learner_bench_reports_cost_and_agreement(tmp_path: Path) -> None:
    from streamlearn.bench.learner import run_learner_bench

    out = tmp_path / "learner.json"
    res = run_learner_bench(out_json=out, n=64, repeats=1, agreement_n=40, print_table=False)
    saved = orjson.loads(out.read_bytes())
    assert saved["summary"].keys() == res["summary"].keys()
    for key in ("fused.strict.sgd", "torch.strict.sgd", "fused.batch32.sgd", "torch.batch32.sgd"):
        assert res["timing"][key]["us_median"] > 0
    assert res["agreement"]["sgd"]["match_1e-5"]  # plain SGD: the same predictions step for step
    assert "available" in res["deep_river"]


def test_the_cpu_meter_sees_its_own_process() -> None:
    import os

    meter = CpuMeter({"me": os.getpid()})
    sum(i * i for i in range(200_000))
    got = meter.stop()
    assert got["cpu_s"]["me"] is not None and got["elapsed_s"] > 0


def test_the_cpu_meter_splits_a_process_by_thread() -> None:
    import os
    import threading

    spun, release = threading.Event(), threading.Event()

    def spin() -> None:
        t0 = time.thread_time()
        while time.thread_time() - t0 < 0.3:
            pass
        spun.set()
        release.wait(10)  # alive until measured: an ended thread leaves /proc/<pid>/task

    meter = CpuMeter({"me": os.getpid()}, threads_of="me")
    worker = threading.Thread(target=spin)
    worker.start()
    assert spun.wait(10)
    got = meter.stop()["threads_cpu_s"]
    release.set()
    worker.join(10)
    # the worker's 0.3 s (tick-granular) is another thread's, not the main thread's
    assert got["others"] and got["others"][0] >= 0.25
    assert got["main"] < 0.2


def test_benchmark_settings_are_parsed_as_the_config_wants_them() -> None:
    from streamlearn.bench.common import parse_settings

    assert parse_settings(["agent.micro_batch_size_max=8", "synchronous=normal", "agent.micro_batch=false",
                           "agent.commit_delay_ms=2.5"]) == {
        "agent.micro_batch_size_max": 8, "synchronous": "normal", "agent.micro_batch": False,
        "agent.commit_delay_ms": 2.5}
