"""Shared fixtures: a private Mosquitto per test module, configs, the agent process."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings

from streamlearn.transport.broker import MosquittoProcess, find_mosquitto

# in CI, generated inputs are the same on every run (a red build is reproducible)
settings.register_profile("ci", derandomize=True, deadline=None)
if os.environ.get("CI"):
    settings.load_profile("ci")


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MosquittoProcess]:
    """A real Mosquitto with the shipped gateway config on a free port."""
    if find_mosquitto() is None:
        pytest.fail("mosquitto is not installed: apt-get install -y mosquitto (the integration tests need it)")
    proc = MosquittoProcess(workdir=tmp_path_factory.mktemp("broker")).start()
    yield proc
    proc.stop()


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    return tmp_path / "streamlearn.db"
