"""Feature state of one model: lags per device and online standardisation.

The feature vector of a reading is its configured fields, followed by the same
fields from the ``lags`` previous readings of the same device (padded with the
oldest value seen until enough history exists). Each vector is standardised with
a running mean and variance, updated with the reading before it is transformed,
as river's ``StandardScaler`` does. One ``FeatureState`` belongs to one model (a
device's own model, or a stream's shared model, which then keeps a lag history per
device). All state is plain lists, saved as JSON in checkpoints.

>>> fs = FeatureState(n_fields=1, lags=1)
>>> [fs.transform("dev", [v]).round(3).tolist() for v in (1.0, 3.0)]
[[0.0, 0.0], [1.0, 0.0]]
"""

from __future__ import annotations

from collections import deque
from typing import Any

import numpy as np

F32 = np.float32


class RunningScaler:
    """Per-dimension running mean and variance (Welford), float64.

    >>> s = RunningScaler(2)
    >>> for x in ([1.0, 10.0], [3.0, 10.0]): s.update(np.array(x))
    >>> s.transform(np.array([3.0, 10.0])).tolist()
    [1.0, 0.0]
    """

    __slots__ = ("n", "mean", "m2")

    def __init__(self, dim: int) -> None:
        self.n = 0
        self.mean = np.zeros(dim)
        self.m2 = np.zeros(dim)

    def update(self, x: np.ndarray) -> None:
        self.n += 1
        delta = x - self.mean
        self.mean += delta / self.n
        self.m2 += delta * (x - self.mean)

    def transform(self, x: np.ndarray) -> np.ndarray:
        """``(x - mean) / std``, with std 1 where the variance is still zero."""
        if self.n < 2:
            return np.zeros_like(x)
        var = self.m2 / self.n
        std = np.sqrt(var, where=var > 1e-12, out=np.ones_like(var))
        return (x - self.mean) / std

    def state(self) -> dict[str, Any]:
        return {"n": self.n, "mean": self.mean.tolist(), "m2": self.m2.tolist()}

    def load(self, state: dict[str, Any]) -> None:
        self.n = int(state["n"])
        self.mean = np.asarray(state["mean"], dtype=np.float64)
        self.m2 = np.asarray(state["m2"], dtype=np.float64)


class FeatureState:
    """Lag buffers per device and one running scaler."""

    def __init__(self, n_fields: int, lags: int = 0) -> None:
        if n_fields < 1 or lags < 0:
            raise ValueError(f"need n_fields >= 1 and lags >= 0, got {n_fields}, {lags}")
        self.n_fields = n_fields
        self.lags = lags
        self.dim = n_fields * (lags + 1)
        self._history: dict[str, deque[list[float]]] = {}
        self.scaler = RunningScaler(self.dim)

    def raw_vector(self, device: str, values: list[float]) -> np.ndarray:
        """The unscaled feature vector, and remember ``values`` as the newest lag."""
        if self.lags == 0:
            return np.asarray(values, dtype=np.float64)
        history = self._history.get(device)
        if history is None:
            history = self._history[device] = deque(maxlen=self.lags)
        past = list(history)
        pad = past[0] if past else values
        rows = [values] + past[::-1] + [pad] * (self.lags - len(past))
        history.append(values)
        return np.asarray(rows, dtype=np.float64).ravel()

    def transform(self, device: str, values: list[float]) -> np.ndarray:
        """Update the state with one reading and return its standardised float32 vector."""
        raw = self.raw_vector(device, values)
        self.scaler.update(raw)
        return self.scaler.transform(raw).astype(F32)

    def state(self) -> dict[str, Any]:
        return {
            "history": {d: list(h) for d, h in self._history.items()},
            "scaler": self.scaler.state(),
        }

    def load(self, state: dict[str, Any]) -> None:
        self._history = {
            d: deque([list(map(float, row)) for row in rows], maxlen=self.lags)
            for d, rows in state.get("history", {}).items()
        }
        scaler = RunningScaler(self.dim)
        scaler.load(state["scaler"])
        if scaler.mean.shape != (self.dim,):
            raise ValueError(
                f"scaler state has {scaler.mean.shape[0]} features, the configured stream "
                f"{self.dim}: the features changed since the checkpoint"
            )
        self.scaler = scaler
