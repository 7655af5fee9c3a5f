"""Fault 1: kill -9 at random times, some inside the checkpoint transaction."""

from __future__ import annotations

import random
import re
import time
from pathlib import Path

import pytest

from streamlearn.config import parse_config
from streamlearn.sim import SensorSimulator
from tests.faults.checker import check_checkpoint, check_store, inbox_max_seq, integrity, stream_counters
from tests.faults.harness import Agent, Sensors, Watch, agent_config, wait_for, write_config
from tests.faults.report import FaultReport

pytestmark = pytest.mark.faults

READINGS = 20_000
KILLS = 20
DEVICES = 3
CHECKPOINT_EVERY = 500  # messages: N, the most a restart may replay
RATE = 700.0  # readings per second from the sensors (the agent handles ~1,500/s here)
RESUME_LIMIT_S = 5.0
SEED = 4
# kills made by the agent's own fault hook, inside (or right after) a checkpoint transaction:
# kill number -> STREAMLEARN_FAULT (the n-th checkpoint of that run; n=1 is the replay checkpoint
# when there is something to replay)
HOOK_KILLS = {
    2: "checkpoint:before_commit:1",
    5: "checkpoint:models_written:2",
    8: "checkpoint:after_commit:1",
    11: "checkpoint:before_commit:2",
    14: "checkpoint:models_written:1",
    17: "checkpoint:after_commit:2",
}


def test_kill9_twenty_times_loses_nothing_and_learns_nothing_twice(mosquitto, tmp_path: Path,
                                                                    report: FaultReport) -> None:
    """20 SIGKILLs (6 of them by the fault hook inside checkpoints) during a 20,000-reading
    QoS 1 stream from 3 devices: 0 lost, 0 learned twice, integrity ok and the latest
    checkpoint loads after every kill, at most N (the checkpoint interval) replayed per
    restart, processing resumes within 5 s."""
    db = tmp_path / "s.db"
    data = agent_config(db, mosquitto.port, "kill9-agent")
    data["store"]["checkpoint_every_messages"] = CHECKPOINT_EVERY
    cfg = parse_config(data)
    readings = list(SensorSimulator(cfg.streams[0], devices=DEVICES, seed=SEED).messages(READINGS))
    rng = random.Random(SEED)
    thresholds = sorted(rng.randint(300, READINGS - 600) for _ in range(KILLS))

    watch = Watch(mosquitto.port, "kill9-watch")
    agent = Agent(write_config(tmp_path / "agent.toml", data), tmp_path / "agent.log")
    sensors = Sensors(mosquitto.port, "kill9-sensors", window=200)
    restarts: list[dict] = []
    t_begin = time.monotonic()
    try:
        agent.start()
        agent.wait_log(r"connected \(session present", 30)
        sensors.start_background(readings, rate=RATE)
        for i in range(KILLS):
            if i > 0:
                spec = HOOK_KILLS.get(i)
                agent.start(extra_env={"STREAMLEARN_FAULT": spec} if spec else None)
            else:
                spec = None
            started = agent.started_at
            stored_before = inbox_max_seq(db)
            entry: dict = {"kill": i + 1, "how": spec or "SIGKILL"}
            if spec:
                # the agent kills itself at its n-th checkpoint
                code = agent.wait_exit(90)
                entry["exit_code"] = code
                live = watch.first_live_after(started)
                entry["first_prediction_s"] = None if live is None else round(live - started, 3)
            else:
                # processing has resumed when a new reading is committed (then acked and learned)
                wait_for(lambda: inbox_max_seq(db) > stored_before, 60, interval=0.01,
                         what=f"first new reading stored after start {agent.starts}")
                entry["resume_s"] = round(time.time() - started, 3)
                live = wait_for(lambda: watch.first_live_after(started), 60, interval=0.02,
                                what=f"first new prediction after start {agent.starts}")
                entry["first_prediction_s"] = round(live - started, 3)
                wait_for(lambda: inbox_max_seq(db) >= thresholds[i] or sensors.error, 120, interval=0.01,
                         what=f"{thresholds[i]} readings stored")
                time.sleep(rng.uniform(0.0, 0.3))  # a random moment, not right at the threshold
                agent.kill()
                entry["exit_code"] = -9
            entry["stored"] = inbox_max_seq(db)
            entry["predictions_so_far"] = len(watch.predictions)
            # the store as the next start will find it
            entry["integrity"] = integrity(db)
            cp = check_checkpoint(db)
            entry.update(checkpoint=cp.checkpoint_id, position=cp.position, to_replay=cp.rows_after,
                         loads=cp.loads and cp.finite, consistent=cp.consistent, problems=cp.problems)
            restarts.append(entry)
        # the last start runs to the end of the stream
        agent.start()
        started = agent.started_at
        stored_before = inbox_max_seq(db)
        if stored_before < READINGS:
            wait_for(lambda: inbox_max_seq(db) > stored_before, 60, interval=0.01, what="first reading after the last start")
            restarts.append({"kill": None, "how": "final start", "resume_s": round(time.time() - started, 3)})
        sensors.join(300)
        wait_for(lambda: stream_counters(db).get("learned_count", 0) >= READINGS, 180, interval=0.2,
                 what="every reading learned")
        assert agent.terminate() == 0
    finally:
        agent.stop_quietly()
        sensors.close()
        watch.close()
    elapsed = time.monotonic() - t_begin

    # replays as the agent logged them, per start
    replayed = []
    # every start after a kill that left a checkpoint behind must have loaded it
    not_resumed = [n for n in range(2, agent.starts + 1)
                   if restarts[n - 2].get("checkpoint") is not None and "resumed checkpoint" not in agent.log_of_start(n)]
    for n in range(2, agent.starts + 1):
        m = re.search(r"replayed (\d+) inbox rows", agent.log_of_start(n))
        replayed.append(int(m.group(1)) if m else 0)
    for entry, r in zip(restarts, replayed):
        entry["replayed_next_start"] = r

    result = check_store(db, readings)
    per_reading = watch.per_reading()
    no_prediction = sum(1 for m in readings if (m.device, f"b0|{m.seq}") not in per_reading)
    resumes_all = [e["resume_s"] for e in restarts if e.get("resume_s") is not None]
    report.add(
        published=len(readings), lost=result.lost, twice=result.twice, once=result.once,
        kills=len([e for e in restarts if e["kill"]]), hook_kills=len(HOOK_KILLS),
        checkpoint_every=CHECKPOINT_EVERY, max_replayed=max(replayed, default=0), replayed_per_restart=replayed,
        resume_s_max=max(resumes_all, default=None), resume_s_median=sorted(resumes_all)[len(resumes_all) // 2] if resumes_all else None,
        readings_without_prediction=no_prediction, predictions_received=len(watch.predictions),
        final_status=agent.final_status(),
        first_prediction_s_max=max((e["first_prediction_s"] for e in restarts if e.get("first_prediction_s") is not None), default=None), duration_s=round(elapsed, 1),
        check=result.summary(), restarts=restarts,
    )
    report.expect("0 readings lost", result.lost == 0, result.summary())
    report.expect("0 readings learned twice", result.twice == 0 and result.unexplained == 0, result.summary())
    report.expect("every reading learned exactly once (count and digest)", result.digest_ok, result.summary())
    report.expect("PRAGMA integrity_check ok after every kill", all(e.get("integrity", "ok") == "ok" for e in restarts),
                  [e for e in restarts if e.get("integrity", "ok") != "ok"])
    report.expect("integrity ok at the end", result.integrity == "ok", result.integrity)
    report.expect("the latest checkpoint loads (finite tensors) after every kill",
                  all(e.get("loads", True) for e in restarts), [e for e in restarts if not e.get("loads", True)])
    report.expect("every restart resumed from the latest checkpoint (the agent loaded it)", not not_resumed,
                  f"starts without 'resumed checkpoint' in the log: {not_resumed}")
    report.expect("the counters of every latest checkpoint match the inbox up to its position",
                  all(e.get("consistent", True) for e in restarts), [e["problems"] for e in restarts if e.get("problems")])
    report.expect(f"at most N={CHECKPOINT_EVERY} readings replayed per restart",
                  max(replayed, default=0) <= CHECKPOINT_EVERY, f"replayed per restart: {replayed}")
    report.expect(f"processing resumes within {RESUME_LIMIT_S} s of every restart",
                  all(r <= RESUME_LIMIT_S for r in resumes_all), f"resume times: {resumes_all}")
    report.expect("all 20 kills happened", len([e for e in restarts if e["kill"]]) == KILLS, restarts)
    report.headline = (f"{len(restarts) - 1} kills, max replay {max(replayed, default=0)} (N={CHECKPOINT_EVERY}), "
                       f"resume max {max(resumes_all, default=0):.1f} s")
    report.verify()
