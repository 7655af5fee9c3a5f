"""Fault 2: a run with crashes ends exactly where a clean run of the same stream ends."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from safetensors.numpy import load as load_tensors

from streamlearn.config import parse_config
from streamlearn.sim import SensorSimulator
from streamlearn.transport.broker import MosquittoProcess
from tests.faults.checker import check_store, connect_ro, inbox_max_seq, stream_counters
from tests.faults.harness import Agent, Sensors, Watch, agent_config, wait_for, write_config
from tests.faults.report import FaultReport

pytestmark = pytest.mark.faults

READINGS = 6_000
DEVICES = 3
SEED = 7
TOLERANCE = 1e-6
# what happens to the faulty run: SIGKILL after this many stored readings, or the fault hook
FAULTS: list[tuple[str, Any]] = [
    ("sigkill", 700),
    ("hook", "checkpoint:before_commit:2"),
    ("sigkill", 2300),
    ("hook", "checkpoint:models_written:1"),
    ("sigterm", 3500),
    ("sigkill", 4100),
    ("hook", "checkpoint:after_commit:2"),
    ("sigkill", 5200),
]


def _stream() -> dict[str, Any]:
    # more state than the default: lags, Adam moments, the target scaler
    return {"lags": 2, "optimizer": {"name": "adam", "lr": 0.003}}


def _models(db: Path) -> dict[str, tuple[dict[str, np.ndarray], dict[str, Any]]]:
    conn = connect_ro(db)
    try:
        return {
            f"{s}/{k}": (load_tensors(bytes(t)), orjson.loads(st))
            for s, k, t, st in conn.execute("SELECT stream, model_key, tensors, state FROM current_models")
        }
    finally:
        conn.close()


def _drift_rows(db: Path) -> list[tuple] | None:
    """Rows of the drift history (without wall-clock columns), or None when the store has none."""
    conn = connect_ro(db)
    try:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        name = next((t for t in tables if "drift" in t), None)
        if name is None:
            return None
        cols = [r[1] for r in conn.execute(f"PRAGMA table_info({name})")]
        keep = [c for c in cols if c not in ("id", "at", "created_at", "updated_at", "time", "wall_time")]
        return [tuple(r) for r in conn.execute(f"SELECT {', '.join(keep)} FROM {name} ORDER BY {', '.join(keep)}")]
    finally:
        conn.close()


def _json_diff(a: Any, b: Any, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                out.append(f"{path}/{k}: only in one run")
            else:
                out += _json_diff(a[k], b[k], f"{path}/{k}")
        return out
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{path}: lengths {len(a)} != {len(b)}"]
        out = []
        for i, (x, y) in enumerate(zip(a, b)):
            out += _json_diff(x, y, f"{path}[{i}]")
        return out
    if isinstance(a, float) or isinstance(b, float):
        if a is None or b is None or abs(float(a) - float(b)) > TOLERANCE * max(1.0, abs(float(a))):
            return [f"{path}: {a!r} != {b!r}"]
        return []
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


def _run(tmp: Path, name: str, readings, faults: list[tuple[str, Any]]) -> tuple[Agent, Watch, list[dict]]:
    tmp.mkdir()
    # a broker per run: the other run's agent session would make the broker queue this run's readings
    mosquitto = MosquittoProcess(workdir=tmp / "broker").start()
    db = tmp / "s.db"
    data = agent_config(db, mosquitto.port, f"equiv-{name}", **_stream())
    data["store"]["checkpoint_every_messages"] = 300
    # two runs compared with each other: strict test-then-train, since which readings share a
    # micro-batch depends on how each run's messages arrived (a restart replays its own run's
    # micro-batches exactly: tests/test_agent.py::test_micro_batches_are_recorded_so_a_restart_replays_them_exactly)
    data["agent"]["micro_batch"] = False
    agent = Agent(write_config(tmp / "agent.toml", data), tmp / "agent.log")
    watch = Watch(mosquitto.port, f"equiv-watch-{name}")
    sensors = Sensors(mosquitto.port, f"equiv-sensors-{name}", window=200)
    events: list[dict] = []
    def env_for(j: int) -> dict[str, str] | None:
        # the fault hook is armed when the agent starts, for the fault that follows
        return {"STREAMLEARN_FAULT": faults[j][1]} if j < len(faults) and faults[j][0] == "hook" else None

    try:
        agent.start(extra_env=env_for(0))
        agent.wait_log(r"connected \(session present", 30)
        sensors.start_background(readings, rate=900)
        for i, (kind, arg) in enumerate(faults):
            if kind == "hook":
                code = agent.wait_exit(90)  # the agent kills itself inside a checkpoint
            else:
                wait_for(lambda: inbox_max_seq(db) >= arg or sensors.error, 120, interval=0.01, what=f"{arg} stored")
                code = agent.terminate() if kind == "sigterm" else agent.kill()
            events.append({"fault": arg if kind == "hook" else f"{kind} at {arg}", "exit": code,
                           "stored": inbox_max_seq(db)})
            agent.start(extra_env=env_for(i + 1))
        if not agent.alive():
            agent.start()
        sensors.join(180)
        wait_for(lambda: stream_counters(db).get("learned_count", 0) >= len(readings), 120, interval=0.2,
                 what=f"{name}: every reading learned")
        assert agent.terminate() == 0
    finally:
        agent.stop_quietly()
        sensors.close()
        watch.close()
        mosquitto.stop()
    return agent, watch, events


def test_crash_and_replay_land_on_the_clean_run(tmp_path: Path, report: FaultReport) -> None:
    """The same seeded stream (6,000 readings, 3 devices, lags and Adam) run once cleanly
    and once with 8 faults (SIGKILLs, SIGTERM, fault-hook kills inside checkpoints), one
    thread: the same model parameters and optimizer state (max difference at most 1e-6),
    the same drift points and the same learning-rate trajectory."""
    cfg = parse_config(agent_config(tmp_path / "x.db", 1883, "x", **_stream()))
    readings = list(SensorSimulator(cfg.streams[0], devices=DEVICES, seed=SEED).messages(READINGS))

    t0 = time.monotonic()
    _, clean_watch, _ = _run(tmp_path / "clean", "clean", readings, [])
    t_clean = time.monotonic() - t0
    faulty_agent, faulty_watch, events = _run(tmp_path / "faulty", "faulty", readings, FAULTS)
    t_faulty = time.monotonic() - t0 - t_clean

    clean_db, faulty_db = tmp_path / "clean" / "s.db", tmp_path / "faulty" / "s.db"
    result = check_store(faulty_db, readings)
    a, b = _models(clean_db), _models(faulty_db)
    max_diff = 0.0
    tensor_diffs: dict[str, float] = {}
    state_diffs: list[str] = []
    for key in sorted(set(a) | set(b)):
        if key not in a or key not in b:
            state_diffs.append(f"model {key} only in one run")
            continue
        ta, sa = a[key]
        tb, sb = b[key]
        for name in sorted(set(ta) | set(tb)):
            if name not in ta or name not in tb or ta[name].shape != tb[name].shape:
                state_diffs.append(f"{key}/{name}: missing or different shape")
                continue
            d = float(np.max(np.abs(ta[name].astype(np.float64) - tb[name].astype(np.float64)))) if ta[name].size else 0.0
            tensor_diffs[f"{key}/{name}"] = d
            max_diff = max(max_diff, d)
        state_diffs += [f"{key}{p}" for p in _json_diff(sa, sb)]
    counters_a, counters_b = stream_counters(clean_db), stream_counters(faulty_db)

    # the learning-rate and prediction trajectories, reading by reading, from the published predictions
    pa, pb = clean_watch.per_reading(), faulty_watch.per_reading()
    common = sorted(set(pa) & set(pb))
    lr_diff = max((abs(float(pa[k][0]["lr"]) - float(pb[k][0]["lr"])) for k in common), default=0.0)
    pred_diff = max((abs(float(pa[k][0]["prediction"]) - float(pb[k][0]["prediction"])) for k in common), default=0.0)
    version_mismatch = sum(1 for k in common if pa[k][0]["model_version"] != pb[k][0]["model_version"])
    drift_a, drift_b = _drift_rows(clean_db), _drift_rows(faulty_db)

    report.add(
        published=len(readings), lost=result.lost, twice=result.twice, once=result.once,
        faults=events, restarts=faulty_agent.starts - 1,
        max_tensor_diff=max_diff, tensor_diffs=tensor_diffs, state_differences=state_diffs[:20],
        counters_clean=counters_a, counters_faulty=counters_b,
        readings_compared_by_prediction=len(common), max_lr_diff=lr_diff, max_prediction_diff=pred_diff,
        model_version_mismatches=version_mismatch,
        drift_table=("absent" if drift_a is None else f"{len(drift_a)} rows clean, {len(drift_b or [])} faulty"),
        clean_run_s=round(t_clean, 1), faulty_run_s=round(t_faulty, 1),
    )
    report.expect("faulty run: 0 lost, 0 learned twice", result.exactly_once and result.digest_ok, result.summary())
    report.expect(f"same parameters and optimizer moments (max difference <= {TOLERANCE})",
                  max_diff <= TOLERANCE and not any("missing" in s or "only in one" in s for s in state_diffs),
                  f"max difference {max_diff:g}; {state_diffs[:5]}")
    report.expect("same learner, scaler, feature and policy state", not state_diffs, state_diffs[:10])
    report.expect("same stream counters (learned count and digest)", counters_a == counters_b,
                  f"{counters_a} != {counters_b}")
    report.expect("same drift points", drift_a == drift_b, f"clean {drift_a!r:.300} faulty {drift_b!r:.300}")
    report.expect("same learning-rate trajectory (lr of every compared prediction)", lr_diff <= TOLERANCE,
                  f"max lr difference {lr_diff:g}")
    report.expect("same predictions reading by reading", pred_diff <= 1e-4 and version_mismatch == 0,
                  f"max prediction difference {pred_diff:g}, {version_mismatch} model versions differ")
    if len(common) < len(readings):
        report.note(f"only {len(common)} of {len(readings)} readings have a prediction in both runs: the agent "
                    "drops the predictions of replayed readings and loses queued ones at kill -9 (see test_kill9)")
    report.headline = f"{len(events)} faults; max tensor diff {max_diff:g}, max lr diff {lr_diff:g}"
    report.verify()
