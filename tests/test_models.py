"""The fused numpy engine against torch autograd, step for step."""

from __future__ import annotations

import numpy as np
import pytest

from streamlearn.config import OptimizerConfig
from streamlearn.learner import Learner
from streamlearn.learner_torch import TorchLearner
from streamlearn.models import ModelShape
from streamlearn.models.torch_modules import from_torch, to_torch


def stream(task: str, n: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 8)).astype(np.float32)
    if task == "regression":
        Y = 10 + 3 * X[:, 0] - X[:, 1] ** 2
    elif task == "binary":
        Y = (X[:, 0] + 0.3 * rng.normal(size=n) > 0).astype(float)
    else:
        Y = (X[:, 0] > 0).astype(float) + (X[:, 1] > 0.5)
    return X, Y.astype(np.float64)


def twins(task: str, opt: OptimizerConfig, hidden: tuple[int, ...] = (32, 32)) -> tuple[Learner, TorchLearner]:
    shape = ModelShape(8, hidden, 3 if task == "multiclass" else 1)
    reference = TorchLearner(shape, task, opt, seed=0)
    fused = Learner(shape, task, opt)
    fused.net.load_state_dict(from_torch(reference.module))
    return fused, reference


def max_param_diff(fused: Learner, reference: TorchLearner) -> float:
    ref = from_torch(reference.module)
    return max(float(np.abs(ref[k] - v).max()) for k, v in fused.net.state_dict().items())


OPTIMIZERS = {
    "sgd": OptimizerConfig(name="sgd", lr=0.01),
    "sgd-momentum": OptimizerConfig(name="sgd", lr=0.01, momentum=0.9, weight_decay=1e-4),
    "adam": OptimizerConfig(name="adam", lr=0.003, weight_decay=1e-4),
    "sgd-noclip": OptimizerConfig(name="sgd", lr=0.01, clip_norm=None),
}


@pytest.mark.parametrize("task", ["regression", "binary", "multiclass"])
@pytest.mark.parametrize("opt", list(OPTIMIZERS))
def test_per_sample_steps_match_torch(task: str, opt: str) -> None:
    """Predictions and parameters agree to 1e-5 over 300 test-then-train steps.

    (With momentum or Adam, float32 rounding differences grow chaotically after
    ~1000 steps: torch in float32 and torch in float64 part ways just the same.)
    """
    fused, reference = twins(task, OPTIMIZERS[opt])
    X, Y = stream(task, 300)
    worst = 0.0
    for x, y in zip(X, Y):
        worst = max(worst, float(np.abs(fused.predict_one(x) - reference.predict_one(x)).max()))
        fused.learn_one(x, y)
        reference.learn_one(x, y)
    assert worst < 1e-5
    assert max_param_diff(fused, reference) < 1e-5
    assert fused.n_learned == reference.n_learned == 300


def test_plain_sgd_stays_within_1e5_over_a_long_stream() -> None:
    fused, reference = twins("regression", OPTIMIZERS["sgd"])
    X, Y = stream("regression", 5000)
    for x, y in zip(X, Y):
        fused.learn_one(x, y)
        reference.learn_one(x, y)
    assert max_param_diff(fused, reference) < 1e-5
    Xt, _ = stream("regression", 200, seed=9)
    assert np.abs(fused.predict_many(Xt) - reference.predict_many(Xt)).max() < 1e-4  # target units (~10)


@pytest.mark.parametrize("task", ["regression", "binary", "multiclass"])
def test_micro_batches_match_torch(task: str) -> None:
    fused, reference = twins(task, OPTIMIZERS["adam"], hidden=(16,))
    X, Y = stream(task, 32 * 20)
    for i in range(0, len(X), 32):
        fused.learn_many(X[i:i + 32], Y[i:i + 32])
        reference.learn_many(X[i:i + 32], Y[i:i + 32])
    assert max_param_diff(fused, reference) < 1e-5


def test_a_population_is_k_independent_models() -> None:
    lrs = np.array([0.001, 0.01, 0.1])
    opt = OptimizerConfig(name="sgd", lr=0.01)
    shape = ModelShape(8, (16,), 1)
    population = Learner(shape, "regression", opt, population=3, seed=5)
    population.lr = lrs
    singles = []
    for i, lr in enumerate(lrs):
        single = Learner(shape, "regression", opt.model_copy(update={"lr": float(lr)}))
        single.net.load_state_dict(population.net.state_dict(copy=i))
        singles.append(single)
    X, Y = stream("regression", 200)
    for x, y in zip(X, Y):
        preds = population.predict_one(x)
        for i, single in enumerate(singles):
            assert abs(preds[i] - single.predict_one(x)[0]) < 1e-4
        population.learn_one(x, y)
        for single in singles:
            single.learn_one(x, y)
    for i, single in enumerate(singles):
        np.testing.assert_allclose(population.net.params[i], single.net.params[0], atol=1e-5)


@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_linear_copies_learn_as_a_separate_linear_population_would(opt: str) -> None:
    config = OptimizerConfig(name=opt, lr=0.01, clip_norm=1.0)
    shape = ModelShape(8, (16,), 1)
    mixed = Learner(shape, "binary", config, seed=5, population=2, linear_copies=3)
    network = Learner(shape, "binary", config, seed=5, population=2)
    linear = Learner(ModelShape(8, (), 1), "binary", config, seed=6, population=3)
    lrs = np.array([0.01, 0.1, 0.003, 0.03, 0.3])
    mixed.lr, network.lr, linear.lr = lrs, lrs[:2], lrs[2:]
    np.testing.assert_array_equal(mixed.kinds, [0, 0, 1, 1, 1])
    X, Y = stream("binary", 300)
    for x, y in zip(X[:200], Y[:200]):
        np.testing.assert_allclose(mixed.predict_one(x), np.concatenate(
            [network.predict_one(x), linear.predict_one(x)]), atol=1e-6)
        loss = mixed.learn_one(x, y)
        assert loss is not None
        np.testing.assert_allclose(loss, np.concatenate([network.learn_one(x, y), linear.learn_one(x, y)]),
                                   atol=1e-5)
        np.testing.assert_array_equal(mixed.last_wrong, np.concatenate([network.last_wrong, linear.last_wrong]))
    for i in range(200, 300, 20):  # micro-batches
        mixed.learn_many(X[i:i + 20], Y[i:i + 20])
        network.learn_many(X[i:i + 20], Y[i:i + 20])
        linear.learn_many(X[i:i + 20], Y[i:i + 20])
    np.testing.assert_allclose(mixed.net.params, network.net.params, atol=1e-5)
    np.testing.assert_allclose(mixed.state_arrays()["linear.params"], linear.net.params, atol=1e-5)
    # the state round-trips; a learner configured without the linear copies refuses it
    twin = Learner(shape, "binary", config, population=2, linear_copies=3)
    twin.load_state({k: v.copy() for k, v in mixed.state_arrays().items()}, mixed.state_scalars())
    np.testing.assert_array_equal(twin.predict_one(X[0]), mixed.predict_one(X[0]))
    with pytest.raises(ValueError, match="model changed"):
        network.load_state(mixed.state_arrays(), mixed.state_scalars())


def test_a_non_finite_target_skips_the_update_and_is_counted() -> None:
    learner = Learner(ModelShape(2, (4,), 1), "binary", OPTIMIZERS["sgd"])
    before = learner.net.params.copy()
    x = np.ones(2, dtype=np.float32)
    assert learner.learn_one(x, float("nan")) is None
    assert learner.n_skipped == 1 and learner.n_learned == 0
    np.testing.assert_array_equal(learner.net.params, before)
    assert learner.learn_one(x, 1.0) is not None and learner.n_learned == 1


def test_clipping_bounds_the_step() -> None:
    opt = OptimizerConfig(name="sgd", lr=1.0, clip_norm=0.5)
    learner = Learner(ModelShape(2, (), 1), "regression", opt)
    learner.target.load([10.0, 0.0, 10.0])  # std 1, mean 0: a huge standardised target
    before = learner.net.params.copy()
    learner.learn_one(np.array([1.0, 1.0], dtype=np.float32), 1e6)
    assert np.linalg.norm(learner.net.params - before) == pytest.approx(0.5, rel=1e-4)


def test_state_round_trips_between_engines() -> None:
    fused, reference = twins("regression", OPTIMIZERS["adam"])
    X, Y = stream("regression", 100)
    for x, y in zip(X, Y):
        fused.learn_one(x, y)
    restored = TorchLearner(fused.shape, "regression", OPTIMIZERS["adam"], seed=3)
    restored.load_state(fused.state_arrays(), fused.state_scalars())
    for x, y in zip(*stream("regression", 50, seed=7)):
        fused.learn_one(x, y)
        restored.learn_one(x, y)
    assert max_param_diff(fused, restored) < 1e-5
    module = to_torch(fused.shape, fused.net.state_dict())
    np.testing.assert_allclose(from_torch(module)["layers.0.weight"], fused.net.state_dict()["layers.0.weight"])
