"""SGD and Adam over flat parameter buffers, step for step as ``torch.optim``.

Each optimizer updates a ``(k, n)`` float32 parameter array in place from a
gradient array of the same shape. The learning rate is a float, or a ``(k, 1)``
array giving each copy of a population its own rate. The arithmetic follows
torch's single-tensor CPU implementations (``torch/optim/sgd.py``, ``adam.py``)
operation for operation, so the two agree to float32 rounding; see
``tests/test_models.py``.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from streamlearn.config import OptimizerConfig

F32 = np.float32


class FlatOptimizer(Protocol):
    def step(self, params: np.ndarray, grads: np.ndarray, lr: float | np.ndarray) -> None: ...

    def state_arrays(self) -> dict[str, np.ndarray]: ...

    def state_scalars(self) -> dict[str, float | int]: ...

    def load(self, arrays: dict[str, np.ndarray], scalars: dict[str, float | int]) -> None: ...


class FlatSGD:
    """SGD with optional momentum and (coupled) weight decay."""

    def __init__(self, shape: tuple[int, int], momentum: float = 0.0, weight_decay: float = 0.0) -> None:
        self.momentum = momentum
        self.weight_decay = weight_decay
        self._buf = np.zeros(shape, dtype=F32) if momentum > 0 else None
        self._started = False
        self._lr_of: np.ndarray | None = None  # the rates last given, and their float32 copy
        self._lr32: np.ndarray | None = None

    def step(self, params: np.ndarray, grads: np.ndarray, lr: float | np.ndarray) -> None:
        g = grads
        if self.weight_decay:
            g = g + self.weight_decay * params
        if self._buf is not None:
            if self._started:
                self._buf *= self.momentum
                self._buf += g
            else:
                self._buf[...] = g
                self._started = True
            g = self._buf
        if isinstance(lr, np.ndarray):
            # per copy, in float32 as torch takes a float rate for a float32 tensor (and as the
            # scalar case below); the copy is made when the rates change, not each step
            if lr is not self._lr_of:
                self._lr_of, self._lr32 = lr, lr.astype(F32)
            assert self._lr32 is not None
            params -= self._lr32 * g
        else:
            params -= F32(lr) * g

    def state_arrays(self) -> dict[str, np.ndarray]:
        return {} if self._buf is None else {"momentum_buffer": self._buf}

    def state_scalars(self) -> dict[str, float | int]:
        return {"started": int(self._started)}

    def load(self, arrays: dict[str, np.ndarray], scalars: dict[str, float | int]) -> None:
        if self._buf is not None:
            self._buf[...] = arrays["momentum_buffer"]
        self._started = bool(scalars.get("started", 0))


class FlatAdam:
    """Adam (Kingma & Ba) with torch's bias correction and coupled weight decay."""

    def __init__(
        self,
        shape: tuple[int, int],
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        self.betas = betas
        self.eps = eps
        self.weight_decay = weight_decay
        self._m = np.zeros(shape, dtype=F32)
        self._v = np.zeros(shape, dtype=F32)
        self._scratch = np.empty(shape, dtype=F32)
        self._t = 0

    def step(self, params: np.ndarray, grads: np.ndarray, lr: float | np.ndarray) -> None:
        b1, b2 = self.betas
        g = grads
        if self.weight_decay:
            g = g + self.weight_decay * params
        self._t += 1
        m, v, s = self._m, self._v, self._scratch
        # exp_avg.lerp_(grad, 1 - beta1)
        np.subtract(g, m, out=s)
        s *= F32(1 - b1)
        m += s
        # exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        v *= F32(b2)
        np.multiply(g, g, out=s)
        s *= F32(1 - b2)
        v += s
        bias1 = 1 - b1**self._t
        bias2_sqrt = (1 - b2**self._t) ** 0.5
        # denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
        np.sqrt(v, out=s)
        s /= F32(bias2_sqrt)
        s += F32(self.eps)
        # param.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)
        np.divide(m, s, out=s)
        if isinstance(lr, np.ndarray):
            s *= (lr / bias1).astype(F32)
        else:
            s *= F32(lr / bias1)
        params -= s

    def state_arrays(self) -> dict[str, np.ndarray]:
        return {"exp_avg": self._m, "exp_avg_sq": self._v}

    def state_scalars(self) -> dict[str, float | int]:
        return {"step": self._t}

    def load(self, arrays: dict[str, np.ndarray], scalars: dict[str, float | int]) -> None:
        self._m[...] = arrays["exp_avg"]
        self._v[...] = arrays["exp_avg_sq"]
        self._t = int(scalars.get("step", 0))


def make_optimizer(config: OptimizerConfig, shape: tuple[int, int]) -> FlatSGD | FlatAdam:
    if config.name == "sgd":
        return FlatSGD(shape, momentum=config.momentum, weight_decay=config.weight_decay)
    return FlatAdam(shape, betas=config.betas, eps=config.eps, weight_decay=config.weight_decay)
