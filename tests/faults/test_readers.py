"""Fault 10: readers holding a long read transaction while the agent writes at full rate."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from streamlearn.config import parse_config
from streamlearn.sim import SensorSimulator
from tests.faults.checker import check_store, inbox_max_seq
from tests.faults.harness import ROOT, Agent, Sensors, agent_config, wait_settled, file_size, wait_until, write_config
from tests.faults.report import FaultReport

pytestmark = pytest.mark.faults

READINGS = 40_000
HOLD_S = 15.0  # how long the reader keeps its read transaction open
WAL_BOUND_MB = 64.0  # the agent's journal_size_limit
WAL_TRUNCATED_MB = 4.0  # ~ SQLite's auto-checkpoint size (1000 pages)
TRUNCATE_WITHIN_S = 15.0

# A reader the way the CLI reads (streamlearn.store.reader, read-only), holding one read
# transaction open for HOLD seconds while it keeps reading; then it tries to write.
READER = r"""
import json, sys, time
from streamlearn.store import reader
db, hold = sys.argv[1], float(sys.argv[2])
conn = reader.open_readonly(db)
conn.execute("BEGIN")
t0 = time.time()
reads = 0
first = conn.execute("SELECT count(*) FROM inbox").fetchone()[0]
while time.time() - t0 < hold:
    reader.stream_status(conn)
    reader.store_summary(conn)
    reader.dead_letters(conn, None, 10)
    same = conn.execute("SELECT count(*) FROM inbox").fetchone()[0]
    assert same == first, "the snapshot moved inside one transaction"
    reads += 1
    time.sleep(0.05)
conn.execute("COMMIT")
try:
    conn.execute("INSERT INTO agent_info (key, value) VALUES ('reader', 'wrote')")
    wrote = True
except Exception as exc:
    wrote = str(exc)
print(json.dumps({"reads": reads, "snapshot_rows": first, "write_attempt": wrote}))
"""


def test_long_reader_while_the_agent_writes(mosquitto, tmp_path: Path, report: FaultReport) -> None:
    """A reader (the CLI's read-only connection; `streamlearn drift` if it exists) holds a read
    transaction for 15 s while the agent stores 40,000 readings as fast as it can: no
    writer errors, WAL size bounded and truncated afterwards, the CLI cannot write."""
    db = tmp_path / "s.db"
    wal = db.with_name(db.name + "-wal")
    data = agent_config(db, mosquitto.port, "readers-agent")
    data["store"]["checkpoint_every_messages"] = 1000
    cfg = parse_config(data)
    readings = list(SensorSimulator(cfg.streams[0], devices=3, seed=10).messages(READINGS))
    agent = Agent(write_config(tmp_path / "agent.toml", data), tmp_path / "agent.log")
    sensors = Sensors(mosquitto.port, "readers-sensors", window=200)
    wal_samples: list[tuple[float, int]] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.1):
            wal_samples.append((time.time(), file_size(wal)))

    sampler = threading.Thread(target=sample, daemon=True)
    drift_available = subprocess.run([sys.executable, "-m", "streamlearn", "drift", "--help"], cwd=ROOT,
                                     capture_output=True, timeout=60).returncode == 0
    cli_runs: list[dict] = []
    try:
        agent.start()
        agent.wait_log(r"connected \(session present", 30)
        sampler.start()
        sensors.start_background(readings)
        wait_until(lambda: inbox_max_seq(db) >= 3000, 60)
        t_hold = time.time()
        rd = subprocess.Popen([sys.executable, "-c", READER, str(db), str(HOLD_S)], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        # the CLI, meanwhile: status (and drift when it exists) must work while the agent writes
        while rd.poll() is None and time.time() - t_hold < HOLD_S + 30:
            cmds = [["status", "--store", str(db), "--json"]]
            if drift_available:
                cmds.append(["drift", "--store", str(db)])
            for cmd in cmds:
                t = time.time()
                out = subprocess.run([sys.executable, "-m", "streamlearn", *cmd], cwd=ROOT, capture_output=True,
                                     text=True, timeout=60)
                cli_runs.append({"cmd": cmd[0], "rc": out.returncode, "s": round(time.time() - t, 2),
                                 "err": out.stderr.strip()[-200:]})
            time.sleep(1.0)
        out, err = rd.communicate(timeout=HOLD_S + 60)
        t_release = time.time()
        reader_result = json.loads(out) if rd.returncode == 0 and out.strip() else {"error": err[-500:]}
        wal_during = max((s for t, s in wal_samples if t_hold <= t <= t_release), default=0)
        stored_during_hold = inbox_max_seq(db)
        truncated = wait_until(lambda: file_size(wal) <= WAL_TRUNCATED_MB * 2**20, TRUNCATE_WITHIN_S, interval=0.1)
        wal_after = file_size(wal)
        sensors.join(300)
        wait_settled(db, READINGS, 120)
        wal_before_stop = file_size(wal)
        assert agent.terminate() == 0
        wal_after_stop = file_size(wal)
    finally:
        stop.set()
        agent.stop_quietly()
        sensors.close()

    result = check_store(db, readings)
    log = agent.log()
    writer_errors = [ln for ln in log.splitlines()
                     if ("ERROR" in ln and "streamlearn" in ln) or "database is locked" in ln or "SQLITE_BUSY" in ln]
    status = agent.final_status() or {}
    mb = 2**20
    report.add(
        published=len(readings), lost=result.lost, twice=result.twice, once=result.once,
        hold_s=HOLD_S, reader=reader_result, drift_cli_available=drift_available, cli_runs=cli_runs[:20],
        stored_when_reader_released=stored_during_hold,
        wal_mb_max_during_hold=round(wal_during / mb, 2), wal_mb_after_release=round(wal_after / mb, 2),
        wal_truncated_within_s=TRUNCATE_WITHIN_S if truncated else None,
        wal_mb_before_stop=round(wal_before_stop / mb, 2), wal_mb_after_stop=round(wal_after_stop / mb, 2),
        wal_mb_max=round(max((s for _, s in wal_samples), default=0) / mb, 2),
        writer_errors=writer_errors[:5], store_errors=status.get("store_errors"), check=result.summary(),
        other_errors=[ln for ln in log.splitlines() if "ERROR" in ln and ln not in writer_errors][:3],
        predictions_dropped=(status.get("transport") or {}).get("publish_dropped"),
    )
    report.expect("the reader held its transaction and read a stable snapshot", "reads" in reader_result, reader_result)
    report.expect("no writer errors", not writer_errors and status.get("store_errors") == 0, writer_errors[:5])
    report.expect("the CLI works while the agent writes", all(c["rc"] == 0 for c in cli_runs) and cli_runs,
                  [c for c in cli_runs if c["rc"] != 0][:3])
    report.expect("the CLI's connection cannot write", reader_result.get("write_attempt") not in (True, None)
                  and "readonly" in str(reader_result.get("write_attempt")), reader_result)
    report.expect(f"WAL bounded during the long read (at most {WAL_BOUND_MB:g} MB)", wal_during <= WAL_BOUND_MB * mb,
                  f"{wal_during / mb:.1f} MB")
    report.expect(f"WAL truncated to at most {WAL_TRUNCATED_MB:g} MB within {TRUNCATE_WITHIN_S:g} s after the reader let go",
                  truncated, f"{wal_after / mb:.1f} MB {TRUNCATE_WITHIN_S:g} s after the reader let go; "
                  f"{wal_before_stop / mb:.1f} MB before the agent stopped, {wal_after_stop / mb:.1f} MB after")
    report.expect("every reading learned once", result.exactly_once and result.digest_ok, result.summary())
    report.headline = (f"WAL {wal_during / mb:.1f} MB during a {HOLD_S:g} s read, {wal_after / mb:.1f} MB "
                       f"{TRUNCATE_WITHIN_S:g} s after it")
    report.verify()
