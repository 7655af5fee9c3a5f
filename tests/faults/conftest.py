"""Fixtures of the fault tests: a private Mosquitto per test and the report of its figures.

``mosquitto`` starts a broker with the shipped gateway config on a free port of
127.0.0.1 for one test and stops it by its PID. ``report`` hands the test a
:class:`~tests.faults.report.FaultReport`; after the test its figures, the
requirements checked and the outcome are merged into ``reports/faults.json`` and
``reports/faults.md`` under the repository root.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from streamlearn.transport.broker import MosquittoProcess, find_mosquitto
from tests.faults.report import FaultReport, write_reports

_OUTCOME = pytest.StashKey[tuple[str, float]]()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    rep = outcome.get_result()
    if rep.when == "call" or (rep.when == "setup" and rep.outcome != "passed"):
        item.stash[_OUTCOME] = (rep.outcome, rep.duration)


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[MosquittoProcess]:
    """A private Mosquitto with the shipped gateway config, for this test only."""
    if find_mosquitto() is None:
        pytest.fail("mosquitto is not installed: apt-get install -y mosquitto (the fault tests need it)")
    broker = MosquittoProcess(workdir=tmp_path / "broker").start()
    yield broker
    broker.stop()


@pytest.fixture
def report(request: pytest.FixtureRequest) -> Iterator[FaultReport]:
    doc = (request.function.__doc__ or "").strip()
    rep = FaultReport(nodeid=request.node.nodeid, title=" ".join(doc.split()))
    yield rep
    outcome, duration = request.node.stash.get(_OUTCOME, ("error", 0.0))
    rep.outcome = {"passed": "pass", "failed": "FAIL", "skipped": "skipped"}.get(outcome, outcome)
    rep.duration_s = duration
    write_reports(rep, Path(request.config.rootpath))
