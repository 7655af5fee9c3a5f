"""The checker itself, on stores written by hand: it must see what it is meant to see."""

from __future__ import annotations

from pathlib import Path

import pytest

from streamlearn.config import parse_config
from streamlearn.dedupe import payload_hash
from streamlearn.sim import SensorSimulator, SimMessage
from streamlearn.store import InboxRow, SQLiteStore
from tests.faults.checker import DIGEST_MOD, check_checkpoint, check_store, key_of
from tests.faults.harness import agent_config

pytestmark = pytest.mark.faults


@pytest.fixture(scope="module")
def msgs() -> list[SimMessage]:
    cfg = parse_config(agent_config(Path("unused.db"), 1883, "x"))
    return list(SensorSimulator(cfg.streams[0], devices=2, seed=1).messages(50))


def _store(path: Path, msgs: list[SimMessage], stored: list[int], learned: list[int]) -> Path:
    """A store whose inbox holds ``stored`` and whose counters say ``learned`` (indexes into msgs)."""
    store = SQLiteStore(path)
    rows = []
    for i in stored:
        m = msgs[i]
        device, boot, seq = key_of(m)
        rows.append(InboxRow(0.0, m.topic, "boiler", "reading", device, f"boiler|{device}|{boot}|{seq}",
                             payload_hash(m.topic, m.payload), m.payload))
    store.append(rows, [])
    digest = sum(payload_hash(msgs[i].topic, msgs[i].payload) for i in learned) % DIGEST_MOD
    counters = {"learned_count": len(learned), "learned_digest": digest}
    store.write_checkpoint(len(rows), [], {"boiler": {"counters": counters, "pending": []}}, [], "test")
    store.close()
    return path


ALL = list(range(50))


@pytest.mark.parametrize(
    ("stored", "learned", "lost", "twice", "named"),
    [
        (ALL, ALL, 0, 0, None),
        (ALL, ALL + [7], 0, 1, ("twice", 7)),  # one row replayed after a checkpoint that held it
        ([i for i in ALL if i != 3], [i for i in ALL if i != 3], 1, 0, ("lost", 3)),  # acked, never stored
        (ALL, [i for i in ALL if i != 9], 1, 0, ("lost", 9)),  # stored, never learned
        (ALL + [5], ALL + [5], 0, 1, ("twice", 5)),  # stored twice
        (ALL, [i for i in ALL if i != 9] + [11], 1, 1, ("twice", 11)),  # one skipped, another learned twice
    ],
)
def test_the_checker_counts_and_names_readings(tmp_path: Path, msgs: list[SimMessage], stored: list[int],
                                              learned: list[int], lost: int, twice: int, named: tuple | None) -> None:
    result = check_store(_store(tmp_path / "s.db", msgs, stored, learned), msgs)
    assert (result.lost, result.twice, result.once) == (lost, twice, 50 - lost - twice)
    assert result.digest_ok == (lost == 0 and twice == 0)
    if named is not None:
        kind, index = named
        assert list(key_of(msgs[index])) in result.examples[kind]


def test_the_checker_flags_a_checkpoint_that_disagrees_with_the_inbox(tmp_path: Path, msgs: list[SimMessage]) -> None:
    assert check_checkpoint(_store(tmp_path / "a.db", msgs, ALL, ALL)).consistent
    bad = check_checkpoint(_store(tmp_path / "b.db", msgs, ALL, ALL[:-1]))
    assert not bad.consistent and "learned_count 49 but 50" in bad.problems[0]
