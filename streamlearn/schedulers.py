"""Learning-rate policies: how fast each model learns, decided after every step.

Every policy implements :class:`LRPolicy`. Before a step the learner takes
``lr()``; after it the policy sees the step's loss (and may read the learner's
gradients and parameters) through ``update``; a debounced drift detection calls
``on_drift``. The rate always stays within ``[min_lr, max_lr]``. Discrete choices
(raise on drift, reduce on plateau, re-spread a population) come back as a
:class:`Decision`, which the agent stores in the drift history.

====================  =====================================================================
policy                what it does
====================  =====================================================================
``constant``          a fixed rate
``decay``             ``lr / (1 + t / steps) ** power``, back to ``lr`` after a drift
``drift_reset``       on drift multiply the rate by ``boost``, then decay back to the base
                      rate with ``half_life`` steps
``plateau``           multiply by ``factor`` when the slow loss average stops improving for
                      ``patience`` steps; back to ``lr`` after a drift
``hypergradient``     Baydin et al. 2018, multiplicative form: ``lr *= exp(beta * cos(g_t,
                      g_{t-1}))``: grows while successive gradients agree, shrinks when they
                      oscillate
``dog``               Distance over Gradients (Ivgi et al. 2023), parameter-free:
                      ``max ||x_t - x_0|| / sqrt(sum ||g_t||^2)``; restarts from the current
                      weights after a drift
``population``        trains ``size`` copies of the model side by side at log-spaced rates
                      (one vectorised learner), serves the copy with the lowest recent loss,
                      and every ``period`` steps and after a drift clones the best copy into
                      the worst and re-spreads the rates around the best one; with
                      ``linear_copies``, linear models beside them at their own rates, and
                      the kind with the lower recent error serves
====================  =====================================================================

>>> policy = DriftReset(lr=0.01, boost=5.0, half_life=100)
>>> _ = policy.on_drift(None, t=1000); round(policy.lr(), 4)
0.05
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from streamlearn.config import ScheduleConfig
from streamlearn.monitors import LossMonitor

if TYPE_CHECKING:
    from streamlearn.learner import Learner


@dataclass(frozen=True, slots=True)
class Decision:
    """A discrete learning-rate action, for the drift history."""

    action: str
    lr_before: float
    lr_after: float


class LRPolicy(Protocol):
    name: str
    population: int  # copies in all
    linear_copies: int  # of them linear (the last ones)

    def lr(self) -> float | np.ndarray:
        """The learning rate for the next step (one per copy for a population)."""
        ...

    def serving(self) -> int:
        """Which copy's prediction to publish."""
        ...

    def best_of_kind(self, kind: int) -> int:
        """The best copy of one kind (0: the configured network, 1: linear copies)."""
        ...

    def prefer_kind(self, kind: int) -> None:
        """Serve ``kind`` from now on (after a rollback restored it)."""
        ...

    def update(self, learner: Learner, loss: np.ndarray, t: int) -> Decision | None:
        """See the loss of step ``t`` (per copy); may return a discrete decision."""
        ...

    def on_drift(self, learner: Learner | None, t: int) -> Decision | None:
        """A debounced drift was detected at step ``t``."""
        ...

    def state(self) -> dict[str, Any]: ...

    def load(self, state: dict[str, Any]) -> None: ...


class _Bounded:
    """Shared pieces: bounds, a single rate, copy 0 serves."""

    name = "base"
    population = 1
    linear_copies = 0

    def __init__(self, lr: float, min_lr: float = 1e-6, max_lr: float = 1.0) -> None:
        if not 0 < min_lr <= max_lr:
            raise ValueError(f"need 0 < min_lr <= max_lr, got {min_lr}, {max_lr}")
        if not min_lr <= lr <= max_lr:
            raise ValueError(f"lr {lr} is outside [min_lr, max_lr] = [{min_lr}, {max_lr}]")
        self.base_lr = lr
        self.min_lr = min_lr
        self.max_lr = max_lr
        self._lr = lr

    def _clamp(self, lr: float) -> float:
        return min(self.max_lr, max(self.min_lr, lr))

    def lr(self) -> float:
        return self._lr

    def serving(self) -> int:
        return 0

    def best_of_kind(self, kind: int) -> int:
        return 0

    def prefer_kind(self, kind: int) -> None:
        """One kind of copy only: nothing to choose."""

    def update(self, learner: Learner, loss: np.ndarray, t: int) -> Decision | None:
        return None

    def on_drift(self, learner: Learner | None, t: int) -> Decision | None:
        return None

    def state(self) -> dict[str, Any]:
        return {"lr": self._lr}

    def load(self, state: dict[str, Any]) -> None:
        self._lr = float(state["lr"])


class Constant(_Bounded):
    """A fixed learning rate.

    >>> Constant(lr=0.01).lr()
    0.01
    """

    name = "constant"


class Decay(_Bounded):
    """Inverse-time decay ``lr / (1 + t / steps) ** power``; a drift restarts it.

    >>> p = Decay(lr=0.1, steps=100, power=1.0)
    >>> _ = p.update(None, np.array([1.0]), t=100); p.lr()
    0.05
    """

    name = "decay"

    def __init__(self, lr: float, min_lr: float = 1e-6, max_lr: float = 1.0, steps: int = 5000,
                 power: float = 0.5) -> None:
        super().__init__(lr, min_lr, max_lr)
        if steps < 1 or power <= 0:
            raise ValueError(f"need steps >= 1 and power > 0, got {steps}, {power}")
        self.steps = steps
        self.power = power
        self._start = 0

    def update(self, learner: Learner | None, loss: np.ndarray, t: int) -> Decision | None:
        self._lr = self._clamp(self.base_lr / (1 + (t - self._start) / self.steps) ** self.power)
        return None

    def on_drift(self, learner: Learner | None, t: int) -> Decision | None:
        before = self._lr
        self._start = t
        self._lr = self.base_lr
        return Decision("restart_decay", before, self._lr)

    def state(self) -> dict[str, Any]:
        return {"lr": self._lr, "start": self._start}

    def load(self, state: dict[str, Any]) -> None:
        self._lr = float(state["lr"])
        self._start = int(state["start"])


class DriftReset(_Bounded):
    """Raise the rate by ``boost`` on drift, then decay back to the base rate."""

    name = "drift_reset"

    def __init__(self, lr: float, min_lr: float = 1e-6, max_lr: float = 1.0, boost: float = 5.0,
                 half_life: int = 500) -> None:
        super().__init__(lr, min_lr, max_lr)
        if boost < 1 or half_life < 1:
            raise ValueError(f"need boost >= 1 and half_life >= 1, got {boost}, {half_life}")
        self.boost = boost
        self.half_life = half_life
        self._decay = 0.5 ** (1.0 / half_life)

    def update(self, learner: Learner | None, loss: np.ndarray, t: int) -> Decision | None:
        if self._lr != self.base_lr:
            self._lr = self.base_lr + (self._lr - self.base_lr) * self._decay
            if abs(self._lr - self.base_lr) < 1e-3 * self.base_lr:
                self._lr = self.base_lr
        return None

    def on_drift(self, learner: Learner | None, t: int) -> Decision | None:
        before = self._lr
        self._lr = self._clamp(self.base_lr * self.boost)
        return Decision("boost", before, self._lr)


class ReduceOnPlateau(_Bounded):
    """Multiply the rate by ``factor`` when the loss stops improving; a drift restores it."""

    name = "plateau"

    def __init__(self, lr: float, min_lr: float = 1e-6, max_lr: float = 1.0, factor: float = 0.5,
                 patience: int = 2000) -> None:
        super().__init__(lr, min_lr, max_lr)
        if not 0 < factor < 1:
            raise ValueError(f"factor must be in (0, 1), got {factor}")
        self.factor = factor
        self.monitor = LossMonitor(patience=patience)

    def update(self, learner: Learner | None, loss: np.ndarray, t: int) -> Decision | None:
        self.monitor.update(float(loss[0]))
        if self.monitor.plateau:
            self.monitor.reset_plateau()
            before = self._lr
            self._lr = self._clamp(self._lr * self.factor)
            if self._lr != before:
                return Decision("reduce_on_plateau", before, self._lr)
        return None

    def on_drift(self, learner: Learner | None, t: int) -> Decision | None:
        before = self._lr
        self._lr = self.base_lr
        self.monitor.reset_plateau()
        return Decision("restore", before, self._lr)

    def state(self) -> dict[str, Any]:
        return {"lr": self._lr, "monitor": self.monitor.state()}

    def load(self, state: dict[str, Any]) -> None:
        self._lr = float(state["lr"])
        self.monitor.load(state["monitor"])


class Hypergradient(_Bounded):
    """Hypergradient descent on the rate (Baydin et al. 2018), multiplicative and normalised.

    The derivative of the loss with respect to the rate is ``-g_t . g_{t-1}``; using
    the cosine instead of the raw dot product makes ``beta`` independent of the
    gradient's scale.
    """

    name = "hypergradient"

    def __init__(self, lr: float, min_lr: float = 1e-6, max_lr: float = 1.0, beta: float = 0.01) -> None:
        super().__init__(lr, min_lr, max_lr)
        if beta <= 0:
            raise ValueError(f"beta must be positive, got {beta}")
        self.beta = beta
        self._prev: np.ndarray | None = None

    def update(self, learner: Learner, loss: np.ndarray, t: int) -> Decision | None:
        g = learner.net.grads[0]
        norm = float(np.sqrt(np.dot(g, g)))
        if self._prev is not None and norm > 0:
            prev_norm = float(np.sqrt(np.dot(self._prev, self._prev)))
            if prev_norm > 0:
                cos = float(np.dot(g, self._prev)) / (norm * prev_norm)
                self._lr = self._clamp(self._lr * math.exp(self.beta * cos))
        if self._prev is None:
            self._prev = g.copy()
        else:
            self._prev[...] = g
        return None

    def state(self) -> dict[str, Any]:
        return {"lr": self._lr, "prev": None if self._prev is None else self._prev.tolist()}

    def load(self, state: dict[str, Any]) -> None:
        self._lr = float(state["lr"])
        self._prev = None if state["prev"] is None else np.asarray(state["prev"], dtype=np.float32)


class DoG(_Bounded):
    """Distance over Gradients (Ivgi, Hinder & Carmon 2023): a parameter-free step size.

    ``lr_t = max_{i<=t} ||x_i - x_0|| / sqrt(sum_{i<=t} ||g_i||^2)``, starting from
    ``r_eps * (1 + ||x_0||)``. After a drift it restarts from the current weights.
    ``lr`` only bounds the very first step.
    """

    name = "dog"

    def __init__(self, lr: float, min_lr: float = 1e-6, max_lr: float = 1.0, r_eps: float = 1e-4) -> None:
        super().__init__(lr, min_lr, max_lr)
        self.r_eps = r_eps
        self._x0: np.ndarray | None = None
        self._max_dist = 0.0
        self._grad_sq = 0.0

    def _restart(self, params: np.ndarray) -> None:
        self._x0 = params.copy()
        self._max_dist = self.r_eps * (1.0 + float(np.linalg.norm(params)))
        self._grad_sq = 0.0

    def update(self, learner: Learner, loss: np.ndarray, t: int) -> Decision | None:
        params = learner.net.params[0]
        if self._x0 is None:
            self._restart(params)
        assert self._x0 is not None
        g = learner.net.grads[0]
        self._grad_sq += float(np.dot(g, g))
        diff = params - self._x0
        self._max_dist = max(self._max_dist, float(np.sqrt(np.dot(diff, diff))))
        if self._grad_sq > 0:
            self._lr = self._clamp(self._max_dist / math.sqrt(self._grad_sq))
        return None

    def on_drift(self, learner: Learner | None, t: int) -> Decision | None:
        if learner is None:
            return None
        before = self._lr
        self._restart(learner.net.params[0])
        return Decision("restart_dog", before, self._lr)

    def state(self) -> dict[str, Any]:
        return {"lr": self._lr, "x0": None if self._x0 is None else self._x0.tolist(),
                "max_dist": self._max_dist, "grad_sq": self._grad_sq}

    def load(self, state: dict[str, Any]) -> None:
        self._lr = float(state["lr"])
        self._x0 = None if state["x0"] is None else np.asarray(state["x0"], dtype=np.float32)
        self._max_dist = float(state["max_dist"])
        self._grad_sq = float(state["grad_sq"])


class Population:
    """``size`` copies at log-spaced rates; serve the best, follow it, re-spread after drift.

    Copy ``i`` trains at ``lr * spread ** (i - (size - 1) / 2)`` (within the bounds).
    Each copy's recent score (error rate for classification, loss otherwise) is an
    exponential average with weight ``alpha``; the copy with the lowest serves.
    Copies keep their rates, so each one settles as a fixed-rate learner would;
    the grid moves only when the evidence says so:

    * every ``period`` steps, if a copy at an edge of the grid was the best for at
      least half of the period, the copy at the other edge becomes its clone one
      ``spread`` step further out (the grid follows a stream that wants a rate
      outside it, but not a lucky streak);
    * after a drift, the worst half become clones of the best and the rates are
      re-spread around the best copy's rate.

    With ``linear_copies`` the population holds a second *kind*: that many linear
    models (copies ``size ..``) beside the ``size`` copies of the configured
    network, each kind with its own grid of rates, moved as above within the
    kind. Each kind's best copy is its candidate; which kind serves is decided
    by a slower average (weight ``kind_alpha``) of what each candidate got wrong
    (classification) or its absolute error (regression) on the readings it was
    the candidate for. A linear model wins on linear concepts
    (it learns them faster and with less noise), the network wherever the
    concept is not linear; the benchmark decides, not the configuration.

    >>> p = Population(lr=0.01, size=3, spread=10.0)
    >>> [round(float(r), 4) for r in p.lr()]
    [0.001, 0.01, 0.1]
    """

    name = "population"

    def __init__(self, lr: float, min_lr: float = 1e-6, max_lr: float = 1.0, size: int = 5,
                 spread: float = 3.0, alpha: float = 0.01, period: int = 500, by_error: bool = True,
                 margin: float = 0.0, linear_copies: int = 0, kind_alpha: float = 0.003) -> None:
        if size < 2:
            raise ValueError(f"a population needs at least 2 copies, got {size}")
        if linear_copies == 1 or linear_copies < 0:
            raise ValueError(f"linear copies: 0 (none) or at least 2, got {linear_copies}")
        if spread <= 1:
            raise ValueError(f"spread must exceed 1, got {spread}")
        if not 0 < min_lr <= lr <= max_lr:
            raise ValueError(f"need 0 < min_lr <= lr <= max_lr, got {min_lr}, {lr}, {max_lr}")
        if max_lr / min_lr < spread ** (max(size, linear_copies) - 1):
            raise ValueError(f"[min_lr, max_lr] is too narrow for {size} copies spread by {spread}")
        if not 0 < kind_alpha <= 1:
            raise ValueError(f"kind_alpha must be in (0, 1], got {kind_alpha}")
        self.size = size
        self.linear_copies = linear_copies
        self.population = size + linear_copies
        self.base_lr = lr
        self.min_lr = min_lr
        self.max_lr = max_lr
        self.spread = spread
        self.alpha = alpha
        self.kind_alpha = kind_alpha
        self.period = period
        self.by_error = by_error
        self.margin = margin
        # the copies of each kind: 0 the configured network, 1 the linear copies
        self._kinds = [np.arange(size)] + ([np.arange(size, self.population)] if linear_copies else [])
        # the same copies as (start, slice): per step, views instead of fancy-indexed copies
        self._kind_slices = [(int(idx[0]), slice(int(idx[0]), int(idx[-1]) + 1)) for idx in self._kinds]
        self._lrs = np.concatenate([self._grid(lr, len(idx)) for idx in self._kinds])
        self._avg = np.zeros(self.population)
        self._wins = np.zeros(self.population)
        self._n = 0
        self._best = [int(idx[np.argmin(np.abs(np.log(self._lrs[idx] / lr)))]) for idx in self._kinds]
        self._kind_err = np.zeros(len(self._kinds))
        self._kind = 0
        self._last_move = 0

    def _grid(self, center: float, k: int) -> np.ndarray:
        """``k`` rates ``spread`` apart around ``center``, shifted to fit the bounds."""
        low = center * self.spread ** (-(k - 1) / 2)
        high = low * self.spread ** (k - 1)
        if high > self.max_lr:
            low = self.max_lr / self.spread ** (k - 1)
        elif low < self.min_lr:
            low = self.min_lr
        return low * self.spread ** np.arange(k)

    def lr(self) -> np.ndarray:
        return self._lrs

    def serving(self) -> int:
        return self._best[self._kind]

    def best_of_kind(self, kind: int) -> int:
        """The candidate copy of ``kind`` (0: the configured network, 1: linear)."""
        return self._best[kind]

    def prefer_kind(self, kind: int) -> None:
        """Serve ``kind`` from now on, until the other kind's recent error is lower again."""
        self._kind_err = np.maximum(self._kind_err, self._kind_err[kind])
        self._kind = kind

    def update(self, learner: Learner, loss: np.ndarray, t: int) -> Decision | None:
        # rank copies by what users see: the error rate for classification (ties broken by
        # the loss, since on an easy stream every copy may be error-free for a while)
        if learner.last_wrong is not None and self.by_error:
            score = learner.last_wrong.astype(float) + 1e-3 * loss
        else:
            score = loss
        candidates = list(self._best)  # the copies whose predictions each kind offered for this reading
        self._n += 1
        # a plain mean until 1/alpha samples are in, then an exponential average
        self._avg += max(self.alpha, 1.0 / self._n) * (score - self._avg)
        avg = self._avg
        for kind, (start, rows) in enumerate(self._kind_slices):
            leader = start + int(avg[rows].argmin())
            # switch the copy only when another is better by `margin` (noise is not evidence)
            if avg[leader] < avg[self._best[kind]] * (1.0 - self.margin):
                self._best[kind] = leader
            self._wins[leader] += 1
        if len(self._kinds) > 1:
            # the absolute error on the target's own scale, of the candidates only (elementwise:
            # the same values as over every copy)
            live = learner.last_wrong[candidates].astype(float) if learner.last_wrong is not None \
                else np.sqrt(loss[candidates]) * learner.target.std
            self._kind_err += max(self.kind_alpha, 1.0 / self._n) * (live - self._kind_err)
            leader = int(self._kind_err.argmin())
            if self._kind_err[leader] < self._kind_err[self._kind]:
                self._kind = leader
        if t - self._last_move >= self.period:
            self._last_move = t
            decisions = [d for d in (self._extend(learner, kind) for kind in range(len(self._kinds))) if d]
            self._wins[:] = 0
            if not decisions:
                return None
            if len(decisions) == 1:
                return decisions[0]
            return Decision(", ".join(d.action for d in decisions), decisions[0].lr_before, decisions[0].lr_after)
        return None

    def _extend(self, learner: Learner, kind: int) -> Decision | None:
        idx = self._kinds[kind]
        order = idx[np.argsort(self._lrs[idx])]
        best = int(idx[np.argmax(self._wins[idx])])
        if self._wins[best] < 0.5 * self._wins[idx].sum():
            return None
        if best == order[-1] and self._lrs[best] * self.spread <= self.max_lr * (1 + 1e-9):
            dst, new_lr = int(order[0]), self._lrs[best] * self.spread
        elif best == order[0] and self._lrs[best] / self.spread >= self.min_lr * (1 - 1e-9):
            dst, new_lr = int(order[-1]), self._lrs[best] / self.spread
        else:
            return None
        learner.copy_member(best, dst)
        self._avg[dst] = self._avg[best]
        self._lrs = self._lrs.copy()
        self._lrs[dst] = new_lr
        lr_best = float(self._lrs[best])
        action = "extend_up" if new_lr > lr_best else "extend_down"
        return Decision(action if kind == 0 else f"linear {action}", lr_best, lr_best)

    def on_drift(self, learner: Learner | None, t: int) -> Decision | None:
        if learner is None:
            return None
        before = float(self._lrs[self.serving()])
        self._lrs = self._lrs.copy()
        for kind, idx in enumerate(self._kinds):
            best = self._best[kind]
            kind_before = float(self._lrs[best])
            for dst in idx[np.argsort(self._avg[idx])][(len(idx) + 1) // 2:]:  # the worst half
                if dst != best:
                    learner.copy_member(best, int(dst))
                    self._avg[dst] = self._avg[best]
            grid = self._grid(kind_before, len(idx))
            # the best copy keeps the grid value nearest its rate; the others take the rest in order
            keep = int(np.argmin(np.abs(np.log(grid / kind_before))))
            others = [int(i) for i in idx[np.argsort(self._lrs[idx])] if i != best]
            self._lrs[best] = grid[keep]
            self._lrs[others] = np.delete(grid, keep)
        self._last_move = t
        return Decision("respread", before, float(self._lrs[self.serving()]))

    def state(self) -> dict[str, Any]:
        return {"lrs": self._lrs.tolist(), "avg": self._avg.tolist(), "wins": self._wins.tolist(), "n": self._n,
                "best": list(self._best), "kind_err": self._kind_err.tolist(), "kind": self._kind,
                "last_move": self._last_move}

    def load(self, state: dict[str, Any]) -> None:
        lrs = np.asarray(state["lrs"], dtype=np.float64)
        if lrs.shape != (self.population,):
            raise ValueError(f"policy state for {lrs.shape[0]} copies, configured {self.population}: "
                             "the population changed since the checkpoint")
        self._lrs = lrs
        self._avg = np.asarray(state["avg"], dtype=np.float64)
        self._wins = np.asarray(state["wins"], dtype=np.float64)
        self._n = int(state["n"])
        best = state["best"]
        self._best = [int(b) for b in best] if isinstance(best, list) else [int(best)]  # (an int before kinds)
        self._kind_err = np.asarray(state.get("kind_err", [0.0] * len(self._kinds)), dtype=np.float64)
        self._kind = int(state.get("kind", 0))
        self._last_move = int(state["last_move"])


POLICIES = ("constant", "decay", "drift_reset", "plateau", "hypergradient", "dog", "population")


def make_policy(config: ScheduleConfig, lr: float) -> LRPolicy:
    """The policy a stream's ``[streams.schedule]`` section names."""
    common = {"lr": lr, "min_lr": config.min_lr, "max_lr": config.max_lr}
    p = config.policy
    if p == "constant":
        return Constant(**common)
    if p == "decay":
        return Decay(**common, steps=config.decay_steps, power=config.decay_power)
    if p == "drift_reset":
        return DriftReset(**common, boost=config.boost, half_life=config.half_life)
    if p == "plateau":
        return ReduceOnPlateau(**common, factor=config.factor, patience=config.patience)
    if p == "hypergradient":
        return Hypergradient(**common, beta=config.beta)
    if p == "dog":
        return DoG(**common, r_eps=config.r_eps)
    if p == "population":
        return Population(**common, size=config.size, spread=config.spread, alpha=config.alpha,
                          period=config.period, by_error=config.by_error, margin=config.margin,
                          linear_copies=config.linear_copies, kind_alpha=config.kind_alpha)
    raise ValueError(f"unknown learning-rate policy {p!r}; choose from {POLICIES}")
