"""Fault 9: store faults: failing writes during checkpoints, and a full disk.

Two faults, both without root:

* **failing writes**: the test lowers the agent's RLIMIT_FSIZE with prlimit(2) (allowed
  for a process of the same user) to 1 byte: every write the agent makes to the
  database or its WAL fails with EFBIG ("disk I/O error"), while its log (a pipe) keeps
  working. Raising the limit again ends the fault.
* **full disk**: the store lives on a 32 MB tmpfs mounted in an unprivileged user and
  mount namespace (``unshare --user --map-root-user --mount``); the agent runs inside
  it (``nsenter``), the test reaches the files through ``/proc/<holder>/root`` and
  fills the file system with a filler file (real ENOSPC, "database or disk is full").
  Where user namespaces are not available the full-disk part falls back to the same
  RLIMIT_FSIZE fault and the report says so.
"""

from __future__ import annotations

import errno
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from streamlearn.config import parse_config
from streamlearn.sim import SensorSimulator
from tests.faults.checker import (
    SqlHelper,
    check_checkpoint,
    check_store,
    checkpoint_position,
    inbox_max_seq,
    integrity,
    register_remote,
    unregister_remote,
)
from tests.faults.harness import ROOT, Agent, Sensors, Watch, agent_config, wait_until, write_config
from tests.faults.report import FaultReport

pytestmark = pytest.mark.faults

DISK_MB = 32
PHASE_A = 1_000  # readings before any fault
PHASE_B = 300  # readings around the failing-writes fault
PHASE_C = 3_000  # readings published while the disk fills up and is full
CHECKPOINT_SECONDS = 2.0
STORE_ERROR = r"disk is full|disk I/O error|cannot commit|checkpoint failed"


class SmallDisk:
    """A size-limited tmpfs in a user+mount namespace held by a sleeping process."""

    def __init__(self, mountpoint: Path, size_mb: int) -> None:
        self.mountpoint = mountpoint
        self.size_mb = size_mb
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> bool:
        unshare, nsenter = shutil.which("unshare"), shutil.which("nsenter")
        if not unshare or not nsenter:
            return False
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        script = f"mount -t tmpfs -o size={self.size_mb}m streamlearn-test {self.mountpoint} && echo ready && exec sleep 3600"
        self.proc = subprocess.Popen([unshare, "--user", "--map-root-user", "--mount", "sh", "-c", script],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode(errors="replace").strip()
        if line != "ready":
            self.stop()
            return False
        return True

    @property
    def outside(self) -> Path:
        """The mount point as the test (outside the namespace) reaches it."""
        assert self.proc is not None
        return Path(f"/proc/{self.proc.pid}/root{self.mountpoint}")

    def prefix(self) -> list[str]:
        assert self.proc is not None
        return ["nsenter", f"--target={self.proc.pid}", "--user", "--mount", "--preserve-credentials"]

    def fill(self) -> int:
        """Fill the file system completely; returns the bytes written."""
        written = 0
        with open(self.outside / "filler", "wb", buffering=0) as f:
            for chunk in (1 << 20, 1 << 16, 1 << 12, 1 << 9):
                while True:
                    try:
                        written += f.write(b"\0" * chunk)
                    except OSError as exc:
                        if exc.errno != errno.ENOSPC:
                            raise
                        break
        return written

    def free(self) -> None:
        (self.outside / "filler").unlink(missing_ok=True)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)
        if self.proc is not None and self.proc.stdout:
            self.proc.stdout.close()
        self.proc = None


def _limit_writes(pid: int, limit: int | None) -> None:
    """Set the agent's RLIMIT_FSIZE soft limit (None: back to unlimited)."""
    _, hard = resource.prlimit(pid, resource.RLIMIT_FSIZE)
    resource.prlimit(pid, resource.RLIMIT_FSIZE, (hard if limit is None else limit, hard))


def _cli_status(db: Path, prefix: list[str]) -> tuple[int, str]:
    out = subprocess.run([*prefix, sys.executable, "-m", "streamlearn", "status", "--store", str(db), "--json"],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    return out.returncode, (out.stdout + out.stderr)


def _names_store_error(text: str) -> bool:
    """Does a status text report the store's write error (not just an "error" metric)?"""
    t = text.lower()
    return any(w in t for w in ("disk is full", "disk i/o error", "last_error", "store_error", "cannot commit",
                                "read-only", "no space"))


def test_failing_writes_and_full_disk(mosquitto, tmp_path: Path, report: FaultReport) -> None:
    """Failing writes during a checkpoint (RLIMIT_FSIZE) and a full disk (a 32 MB tmpfs
    filled up) while readings keep coming, then kill -9 while the disk is full: integrity
    ok, no ack for a failed transaction (nothing lost after the kill), no reading learned
    twice after recovery, a clear error in the log and in the status."""
    disk = SmallDisk(tmp_path / "disk", DISK_MB)
    namespaced = disk.start()
    store_dir = disk.mountpoint if namespaced else tmp_path / "store"
    db_inside = store_dir / "s.db"
    db = (disk.outside / "s.db") if namespaced else db_inside
    prefix = disk.prefix() if namespaced else []
    helper = None
    if namespaced:  # SQLite cannot open a store through /proc/<pid>/root: query it from inside
        helper = SqlHelper(prefix)
        register_remote(disk.outside, disk.mountpoint, helper)
    data = agent_config(db_inside, mosquitto.port, "store-agent")
    data["store"]["checkpoint_every_messages"] = 100_000  # checkpoints by time only: the test picks the moment
    data["store"]["checkpoint_every_seconds"] = CHECKPOINT_SECONDS
    cfg = parse_config(data)
    readings = list(SensorSimulator(cfg.streams[0], devices=3, seed=9).messages(PHASE_A + 2 * PHASE_B + PHASE_C))
    a_end, b_end = PHASE_A, PHASE_A + 2 * PHASE_B
    agent = Agent(write_config(tmp_path / "agent.toml", data), tmp_path / "agent.log",
                  prefix=prefix or None)
    watch = Watch(mosquitto.port, "store-watch")
    sensors = Sensors(mosquitto.port, "store-sensors", window=100)
    fig: dict = {"full_disk_method": "tmpfs in a user namespace (ENOSPC)" if namespaced else "RLIMIT_FSIZE (EFBIG)"}
    try:
        agent.start()
        agent.wait_log(r"connected \(session present", 30)
        fig["agent_process"] = os.readlink(f"/proc/{agent.pid}/exe")  # nsenter execs the agent: same PID

        # A: normal operation
        sensors.publish_all(readings[:a_end])
        assert sensors.flush(60)
        assert wait_until(lambda: checkpoint_position(db) >= a_end, 30), "no checkpoint after phase A"

        # B: writes fail while a checkpoint is due (after the readings were committed and acked)
        sensors.publish_all(readings[a_end:a_end + PHASE_B], start=a_end)
        assert sensors.flush(60)
        assert wait_until(lambda: inbox_max_seq(db) >= a_end + PHASE_B, 30)
        covered = checkpoint_position(db) >= a_end + PHASE_B
        t_b = time.time()
        _limit_writes(agent.pid, 1)
        ckpt_failed = wait_until(lambda: agent.events(r"checkpoint failed", since=t_b - 1), 3 * CHECKPOINT_SECONDS + 5)
        sensors.publish_all(readings[a_end + PHASE_B:b_end], start=a_end + PHASE_B)  # appends fail now
        append_failed = wait_until(lambda: agent.events(r"cannot commit", since=t_b - 1), 15)
        stored_while_failing = inbox_max_seq(db)
        status_b = _cli_status(db_inside, prefix)
        _limit_writes(agent.pid, None)
        t_b_end = time.time()
        recovered_b = wait_until(lambda: inbox_max_seq(db) >= b_end, 30)
        fig["phase_b"] = {
            "checkpoint_already_covered_the_rows": covered, "checkpoint_failed_logged": ckpt_failed,
            "append_failed_logged": append_failed, "stored_while_failing": stored_while_failing,
            "recovered": recovered_b, "recovery_s": round(time.time() - t_b_end, 3),
            "errors": [ln for _, ln in agent.events(STORE_ERROR, since=t_b - 1)][:3],
            "cli_status_rc": status_b[0], "cli_status_mentions_error": _names_store_error(status_b[1]),
        }
        cp_b = check_checkpoint(db)

        # C: the disk fills up while readings keep coming; kill -9 while it is full
        t_c = time.time()
        filled = disk.fill() if namespaced else 0
        if not namespaced:
            _limit_writes(agent.pid, 1)
        sensors.start_background(readings[b_end:], rate=500)
        full_logged = wait_until(lambda: agent.events(r"disk is full|disk I/O error", since=t_c), 30)
        stored_when_full = inbox_max_seq(db)
        wait_until(lambda: sensors.sent >= len(readings) - b_end or time.time() - t_c > 12, 20)
        status_c = _cli_status(db_inside, prefix)
        mqtt_status = [(t, topic, p.decode(errors="replace")) for t, topic, p in watch.status if t >= t_c]
        integrity_full = integrity(db)
        stored_before_kill = inbox_max_seq(db)
        agent.kill()
        integrity_after_kill = integrity(db)
        if namespaced:
            disk.free()
        sensors.join(120)
        agent.start()
        wait_until(lambda: inbox_max_seq(db) >= len(readings), 60, interval=0.05)
        wait_until(lambda: checkpoint_position(db) >= len(readings), 30, interval=0.1)
        assert agent.terminate() == 0
        fig["phase_c"] = {
            "filler_bytes": filled, "full_error_logged": full_logged,
            "full_error_lines": [ln for _, ln in agent.events(r"disk is full|disk I/O error", since=t_c)][:3],
            "stored_when_full_detected": stored_when_full, "stored_before_kill": stored_before_kill,
            "published_during_full": sensors.sent, "integrity_while_full": integrity_full,
            "integrity_after_kill": integrity_after_kill,
            "cli_status_rc": status_c[0], "cli_status": status_c[1][:600],
            "mqtt_status_messages": mqtt_status[-5:],
        }
    finally:
        agent.stop_quietly()
        sensors.close()
        watch.close()
        result = None
        try:
            if db.exists():  # read the store before the tmpfs goes away with its namespace
                result = check_store(db, readings)
                cp = check_checkpoint(db)
        finally:
            if helper is not None:
                unregister_remote(disk.outside)
                helper.close()
            disk.stop()

    assert result is not None
    log = agent.log()
    status_error = any(_names_store_error(m[2]) for m in fig["phase_c"]["mqtt_status_messages"])
    cli_error = fig["phase_b"]["cli_status_mentions_error"] or _names_store_error(status_c[1])
    report.add(published=len(readings), lost=result.lost, twice=result.twice, once=result.once,
               check=result.summary(), checkpoint_phase_b=cp_b.summary(), checkpoint_end=cp.summary(),
               store_error_lines=len([ln for ln in log.splitlines() if "ERROR" in ln]), **fig)
    report.expect("a checkpoint failed on the failing writes, and the agent said so in its log",
                  fig["phase_b"]["checkpoint_failed_logged"], fig["phase_b"])
    report.expect("appends failed while writes failed, nothing was stored meanwhile, the agent recovered",
                  fig["phase_b"]["append_failed_logged"] and fig["phase_b"]["recovered"]
                  and fig["phase_b"]["stored_while_failing"] <= a_end + PHASE_B, fig["phase_b"])
    report.expect("the full disk is reported in the log as such", fig["phase_c"]["full_error_logged"], fig["phase_c"]["full_error_lines"])
    report.expect("integrity ok while full, after the kill and at the end",
                  fig["phase_c"]["integrity_while_full"] == "ok" and fig["phase_c"]["integrity_after_kill"] == "ok"
                  and result.integrity == "ok", f"{fig['phase_c']['integrity_while_full']} / {fig['phase_c']['integrity_after_kill']} / {result.integrity}")
    report.expect("no ack for a failed transaction: nothing lost across the kill -9 on a full disk", result.lost == 0, result.summary())
    report.expect("no reading learned twice after recovery", result.twice == 0 and result.unexplained == 0 and result.digest_ok,
                  result.summary())
    report.expect("the latest checkpoint loads and matches the inbox", cp.loads and cp.finite and cp.consistent, cp.problems)
    report.expect("the status shows the store error (MQTT status topic or `streamlearn status`)", status_error or cli_error,
                  f"MQTT status during the fault: {fig['phase_c']['mqtt_status_messages']}; "
                  f"`streamlearn status --json`: {fig['phase_c']['cli_status'][:300]!r}")
    report.headline = f"full disk: {fig['full_disk_method']}; error in status: {status_error or cli_error}"
    report.verify()

