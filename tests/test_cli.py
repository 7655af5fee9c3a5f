"""The command line: help everywhere, one-line errors, listings in three formats."""

from __future__ import annotations

import json
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from streamlearn.agent import Agent, open_store
from streamlearn.cli import main
from streamlearn.config import parse_config
from streamlearn.sim import SensorSimulator
from streamlearn.transport.memory import MemoryTransport

ROOT = Path(__file__).resolve().parent.parent


def all_commands(group: click.Group, prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], click.Command]]:
    out = []
    for name, cmd in group.commands.items():
        out.append(((*prefix, name), cmd))
        if isinstance(cmd, click.Group):
            out.extend(all_commands(cmd, (*prefix, name)))
    return out


@pytest.mark.parametrize("path,command", all_commands(main), ids=lambda v: " ".join(v) if isinstance(v, tuple) else "")
def test_every_command_has_help(path: tuple[str, ...], command: click.Command) -> None:
    assert command.help, f"streamlearn {' '.join(path)} has no help text"
    result = CliRunner().invoke(main, [*path, "--help"])
    assert result.exit_code == 0 and "Usage:" in result.output


def test_config_check_ok_and_error() -> None:
    runner = CliRunner()
    ok = runner.invoke(main, ["config", "check", str(ROOT / "configs/boiler-regression.toml")])
    assert ok.exit_code == 0 and "stream boiler" in ok.output


def test_config_errors_are_one_clean_message(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[[streams]]\nname = "s"\ntopic = "a"\nfeatures = ["a", "b", 3]\nlabel = { field = "t" }\n')
    result = CliRunner().invoke(main, ["config", "check", str(bad)])
    assert result.exit_code == 1
    assert "streams[0].features[2]: expected a field name, got 3" in result.output
    assert "Traceback" not in result.output
    missing = CliRunner().invoke(main, ["run", "-c", str(tmp_path / "nope.toml")])
    assert missing.exit_code == 1 and "no such config file" in missing.output


@pytest.fixture
def filled_store(tmp_path: Path) -> Path:
    store = tmp_path / "s.db"
    # taken 64 at a time, a trickle: 500 at once is a backlog, learned so fast that a checkpoint
    # every 100 readings would take more than checkpoint_max_share of the time, and is stretched
    cfg = parse_config({"store": {"path": str(store), "checkpoint_every_messages": 100},
                        "agent": {"batch_max": 64}, "streams": [{
        "name": "boiler", "topic": "s/+/b", "device": {"topic_level": 1}, "features": ["a", "b"],
        "label": {"field": "y"}}]})
    t = MemoryTransport()
    agent = Agent(cfg, t, open_store(cfg))
    agent.recover()
    for m in SensorSimulator(cfg.streams[0], seed=1, bad_every=50).messages(500):
        t.inject(m.topic, m.payload)
    while agent.step(timeout=0):
        pass
    agent.checkpoint("end")
    agent.store.close()
    return store


def test_status_reports_the_agent_health_and_stretched_checkpoints(filled_store: Path) -> None:
    health_file = filled_store.with_name(filled_store.name + ".health.json")
    health = json.loads(health_file.read_text())
    assert health["commits"] >= 1 and health["checkpoints_stretched"] == 0
    out = CliRunner().invoke(main, ["status", "--store", str(filled_store)]).output
    assert "agent health: ok" in out and "stretched" not in out
    health.update(checkpoints_stretched=3, checkpoint_write_ms=212.5)
    health_file.write_text(json.dumps(health))
    out = CliRunner().invoke(main, ["status", "--store", str(filled_store)]).output
    assert "checkpoint interval stretched 3 times (writing one took 212.5 ms" in out


def test_status_in_three_formats(filled_store: Path) -> None:
    runner = CliRunner()
    table = runner.invoke(main, ["status", "--store", str(filled_store)])
    assert table.exit_code == 0 and "boiler" in table.output and "no agent running" in table.output
    data = json.loads(runner.invoke(main, ["status", "--store", str(filled_store), "--json"]).output)
    (stream,) = data[0]["streams"]
    assert stream["messages"] == 490 and stream["dead_letters"] == 10
    csv_out = runner.invoke(main, ["status", "--store", str(filled_store), "--csv"]).output
    assert csv_out.splitlines()[0].startswith("stream,models,messages")


def test_dead_letters_listing(filled_store: Path) -> None:
    out = CliRunner().invoke(main, ["dead-letters", "--store", str(filled_store), "--json"])
    rows = json.loads(out.output)
    assert len(rows) == 10 and all(r["reason"] for r in rows)


def test_status_of_a_missing_store_is_one_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["status", "--store", str(tmp_path / "x.db")])
    assert result.exit_code == 1 and "no such store" in result.output


@pytest.fixture
def drifted_store(tmp_path: Path) -> Path:
    store = tmp_path / "d.db"
    cfg = parse_config({"store": {"path": str(store), "checkpoint_every_messages": 200}, "streams": [{
        "name": "boiler", "topic": "s/+/b", "device": {"topic_level": 1}, "features": ["a", "b"],
        "label": {"field": "y"}, "per_device": False, "schedule": {"policy": "drift_reset"},
        "optimizer": {"lr": 0.02}}]})
    t = MemoryTransport()
    agent = Agent(cfg, t, open_store(cfg))
    agent.recover()
    for m in SensorSimulator(cfg.streams[0], devices=2, seed=5, drift_at=2500).messages(4000):
        t.inject(m.topic, m.payload)
    while agent.step(timeout=0):
        pass
    agent.checkpoint("end")
    agent.store.close()
    return store


def test_drift_history_listing(drifted_store: Path) -> None:
    runner = CliRunner()
    rows = json.loads(runner.invoke(main, ["drift", "--store", str(drifted_store), "--json"]).output)
    drifts = [r for r in rows if r["detector"] != "policy"]
    assert drifts and drifts[0]["action"] == "boost" and drifts[0]["device"] == "*"
    assert json.loads(runner.invoke(main, ["drift", "--store", str(drifted_store), "--json",
                                           "--stream", "elsewhere"]).output) == []
    assert json.loads(runner.invoke(main, ["drift", "--store", str(drifted_store), "--json",
                                           "--since", "1h"]).output) == rows
    assert json.loads(runner.invoke(main, ["drift", "--store", str(drifted_store), "--json",
                                           "--since", "2999-01-01"]).output) == []
    table = runner.invoke(main, ["drift", "--store", str(drifted_store)])
    assert table.exit_code == 0 and "boost" in table.output
    bad = runner.invoke(main, ["drift", "--store", str(drifted_store), "--since", "yesterday"])
    assert bad.exit_code == 2 and "expected 30m, 2h, 7d" in bad.output


def test_plot_writes_one_png_per_stream(drifted_store: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["plot", "--store", str(drifted_store), "--out", str(tmp_path / "plots")])
    assert result.exit_code == 0, result.output
    png = tmp_path / "plots" / "boiler.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_run_exits_75_on_a_failed_fsync_so_the_service_manager_restarts_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A config error exits 1, which the shipped systemd unit does not restart; a failed fsync of
    the store's WAL stops the agent with 75 (EX_TEMPFAIL), which it does."""
    import gc
    import sys

    from streamlearn.errors import StoreSyncError

    def failing_run(self: Agent, stop: object, max_messages: int | None = None) -> None:
        raise StoreSyncError("fsync of s.db-wal failed: Input/output error; stopping")

    monkeypatch.setattr(Agent, "run", failing_run)
    monkeypatch.setattr(gc, "freeze", lambda: None)  # (the command's settings for a whole process)
    monkeypatch.setattr(sys, "setswitchinterval", lambda interval: None)
    config = tmp_path / "agent.toml"
    config.write_text(f'[store]\npath = "{tmp_path / "s.db"}"\n[[streams]]\nname = "s"\ntopic = "a/+"\n'
                      'features = ["x"]\nlabel = { field = "y" }\n')
    result = CliRunner().invoke(main, ["run", "-c", str(config)])
    assert result.exit_code == 75, result.output
    assert "fsync of s.db-wal failed" in result.output and "Traceback" not in result.output
    unit = (ROOT / "deploy/systemd/streamlearn.service").read_text()
    assert "Restart=on-failure" in unit and "RestartPreventExitStatus=1 2\n" in unit
