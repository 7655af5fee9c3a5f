"""Loss monitors and drift detectors: what tells the learning-rate policy the world changed.

* :class:`LossMonitor` keeps a fast and a slow moving average of the prequential
  loss and reports spikes (fast well above slow) and plateaus (slow average not
  improving for ``patience`` steps).
* :class:`RiverDetector` adapts one river drift detector (ADWIN, PageHinkley,
  KSWIN on the loss; DDM, EDDM, HDDM_A, FHDDM on 0/1 classification errors).
* :class:`DriftMonitor` debounces them: nothing fires during a grace period or a
  cooldown after the last drift, a detection counts only if the loss went *up*
  (a model that learns also makes its loss change, downwards), and with several
  detectors ``min_agree`` of them must fire within ``agree_window`` steps.

What each detector sees was chosen by measurement (our MLP learning from scratch,
10,000 samples; ``tests/test_monitors.py`` keeps these properties):

* On the raw loss, river's default PageHinkley fired 6 times on a stationary
  Friedman stream and KSWIN 15 times; ADWIN fired 3 times, each a *decrease* as
  the model learned. PageHinkley in ``mode="up"`` fired 0 times and found
  FriedmanDrift's drift 62 samples after it, but its threshold is in the loss's
  own units: on a stream the model fits closely (standardised loss ~0.01) it
  found nothing at all.
* So regression detectors see the loss divided by its slow average (floored at
  ``loss_floor``, clipped at 5), a scale-free signal, with PageHinkley's
  ``delta`` and ``threshold`` set for it (0.5, 50): 0 false alarms on stationary
  streams, FriedmanDrift found 25 samples after the change, the simulator's
  concept change 12.
* For classification the log loss misleads: on river's Hyperplane with 5% label
  noise it kept rising as the model grew confident (4 false alarms in 10,000
  samples) while the error rate did not. Classification is watched by HDDM_A on
  the 0/1 errors: 0 false alarms on three stationary streams, Agrawal's function
  change found 20-116 samples after it.

All state round-trips through checkpoints. river detectors have no serialisation
of their own, so their state is pickled and restored with an allow-list unpickler
that only builds river's detector and statistics classes (see :func:`safe_loads`).
"""

from __future__ import annotations

import base64
import importlib
import importlib.util
import io
import math
import pickle
import sys
import types
from dataclasses import dataclass
from typing import Any

# what a detector's pickle may contain: (module, name)
_ALLOWED: set[tuple[str, str]] = {
    ("river.drift.adwin", "ADWIN"),
    ("river._river_rust.drift", "AdaptiveWindowing"),
    ("river.drift.page_hinkley", "PageHinkley"),
    ("river.drift.kswin", "KSWIN"),
    ("river.drift.binary.ddm", "DDM"),
    ("river.drift.binary.eddm", "EDDM"),
    ("river.drift.binary.hddm_a", "HDDMA"),
    ("river.drift.binary.fhddm", "FHDDM"),
    ("river.stats.mean", "Mean"),
    ("river.stats.var", "Var"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy", "dtype"),
    ("collections", "deque"),
    ("random", "Random"),
}

DETECTORS: dict[str, tuple[str, str, str]] = {
    # name: (module, class, input)
    "adwin": ("river.drift.adwin", "ADWIN", "loss"),
    "page_hinkley": ("river.drift.page_hinkley", "PageHinkley", "loss"),
    "kswin": ("river.drift.kswin", "KSWIN", "loss"),
    "ddm": ("river.drift.binary.ddm", "DDM", "error"),
    "eddm": ("river.drift.binary.eddm", "EDDM", "error"),
    "hddm_a": ("river.drift.binary.hddm_a", "HDDMA", "error"),
    "fhddm": ("river.drift.binary.fhddm", "FHDDM", "error"),
}

# defaults that differ from river's, chosen by measurement (module docstring); loss
# detectors see the loss divided by its slow average, clipped at RELATIVE_CLIP
DEFAULT_PARAMS: dict[str, dict[str, Any]] = {
    "page_hinkley": {"mode": "up", "delta": 0.5, "threshold": 50.0},
    "kswin": {"alpha": 1e-4, "seed": 0},
}
RELATIVE_CLIP = 5.0


def _safe_getattr(obj: Any, name: str) -> Any:
    """``getattr`` as pickles of bound methods need it, for allow-listed objects only."""
    cls = type(obj)
    if (cls.__module__, cls.__name__) not in _ALLOWED or name.startswith("__"):
        raise pickle.UnpicklingError(f"refusing getattr({cls.__name__}, {name!r})")
    if not callable(getattr(cls, name, None)):
        raise pickle.UnpicklingError(f"refusing getattr({cls.__name__}, {name!r}): not a method")
    return getattr(obj, name)


def _import(module: str) -> Any:
    """Import the river module of a detector; ``river.drift``'s package init runs on first use."""
    _defer_package_init("river.drift")
    return importlib.import_module(module)


def _defer_package_init(name: str) -> None:
    """Register package ``name`` so that importing one of its submodules does not run the
    package's ``__init__``; the init runs, in full, the first time a name it defines is asked
    for (``from river.drift import KSWIN`` still works, as does anything else using it).

    ``river.drift``'s init imports every detector and river's data sets, among them KSWIN,
    which imports ``scipy.stats``: 1.8-2.5 s on a slow 2-core gateway (0.3 s for the two
    detectors the agent uses by default), paid before the first reading on every start,
    after a crash too. A no-op when the package is already imported."""
    if name in sys.modules:
        return
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None or spec.submodule_search_locations is None:
        return
    package = types.ModuleType(name)
    package.__spec__ = spec
    package.__loader__ = spec.loader
    package.__file__ = spec.origin
    package.__path__ = list(spec.submodule_search_locations)
    package.__package__ = name
    loader = spec.loader

    def run_init(attr: str) -> Any:
        del package.__dict__["__getattr__"]
        loader.exec_module(package)
        return getattr(package, attr)

    package.__getattr__ = run_init  # type: ignore[attr-defined]
    sys.modules[name] = package
    parent, _, child = name.rpartition(".")
    if parent in sys.modules:
        setattr(sys.modules[parent], child, package)


def import_detectors(names: set[str] | list[str]) -> None:
    """Import the river modules of these detectors now (each detector's first use would).

    The CLI calls it before ``gc.freeze()``: what is imported after the freeze (river and
    what it imports, ~9,000 objects) stays in the collector's oldest generation, and each
    full collection walks it again."""
    for name in names:
        if name in DETECTORS:
            _import(DETECTORS[name][0])


class _AllowListUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("builtins", "getattr"):
            return _safe_getattr
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a checkpoint")
        return getattr(_import(module), name)


def safe_loads(data: bytes) -> Any:
    """Unpickle a detector, refusing anything but river's detector and statistics classes.

    >>> import pickle, os
    >>> safe_loads(pickle.dumps(os.system))
    Traceback (most recent call last):
    ...
    _pickle.UnpicklingError: refusing to load posix.system from a checkpoint
    """
    return _AllowListUnpickler(io.BytesIO(data)).load()


class RiverDetector:
    """One river drift detector, by name.

    Parameters
    ----------
    name
        A key of :data:`DETECTORS`.
    params
        Keyword arguments for the river class (over :data:`DEFAULT_PARAMS`).

    >>> d = RiverDetector("page_hinkley")
    >>> any(d.update(0.5) for _ in range(1000))
    False
    >>> any(d.update(5.0) for _ in range(100))
    True
    """

    def __init__(self, name: str, params: dict[str, Any] | None = None) -> None:
        if name not in DETECTORS:
            raise ValueError(f"unknown detector {name!r}; choose from {sorted(DETECTORS)}")
        module, cls, self.input = DETECTORS[name]
        self.name = name
        self.params = {**DEFAULT_PARAMS.get(name, {}), **(params or {})}
        self._detector = getattr(_import(module), cls)(**self.params)

    def update(self, value: float) -> bool:
        self._detector.update(value)
        return bool(self._detector.drift_detected)

    def state(self) -> str:
        return base64.b64encode(pickle.dumps(self._detector, protocol=4)).decode()

    def load(self, state: str) -> None:
        detector = safe_loads(base64.b64decode(state))
        module, cls, _ = DETECTORS[self.name]
        if type(detector).__name__ != cls:
            raise ValueError(f"checkpoint holds a {type(detector).__name__}, expected {cls}")
        self._detector = detector


class LossMonitor:
    """Fast and slow moving averages of the loss, with spike and plateau flags.

    >>> m = LossMonitor(fast=0.1, slow=0.01, patience=50)
    >>> for _ in range(200): m.update(1.0)
    >>> m.plateau, m.spike
    (True, False)
    >>> for _ in range(20): m.update(10.0)
    >>> m.spike
    True
    """

    def __init__(self, fast: float = 0.05, slow: float = 0.005, spike_ratio: float = 2.0,
                 patience: int = 2000, tolerance: float = 0.01, warmup: int = 100) -> None:
        if not 0 < slow < fast <= 1:
            raise ValueError(f"need 0 < slow < fast <= 1, got slow={slow}, fast={fast}")
        self.fast_alpha = fast
        self.slow_alpha = slow
        self.spike_ratio = spike_ratio
        self.patience = patience
        self.tolerance = tolerance
        self.warmup = warmup
        self.n = 0
        self.fast = 0.0
        self.slow = 0.0
        self._best = math.inf
        self._since_best = 0

    def update(self, loss: float) -> None:
        self.n += 1
        if self.n == 1:
            self.fast = self.slow = loss
        else:
            self.fast += self.fast_alpha * (loss - self.fast)
            self.slow += self.slow_alpha * (loss - self.slow)
        if self.slow < self._best * (1 - self.tolerance):
            self._best = self.slow
            self._since_best = 0
        else:
            self._since_best += 1

    @property
    def ratio(self) -> float:
        """Fast over slow average: above 1 the loss is rising."""
        return self.fast / self.slow if self.slow > 1e-12 else 1.0

    @property
    def spike(self) -> bool:
        return self.n > self.warmup and self.ratio > self.spike_ratio

    @property
    def plateau(self) -> bool:
        return self.n > self.warmup and self._since_best >= self.patience

    def reset_plateau(self) -> None:
        self._best = self.slow
        self._since_best = 0

    def state(self) -> dict[str, Any]:
        return {"n": self.n, "fast": self.fast, "slow": self.slow,
                "best": None if math.isinf(self._best) else self._best, "since_best": self._since_best}

    def load(self, state: dict[str, Any]) -> None:
        self.n = int(state["n"])
        self.fast = float(state["fast"])
        self.slow = float(state["slow"])
        self._best = math.inf if state["best"] is None else float(state["best"])
        self._since_best = int(state["since_best"])


@dataclass(frozen=True, slots=True)
class DriftSignal:
    """A debounced drift: which detectors fired and the loss ratio (fast/slow) then."""

    detectors: tuple[str, ...]
    statistic: float
    loss_before: float


class DriftMonitor:
    """Debounced drift detection on the prequential loss (and 0/1 errors).

    Parameters
    ----------
    detectors
        Detector names (see :data:`DETECTORS`); error-based ones are fed only for
        classification.
    grace
        Steps after start (or after a reset) during which nothing fires.
    cooldown
        Steps after a drift during which nothing fires.
    min_agree, agree_window
        With several detectors: how many must fire within how many steps.
    rise
        A detection counts only if the fast loss average exceeds the slow one by
        this factor (the loss went up).
    params
        Per-detector keyword arguments.
    loss_floor
        Regression losses below this (squared error in units of the target's
        variance: 0.05 is an error of about 22% of its standard deviation) count as
        this much when taking ratios, so a model that fits very well does not see
        drift in wobbles of an already tiny loss.
    """

    def __init__(self, detectors: list[str] | tuple[str, ...] = ("page_hinkley", "hddm_a"), grace: int = 500,
                 cooldown: int = 1000, min_agree: int = 1, agree_window: int = 100, rise: float = 1.3,
                 params: dict[str, dict[str, Any]] | None = None, loss_floor: float = 0.05) -> None:
        if not detectors:
            raise ValueError("need at least one detector")
        if not 1 <= min_agree <= len(detectors):
            raise ValueError(f"min_agree must be within 1..{len(detectors)}, got {min_agree}")
        self.detectors = [RiverDetector(d, (params or {}).get(d)) for d in detectors]
        self.grace = grace
        self.cooldown = cooldown
        self.min_agree = min_agree
        self.agree_window = agree_window
        self.rise = rise
        self.loss_floor = loss_floor
        self.loss = LossMonitor()
        self.t = 0
        self._quiet_until = grace
        self._fired_at: dict[str, int] = {}

    def update(self, loss: float, error: float | None = None) -> DriftSignal | None:
        """Feed one step's loss (and 0/1 error); returns a DriftSignal when drift is declared."""
        self.t += 1
        before = self.loss.slow
        # loss detectors see the loss relative to its slow average (clipped), so their
        # thresholds mean the same on every scale: a trained model's loss may sit at 0.01
        # or at 10, and a single outlier should not look like a drift
        scale = max(before, self.loss_floor)
        relative = min(loss / scale, RELATIVE_CLIP)
        self.loss.update(loss)
        for d in self.detectors:
            # classification: only the error detectors, which are built for 0/1 streams (the
            # relative error of a 2%-error classifier jumps 3x on three mistakes in a row)
            value = (relative if error is None else None) if d.input == "loss" else error
            if value is not None and d.update(value):
                self._fired_at[d.name] = self.t
        if self.t < self._quiet_until:
            self._fired_at.clear()  # alarms during grace or cooldown do not carry over
            return None
        recent = tuple(sorted(n for n, at in self._fired_at.items() if self.t - at < self.agree_window))
        ratio = self.loss.fast / max(self.loss.slow, self.loss_floor if error is None else 1e-12)
        if len(recent) < self.min_agree or ratio < self.rise:
            return None
        self._quiet_until = self.t + self.cooldown
        self._fired_at.clear()
        return DriftSignal(recent, round(ratio, 6), before)

    def state(self) -> dict[str, Any]:
        return {"t": self.t, "quiet_until": self._quiet_until, "fired_at": self._fired_at,
                "loss": self.loss.state(), "detectors": {d.name: d.state() for d in self.detectors}}

    def load(self, state: dict[str, Any]) -> None:
        self.t = int(state["t"])
        self._quiet_until = int(state["quiet_until"])
        self._fired_at = {k: int(v) for k, v in state["fired_at"].items()}
        self.loss.load(state["loss"])
        for d in self.detectors:
            d.load(state["detectors"][d.name])
