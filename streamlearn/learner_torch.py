"""The autograd engine: the same learner as :mod:`streamlearn.learner`, in plain torch.

``engine = "torch"`` in a stream's model config selects it. Every step is the
textbook loop (``zero_grad``, forward, loss, ``backward``, ``clip_grad_norm_``,
``optimizer.step``) on :class:`~streamlearn.models.torch_modules.CompactMLP` with
``torch.optim``. It is the reference the fused engine is tested and benchmarked
against, and it checkpoints in the same format (a flat parameter vector and
flat optimizer moments in ``state_dict`` order), so a store can switch engines.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from streamlearn.config import OptimizerConfig
from streamlearn.learner import TASKS, TargetScaler, _sigmoid, _softmax
from streamlearn.models import ModelShape
from streamlearn.models.torch_modules import CompactMLP

torch.set_num_threads(1)  # on 1-2 cores the default thread pool makes tiny steps 3.5x slower


class TorchLearner:
    """Test-then-train with torch autograd (population 1 only)."""

    def __init__(self, shape: ModelShape, task: str, optimizer: OptimizerConfig, seed: int = 0) -> None:
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        self.shape = shape
        self.task = task
        self.k = 1
        self.clip_norm = optimizer.clip_norm
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        self.module = CompactMLP(shape)
        torch.random.set_rng_state(generator_state)
        self._params = list(self.module.parameters())
        if optimizer.name == "sgd":
            self.optimizer: torch.optim.Optimizer = torch.optim.SGD(
                self._params, lr=optimizer.lr, momentum=optimizer.momentum, weight_decay=optimizer.weight_decay
            )
        else:
            self.optimizer = torch.optim.Adam(
                self._params, lr=optimizer.lr, betas=optimizer.betas, eps=optimizer.eps,
                weight_decay=optimizer.weight_decay,
            )
        self._loss = {
            "regression": torch.nn.MSELoss(),
            "binary": torch.nn.BCEWithLogitsLoss(),
            "multiclass": torch.nn.CrossEntropyLoss(),
        }[task]
        self.target = TargetScaler()
        self._lr = optimizer.lr
        self.n_learned = 0
        self.n_skipped = 0
        self.version = 0

    @property
    def lr(self) -> float:
        return self._lr

    @lr.setter
    def lr(self, value: float) -> None:
        if not (value > 0 and math.isfinite(value)):
            raise ValueError(f"learning rate must be positive and finite, got {value!r}")
        self._lr = float(value)
        for group in self.optimizer.param_groups:
            group["lr"] = self._lr

    def _out(self, X: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return self.module(torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32))).numpy()

    def predict_one(self, x: np.ndarray) -> np.ndarray:
        return self._head(self._out(x[None, :]))

    def predict_many(self, X: np.ndarray) -> np.ndarray:
        return self._head(self._out(X)[None])[0][None]

    def _head(self, out: np.ndarray) -> np.ndarray:
        if self.task == "regression":
            return out[..., 0] * self.target.std + self.target.mean
        if self.task == "binary":
            return _sigmoid(out[..., 0])
        return _softmax(out)

    def _target_tensor(self, Y: np.ndarray) -> torch.Tensor:
        if self.task == "regression":
            for y in Y:
                self.target.update(float(y))
            ys = (Y - self.target.mean) / self.target.std
            return torch.from_numpy(ys.astype(np.float32))[:, None]
        if self.task == "binary":
            return torch.from_numpy(Y.astype(np.float32))[:, None]
        return torch.from_numpy(Y.astype(np.int64))

    def learn_one(self, x: np.ndarray, y: float) -> np.ndarray | None:
        return self.learn_many(x[None, :], np.array([y], dtype=np.float64))

    def learn_many(self, X: np.ndarray, Y: np.ndarray) -> np.ndarray | None:
        target = self._target_tensor(np.asarray(Y, dtype=np.float64))
        self.optimizer.zero_grad()
        loss = self._loss(self.module(torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32))), target)
        loss.backward()
        if self.clip_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(self._params, self.clip_norm)
        else:
            norm = torch.sqrt(sum((p.grad * p.grad).sum() for p in self._params))
        value = float(loss.item())
        if not (math.isfinite(value) and math.isfinite(float(norm))):
            self.n_skipped += len(Y)
            return None
        self.optimizer.step()
        self.version += 1
        self.n_learned += len(Y)
        return np.array([value])

    # -- state, in the fused engine's format ----------------------------------------------

    def _flat(self, tensors: list[torch.Tensor]) -> np.ndarray:
        return torch.cat([t.detach().reshape(-1) for t in tensors]).numpy()[None, :].copy()

    def state_arrays(self) -> dict[str, np.ndarray]:
        arrays = {"params": self._flat(self._params)}
        states = [self.optimizer.state.get(p, {}) for p in self._params]
        names = {"momentum_buffer": "momentum_buffer", "exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq"}
        for key, name in names.items():
            if states and all(key in s and s[key] is not None for s in states):
                arrays[f"optimizer.{name}"] = self._flat([s[key] for s in states])
        return arrays

    def state_scalars(self) -> dict[str, Any]:
        states = [self.optimizer.state.get(p, {}) for p in self._params]
        step = int(states[0]["step"]) if states and "step" in states[0] else 0
        return {
            "task": self.task, "n_learned": self.n_learned, "n_skipped": self.n_skipped,
            "version": self.version, "target": self.target.state(),
            "optimizer": {"step": step, "started": int(bool(states and states[0]))}, "lr": self._lr,
        }

    def load_state(self, arrays: dict[str, np.ndarray], scalars: dict[str, Any]) -> None:
        flat = torch.from_numpy(np.ascontiguousarray(arrays["params"][0]))
        if flat.numel() != sum(p.numel() for p in self._params):
            raise ValueError("checkpoint parameters do not fit the configured model")
        offset = 0
        slices = []
        for p in self._params:
            n = p.numel()
            slices.append((offset, n, p.shape))
            with torch.no_grad():
                p.copy_(flat[offset:offset + n].reshape(p.shape))
            offset += n
        step = int(scalars.get("optimizer", {}).get("step", 0))
        for key in ("momentum_buffer", "exp_avg", "exp_avg_sq"):
            blob = arrays.get(f"optimizer.{key}")
            if blob is None:
                continue
            moments = torch.from_numpy(np.ascontiguousarray(blob[0]))
            for p, (off, n, shape) in zip(self._params, slices):
                state = self.optimizer.state[p]
                state[key] = moments[off:off + n].reshape(shape).clone()
                if key != "momentum_buffer":
                    state["step"] = torch.tensor(float(step))
        self.n_learned = int(scalars["n_learned"])
        self.n_skipped = int(scalars["n_skipped"])
        self.version = int(scalars["version"])
        self.target.load(scalars["target"])
        self.lr = float(scalars["lr"])
