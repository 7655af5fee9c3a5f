"""The poison guard: label outliers are skipped, a burst of wrong labels is rolled back, a real drift is not."""

from __future__ import annotations

from typing import Any

import numpy as np

from streamlearn.config import parse_config
from streamlearn.stream import Slot


def make_slot(schedule: dict[str, Any] | None = None, **guard: Any) -> Slot:
    cfg = parse_config({"streams": [{
        "name": "s", "topic": "s/#", "features": ["a", "b", "c"], "label": {"field": "y"},
        "schedule": schedule or {"policy": "constant"}, "optimizer": {"lr": 0.05}, "guard": guard,
    }]})
    return Slot("d", cfg.streams[0])


def readings(rng: np.random.Generator, w: np.ndarray, size: int, flip_mean: float | None = None,
             scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """``size`` readings of a linear concept: features ``(size, 3)`` and labels ``(size,)``
    (mirrored about ``flip_mean``: a burst of wrong labels)."""
    values = rng.normal(size=(size, 3))
    ys = values @ w + 10.0 + 0.1 * rng.normal(size=size)
    if flip_mean is not None:
        ys = 2 * flip_mean - ys
    return values, ys * scale


def run(slot: Slot, n: int, rng: np.random.Generator, w: np.ndarray, flip_mean: float | None = None,
        scale: float = 1.0) -> list[tuple[Any, ...]]:
    events = []
    for _ in range(n):
        values, ys = readings(rng, w, 1, flip_mean, scale)
        x = slot.features_for("d", values[0].tolist())
        _, ev = slot.learn(x, float(ys[0]), slot.predict(x))
        events += ev
    return events


def rollbacks(events: list[tuple[Any, ...]]) -> int:
    return sum(1 for e in events if e[0] == "guard" and e[2] == "rollback")


def test_a_burst_of_mirrored_labels_is_rolled_back() -> None:
    rng = np.random.default_rng(0)
    w = np.array([3.0, -2.0, 1.0])
    slot = make_slot()
    assert rollbacks(run(slot, 3000, rng, w)) == 0  # a healthy stream: never
    burst = run(slot, 300, rng, w, flip_mean=10.0)
    after = run(slot, 1500, rng, w)
    assert rollbacks(burst + after) == 1
    # and the model it went back to is good: the error is back near the noise level
    assert slot.drift.loss.fast < 0.1


def test_a_population_with_linear_copies_rolls_back_its_network_and_serves_it() -> None:
    rng = np.random.default_rng(0)
    w = np.array([3.0, -2.0, 1.0])
    slot = make_slot({"policy": "population", "linear_copies": 3})
    policy = slot.policy
    assert rollbacks(run(slot, 3000, rng, w)) == 0
    linear_before = slot.learner.state_arrays()["linear.params"].copy()
    events = run(slot, 300, rng, w, flip_mean=10.0)
    for _ in range(1500):  # the trial decides within its length
        if rollbacks(events):
            break
        events += run(slot, 1, rng, w)
    assert rollbacks(events) == 1
    assert policy.serving() == policy.best_of_kind(0)  # the restored network serves
    # the linear copies were not overwritten by the network's snapshot (they learned on: the burst moved them)
    assert not np.array_equal(slot.learner.state_arrays()["linear.params"], linear_before)
    run(slot, 1500, rng, w)
    assert slot.drift.loss.fast < 0.1


def test_a_real_drift_is_not_rolled_back_even_after_an_earlier_trial() -> None:
    rng = np.random.default_rng(1)
    slot = make_slot()
    run(slot, 3000, rng, np.array([3.0, -2.0, 1.0]))
    events = run(slot, 3000, rng, np.array([-3.0, 2.0, 4.0]))  # the concept changed for good
    assert rollbacks(events) == 0
    # a mirrored burst later still gets a trial of its own, and is rolled back
    burst = run(slot, 300, rng, np.array([-3.0, 2.0, 4.0]), flip_mean=10.0)
    assert rollbacks(burst + run(slot, 1500, rng, np.array([-3.0, 2.0, 4.0]))) == 1


def test_label_spikes_are_skipped_and_counted_not_learned() -> None:
    rng = np.random.default_rng(2)
    w = np.array([3.0, -2.0, 1.0])
    slot = make_slot(rollback=False)
    run(slot, 2000, rng, w)
    before = slot.learner.net.params.copy()
    run(slot, 20, rng, w, scale=1e6)
    assert slot.learner.n_outliers == 20
    assert np.array_equal(before, slot.learner.net.params)  # not one step on them


def run_batched(slot: Slot, n: int, rng: np.random.Generator, w: np.ndarray, flip_mean: float | None = None,
                size: int = 8) -> list[tuple[Any, ...]]:
    """As ``run``, learning in micro-batches of ``size`` (as the agent does under a backlog)."""
    events = []
    for _ in range(n // size):
        values, ys = readings(rng, w, size, flip_mean)
        X = np.stack([slot.features_for("d", v.tolist()) for v in values])
        events += slot.learn_many(X, [float(y) for y in ys], list(slot.predict_many(X)))
    return events


def test_micro_batches_roll_back_a_burst_as_single_readings_do() -> None:
    rng = np.random.default_rng(0)
    w = np.array([3.0, -2.0, 1.0])
    slot = make_slot()
    assert rollbacks(run_batched(slot, 3000, rng, w)) == 0
    burst = run_batched(slot, 296, rng, w, flip_mean=10.0)
    after = run_batched(slot, 1504, rng, w)
    assert rollbacks(burst + after) == 1
    assert slot.drift.loss.fast < 0.1


def test_the_snapshot_scores_a_micro_batch_as_it_scores_its_readings_one_by_one() -> None:
    rng = np.random.default_rng(1)
    w = np.array([3.0, -2.0, 1.0])
    slot = make_slot()
    run(slot, 3000, rng, w)
    guard = slot.guard
    assert guard is not None and guard.start_trial(slot.learner)
    values, labels = readings(rng, w, 300)
    ys = [float(y) for y in labels]
    X = np.stack([slot.features_for("d", v.tolist()) for v in values])
    # a live model as poisoned as after a burst of wrong labels: the snapshot wins the trial
    live = [abs(y - float(p)) + 2.0 + rng.random() for y, p in zip(ys, slot.predict_many(X))]
    state = guard.state()
    one_by_one = next((i for i, (x, e, y) in enumerate(zip(X, live, ys)) if guard.compare(x, e, y)), None)
    guard.load(*state)
    batched = guard.compare_many(X, live, ys)
    assert one_by_one is not None and batched is not None
    assert abs(batched - one_by_one) <= 1  # the same reading, but for the last bits of a batched matmul
