"""Fault 5: the broker restarts mid-stream, gracefully and by SIGKILL."""

from __future__ import annotations

import random
import re
import time
from pathlib import Path

import pytest

from streamlearn.config import parse_config
from streamlearn.sim import SensorSimulator
from tests.faults.checker import check_store, inbox_max_seq, key_of
from tests.faults.harness import Agent, Sensors, agent_config, wait_settled, wait_until, write_config
from tests.faults.report import FaultReport

pytestmark = pytest.mark.faults

READINGS = 15_000
RATE = 250.0
RESTARTS = 10  # alternately SIGTERM (mosquitto saves its database) and SIGKILL
BACKOFF_MAX = 5  # the agent's reconnect_max_delay
SEED = 8
DOWNTIME_S = [0, 0, 3, 0, 0, 8, 0, 2, 0, 12]  # how long the broker stays down at each restart


def _save_times(log: Path) -> list[int]:
    """Epoch seconds of every 'Saving in-memory database' line of the broker's log."""
    if not log.exists():
        return []
    return [int(m.group(1)) for m in re.finditer(r"^(\d+): Saving in-memory database", log.read_text(), re.M)]


def test_ten_broker_restarts_mid_stream(mosquitto, tmp_path: Path, report: FaultReport) -> None:
    """10 broker restarts during a 15,000-reading stream (5 graceful, 5 SIGKILL, shipped
    persistence settings; down for 0 to 12 s): the agent reconnects within back-off max + 2 s of the broker's
    return, its subscriptions work again, 0 lost among readings the broker had persisted,
    0 learned twice."""
    db = tmp_path / "s.db"
    data = agent_config(db, mosquitto.port, "restart-agent")
    data["mqtt"]["reconnect_max_delay"] = BACKOFF_MAX
    cfg = parse_config(data)
    readings = list(SensorSimulator(cfg.streams[0], devices=3, seed=SEED).messages(READINGS))
    rng = random.Random(SEED)
    agent = Agent(write_config(tmp_path / "agent.toml", data), tmp_path / "agent.log")
    sensors = Sensors(mosquitto.port, "restart-sensors", window=200)
    restarts: list[dict] = []
    try:
        agent.start()
        agent.wait_log(r"connected \(session present", 30)
        sensors.start_background(readings, rate=RATE)
        for r in range(RESTARTS):
            kill = r % 2 == 1
            time.sleep(rng.uniform(1.0, 2.0))  # a random moment mid-stream
            stored_before = inbox_max_seq(db)
            t_down = time.time()
            mosquitto.stop(kill=kill)
            down = DOWNTIME_S[r % len(DOWNTIME_S)]
            if down:
                # the broker stays away long enough for the agent's back-off to grow
                wait_until(lambda: time.time() - t_down >= down, down + 1, interval=0.05)
            mosquitto.start()
            t_up = time.time()
            entry = {"restart": r + 1, "how": "SIGKILL" if kill else "SIGTERM", "down_s": round(t_up - t_down, 3),
                     "t_down": t_down}
            ok = wait_until(lambda: agent.events(r"connected \(session present", since=t_up), BACKOFF_MAX + 10)
            if ok:
                t_conn, line = agent.events(r"connected \(session present", since=t_up)[0]
                entry["reconnect_s"] = round(t_conn - t_up, 3)
                entry["session_present"] = "session present: True" in line
            else:
                entry["reconnect_s"] = None
            # subscriptions work again: new readings arrive and are stored
            flowing = wait_until(lambda: inbox_max_seq(db) > stored_before + 50, 15)
            entry["readings_flow_again"] = flowing
            entry["resubscribed_s"] = round(time.time() - t_up, 3) if flowing else None
            restarts.append(entry)
            if sensors.sent >= READINGS:
                break
        sensors.join(300)
        wait_settled(db, READINGS, 120)
        assert agent.terminate() == 0
    finally:
        agent.stop_quietly()
        sensors.close()

    result = check_store(db, readings)
    # which lost readings could the broker not have persisted? acked after its last save before a SIGKILL
    saves = _save_times(mosquitto.log_path)
    stored = _stored_keys(db)
    excused, unexcused = [], []
    kill_times = [e["t_down"] for e in restarts if e["how"] == "SIGKILL"]
    for i, m in enumerate(readings):
        k = key_of(m)
        if k in stored:
            continue
        acked = sensors.ack_time.get(i)
        why = _excuse(acked, kill_times, saves)
        (excused if why else unexcused).append({"reading": list(k), "acked_at": acked, "why": why})
    reconnects = [e["reconnect_s"] for e in restarts]
    report.add(
        published=len(readings), lost=result.lost, twice=result.twice, once=result.once,
        lost_unpersisted_excused=len(excused), lost_persisted=len(unexcused),
        restarts=len(restarts), reconnect_s_max=max((x for x in reconnects if x is not None), default=None),
        restart_log=restarts, broker_saves=len(saves), publisher_reconnects=sensors.connects - 1,
        lost_examples=(unexcused + excused)[:5], check=result.summary(), final_status=agent.final_status(),
    )
    report.expect(f"all {RESTARTS} restarts done", len(restarts) == RESTARTS, f"only {len(restarts)} before the stream ended")
    report.expect(f"reconnect within back-off max + 2 s = {BACKOFF_MAX + 2} s of the broker's return",
                  all(x is not None and x <= BACKOFF_MAX + 2 for x in reconnects), reconnects)
    report.expect("subscriptions restored: readings flow again after every restart",
                  all(e["readings_flow_again"] for e in restarts), [e for e in restarts if not e["readings_flow_again"]])
    report.expect("0 lost among readings the broker had persisted", not unexcused, unexcused[:5])
    report.expect("0 learned twice", result.twice == 0 and result.unexplained == 0, result.summary())
    report.expect("integrity ok", result.integrity == "ok", result.integrity)
    report.headline = (f"{len(restarts)} restarts, reconnect max {report.figures.get('reconnect_s_max')} s, "
                       f"{len(excused)} unpersisted + {len(unexcused)} persisted lost")
    report.verify()


def _stored_keys(db: Path) -> set[tuple]:
    from tests.faults.checker import connect_ro

    conn = connect_ro(db)
    try:
        out = set()
        for (k,) in conn.execute("SELECT msg_key FROM inbox WHERE msg_key IS NOT NULL"):
            p = k.split("|")
            out.add((p[1], p[2], int(p[3])))
        return out
    finally:
        conn.close()


def _excuse(acked: float | None, kill_times: list[float], saves: list[int]) -> str:
    """Why a lost reading may be lost: the broker acked it after its last save and was then SIGKILLed."""
    if acked is None:
        return "never acknowledged by the broker"
    for t_kill in kill_times:
        if acked <= t_kill:
            last_save = max((s for s in saves if s <= t_kill), default=None)
            if last_save is None or acked >= last_save:
                return f"acked {t_kill - acked:.1f} s before a SIGKILL, after the last save"
            return ""
    return ""
