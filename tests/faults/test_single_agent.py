"""Fault 11: one agent per store and per MQTT client id."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from streamlearn.config import parse_config
from streamlearn.sim import SensorSimulator
from tests.faults.checker import check_store, stream_counters
from tests.faults.harness import Agent, Sensors, agent_config, wait_settled, wait_until, write_config
from tests.faults.report import FaultReport

pytestmark = pytest.mark.faults

READINGS = 3_000
RATE = 200.0
REFUSE_WITHIN_S = 20.0  # a second agent must have exited (with a message) by then
OBSERVE_S = 10.0  # how long a second agent that did not refuse is watched before the test stops it
TAKEOVER = r"took over the session|another client connected with our client id"


def test_second_agent_on_same_store_or_client_id_refuses(mosquitto, tmp_path: Path, report: FaultReport) -> None:
    """While an agent runs, a second agent on the same store, and a third on another store with
    the same MQTT client id, each refuse to start with a clear message (a lock) instead of the
    two knocking each other off the broker; the first agent loses nothing."""
    db = tmp_path / "a.db"
    data_a = agent_config(db, mosquitto.port, "single-agent")
    cfg = parse_config(data_a)
    readings = list(SensorSimulator(cfg.streams[0], devices=3, seed=3).messages(READINGS))
    first = Agent(write_config(tmp_path / "a.toml", data_a), tmp_path / "a.log")
    same_store = Agent(write_config(tmp_path / "b.toml", agent_config(db, mosquitto.port, "single-other-id")),
                       tmp_path / "b.log")
    same_id = Agent(write_config(tmp_path / "c.toml", agent_config(tmp_path / "c.db", mosquitto.port, "single-agent")),
                    tmp_path / "c.log")
    sensors = Sensors(mosquitto.port, "single-sensors", window=100)
    fig: dict = {}
    try:
        first.start()
        first.wait_log(r"connected \(session present", 30)
        sensors.start_background(readings, rate=RATE)

        # a second agent on the same store
        t0 = time.time()
        same_store.start()
        exited = wait_until(lambda: not same_store.alive(), REFUSE_WITHIN_S, interval=0.05)
        code = same_store.wait_exit(5) if exited else None
        if not exited:
            same_store.stop_quietly()
        text = same_store.log()
        fig["same_store"] = {"refused": exited and code not in (0, None), "exit_code": code,
                             "after_s": round(time.time() - t0, 2), "message": text.strip().splitlines()[-1][-300:]}

        # a third agent, its own store, the same client id
        t1 = time.time()
        same_id.start()
        exited = wait_until(lambda: not same_id.alive(), OBSERVE_S, interval=0.05)
        code = same_id.wait_exit(5) if exited else None
        if not exited:
            same_id.terminate()
        text = same_id.log()
        c_db = tmp_path / "c.db"
        fig["same_client_id"] = {
            "refused": exited and code not in (0, None), "exit_code": code, "ran_s": round(time.time() - t1, 2),
            "message": [ln[-200:] for ln in text.splitlines() if "ERROR" in ln or "Error" in ln][:3],
            "disconnects_of_first": len(first.events(r"disconnected from the broker|took over", since=t1)),
            "takeovers_named_by_first": len(first.events(TAKEOVER, since=t1)),
            "takeovers_seen_by_third": len(same_id.events(TAKEOVER, since=t1)),
            "connects_of_third": len(same_id.events(r"connected \(session present", since=t1)),
            "readings_learned_by_third": stream_counters(c_db).get("learned_count", 0) if c_db.exists() else 0,
        }
        sensors.join(120)
        # readings the third agent took never reach the first: wait for the first, or for both together
        wait_settled(db, READINGS - fig["same_client_id"]["readings_learned_by_third"], 60)
        fig["first_alive_throughout"] = first.alive()
        assert first.terminate() == 0
    finally:
        first.stop_quietly()
        same_store.stop_quietly()
        same_id.stop_quietly()
        sensors.close()

    result = check_store(db, readings)
    ss, sc = fig.get("same_store", {}), fig.get("same_client_id", {})
    report.add(published=len(readings), lost=result.lost, twice=result.twice, once=result.once,
               check=result.summary(), **fig)
    report.expect("a second agent on the same store refuses to start with a clear message",
                  ss.get("refused") and "in use" in ss.get("message", ""), ss)
    report.expect(f"an agent with the same client id refuses to start (exits within {OBSERVE_S:g} s) with a clear message",
                  sc.get("refused") and any("client id" in m for m in sc.get("message", [])), sc)
    report.expect("the first agent is never knocked off the broker", sc.get("disconnects_of_first") == 0, sc)
    report.expect("the first agent loses nothing: every reading learned once by it",
                  result.exactly_once and result.digest_ok, result.summary())
    report.headline = (f"same store refused: {bool(ss.get('refused'))}; same client id refused: "
                       f"{bool(sc.get('refused'))}; readings taken by the other agent: {sc.get('readings_learned_by_third')}")
    report.verify()
