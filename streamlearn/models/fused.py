"""The compact MLP as fused numpy kernels over one flat parameter buffer.

All parameters of a network live in one float32 array of shape ``(k, n_params)``
where ``k`` is the population size (``k`` copies of the same architecture trained
side by side at different learning rates; ``k = 1`` for a plain model). Weight
and bias arrays are views into that buffer, laid out in the order of the torch
module's ``state_dict``; gradients live in a second buffer with the same layout.
Optimizers therefore update every parameter of every copy with a handful of
vector operations, and a checkpoint is one contiguous array.

Forward and backward are written out by hand for Linear + ReLU/tanh layers. They
are checked against torch autograd in ``tests/test_models.py``.
"""

from __future__ import annotations

import numpy as np

from streamlearn.models import ModelShape

F32 = np.float32


class FusedMLP:
    """``k`` copies of an MLP with hand-written forward and backward passes.

    Parameters
    ----------
    shape
        Layer sizes and activation.
    population
        Number of copies ``k`` (each its own parameters).
    seed
        Seed of the initialisation, drawn as torch's ``nn.Linear`` default:
        U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and biases.
    grads
        A ``(k, n_params)`` buffer to share with other networks of the same shape
        that are never stepped at the same time (saves memory per device model).

    >>> import numpy as np
    >>> net = FusedMLP(ModelShape(n_in=3, hidden=(4,), n_out=1), seed=0)
    >>> net.forward_one(np.ones(3, dtype=np.float32)).shape
    (1, 1)
    """

    def __init__(self, shape: ModelShape, population: int = 1, seed: int = 0,
                 grads: np.ndarray | None = None) -> None:
        if population < 1:
            raise ValueError(f"population must be at least 1, got {population}")
        self.shape = shape
        self.k = population
        self.n_params = shape.n_params
        self.params = np.empty((population, self.n_params), dtype=F32)
        if grads is not None and grads.shape != (population, self.n_params):
            raise ValueError(f"a shared gradient buffer must have shape {(population, self.n_params)}")
        # gradients only live through one step: models stepped one at a time may share them
        self.grads = np.zeros((population, self.n_params), dtype=F32) if grads is None else grads
        self._names: list[str] = []
        self._W: list[np.ndarray] = []
        self._b: list[np.ndarray] = []
        self._gW: list[np.ndarray] = []
        self._gb: list[np.ndarray] = []
        offset = 0
        for name, pshape in shape.layout():
            n = int(np.prod(pshape))
            view = self.params[:, offset : offset + n].reshape((population, *pshape))
            gview = self.grads[:, offset : offset + n].reshape((population, *pshape))
            (self._W if len(pshape) == 2 else self._b).append(view)
            (self._gW if len(pshape) == 2 else self._gb).append(gview)
            self._names.append(name)
            offset += n
        self._relu = shape.activation == "relu"
        self._n_layers = len(self._W)
        # 2-D views of the single copy, for the per-sample fast path
        self._W1 = [w[0] for w in self._W]
        self._b1 = [b[0] for b in self._b]
        self._gW1 = [g[0] for g in self._gW]
        self._gb1 = [g[0] for g in self._gb]
        self._acts: list[np.ndarray] = []
        self.reset(seed)

    # -- parameters ---------------------------------------------------------

    def reset(self, seed: int) -> None:
        """Draw fresh parameters for every copy."""
        rng = np.random.default_rng(seed)
        for w, b in zip(self._W, self._b):
            bound = 1.0 / np.sqrt(w.shape[2])
            w[...] = rng.uniform(-bound, bound, size=w.shape).astype(F32)
            b[...] = rng.uniform(-bound, bound, size=b.shape).astype(F32)

    def state_dict(self, copy: int = 0) -> dict[str, np.ndarray]:
        """Parameters of one copy under torch's names (views, not copies)."""
        out = {}
        for i in range(self._n_layers):
            out[self._names[2 * i]] = self._W[i][copy]
            out[self._names[2 * i + 1]] = self._b[i][copy]
        return out

    def load_state_dict(self, state: dict[str, np.ndarray], copy: int | None = None) -> None:
        """Load torch-named parameters into one copy (or all copies when ``copy`` is None)."""
        layout = dict(self.shape.layout())
        missing = set(layout) - set(state)
        if missing:
            raise ValueError(f"state is missing parameters {sorted(missing)}")
        for i in range(self._n_layers):
            for arr, name in ((self._W[i], self._names[2 * i]), (self._b[i], self._names[2 * i + 1])):
                value = np.asarray(state[name], dtype=F32)
                if value.shape != layout[name]:
                    raise ValueError(f"{name}: expected shape {layout[name]}, got {value.shape}")
                if copy is None:
                    arr[...] = value
                else:
                    arr[copy] = value

    # -- per-sample fast path (k == 1) --------------------------------------

    def forward_one(self, x: np.ndarray) -> np.ndarray:
        """Outputs ``(k, n_out)`` for one input vector; keeps activations for backward."""
        if self.k != 1:
            return self.forward(x[None, :])[:, 0, :]
        acts = [x]
        h = x
        last = self._n_layers - 1
        for i in range(self._n_layers):
            z = self._W1[i] @ h
            z += self._b1[i]
            if i < last:
                h = np.maximum(z, 0.0, out=z) if self._relu else np.tanh(z, out=z)
                acts.append(h)
            else:
                h = z
        self._acts = acts
        return h[None, :]

    def backward_one(self, d_out: np.ndarray) -> None:
        """Fill ``grads`` from d(loss)/d(output) ``(k, n_out)`` of the last ``forward_one``."""
        if self.k != 1:
            self.backward(d_out[:, None, :])
            return
        acts = self._acts
        dz = d_out[0]
        for i in range(self._n_layers - 1, -1, -1):
            h = acts[i]
            np.multiply.outer(dz, h, out=self._gW1[i])
            self._gb1[i][...] = dz
            if i == 0:
                break
            dh = dz @ self._W1[i]
            if self._relu:
                dh *= h > 0
            else:
                dh *= 1.0 - h * h
            dz = dh

    # -- batched path (any k) ------------------------------------------------

    def forward(self, X: np.ndarray) -> np.ndarray:
        """Outputs ``(k, B, n_out)`` for a batch ``(B, n_in)``; keeps activations."""
        acts = [X]
        h = X
        last = self._n_layers - 1
        for i in range(self._n_layers):
            z = np.matmul(h, self._W[i].transpose(0, 2, 1))
            z += self._b[i][:, None, :]
            if i < last:
                h = np.maximum(z, 0.0, out=z) if self._relu else np.tanh(z, out=z)
                acts.append(h)
            else:
                h = z
        self._acts = acts
        return h

    def backward(self, d_out: np.ndarray) -> None:
        """Fill ``grads`` (summed over the batch) from d(loss)/d(output) ``(k, B, n_out)``."""
        acts = self._acts
        dz = d_out
        for i in range(self._n_layers - 1, -1, -1):
            h = acts[i]  # (B, n_in) for the shared input, (k, B, n) after
            np.matmul(dz.transpose(0, 2, 1), h, out=self._gW[i])
            dz.sum(axis=1, out=self._gb[i])  # (the method: np.sum's Python wrapper cost 2 us a call)
            if i == 0:
                break
            dh = np.matmul(dz, self._W[i])
            if self._relu:
                dh *= h > 0
            else:
                dh *= 1.0 - h * h
            dz = dh

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Outputs ``(k, B, n_out)`` without touching the cached activations."""
        h = X
        last = self._n_layers - 1
        for i in range(self._n_layers):
            z = np.matmul(h, self._W[i].transpose(0, 2, 1))
            z += self._b[i][:, None, :]
            h = (np.maximum(z, 0.0, out=z) if self._relu else np.tanh(z, out=z)) if i < last else z
        return h
