"""Fault 6: network faults between the agent and the broker, through a loopback TCP proxy."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from streamlearn.config import parse_config
from streamlearn.sim import SensorSimulator
from tests.faults.checker import check_store, inbox_max_seq
from tests.faults.harness import Agent, Sensors, agent_config, wait_settled, wait_until, write_config
from tests.faults.proxy import TcpProxy
from tests.faults.report import FaultReport

pytestmark = pytest.mark.faults

READINGS = 12_000
RATE = 300.0
KEEPALIVE = 5  # the agent's keepalive (the smallest the config allows)
BLACKHOLE_S = 12.0
LATENCY_S = 0.5
LATENCY_PHASE_S = 15.0
RECONNECT_LIMIT_S = 5.0
RSS_GROWTH_LIMIT_MB = 64.0  # no number in the issue: a fixed bound, whatever the outage length
SEED = 12


def test_blackhole_reset_and_latency(mosquitto, tmp_path: Path, report: FaultReport) -> None:
    """Through a TCP proxy between agent and broker: a 12 s blackhole, a connection reset,
    500 ms latency each way for 15 s, while 12,000 readings are published: each outage
    detected within 2 keepalives, reconnect within 5 s of healing, 0 lost, memory growth
    bounded."""
    proxy = TcpProxy(mosquitto.port).start()
    db = tmp_path / "s.db"
    data = agent_config(db, proxy.port, "net-agent")
    data["mqtt"]["keepalive"] = KEEPALIVE
    cfg = parse_config(data)
    readings = list(SensorSimulator(cfg.streams[0], devices=3, seed=SEED).messages(READINGS))
    agent = Agent(write_config(tmp_path / "agent.toml", data), tmp_path / "agent.log")
    sensors = Sensors(mosquitto.port, "net-sensors", window=200)
    rss: list[tuple[float, int]] = []
    sampling = threading.Event()

    def sample() -> None:
        while not sampling.wait(0.5):
            if agent.alive():
                value = agent.rss_kb()
                if value:
                    rss.append((time.time(), value))

    sampler = threading.Thread(target=sample, daemon=True)
    phases: dict[str, dict] = {}
    disconnect = r"disconnected from the broker|connection lost|keepalive"
    connected = r"connected \(session present"
    try:
        agent.start()
        agent.wait_log(connected, 30)
        sampler.start()
        sensors.start_background(readings, rate=RATE)
        wait_until(lambda: inbox_max_seq(db) >= 900, 30)
        rss_base = agent.rss_kb() or 0

        # 1. blackhole: nothing gets through for 12 s, no FIN, no RST
        t0 = time.time()
        proxy.blackhole()
        detected = wait_until(lambda: agent.events(disconnect, since=t0), BLACKHOLE_S)
        t_detect = agent.events(disconnect, since=t0)[0][0] if detected else None
        wait_until(lambda: time.time() - t0 >= BLACKHOLE_S, BLACKHOLE_S + 1, interval=0.05)
        stored_in_blackhole = inbox_max_seq(db)
        t_heal = time.time()
        proxy.heal()
        back = wait_until(lambda: agent.events(connected, since=t_heal), 30)
        t_back = agent.events(connected, since=t_heal)[0][0] if back else None
        phases["blackhole"] = {
            "seconds": BLACKHOLE_S, "detected_after_s": None if t_detect is None else round(t_detect - t0, 3),
            "reconnected_after_heal_s": None if t_back is None else round(t_back - t_heal, 3),
            "stored_during": stored_in_blackhole,
        }
        wait_until(lambda: inbox_max_seq(db) > stored_in_blackhole + 300, 20)

        # 2. connection reset: RST on both sides
        t1 = time.time()
        n_reset = proxy.reset()
        detected = wait_until(lambda: agent.events(disconnect, since=t1), 2 * KEEPALIVE + 2)
        t_detect = agent.events(disconnect, since=t1)[0][0] if detected else None
        back = wait_until(lambda: agent.events(connected, since=t1), 30)
        t_back = agent.events(connected, since=t1)[0][0] if back else None
        phases["reset"] = {
            "connections_reset": n_reset,
            "detected_after_s": None if t_detect is None else round(t_detect - t1, 3),
            "reconnected_after_s": None if t_back is None else round(t_back - t1, 3),
        }
        after_reset = inbox_max_seq(db)
        wait_until(lambda: inbox_max_seq(db) > after_reset + 300, 20)

        # 3. latency: 500 ms each way
        stored_before = inbox_max_seq(db)
        t2 = time.time()
        proxy.set_latency(LATENCY_S)
        wait_until(lambda: time.time() - t2 >= LATENCY_PHASE_S, LATENCY_PHASE_S + 1, interval=0.05)
        proxy.set_latency(0.0)
        stored_during = inbox_max_seq(db) - stored_before
        phases["latency"] = {
            "latency_each_way_s": LATENCY_S, "seconds": LATENCY_PHASE_S,
            "readings_stored_during": stored_during,
            "rate_during": round(stored_during / LATENCY_PHASE_S, 1),
            "disconnects_during": len(agent.events(disconnect, since=t2)),
        }
        sensors.join(300)
        wait_settled(db, READINGS, 120)
        rss_end = agent.rss_kb() or 0
        assert agent.terminate() == 0
    finally:
        sampling.set()
        agent.stop_quietly()
        sensors.close()
        proxy.close()

    result = check_store(db, readings)
    rss_max = max((v for _, v in rss), default=0)
    growth_mb = (rss_max - rss_base) / 1024.0
    bh, rs, lt = phases.get("blackhole", {}), phases.get("reset", {}), phases.get("latency", {})
    report.add(
        published=len(readings), lost=result.lost, twice=result.twice, once=result.once,
        keepalive_s=KEEPALIVE, phases=phases, rss_base_kb=rss_base, rss_max_kb=rss_max, rss_end_kb=rss_end,
        rss_growth_mb=round(growth_mb, 1), proxy=proxy.stats, check=result.summary(),
        rss_timeline_kb=[v for _, v in rss[::4]],
        final_status=agent.final_status(),
    )
    report.expect(f"blackhole detected within 2 keepalives ({2 * KEEPALIVE} s)",
                  bh.get("detected_after_s") is not None and bh["detected_after_s"] <= 2 * KEEPALIVE, bh)
    report.expect(f"reconnect within {RECONNECT_LIMIT_S} s of healing the blackhole",
                  bh.get("reconnected_after_heal_s") is not None and bh["reconnected_after_heal_s"] <= RECONNECT_LIMIT_S, bh)
    report.expect(f"reset detected within 2 keepalives ({2 * KEEPALIVE} s)",
                  rs.get("detected_after_s") is not None and rs["detected_after_s"] <= 2 * KEEPALIVE, rs)
    report.expect(f"reconnect within {RECONNECT_LIMIT_S} s of the reset",
                  rs.get("reconnected_after_s") is not None and rs["reconnected_after_s"] <= RECONNECT_LIMIT_S, rs)
    report.expect("readings keep flowing at 500 ms latency without a disconnect",
                  lt.get("readings_stored_during", 0) > 0 and lt.get("disconnects_during", 1) == 0, lt)
    report.expect("0 lost", result.lost == 0, result.summary())
    report.expect("0 learned twice", result.twice == 0 and result.unexplained == 0, result.summary())
    report.expect(f"memory growth bounded (RSS +{RSS_GROWTH_LIMIT_MB:g} MB at most)", growth_mb <= RSS_GROWTH_LIMIT_MB,
                  f"RSS {rss_base} kB -> max {rss_max} kB")
    report.expect("integrity ok", result.integrity == "ok", result.integrity)
    report.headline = (f"blackhole detected after {bh.get('detected_after_s')} s, back {bh.get('reconnected_after_heal_s')} s "
                       f"after heal; reset back after {rs.get('reconnected_after_s')} s; RSS +{growth_mb:.0f} MB")
    report.verify()
