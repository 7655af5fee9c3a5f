"""Predict and learn: the model, its head, its optimizer and the numeric guards.

A :class:`Learner` owns one compact model (or a population of ``k`` copies of it),
the task head (squared error on a standardised target for regression, logistic
loss for binary, softmax cross-entropy for multiclass), the optimizer, gradient
clipping and the guards that keep one bad sample from poisoning the weights: a
non-finite loss or gradient skips the update and is counted.

The learner speaks in raw units: ``predict_one`` returns a value on the target's
own scale (or class probabilities) and ``learn_one`` takes the raw target. For
regression it keeps a running mean and variance of the target and trains the
network on the standardised value, because fixed-rate SGD on raw targets of scale
0-30 diverges within 40 samples (DESIGN, facts).

>>> import numpy as np
>>> from streamlearn.config import OptimizerConfig
>>> from streamlearn.models import ModelShape
>>> learner = Learner(ModelShape(2, (8,), 1), "regression", OptimizerConfig(lr=0.05), seed=1)
>>> rng = np.random.default_rng(0)
>>> for _ in range(2000):
...     x = rng.normal(size=2).astype(np.float32)
...     _ = learner.learn_one(x, 3.0 * x[0] - x[1] + 10.0)
>>> round(float(learner.predict_one(np.array([1.0, 1.0], dtype=np.float32))[0]), 1)
12.0
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from streamlearn.config import OptimizerConfig
from streamlearn.models import ModelShape
from streamlearn.models.fused import FusedMLP
from streamlearn.optim import make_optimizer

F32 = np.float32
TASKS = ("regression", "binary", "multiclass")


class TargetScaler:
    """Running mean and standard deviation of a scalar target (Welford).

    Until two targets are seen the scale is 1, so the first predictions are
    the network's raw output around the first target.

    >>> s = TargetScaler()
    >>> for y in [10.0, 12.0, 14.0]: s.update(y)
    >>> s.mean, round(s.std, 4)
    (12.0, 1.633)
    """

    __slots__ = ("n", "mean", "m2")

    def __init__(self) -> None:
        self.n = 0
        self.mean = 0.0
        self.m2 = 0.0

    def update(self, y: float) -> None:
        self.n += 1
        delta = y - self.mean
        self.mean += delta / self.n
        self.m2 += delta * (y - self.mean)

    @property
    def std(self) -> float:
        if self.n < 2:
            return 1.0
        var = self.m2 / self.n
        return math.sqrt(var) if var > 1e-12 else 1.0

    def state(self) -> list[float]:
        return [float(self.n), self.mean, self.m2]

    def load(self, state: list[float]) -> None:
        self.n, self.mean, self.m2 = int(state[0]), float(state[1]), float(state[2])


class Learner:
    """Test-then-train learner over a fused compact MLP.

    Parameters
    ----------
    shape
        Network sizes; ``n_out`` must be 1 for regression and binary tasks.
    task
        ``"regression"``, ``"binary"`` or ``"multiclass"``.
    optimizer
        Optimizer name, learning rate and clipping.
    seed
        Initialisation seed.
    population
        Number of copies trained side by side; ``lr`` may then be a ``(k,)`` array.
    outlier_z
        Regression: once 100 targets are in, a target further than this many
        standard deviations from their mean is skipped (and counted in
        ``n_outliers`` and ``n_skipped``), so one label x1e6 cannot wreck the
        target scaling; ``accept_after`` such targets in a row mean the level
        really moved, and the target statistics start again from there.
    scratch
        Where learners that are never stepped at the same time share their
        gradient buffer.
    linear_copies
        With a population: this many linear copies (the network without hidden
        layers, with their own parameters and optimizer state) trained beside the
        ``population`` copies of ``shape``. Copies ``0 .. population - 1`` are of
        ``shape``, the rest linear; :attr:`kinds` says which is which, and every
        per-copy array (predictions, losses, learning rates) has ``k =
        population + linear_copies`` rows in that order.
    """

    def __init__(
        self,
        shape: ModelShape,
        task: str,
        optimizer: OptimizerConfig,
        seed: int = 0,
        population: int = 1,
        outlier_z: float | None = None,
        accept_after: int = 100,
        scratch: dict[tuple[int, int], np.ndarray] | None = None,
        linear_copies: int = 0,
    ) -> None:
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        if task != "multiclass" and shape.n_out != 1:
            raise ValueError(f"task {task!r} needs n_out=1, got {shape.n_out}")
        self.shape = shape
        self.task = task
        self.optimizer_config = optimizer
        self.clip_norm = optimizer.clip_norm
        grads = None
        if scratch is not None:  # one gradient buffer per shape, shared by a stream's models
            grads = scratch.setdefault((population, shape.n_params),
                                       np.zeros((population, shape.n_params), dtype=F32))
        self.net = FusedMLP(shape, population=population, seed=seed, grads=grads)
        self.optimizer = make_optimizer(optimizer, self.net.params.shape)
        if linear_copies < 0 or (linear_copies and not shape.hidden):
            raise ValueError(f"linear copies need a network with hidden layers beside them, got {linear_copies} "
                             f"beside {shape}")
        self.n_main = population
        self.lin: FusedMLP | None = None
        self.lin_optimizer = None
        if linear_copies:
            self.lin = FusedMLP(ModelShape(shape.n_in, (), shape.n_out), population=linear_copies, seed=seed + 1)
            self.lin_optimizer = make_optimizer(optimizer, self.lin.params.shape)
        self.k = population + linear_copies
        self.kinds = np.array([0] * population + [1] * linear_copies, dtype=np.int8)  # 0: shape, 1: linear
        self.target = TargetScaler()
        self._lr: float | np.ndarray = optimizer.lr
        self._lr_source: np.ndarray | None = None  # the array the rates were last taken from
        self._set_step_lr()
        self.n_learned = 0
        self.n_skipped = 0
        self.n_outliers = 0
        self.outlier_z = outlier_z
        self.accept_after = accept_after
        self._outlier_run = 0
        self.version = 0
        self._cached_x: np.ndarray | None = None
        self._cached_version = -1
        self._cached_out: np.ndarray | None = None
        # classification: per copy, was the last sample misclassified (the share, for a micro-batch)
        self.last_wrong: np.ndarray | None = None

    # -- learning rate --------------------------------------------------------

    @property
    def lr(self) -> float | np.ndarray:
        return self._lr

    @lr.setter
    def lr(self, value: float | np.ndarray) -> None:
        if value is self._lr_source:  # a policy's rates, unchanged since the last step (policies copy
            return  # their array before they change it)
        if isinstance(value, np.ndarray):
            if value.shape != (self.k,):
                raise ValueError(f"expected {self.k} learning rates, got shape {value.shape}")
            if not np.all(np.isfinite(value)) or np.any(value <= 0):
                raise ValueError("learning rates must be positive and finite")
            self._lr = value.astype(np.float64)
            self._lr_source = value
        else:
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"learning rate must be positive and finite, got {value!r}")
            self._lr = float(value)
            self._lr_source = None
        self._set_step_lr()

    def _set_step_lr(self) -> None:
        """The rates as the optimizers take them, made once per change of rates (not per step):
        a ``(k, 1)`` column, and its rows of each kind of copy. (The same arrays each step also
        let an optimizer keep its float32 copy of them.)"""
        if isinstance(self._lr, np.ndarray):
            col = self._lr[:, None]
            self._lr_col: float | np.ndarray = col
            self._lr_parts: tuple[float | np.ndarray, float | np.ndarray] = (col[: self.n_main], col[self.n_main:])
        else:
            self._lr_col = self._lr
            self._lr_parts = (self._lr, self._lr)

    def _step_lr(self) -> float | np.ndarray:
        return self._lr_col

    # -- predict ----------------------------------------------------------------

    def _forward_one(self, x: np.ndarray) -> np.ndarray:
        if self._cached_x is x and self._cached_version == self.version:
            assert self._cached_out is not None
            return self._cached_out
        out = self.net.forward_one(x)
        if self.lin is not None:
            out = np.concatenate((out, self.lin.forward_one(x)))
        self._cached_x, self._cached_version, self._cached_out = x, self.version, out
        return out

    def predict_one(self, x: np.ndarray) -> np.ndarray:
        """Per copy: the prediction on the target's scale ``(k,)``, the probability of
        class 1 ``(k,)``, or class probabilities ``(k, n_classes)``."""
        return self._head(self._forward_one(x))

    def predict_many(self, X: np.ndarray) -> np.ndarray:
        """Batched :meth:`predict_one`: ``(k, B)`` or ``(k, B, n_classes)``."""
        out = self.net.predict(X)
        if self.lin is not None:
            out = np.concatenate((out, self.lin.predict(X)))
        return self._head(out)

    def _head(self, out: np.ndarray) -> np.ndarray:
        if self.task == "regression":
            return out[..., 0] * self.target.std + self.target.mean
        if self.task == "binary":
            return _sigmoid(out[..., 0])
        return _softmax(out)

    # -- learn ------------------------------------------------------------------

    def _outlier(self, y: float) -> bool:
        """True when ``y`` is to be skipped as an outlier (regression only)."""
        if self.outlier_z is None or self.target.n < 100 or not math.isfinite(y):
            return False
        if abs(y - self.target.mean) <= self.outlier_z * self.target.std:
            self._outlier_run = 0
            return False
        self._outlier_run += 1
        if self._outlier_run >= self.accept_after:  # not a spike: the level moved; follow it
            self.target = TargetScaler()
            self._outlier_run = 0
            return False
        self.n_outliers += 1
        return True

    def learn_one(self, x: np.ndarray, y: float) -> np.ndarray | None:
        """One SGD step on ``(x, y)``; returns the loss per copy, or None when skipped."""
        if self.task == "regression" and self._outlier(y):
            self.n_skipped += 1
            return None
        out = self._forward_one(x)
        if self.task == "regression":
            self.target.update(y)
            ys = (y - self.target.mean) / self.target.std
            err = out[:, 0] - F32(ys)
            loss = err * err
            d_out = (2.0 * err)[:, None]
        elif self.task == "binary":
            z = out[:, 0]
            loss = np.maximum(z, 0) - z * F32(y) + np.log1p(np.exp(-np.abs(z)))
            d_out = (_sigmoid(z) - F32(y))[:, None]
            self.last_wrong = (z > 0) != (y > 0.5)
        else:
            cls = int(y)
            self.last_wrong = out.argmax(axis=1) != cls
            shifted = out - out.max(axis=1, keepdims=True)
            expz = np.exp(shifted)
            total = expz.sum(axis=1, keepdims=True)
            loss = np.log(total[:, 0]) - shifted[:, cls]
            d_out = expz / total
            d_out[:, cls] -= 1.0
        d_out = d_out.astype(F32, copy=False)
        if self.lin is None:
            self.net.backward_one(d_out)
        else:
            self.net.backward_one(d_out[: self.n_main])
            self.lin.backward_one(d_out[self.n_main :])
        return self._apply(loss, 1)

    def learn_many(self, X: np.ndarray, Y: np.ndarray) -> np.ndarray | None:
        """One step on a micro-batch (mean loss over the batch, as torch's default reduction)."""
        if self.task == "regression" and self.outlier_z is not None:
            keep = np.array([not self._outlier(float(y)) for y in Y], dtype=bool)
            if not keep.all():
                self.n_skipped += int((~keep).sum())
                X, Y = X[keep], Y[keep]
                if len(Y) == 0:
                    return None
        B = X.shape[0]
        out = self.net.forward(X)  # (k, B, n_out)
        if self.lin is not None:
            out = np.concatenate((out, self.lin.forward(X)))
        if self.task == "regression":
            for y in Y:
                self.target.update(float(y))
            ys = ((Y - self.target.mean) / self.target.std).astype(F32)
            err = out[..., 0] - ys
            loss = (err * err).mean(axis=1)
            d_out = (2.0 / B) * err[..., None]
        elif self.task == "binary":
            z = out[..., 0]
            y32 = Y.astype(F32)
            loss = (np.maximum(z, 0) - z * y32 + np.log1p(np.exp(-np.abs(z)))).mean(axis=1)
            d_out = ((_sigmoid(z) - y32) / B)[..., None]
            self.last_wrong = ((z > 0) != (y32 > 0.5)).mean(axis=1)
        else:
            cls = Y.astype(np.int64)
            shifted = out - out.max(axis=2, keepdims=True)
            expz = np.exp(shifted)
            total = expz.sum(axis=2, keepdims=True)
            picked = np.take_along_axis(shifted, cls[None, :, None].repeat(self.k, 0), axis=2)[..., 0]
            loss = (np.log(total[..., 0]) - picked).mean(axis=1)
            self.last_wrong = (out.argmax(axis=2) != cls[None, :]).mean(axis=1)
            d_out = expz / total
            d_out[:, np.arange(B), cls] -= 1.0
            d_out /= B
        d_out = d_out.astype(F32, copy=False)
        if self.lin is None:
            self.net.backward(d_out)
        else:
            self.net.backward(d_out[: self.n_main])
            self.lin.backward(d_out[self.n_main :])
        return self._apply(loss, B)

    def _apply(self, loss: np.ndarray, n: int) -> np.ndarray | None:
        if self.lin is not None:
            return self._apply_mixed(loss, n)
        grads = self.net.grads
        if self.k == 1:
            sq = float(np.dot(grads[0], grads[0]))
            if not (math.isfinite(sq) and math.isfinite(float(loss[0]))):
                self.n_skipped += n
                return None
            if self.clip_norm is not None:
                coef = self.clip_norm / (math.sqrt(sq) + 1e-6)
                if coef < 1.0:
                    grads *= F32(coef)
        else:
            sq_k = np.einsum("kp,kp->k", grads, grads)
            if not math.isfinite(float(_add(sq_k)) + float(_add(loss))):  # (as in _apply_mixed)
                self.n_skipped += n
                return None
            if self.clip_norm is not None:
                _clip(grads, sq_k, self.clip_norm)
        self.optimizer.step(self.net.params, grads, self._lr_col)
        self.version += 1
        self.n_learned += n
        return loss

    def _apply_mixed(self, loss: np.ndarray, n: int) -> np.ndarray | None:
        """:meth:`_apply` for a population with linear copies: the same per-copy clipping and
        checks, each kind stepped by its own optimizer at its copies' rates."""
        assert self.lin is not None and self.lin_optimizer is not None
        net, lin = self.net, self.lin
        sq_net = np.einsum("kp,kp->k", net.grads, net.grads)
        sq_lin = np.einsum("kp,kp->k", lin.grads, lin.grads)
        # one scalar check: a sum is finite only if every term is (or it overflows: a norm that
        # large is no step to take either)
        if not math.isfinite(float(_add(sq_net)) + float(_add(sq_lin)) + float(_add(loss))):
            self.n_skipped += n
            return None
        if self.clip_norm is not None:
            _clip(net.grads, sq_net, self.clip_norm)
            _clip(lin.grads, sq_lin, self.clip_norm)
        lr_net, lr_lin = self._lr_parts
        self.optimizer.step(net.params, net.grads, lr_net)
        self.lin_optimizer.step(lin.params, lin.grads, lr_lin)
        self.version += 1
        self.n_learned += n
        return loss

    def copy_member(self, src: int, dst: int) -> None:
        """Make copy ``dst`` of a population an exact clone of copy ``src`` (weights and moments)."""
        if self.kinds[src] != self.kinds[dst]:
            raise ValueError(f"copies {src} and {dst} are of different kinds")
        linear = bool(self.kinds[src])
        offset = self.n_main if linear else 0
        for name, arr in self.state_arrays().items():
            if name.startswith("linear.") == linear:
                arr[dst - offset] = arr[src - offset]
        self.version += 1

    # -- state ----------------------------------------------------------------------

    def state_arrays(self) -> dict[str, np.ndarray]:
        """Every array of the learner's state (parameters and optimizer moments)."""
        arrays = {"params": self.net.params}
        for name, arr in self.optimizer.state_arrays().items():
            arrays[f"optimizer.{name}"] = arr
        if self.lin is not None and self.lin_optimizer is not None:
            arrays["linear.params"] = self.lin.params
            for name, arr in self.lin_optimizer.state_arrays().items():
                arrays[f"linear.optimizer.{name}"] = arr
        return arrays

    def state_scalars(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "n_learned": self.n_learned,
            "n_skipped": self.n_skipped,
            "n_outliers": self.n_outliers,
            "outlier_run": self._outlier_run,
            "version": self.version,
            "target": self.target.state(),
            "optimizer": self.optimizer.state_scalars(),
            **({"linear_optimizer": self.lin_optimizer.state_scalars()} if self.lin_optimizer is not None else {}),
            "lr": self._lr.tolist() if isinstance(self._lr, np.ndarray) else self._lr,
        }

    def load_state(self, arrays: dict[str, np.ndarray], scalars: dict[str, Any]) -> None:
        params = arrays["params"]
        if params.shape != self.net.params.shape:
            raise ValueError(
                f"checkpoint parameters have shape {params.shape}, the configured model "
                f"{self.net.params.shape}: the model changed since the checkpoint"
            )
        lin_params = arrays.get("linear.params")
        lin_shape = None if self.lin is None else self.lin.params.shape
        if (None if lin_params is None else lin_params.shape) != lin_shape:
            saved = 0 if lin_params is None else lin_params.shape[0]
            configured = 0 if lin_shape is None else lin_shape[0]
            raise ValueError(
                f"the checkpoint has {saved} linear copies of the model, the config {configured} "
                f"(schedule.linear_copies; stores written before linear copies existed need 0): "
                "the model changed since the checkpoint"
            )
        self.net.params[...] = params
        self.optimizer.load(
            {k.split(".", 1)[1]: v for k, v in arrays.items() if k.startswith("optimizer.")},
            scalars.get("optimizer", {}),
        )
        if self.lin is not None and self.lin_optimizer is not None:
            assert lin_params is not None
            self.lin.params[...] = lin_params
            self.lin_optimizer.load(
                {k.split(".", 2)[2]: v for k, v in arrays.items() if k.startswith("linear.optimizer.")},
                scalars.get("linear_optimizer", {}),
            )
        self.n_learned = int(scalars["n_learned"])
        self.n_skipped = int(scalars["n_skipped"])
        self.n_outliers = int(scalars.get("n_outliers", 0))
        self._outlier_run = int(scalars.get("outlier_run", 0))
        self.version = int(scalars["version"])
        self.target.load(scalars["target"])
        lr = scalars["lr"]
        self._lr = np.asarray(lr, dtype=np.float64) if isinstance(lr, list) else float(lr)
        self._lr_source = None
        self._set_step_lr()
        self._cached_x = None


_add = np.add.reduce  # a sum without ndarray.sum's Python wrapper (1 us a call)
_CLIP_MARGIN = 1.0 - 1e-5  # well beyond float32 rounding: the check below never skips a clipping


def _clip(grads: np.ndarray, sq_k: np.ndarray, clip_norm: float) -> None:
    """Scale each copy's gradient (a row) down to norm ``clip_norm`` where it is longer, as
    torch's ``clip_grad_norm_`` (coefficient ``clip / (norm + 1e-6)``, at most 1). When no copy
    comes near the limit every coefficient is exactly 1 and the multiplication is skipped."""
    if math.sqrt(float(np.maximum.reduce(sq_k))) + 1e-6 < clip_norm * _CLIP_MARGIN:
        return
    coef_k = np.minimum(clip_norm / (np.sqrt(sq_k) + 1e-6), 1.0)
    grads *= coef_k[:, None].astype(F32)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (np.tanh(0.5 * z) + 1.0)


def _softmax(out: np.ndarray) -> np.ndarray:
    shifted = out - out.max(axis=-1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=-1, keepdims=True)
