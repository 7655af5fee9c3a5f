"""Drift detectors and loss monitors: one contract for every adapter, then their defaults."""

from __future__ import annotations

import itertools
import pickle

import numpy as np
import pytest

from streamlearn.config import parse_config
from streamlearn.monitors import DETECTORS, DriftMonitor, LossMonitor, RiverDetector, safe_loads
from streamlearn.stream import Slot


def values_for(detector: RiverDetector, n: int, shift_at: int | None, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if detector.input == "error":
        p = np.where(np.arange(n) >= (shift_at or n), 0.5, 0.1)
        return (rng.random(n) < p).astype(float)
    level = np.where(np.arange(n) >= (shift_at or n), 3.0, 1.0)
    return level * rng.exponential(size=n)


@pytest.mark.parametrize("name", sorted(DETECTORS))
def test_contract_state_round_trips_mid_stream(name: str) -> None:
    a = RiverDetector(name)
    data = values_for(a, 3000, shift_at=2000)
    for v in data[:1500]:
        a.update(float(v))
    b = RiverDetector(name)
    b.load(a.state())
    assert [a.update(float(v)) for v in data[1500:]] == [b.update(float(v)) for v in data[1500:]]


@pytest.mark.parametrize("name", sorted(DETECTORS))
def test_contract_each_detector_sees_a_large_shift(name: str) -> None:
    d = RiverDetector(name)
    fired = [i for i, v in enumerate(values_for(d, 6000, shift_at=3000)) if d.update(float(v))]
    assert any(3000 <= i < 4000 for i in fired), f"{name} fired at {fired[:10]}"


def test_the_unpickler_refuses_anything_else() -> None:
    evil = pickle.dumps(eval)
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        safe_loads(evil)
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        safe_loads(b"cbuiltins\ngetattr\n(cbuiltins\nobject\nS'__subclasses__'\ntR.")


def test_loss_monitor_state_round_trips() -> None:
    a = LossMonitor()
    for v in np.linspace(1, 0.1, 500):
        a.update(float(v))
    b = LossMonitor()
    b.load(a.state())
    assert (a.fast, a.slow, a.plateau, a.spike) == (b.fast, b.slow, b.plateau, b.spike)


def slot_for(task: str, features: int) -> Slot:
    stream = {"name": "s", "topic": "t", "features": [f"f{i}" for i in range(features)], "task": task,
              "label": {"field": "y"}}
    return Slot("d", parse_config({"streams": [stream]}).streams[0])


def run_slot(slot: Slot, source, n: int) -> list[tuple[int, tuple]]:
    drifts = []
    for i, (x, y) in enumerate(itertools.islice(source, n)):
        v = slot.features_for("d", [float(a) for a in x.values()])
        p = slot.predict(v)
        _, events = slot.learn(v, float(int(y)) if slot.task != "regression" else float(y), p)
        drifts += [(i, e) for e in events if e[0] != "policy"]
    return drifts


@pytest.mark.parametrize("task", ["regression", "binary"])
def test_no_drift_on_a_stationary_stream_with_the_defaults(task: str) -> None:
    from river.datasets import synth

    source = synth.Friedman(seed=3) if task == "regression" else synth.Agrawal(classification_function=1, seed=3)
    slot = slot_for(task, 10 if task == "regression" else 9)
    assert run_slot(slot, source, 10_000) == []


def test_the_default_detectors_find_an_abrupt_shift_within_300_samples() -> None:
    from river.datasets import synth

    slot = slot_for("regression", 10)
    drifts = run_slot(slot, synth.FriedmanDrift(drift_type="gra", position=(5000, 100_000), seed=3), 8000)
    assert drifts, "no drift detected"
    first = drifts[0][0]
    assert 5000 <= first < 5300, drifts


def test_drift_monitor_waits_out_grace_and_cooldown() -> None:
    m = DriftMonitor(("page_hinkley",), grace=200, cooldown=500)
    rng = np.random.default_rng(0)
    signals = []
    for t in range(3000):
        level = 1.0 if t < 100 or 1000 <= t < 1100 else 0.2
        if m.update(float(level * rng.exponential())):
            signals.append(t)
    assert all(t >= 200 for t in signals)
    assert all(b - a >= 500 for a, b in zip(signals, signals[1:]))


def test_the_default_detectors_load_without_river_drifts_heavy_init() -> None:
    """Building the default detectors must not import scipy.stats (KSWIN's, via river.drift's
    package init: seconds on a slow gateway, on every start); river.drift still works in full."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from streamlearn.monitors import RiverDetector\n"
        "detectors = [RiverDetector('page_hinkley'), RiverDetector('hddm_a'), RiverDetector('adwin')]\n"
        "assert 'scipy.stats' not in sys.modules, 'scipy.stats imported'\n"
        "from river.drift import KSWIN, ADWIN\n"
        "from river import forest\n"
        "assert 'scipy.stats' in sys.modules and KSWIN.__name__ == 'KSWIN'\n"
        "k = RiverDetector('kswin')\n"
        "assert any(k.update(float(i > 300) * 3) for i in range(600))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
