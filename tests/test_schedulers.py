"""Every learning-rate policy through the same contract, then each one's own behaviour."""

from __future__ import annotations

import json

import numpy as np
import pytest

from streamlearn.config import OptimizerConfig, ScheduleConfig
from streamlearn.learner import Learner
from streamlearn.models import ModelShape
from streamlearn.schedulers import POLICIES, DoG, DriftReset, Hypergradient, Population, ReduceOnPlateau, make_policy

BOUNDS = {"min_lr": 1e-4, "max_lr": 0.5}


def learner_for(policy: object, shape: ModelShape, seed: int) -> Learner:
    """A learner with the copies the policy trains (the default population: linear ones beside the network)."""
    linear = policy.linear_copies  # type: ignore[attr-defined]
    return Learner(shape, "regression", OptimizerConfig(lr=0.01), seed=seed,
                   population=policy.population - linear, linear_copies=linear)  # type: ignore[attr-defined]


def drive(policy_name: str, steps: int, seed: int = 0, drift_at: tuple[int, ...] = (300,)) -> tuple[list, object]:
    """Train a small learner under the policy on a noisy stream; returns the lr trajectory."""
    cfg = ScheduleConfig(policy=policy_name, patience=50, period=100, **BOUNDS)
    policy = make_policy(cfg, 0.01)
    learner = learner_for(policy, ModelShape(3, (8,), 1), seed)
    rng = np.random.default_rng(seed)
    trajectory = []
    for t in range(steps):
        x = rng.normal(size=3).astype(np.float32)
        y = float(x @ [1.0, -2.0, 0.5] * (3 if t > 300 else 1) + rng.normal(scale=0.1))
        learner.lr = policy.lr()
        loss = learner.learn_one(x, y)
        assert loss is not None
        policy.update(learner, loss, learner.version)
        if t in drift_at:
            policy.on_drift(learner, learner.version)
        trajectory.append(np.atleast_1d(np.asarray(policy.lr(), dtype=float)).copy())
    return trajectory, (policy, learner)


@pytest.mark.parametrize("name", POLICIES)
def test_contract_rates_stay_within_bounds(name: str) -> None:
    trajectory, (policy, _) = drive(name, 600)
    rates = np.concatenate(trajectory)
    assert np.all(rates >= BOUNDS["min_lr"] * (1 - 1e-12)) and np.all(rates <= BOUNDS["max_lr"] * (1 + 1e-12))
    assert 0 <= policy.serving() < policy.population


@pytest.mark.parametrize("name", POLICIES)
def test_contract_state_round_trips_through_json(name: str) -> None:
    _, (policy, learner) = drive(name, 400)
    saved = json.loads(json.dumps(policy.state()))
    twin = make_policy(ScheduleConfig(policy=name, patience=50, period=100, **BOUNDS), 0.01)
    twin.load(saved)
    twin_learner = learner_for(twin, learner.shape, 0)
    twin_learner.load_state({k: v.copy() for k, v in learner.state_arrays().items()}, learner.state_scalars())
    rng = np.random.default_rng(9)
    for _ in range(200):
        x = rng.normal(size=3).astype(np.float32)
        y = float(x.sum())
        for p, lrn in ((policy, learner), (twin, twin_learner)):
            lrn.lr = p.lr()
            loss = lrn.learn_one(x, y)
            p.update(lrn, loss, lrn.version)
        np.testing.assert_array_equal(np.asarray(policy.lr()), np.asarray(twin.lr()))
        assert policy.serving() == twin.serving()


@pytest.mark.parametrize("name", POLICIES)
def test_contract_deterministic_with_a_seed(name: str) -> None:
    a, _ = drive(name, 300, seed=4)
    b, _ = drive(name, 300, seed=4)
    np.testing.assert_array_equal(np.concatenate(a), np.concatenate(b))


def test_drift_reset_boosts_then_decays_back() -> None:
    p = DriftReset(lr=0.01, boost=5, half_life=10)
    decision = p.on_drift(None, t=1)
    assert decision is not None and decision.action == "boost" and p.lr() == pytest.approx(0.05)
    for t in range(10):
        p.update(None, np.array([1.0]), t)  # type: ignore[arg-type]
    assert p.lr() == pytest.approx(0.01 + 0.04 / 2, rel=1e-6)
    for t in range(200):
        p.update(None, np.array([1.0]), t)  # type: ignore[arg-type]
    assert p.lr() == 0.01


def test_plateau_reduces_and_drift_restores() -> None:
    p = ReduceOnPlateau(lr=0.1, factor=0.5, patience=50)
    decisions = [p.update(None, np.array([1.0]), t) for t in range(400)]  # type: ignore[arg-type]
    reduced = [d for d in decisions if d is not None]
    assert reduced and all(d.action == "reduce_on_plateau" for d in reduced)
    assert p.lr() < 0.1
    p.on_drift(None, 400)
    assert p.lr() == 0.1


class FakeGrads:
    """A learner stand-in that only has gradients and parameters."""

    def __init__(self, n: int) -> None:
        self.net = type("Net", (), {})()
        self.net.grads = np.zeros((1, n), dtype=np.float32)
        self.net.params = np.zeros((1, n), dtype=np.float32)
        self.last_wrong = None


def test_hypergradient_grows_when_gradients_agree_and_shrinks_when_they_flip() -> None:
    fake = FakeGrads(4)
    p = Hypergradient(lr=0.01, beta=0.05)
    for t in range(20):
        fake.net.grads[0] = [1, 1, 0, 0]
        p.update(fake, np.array([1.0]), t)  # type: ignore[arg-type]
    grown = p.lr()
    assert grown > 0.01
    for t in range(40):
        fake.net.grads[0] = [1, 1, 0, 0] if t % 2 else [-1, -1, 0, 0]
        p.update(fake, np.array([1.0]), t)  # type: ignore[arg-type]
    assert p.lr() < grown


def test_dog_is_distance_over_root_sum_of_squared_gradients() -> None:
    fake = FakeGrads(2)
    p = DoG(lr=0.01, r_eps=1e-3, max_lr=10.0)
    fake.net.grads[0] = [3.0, 4.0]  # |g| = 5
    p.update(fake, np.array([1.0]), 1)  # type: ignore[arg-type]
    assert p.lr() == pytest.approx(1e-3 / 5)
    fake.net.params[0] = [0.6, 0.8]  # moved 1 from x0
    p.update(fake, np.array([1.0]), 2)  # type: ignore[arg-type]
    assert p.lr() == pytest.approx(1.0 / np.sqrt(50))


def test_population_serves_its_best_copy_and_follows_it_out_of_the_grid() -> None:
    learner = Learner(ModelShape(2, (), 1), "regression", OptimizerConfig(lr=0.01), population=3)
    p = Population(lr=0.01, size=3, spread=10, alpha=0.5, period=10, max_lr=1.0, min_lr=1e-5)
    for t in range(1, 11):
        p.update(learner, np.array([3.0, 2.0, 1.0]), t)  # the fastest copy does best
    assert p.serving() == 2
    np.testing.assert_allclose(p.lr(), [1.0, 0.01, 0.1])  # the slowest became a clone, one step up
    np.testing.assert_array_equal(learner.net.params[0], learner.net.params[2])
    assert p.lr()[p.serving()] == pytest.approx(0.1)  # the clone serves only once it proves better
    for t in range(11, 20):
        p.update(learner, np.array([0.5, 2.0, 1.0]), t)
    assert p.serving() == 0
    decision = p.on_drift(learner, 20)
    assert decision is not None and decision.action == "respread"
    np.testing.assert_allclose(sorted(p.lr()), [0.01, 0.1, 1.0])  # around 1.0, shifted under max_lr
    assert p.lr()[p.serving()] == pytest.approx(1.0)


def test_population_with_linear_copies_serves_the_kind_with_the_lower_recent_error() -> None:
    learner = Learner(ModelShape(2, (4,), 1), "binary", OptimizerConfig(lr=0.01), population=3, linear_copies=2)
    p = Population(lr=0.01, size=3, spread=10, alpha=0.5, period=10**6, linear_copies=2, kind_alpha=0.1,
                   min_lr=1e-5, max_lr=1.0)
    assert p.population == 5 and p.serving() == 1  # the network's middle copy
    np.testing.assert_allclose(p.lr(), [0.001, 0.01, 0.1, 0.00316228, 0.0316228], rtol=1e-5)
    loss = np.full(5, 0.5)
    for t in range(1, 40):  # copy 4 (linear) is never wrong, every network copy always
        learner.last_wrong = np.array([True, True, True, False, False])
        p.update(learner, loss + np.array([0, 0, 0, 0.1, 0.0]), t)
    assert p.serving() == 4 and p.best_of_kind(0) in (0, 1, 2)
    for t in range(40, 200):  # now the network's copy 2 is right and the linear ones wrong
        learner.last_wrong = np.array([True, True, False, True, True])
        p.update(learner, loss + np.array([0, 0, 0, 0.1, 0.0]), t)
    assert p.serving() == 2
    p.prefer_kind(1)
    assert p.serving() == 4
    # a drift re-spreads each kind around its own best copy, cloning only within the kind
    before = learner.state_arrays()
    decision = p.on_drift(learner, 200)
    assert decision is not None and decision.action == "respread"
    after = learner.state_arrays()
    assert sorted(np.round(p.lr()[:3], 6)) == sorted(np.round(p._grid(0.1, 3), 6))
    np.testing.assert_array_equal(after["linear.params"][0], after["linear.params"][1])
    assert after["params"].shape == before["params"].shape
    with pytest.raises(ValueError, match="different kinds"):
        learner.copy_member(0, 3)


def test_population_bounds_must_hold_the_grid() -> None:
    with pytest.raises(ValueError, match="too narrow"):
        Population(lr=0.01, size=5, spread=10, min_lr=1e-3, max_lr=1.0)
