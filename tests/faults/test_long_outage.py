"""Fault 3: a long outage of the agent; the shipped broker config must keep every reading."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from streamlearn.config import parse_config
from streamlearn.sim import SensorSimulator
from streamlearn.transport.broker import gateway_config_text
from tests.faults.checker import check_checkpoint, check_store, stream_counters
from tests.faults.harness import Agent, Sensors, agent_config, file_size, rss_kb, wait_for, write_config
from tests.faults.report import FaultReport

pytestmark = pytest.mark.faults

READINGS = 100_000
DEVICES = 3
SEED = 11


def test_agent_down_while_100k_readings_are_published(mosquitto, tmp_path: Path, report: FaultReport) -> None:
    """The agent is stopped while 100,000 readings are published; after the restart all
    100,000 are learned once (with the broker config shipped in deploy/mosquitto)."""
    db = tmp_path / "s.db"
    data = agent_config(db, mosquitto.port, "outage-agent")
    data["store"]["checkpoint_every_messages"] = 1000
    data["store"]["inbox_retention"] = READINGS + 10_000
    cfg = parse_config(data)
    readings = list(SensorSimulator(cfg.streams[0], devices=DEVICES, seed=SEED).messages(READINGS))
    agent = Agent(write_config(tmp_path / "agent.toml", data), tmp_path / "agent.log")
    sensors = Sensors(mosquitto.port, "outage-sensors", window=100)
    try:
        agent.start()
        agent.wait_log(r"connected \(session present", 30)  # the broker now holds our session
        assert agent.terminate() == 0
        t0 = time.monotonic()
        sensors.publish_all(readings)
        assert sensors.flush(300), "the broker did not acknowledge every reading"
        t_publish = time.monotonic() - t0
        broker_rss = rss_kb(mosquitto.proc.pid) if mosquitto.proc else None
        t1 = time.monotonic()
        agent.start()
        session = agent.wait_log(r"connected \(session present", 30)
        rss_peak = 0
        db_peak = wal_peak = 0

        def done() -> bool:
            nonlocal rss_peak, db_peak, wal_peak
            rss_peak = max(rss_peak, agent.rss_kb() or 0)
            db_peak = max(db_peak, file_size(db))
            wal_peak = max(wal_peak, file_size(db.with_name(db.name + "-wal")))
            return stream_counters(db).get("learned_count", 0) >= READINGS

        wait_for(done, 600, interval=0.25, what="every reading of the outage learned")
        t_drain = time.monotonic() - t1
        assert agent.terminate() == 0
    finally:
        agent.stop_quietly()
        sensors.close()

    result = check_store(db, readings)
    cp = check_checkpoint(db)
    queued_limit = next((ln.split()[1] for ln in gateway_config_text().splitlines()
                         if ln.startswith("max_queued_messages")), None)
    report.add(
        published=len(readings), lost=result.lost, twice=result.twice, once=result.once,
        broker_acked=sensors.acked, refused_by_broker=len(sensors.refused),
        publish_s=round(t_publish, 1), publish_rate=round(len(readings) / t_publish),
        drain_s=round(t_drain, 1), drain_rate=round(len(readings) / t_drain),
        session_present="session present: True" in session[1], broker_rss_kb_with_backlog=broker_rss,
        agent_rss_peak_kb=rss_peak, db_bytes_peak=db_peak, wal_bytes_peak=wal_peak,
        shipped_max_queued_messages=queued_limit, check=result.summary(), final_status=agent.final_status(),
        predictions_dropped=((agent.final_status() or {}).get("transport") or {}).get("publish_dropped"),
    )
    report.expect("the broker acknowledged all 100,000", sensors.acked == len(readings),
                  f"{sensors.acked} acked, {len(sensors.refused)} refused")
    report.expect("the broker kept the session across the outage", "session present: True" in session[1], session[1])
    report.expect("all 100,000 learned once: 0 lost", result.lost == 0, result.summary())
    report.expect("0 learned twice", result.twice == 0 and result.unexplained == 0, result.summary())
    report.expect("count and digest of the learned readings match", result.digest_ok, result.summary())
    report.expect("integrity ok, checkpoint loads", result.integrity == "ok" and cp.loads and cp.finite, cp.problems)
    report.headline = (f"drained in {t_drain:.0f} s ({len(readings) / t_drain:.0f}/s); "
                       f"predictions dropped {report.figures.get('predictions_dropped')}")
    report.verify()
