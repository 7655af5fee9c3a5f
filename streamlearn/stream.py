"""One configured stream at run time: features -> predict -> label join -> learn.

A :class:`StreamRunner` turns each decoded :class:`~streamlearn.codec.Reading` of
its stream into a prediction message and, when a target is known, one learning
step. It keeps one :class:`Slot` per model: one per device (``per_device``) or
one shared by all devices of the stream. Targets arrive in one of three ways:

* ``payload``: in the reading itself; the model predicts first, then learns
  (test-then-train).
* ``topic``: in a later label message with the reading's id; the reading waits
  in a bounded pending table for at most ``ttl_seconds`` of stream time.
* ``forecast``: the value of a field ``horizon`` readings later on the same
  device. The model first learns from the reading ``horizon`` steps back, then
  forecasts from the current one; the size of the error it just learned from,
  relative to its recent errors, is published as an anomaly score.

Everything here is deterministic given the inbox rows and the saved state, which
is what makes replay after a crash land on exactly the same model.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any

import numpy as np
import orjson

from streamlearn.codec import Reading
from streamlearn.config import StreamConfig
from streamlearn.features import FeatureState
from streamlearn.learner import Learner
from streamlearn.models import ModelShape
from streamlearn.monitors import DriftMonitor
from streamlearn.schedulers import LRPolicy, make_policy
from streamlearn.store import DriftEvent, InboxRow, SlotState

logger = logging.getLogger(__name__)

F32 = np.float32
SHARED = "*"
EWMA_ALPHA = 0.01
_DIGEST_MOD = 1 << 64
# a stream's metrics row: totals of these counts over its models, then averages of these figures
# over the models that have them (Slot.metric_values gives them in this order)
METRIC_FIGURES = ("messages", "labelled", "batched", "learned", "skipped", "loss", "error", "baseline_error", "lr")
N_METRIC_COUNTS = 5


class SlotMetrics:
    """Prequential figures of one model, as exponentially weighted averages.

    ``loss`` is on the model's scale (squared error of the standardised target,
    or log loss); ``error`` is the absolute error in the target's units (or the
    error rate); ``baseline_error`` is the same error of the naive baseline
    (the running mean of the targets so far, or the majority class so far).
    """

    __slots__ = ("messages", "labelled", "batched", "loss", "error", "baseline_error", "abs_err_scale",
                 "_target_n", "_target_mean", "_class_counts")

    def __init__(self, n_classes: int) -> None:
        self.messages = 0
        self.labelled = 0
        self.batched = 0  # labelled readings learned in micro-batches (not strictly test-then-train)
        self.loss: float | None = None
        self.error: float | None = None
        self.baseline_error: float | None = None
        self.abs_err_scale: float | None = None
        self._target_n = 0
        self._target_mean = 0.0
        self._class_counts = [0] * n_classes

    @staticmethod
    def _ewma(old: float | None, new: float) -> float:
        return new if old is None else old + EWMA_ALPHA * (new - old)

    def record_regression(self, y: float, predicted: float, scale: float) -> float:
        """Record one labelled prediction; returns its anomaly score (error / usual error)."""
        self.labelled += 1
        err = abs(y - predicted)
        usual = self.abs_err_scale
        score = err / usual if usual and usual > 1e-12 else 0.0
        self.loss = self._ewma(self.loss, (err / scale) ** 2)
        self.error = self._ewma(self.error, err)
        self.abs_err_scale = self._ewma(self.abs_err_scale, err)
        if self._target_n > 0:
            self.baseline_error = self._ewma(self.baseline_error, abs(y - self._target_mean))
        self._target_n += 1
        self._target_mean += (y - self._target_mean) / self._target_n
        return score

    def record_class(self, y: int, probs: np.ndarray) -> float:
        """Record one labelled prediction; returns its 0/1 error."""
        self.labelled += 1
        p = float(probs[y])
        wrong = float(int(np.argmax(probs)) != y)
        self.loss = self._ewma(self.loss, -math.log(max(p, 1e-12)))
        self.error = self._ewma(self.error, wrong)
        if sum(self._class_counts) > 0:
            majority = int(np.argmax(self._class_counts))
            self.baseline_error = self._ewma(self.baseline_error, float(majority != y))
        self._class_counts[y] += 1
        return wrong

    def state(self) -> dict[str, Any]:
        return {
            "messages": self.messages, "labelled": self.labelled, "batched": self.batched, "loss": self.loss,
            "error": self.error, "baseline_error": self.baseline_error,
            "abs_err_scale": self.abs_err_scale, "target_n": self._target_n,
            "target_mean": self._target_mean, "class_counts": self._class_counts,
        }

    def load(self, state: dict[str, Any]) -> None:
        self.messages = int(state["messages"])
        self.labelled = int(state["labelled"])
        self.batched = int(state.get("batched", 0))
        self.loss = state["loss"]
        self.error = state["error"]
        self.baseline_error = state["baseline_error"]
        self.abs_err_scale = state["abs_err_scale"]
        self._target_n = int(state["target_n"])
        self._target_mean = float(state["target_mean"])
        self._class_counts = [int(c) for c in state["class_counts"]]


def make_learner(shape: ModelShape, config: StreamConfig, population: int = 1,
                 scratch: dict[tuple[int, int], np.ndarray] | None = None, linear_copies: int = 0) -> Learner:
    """The learner of the configured engine (``auto`` = fused for every model kind so far)."""
    if config.model.engine == "torch":
        if population != 1:
            raise ValueError("engine 'torch' trains one copy; the population policy needs the fused engine")
        from streamlearn.learner_torch import TorchLearner  # imports torch: ~220 MB, ~1 s

        return TorchLearner(shape, config.task, config.optimizer, seed=config.model.seed)  # type: ignore[return-value]
    return Learner(shape, config.task, config.optimizer, seed=config.model.seed, population=population,
                   outlier_z=config.guard.outlier_z, accept_after=config.guard.accept_after, scratch=scratch,
                   linear_copies=linear_copies)


class RollbackGuard:
    """Keeps the last good model of a slot, and rolls back to it when it clearly does better.

    While the slot is healthy (its fast loss average near its slow one) the guard
    snapshots the served copy's parameters and the target scaling every
    ``snapshot_every`` labelled readings. When the loss spikes or a drift is
    declared, a trial starts: for up to ``trial`` readings the snapshot (frozen)
    predicts each labelled reading alongside the live model. If, after at least
    100 readings, the snapshot's recent error is below ``margin`` times the live
    model's and the paired difference is significant (z > 4 on moving averages
    of the per-reading differences), the live model was poisoned (a burst of wrong
    labels) and every copy goes back to the snapshot. After a genuine drift the
    frozen snapshot is the worse one, so nothing happens. A new spike (the loss
    ratio crossing 3 from below) during a trial the live model is winning starts
    the trial again with a fresh snapshot: a drift must not use up the guard
    before a poisoned burst arrives.
    """

    def __init__(self, learner: Learner, snapshot_every: int, trial: int, margin: float) -> None:
        self.snapshot_every = snapshot_every
        self.trial = trial
        self.margin = margin
        self._snapshots: list[tuple[int, np.ndarray, list[float]]] = []  # (step, params, target), newest last
        self._since_snapshot = 0
        self._shadow: Learner | None = None
        self._shadow_step = 0
        self._trial_n = 0
        self._trial_avg = [0.0, 0.0, 0.0, 0.0]  # moving averages: live error, snapshot error, diff, diff²
        self._spiking = False  # the loss ratio was above 3 at the last step
        self._shape = (learner.shape, learner.task, learner.optimizer_config)

    @property
    def in_trial(self) -> bool:
        return self._shadow is not None

    def observe(self, learner: Learner, serving: int, healthy: bool) -> None:
        """After a successful step: maybe take a snapshot."""
        self._since_snapshot += 1
        # not during a trial: the live model is suspect until the trial ends (a burst of wrong
        # labels lowers the fast/slow loss ratio again within a few hundred readings)
        if healthy and self._shadow is None and self._since_snapshot >= self.snapshot_every:
            self._snapshots.append((learner.version, learner.net.params[serving].copy(), learner.target.state()))
            self._snapshots = self._snapshots[-3:]
            self._since_snapshot = 0

    def watch(self, learner: Learner, spiking: bool, drift: bool) -> None:
        """Each labelled step: a drift signal or the start of a spike starts (or restarts) a trial."""
        if drift or (spiking and not self._spiking):
            self.start_trial(learner)
        self._spiking = spiking

    def start_trial(self, learner: Learner) -> bool:
        """A spike or a drift: compare the newest snapshot at least 100 steps old with the live model
        (a trial under way is replaced only while the live model is winning it)."""
        if self._shadow is not None and (self._trial_n < 100 or self._trial_avg[2] > 0.0):
            return False
        old = [snap for snap in self._snapshots if snap[0] <= learner.version - 100]
        if not old:
            return False
        self._shadow_step, params, target = old[-1]
        shape, task, optimizer = self._shape
        shadow = Learner(shape, task, optimizer)
        shadow.net.params[0] = params
        shadow.target.load(target)
        self._shadow = shadow
        self._trial_n = 0
        self._trial_avg = [0.0, 0.0, 0.0, 0.0]
        return True

    def compare(self, x: np.ndarray, live_error: float, y: float) -> bool:
        """Score one labelled reading; True when the live model should roll back."""
        shadow = self._shadow
        if shadow is None:
            return False
        return self._score(shadow.predict_one(x)[0], live_error, y)

    def compare_many(self, X: np.ndarray, live_errors: list[float], ys: list[float]) -> int | None:
        """:meth:`compare` over a micro-batch, the snapshot predicting it in one call: the index
        of the reading after which the live model should roll back, or None."""
        shadow = self._shadow
        if shadow is None:
            return None
        for i, (predicted, live_error, y) in enumerate(zip(shadow.predict_many(X)[0], live_errors, ys)):
            if self._score(predicted, live_error, y):
                return i
            if self._shadow is None:  # the trial ended
                return None
        return None

    def _score(self, predicted: Any, live_error: float, y: float) -> bool:
        shadow = self._shadow
        assert shadow is not None
        if shadow.task == "regression":
            shadow_error = abs(y - float(predicted))
        elif shadow.task == "binary":
            shadow_error = float((float(predicted) > 0.5) != (y > 0.5))
        else:
            shadow_error = float(int(np.argmax(predicted)) != int(y))
        self._trial_n += 1
        weight = max(1.0 / 100, 1.0 / self._trial_n)
        diff = live_error - shadow_error
        avg = self._trial_avg
        for i, value in enumerate((live_error, shadow_error, diff, diff * diff)):
            avg[i] += weight * (value - avg[i])
        if self._trial_n >= 100:
            n_eff = min(self._trial_n, 199)  # what a moving average with weight 1/100 holds
            z = avg[2] / math.sqrt(max(avg[3] - avg[2] ** 2, 1e-24) / n_eff)
            if z > 4.0 and avg[1] < self.margin * avg[0]:
                return True
        if self._trial_n >= self.trial:
            self._shadow = None
        return False

    def roll_back(self, learner: Learner) -> int:
        """Put the snapshot into every copy of the network (a population's linear copies, cheap to
        retrain, learn on); returns the step it was taken at."""
        assert self._shadow is not None
        step = self._shadow_step
        learner.net.params[:] = self._shadow.net.params[0]
        for name, arr in learner.state_arrays().items():
            if name != "params" and not name.startswith("linear."):
                arr[...] = 0.0  # the optimizer's moments belonged to the poisoned trajectory
        learner.target.load(self._shadow.target.state())
        learner.version += 1
        self._shadow = None
        self._since_snapshot = 0
        return step

    def state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        arrays = {f"guard.snapshot{i}": p[None, :] for i, (_, p, _) in enumerate(self._snapshots)}
        if self._shadow is not None:
            arrays["guard.shadow"] = self._shadow.net.params
        return arrays, {
            "snapshots": [[step, target] for step, _, target in self._snapshots],
            "since_snapshot": self._since_snapshot,
            "shadow_target": None if self._shadow is None else self._shadow.target.state(),
            "shadow_step": self._shadow_step,
            "trial_n": self._trial_n, "trial_avg": self._trial_avg, "spiking": self._spiking,
        }

    def load(self, arrays: dict[str, np.ndarray], state: dict[str, Any]) -> None:
        self._snapshots = [(int(step), arrays[f"guard.snapshot{i}"][0].copy(), list(target))
                           for i, (step, target) in enumerate(state["snapshots"])]
        self._since_snapshot = int(state["since_snapshot"])
        self._trial_n = int(state["trial_n"])
        self._trial_avg = [float(v) for v in state["trial_avg"]]
        self._spiking = bool(state.get("spiking", False))
        self._shadow_step = int(state["shadow_step"])
        self._shadow = None
        if state["shadow_target"] is not None:
            shape, task, optimizer = self._shape
            self._shadow = Learner(shape, task, optimizer)
            self._shadow.net.params[...] = arrays["guard.shadow"]
            self._shadow.target.load(state["shadow_target"])


class Slot:
    """One model with its features, learning-rate policy, drift monitor and metrics.

    The agent's :class:`StreamRunner` and the accuracy benchmark drive a slot the
    same way: ``x = features_for(device, values)``, ``predict(x)``, then, once the
    target is known, ``learn(x, y, predicted)``.
    """

    def __init__(self, key: str, config: StreamConfig,
                 scratch: dict[tuple[int, int], np.ndarray] | None = None,
                 unsaved: dict[str, int] | None = None, since: int = 0) -> None:
        self.key = key
        self.task = config.task
        self.features = FeatureState(len(config.features), config.lags)
        shape = ModelShape(
            n_in=self.features.dim,
            hidden=tuple(config.model.hidden) if config.model.kind == "mlp" else (),
            n_out=config.n_outputs,
            activation=config.model.activation,
        )
        schedule = config.schedule
        if not shape.hidden or config.model.engine == "torch":  # linear copies go beside a network
            schedule = schedule.model_copy(update={"linear_copies": 0})
        self.policy: LRPolicy = make_policy(schedule, config.optimizer.lr)
        linear = self.policy.linear_copies
        self.learner = make_learner(shape, config, self.policy.population - linear, scratch, linear)
        self.learner.lr = self.policy.lr()
        d = config.drift
        self.drift = DriftMonitor(d.detectors, grace=d.grace, cooldown=d.cooldown, min_agree=d.min_agree,
                                  agree_window=d.agree_window, rise=d.rise, params=dict(d.params))
        self.metrics = SlotMetrics(config.n_outputs if config.task == "multiclass" else 2)
        g = config.guard
        self.guard = RollbackGuard(self.learner, g.snapshot_every, g.trial, g.margin) if g.rollback \
            and isinstance(self.learner, Learner) else None
        # forecast: per device, the readings still waiting for their target
        self.waiting: dict[str, deque[tuple[np.ndarray, Any, int]]] = {}
        # the inbox position of its saved state: a restart replays its readings after it (for a
        # model never saved, the position just before its first reading)
        self.since = since
        # changed since it was last saved; ``unsaved`` (its runner's) holds ``since`` of each model
        # that is, so that a checkpoint finds them without visiting every model
        self.dirty = True
        self.unsaved = unsaved
        if unsaved is not None:
            unsaved[key] = since

    def _changed(self) -> None:
        if not self.dirty:
            self.mark_changed()

    def mark_changed(self) -> None:
        """Changed since it was last saved (a checkpoint that was to save it was abandoned)."""
        self.dirty = True
        if self.unsaved is not None:
            self.unsaved[self.key] = self.since

    def mark_saved(self) -> None:
        """A checkpoint has taken its state as it is now."""
        self.dirty = False
        if self.unsaved is not None:
            self.unsaved.pop(self.key, None)

    def saved_at(self, position: int) -> None:
        """The checkpoint that took its state is complete, at ``position``."""
        self.since = max(self.since, position)
        if self.dirty and self.unsaved is not None:
            self.unsaved[self.key] = self.since

    def metric_values(self) -> tuple[float, ...]:
        """Its figures for the stream's metrics row, as ``METRIC_FIGURES`` names them (NaN: none yet)."""
        m, learner = self.metrics, self.learner
        lr = learner.lr
        if isinstance(lr, np.ndarray):
            lr = lr[self.policy.serving()]
        nan = math.nan
        return (m.messages, m.labelled, m.batched, learner.n_learned, learner.n_skipped,
                nan if m.loss is None else m.loss, nan if m.error is None else m.error,
                nan if m.baseline_error is None else m.baseline_error, nan if lr is None else lr)

    def features_for(self, device: str, values: list[float]) -> np.ndarray:
        self._changed()
        return self.features.transform(device, values)

    def predict(self, x: np.ndarray) -> Any:
        """The served prediction: a value, P(class 1), or class probabilities."""
        out = self.learner.predict_one(x)
        return out[self.policy.serving()]

    @property
    def lr(self) -> float:
        lr = self.learner.lr
        return float(lr[self.policy.serving()]) if isinstance(lr, np.ndarray) else float(lr)

    def learn(self, x: np.ndarray, y: float, predicted: Any) -> tuple[float | None, list[tuple[Any, ...]]]:
        """Record the prediction made for ``x``, then take one step on ``(x, y)``.

        Returns the anomaly score (regression) and the drift/decision events as
        ``(detector, statistic, action, lr_before, lr_after, loss_before)`` tuples.
        """
        self._changed()
        score: float | None = None
        error: float | None = None
        if self.task == "regression":
            score = self.metrics.record_regression(y, float(predicted), self.learner.target.std)
            live_error = abs(y - float(predicted))
        else:
            probs = np.array([1.0 - float(predicted), float(predicted)]) if self.task == "binary" \
                else np.asarray(predicted, dtype=np.float64)
            error = self.metrics.record_class(int(y), probs)
            live_error = error
        events: list[tuple[Any, ...]] = []
        self._guard_compare(x, live_error, y, events)
        serving = self.policy.serving()
        self.learner.lr = self.policy.lr()
        loss = self.learner.learn_one(x, y)
        if loss is None:
            return score, events
        t = self.learner.version
        decision = self.policy.update(self.learner, loss, t)
        if decision is not None:
            events.append(("policy", None, decision.action, decision.lr_before, decision.lr_after,
                           self.drift.loss.slow))
        # classification is watched through its error rate: the log loss of a confident model on
        # noisy labels keeps rising with no drift at all (measured on river's Hyperplane)
        signal = self.drift.update(float(loss[serving]) if error is None else error, error)
        self._after_monitor(signal, t, events)
        return score, events

    def _guard_compare(self, x: np.ndarray, live_error: float, y: float, events: list[tuple[Any, ...]]) -> None:
        """During a guard trial, score the snapshot on this reading and roll back if it wins."""
        guard = self.guard
        if guard is not None and guard.in_trial and guard.compare(x, live_error, y):
            self._roll_back(events)

    def _roll_back(self, events: list[tuple[Any, ...]]) -> None:
        """The guard's snapshot won its trial: it replaces the live model."""
        guard = self.guard
        assert guard is not None
        lr = self.lr
        step = guard.roll_back(self.learner)
        self.policy.prefer_kind(0)  # serve what was restored
        logger.info("rolled back model %s to its snapshot of step %d: it predicts clearly better", self.key, step)
        events.append(("guard", None, "rollback", lr, lr, self.drift.loss.slow))

    def _after_monitor(self, signal: Any, t: int, events: list[tuple[Any, ...]]) -> None:
        """A drift signal goes to the policy (and into the history); the guard watches the loss."""
        if signal is not None:
            lr_before = self.lr
            decision = self.policy.on_drift(self.learner, t)
            action, lr_after = (decision.action, decision.lr_after) if decision else ("none", lr_before)
            events.append(("+".join(signal.detectors), signal.statistic, action, lr_before, lr_after,
                           signal.loss_before))
        guard = self.guard
        if guard is not None:
            monitor = self.drift.loss
            floor = self.drift.loss_floor if self.task == "regression" else 1e-12
            ratio = monitor.fast / max(monitor.slow, floor)
            if monitor.n > 500:
                guard.watch(self.learner, spiking=ratio > 3.0, drift=signal is not None)
            # the guard keeps snapshots of the network's best copy (a population's linear copies have none)
            guard.observe(self.learner, self.policy.best_of_kind(0), healthy=ratio < 1.5)

    def predict_many(self, X: np.ndarray) -> np.ndarray:
        """Served predictions for a batch, all from the model as it is now."""
        return self.learner.predict_many(X)[self.policy.serving()]

    def learn_many(self, X: np.ndarray, ys: list[float], predicted: list[Any]) -> list[tuple[Any, ...]]:
        """One micro-batch step: record each reading's prediction, then learn them all at once.

        The drift monitor and the rollback guard still see every reading.
        """
        self._changed()
        monitor_values: list[tuple[float, float | None]] = []
        events: list[tuple[Any, ...]] = []
        std = self.learner.target.std
        live_errors: list[float] = []
        for y, p in zip(ys, predicted):
            if self.task == "regression":
                self.metrics.record_regression(y, float(p), std)
                live_errors.append(abs(y - float(p)))
                monitor_values.append((((y - float(p)) / std) ** 2, None))
            else:
                probs = np.array([1.0 - float(p), float(p)]) if self.task == "binary" \
                    else np.asarray(p, dtype=np.float64)
                live_error = self.metrics.record_class(int(y), probs)
                live_errors.append(live_error)
                monitor_values.append((live_error, live_error))
        guard = self.guard
        if guard is not None and guard.in_trial and guard.compare_many(X, live_errors, ys) is not None:
            self._roll_back(events)
        self.metrics.batched += len(ys)
        self.learner.lr = self.policy.lr()
        loss = self.learner.learn_many(X, np.asarray(ys, dtype=np.float64))
        if loss is None:
            return events
        t = self.learner.version
        decision = self.policy.update(self.learner, loss, t)
        if decision is not None:
            events.append(("policy", None, decision.action, decision.lr_before, decision.lr_after,
                           self.drift.loss.slow))
        signal = None
        for value, error in monitor_values:
            found = self.drift.update(value, error)
            if found is not None and signal is None:
                signal = found
        self._after_monitor(signal, t, events)
        return events

    def to_state(self, stream: str) -> SlotState:
        tensors = dict(self.learner.state_arrays())
        guard_state = None
        if self.guard is not None:
            guard_arrays, guard_state = self.guard.state()
            tensors.update(guard_arrays)
        return SlotState(
            stream=stream,
            model_key=self.key,
            tensors=tensors,
            state={
                "guard": guard_state,
                "learner": self.learner.state_scalars(),
                "features": self.features.state(),
                "metrics": self.metrics.state(),
                "policy": self.policy.state(),
                "drift": self.drift.state(),
                "waiting": {
                    d: [[x.tolist(), _jsonable(p), h] for x, p, h in q] for d, q in self.waiting.items()
                },
            },
        )

    def snapshot(self, stream: str) -> SlotState:
        """``to_state`` as a copy that later learning cannot change (tensors copied, state serialised)."""
        saved = self.to_state(stream)
        saved.tensors = {name: np.array(arr, copy=True) for name, arr in saved.tensors.items()}
        saved.state_json = orjson.dumps(saved.state, option=orjson.OPT_SERIALIZE_NUMPY).decode()
        return saved

    def load(self, saved: SlotState, horizon: int) -> None:
        self.learner.load_state({k: v for k, v in saved.tensors.items() if not k.startswith("guard.")},
                                saved.state["learner"])
        if self.guard is not None and saved.state.get("guard") is not None:
            self.guard.load(saved.tensors, saved.state["guard"])
        self.features.load(saved.state["features"])
        self.metrics.load(saved.state["metrics"])
        self.policy.load(saved.state["policy"])
        self.drift.load(saved.state["drift"])
        self.waiting = {
            d: deque(((np.asarray(x, dtype=F32), p, int(h)) for x, p, h in q), maxlen=horizon)
            for d, q in saved.state["waiting"].items()
        }
        self.since = saved.position if saved.position is not None else 0
        self.mark_saved()


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


class StreamRunner:
    """Runs one stream; ``handle`` returns the messages to publish."""

    def __init__(self, config: StreamConfig, topic_prefix: str, gateway: str) -> None:
        self.config = config
        self.name = config.name
        self.task = config.task
        self.source = config.label.source
        self.horizon = config.label.horizon
        self.classes = list(config.classes) if config.classes is not None else None
        self.slots: dict[str, Slot] = {}
        self._scratch: dict[tuple[int, int], np.ndarray] = {}  # gradient buffers the slots share
        self._topic_base = f"{topic_prefix}/{gateway}/{config.name}"
        self.drift_topic = f"{self._topic_base}/drift"
        self._prediction_topics: dict[str, str] = {}
        # topic labels: join id -> (slot key, x, served prediction, payload hash, received_at)
        self.pending: OrderedDict[str, tuple[str, np.ndarray, Any, int, float]] = OrderedDict()
        self.counters = {
            "labels_unmatched": 0, "readings_expired": 0, "dead_letters": 0,
            "learned_count": 0, "learned_digest": 0,
        }
        self.events: list[DriftEvent] = []  # since the last checkpoint
        # the highest sequence number seen per sequence scope (device and boot), newest scopes last
        self.last_seq: OrderedDict[str, int] = OrderedDict()
        # a checkpoint being written in steps: models it still has to write, as they were at its
        # position (a model about to change is written first, or copied, see _before_change)
        self._capture_pending: set[str] = set()
        self._captured: dict[str, SlotState] = {}
        self._capture_written: set[str] = set()
        self._capture_write: Callable[[SlotState], bool] | None = None
        # micro-batches learned since the agent last took them (seqs of their rows), to be
        # recorded with the rows; and, in a replay, the recorded ones still being gathered
        self.micro_batches: list[list[int]] = []
        self._replay_groups: dict[
            str, tuple[int, Slot, list[tuple[InboxRow, Reading, float | None, np.ndarray]], bool]] = {}
        # replaying the readings of a model whose saved state is older than the checkpoint's
        # position (catch_up): only the model changes, the stream's own state is at that position
        self._catching_up = False
        self._capture_keys: list[str] = []
        # the models changed since they were last saved, with the position of their saved state
        # (their Slot.dirty, kept by the slots): a checkpoint names them without visiting every model
        self._unsaved: dict[str, int] = {}
        # the metrics row's figures, one row per model (Slot.metric_values), brought up to date for
        # the models that handled readings since (refresh_metrics): a checkpoint sums them in C
        # instead of visiting every model's objects (2 ms with a thousand, most of it cache misses)
        self._metric_rows: dict[str, int] = {}
        self._metric_table = np.zeros((16, len(METRIC_FIGURES)))
        self._unsummed: set[str] = set()

    # -- slots --------------------------------------------------------------------

    def slot_key(self, device: str) -> str:
        return device if self.config.per_device else SHARED

    def _slot(self, device: str, seq: int) -> Slot:
        """The model of ``device``, about to change with inbox row ``seq``."""
        key = self.slot_key(device)
        self._unsummed.add(key)
        slot = self.slots.get(key)
        if slot is None:
            slot = self.slots[key] = Slot(key, self.config, self._scratch, self._unsaved, since=seq - 1)
        else:
            self._before_change(slot)
        return slot

    def _before_change(self, slot: Slot) -> None:
        """A checkpoint being written needs the model as it was at its position: write it now
        (in the open transaction, no copy held) or, when the store cannot take it now, copy it."""
        if slot.key in self._capture_pending:
            self._capture_pending.discard(slot.key)
            write = self._capture_write
            if write is not None and write(slot.to_state(self.name)):
                self._capture_written.add(slot.key)
            else:
                self._captured[slot.key] = slot.snapshot(self.name)

    # -- the pipeline ------------------------------------------------------------------

    def handle(self, row: InboxRow, reading: Reading, received_mono: float | None,
               now_mono: float, emit: Callable[[str, bytes], Any] | None = None) -> list[tuple[str, bytes]]:
        """Process one inbox row; returns ``(topic, payload)`` pairs to publish.

        ``emit``: publishes the prediction as soon as it is made, before the model learns
        from the reading (it is not in the list then): the sender waits for its answer, the
        learning need not hold it up.
        """
        out: list[tuple[str, bytes]] = []
        if reading.kind == "label":
            self._on_label(reading, row, out, received_mono is None)
            return out
        if reading.sequence_scope is not None:
            self._saw_sequence(reading.sequence_scope, reading.sequence or 0)
        if self.source == "topic":
            self._expire(row.received_at)
        slot = self._slot(reading.device, row.seq)
        slot.metrics.messages += 1
        x = slot.features_for(reading.device, reading.features)
        extra: dict[str, Any] = {}
        if self.source == "forecast":
            # learn from the reading `horizon` steps back first: its target is known now
            queue = slot.waiting.get(reading.device)
            if queue is None:
                queue = slot.waiting[reading.device] = deque(maxlen=self.horizon)
            y = reading.forecast_value
            assert y is not None
            if len(queue) == self.horizon:
                old_x, old_pred, old_hash = queue.popleft()
                extra["anomaly_score"] = self._learn(slot, old_x, y, old_pred, old_hash, row, out,
                                                     received_mono is None)
            prediction = slot.predict(x)
            queue.append((x, float(prediction), row.payload_hash))
            extra["horizon"] = self.horizon
            self._send_prediction(row, reading, slot, prediction, received_mono, now_mono, extra, out, emit)
        else:
            prediction = slot.predict(x)
            self._send_prediction(row, reading, slot, prediction, received_mono, now_mono, extra, out, emit)
            if self.source == "payload":
                if reading.target is not None:
                    self._learn(slot, x, reading.target, prediction, row.payload_hash, row, out,
                                received_mono is None)
            else:
                assert reading.join_id is not None
                self._add_pending(reading.join_id, slot.key, x, _jsonable(prediction),
                                  row.payload_hash, row.received_at)
        return out

    def _send_prediction(self, row: InboxRow, reading: Reading, slot: Slot, prediction: Any,
                         received_mono: float | None, now_mono: float, extra: dict[str, Any],
                         out: list[tuple[str, bytes]], emit: Callable[[str, bytes], Any] | None) -> None:
        message = (self._prediction_topic(reading.device),
                   self._prediction_payload(row, reading, slot, prediction, received_mono, now_mono, extra))
        if emit is None:
            out.append(message)
        else:
            emit(*message)

    MAX_SEQUENCE_SCOPES = 100_000

    def _saw_sequence(self, scope: str, sequence: int) -> None:
        if self._catching_up:
            return
        self.last_seq[scope] = max(sequence, self.last_seq.get(scope, -1))
        self.last_seq.move_to_end(scope)
        if len(self.last_seq) > self.MAX_SEQUENCE_SCOPES:
            self.last_seq.popitem(last=False)

    def _learn(self, slot: Slot, x: np.ndarray, y: float, predicted: Any, phash: int,
               row: InboxRow, out: list[tuple[str, bytes]], replay: bool) -> float | None:
        score, events = slot.learn(x, y, predicted)
        if not self._catching_up:
            self.counters["learned_count"] += 1
            self.counters["learned_digest"] = (self.counters["learned_digest"] + phash) % _DIGEST_MOD
        self._record_events(slot, events, row, out, replay)
        return score

    def _record_events(self, slot: Slot, events: list[tuple[Any, ...]], row: InboxRow,
                       out: list[tuple[str, bytes]], replay: bool) -> None:
        if self._catching_up:
            return  # stored with the checkpoint this catches up to
        for detector, statistic, action, lr_before, lr_after, loss_before in events:
            # step: readings the model has learned (a micro-batch is one update of several)
            event = DriftEvent(row.received_at, self.name, slot.key, slot.learner.n_learned, detector,
                               statistic, action, lr_before, lr_after, loss_before)
            self.events.append(event)
            body = {
                "stream": self.name, "model": slot.key, "at": event.at, "step": event.step,
                "detector": detector, "statistic": statistic, "action": action,
                "lr_before": lr_before, "lr_after": lr_after, "loss_before": loss_before,
            }
            if replay:
                body["replay"] = True
            out.append((self.drift_topic, orjson.dumps(body)))

    @property
    def batchable(self) -> bool:
        """Micro-batches apply to streams whose labels come in the payload."""
        return self.source == "payload"

    def handle_many(self, items: list[tuple[InboxRow, Reading, float | None]], now_mono: float,
                    size: int, emit: Callable[[str, bytes], Any] | None = None,
                    min_size: int | None = None) -> list[tuple[str, bytes]]:
        """Process a run of readings; a model with ``size`` or more of them learns them ``size``
        at a time (each prediction comes from the model before its micro-batch), and what is left,
        if ``min_size`` readings or more, as one smaller micro-batch; the rest one by one.
        ``emit``: as in ``handle``, each prediction goes out as soon as it is made."""
        assert self.batchable
        out: list[tuple[str, bytes]] = []
        groups: dict[str, list[tuple[InboxRow, Reading, float | None, np.ndarray]]] = {}
        for row, reading, received_mono in items:
            if reading.sequence_scope is not None:
                self._saw_sequence(reading.sequence_scope, reading.sequence or 0)
            slot = self._slot(reading.device, row.seq)
            slot.metrics.messages += 1
            x = slot.features_for(reading.device, reading.features)
            groups.setdefault(slot.key, []).append((row, reading, received_mono, x))
        for key, entries in groups.items():
            slot = self.slots[key]
            full = len(entries) - len(entries) % size
            if len(entries) - full >= (min_size or size):
                full = len(entries)  # the last micro-batch is smaller
            for start in range(0, full, size):
                self._micro_batch(slot, entries[start:start + size], now_mono, out, emit)
            for row, reading, received_mono, x in entries[full:]:
                prediction = slot.predict(x)
                self._send_prediction(row, reading, slot, prediction, received_mono, now_mono, {}, out, emit)
                if reading.target is not None:
                    self._learn(slot, x, reading.target, prediction, row.payload_hash, row, out,
                                received_mono is None)
        return out

    def _micro_batch(self, slot: Slot, entries: list[tuple[InboxRow, Reading, float | None, np.ndarray]],
                     now_mono: float, out: list[tuple[str, bytes]],
                     emit: Callable[[str, bytes], Any] | None = None) -> None:
        if entries[0][2] is not None:  # live: the rows record it, so that a replay does the same
            self.micro_batches.append([e[0].seq for e in entries])
        X = np.stack([e[3] for e in entries])
        predictions = slot.predict_many(X)
        extra = {"micro_batch": len(entries)}
        for (row, reading, received_mono, _), prediction in zip(entries, predictions):
            self._send_prediction(row, reading, slot, prediction, received_mono, now_mono, extra, out, emit)
        labelled = [i for i, e in enumerate(entries) if e[1].target is not None]
        if not labelled:
            return
        events = slot.learn_many(X[labelled], [entries[i][1].target for i in labelled],
                                 [predictions[i] for i in labelled])
        for i in labelled:
            if self._catching_up:
                break
            self.counters["learned_count"] += 1
            self.counters["learned_digest"] = (self.counters["learned_digest"]
                                               + entries[i][0].payload_hash) % _DIGEST_MOD
        last = entries[labelled[-1]]
        self._record_events(slot, events, last[0], out, last[2] is None)

    def take_micro_batches(self) -> list[list[int]]:
        """The micro-batches learned since the last call, as lists of inbox seqs."""
        groups, self.micro_batches = self.micro_batches, []
        return groups

    def replay(self, row: InboxRow, reading: Reading, now_mono: float,
               emit: Callable[[str, bytes], Any] | None = None) -> list[tuple[str, bytes]]:
        """Process a replayed inbox row as it was processed live: on its own (``handle``), or,
        when it was learned in a micro-batch (``row.micro_batch``), gathered until that
        micro-batch is complete and then learned as one again, from the same model.

        A model's micro-batch is complete when its next row belongs elsewhere; call
        :meth:`finish_replay` after the last row.
        """
        out: list[tuple[str, bytes]] = []
        key = self.slot_key(reading.device)
        gathering = self._replay_groups.get(key)
        if gathering is not None and (reading.kind != "reading" or gathering[0] != row.micro_batch):
            self._learn_replayed(key, now_mono, out)
        if row.micro_batch is None or reading.kind != "reading" or not self.batchable:
            return out + self.handle(row, reading, None, now_mono, emit=emit)
        # as handle_many: sequence, model and features now, in row order; the learning once complete
        if reading.sequence_scope is not None:
            self._saw_sequence(reading.sequence_scope, reading.sequence or 0)
        slot = self._slot(reading.device, row.seq)
        slot.metrics.messages += 1
        x = slot.features_for(reading.device, reading.features)
        if gathering is None or gathering[0] != row.micro_batch:
            gathering = self._replay_groups[key] = (row.micro_batch, slot, [], self._catching_up)
        gathering[2].append((row, reading, None, x))
        return out

    def finish_replay(self, now_mono: float) -> list[tuple[str, bytes]]:
        """Learn the micro-batches still being gathered at the end of a replay."""
        out: list[tuple[str, bytes]] = []
        for key in list(self._replay_groups):
            self._learn_replayed(key, now_mono, out)
        return out

    def _learn_replayed(self, key: str, now_mono: float, out: list[tuple[str, bytes]]) -> None:
        _, slot, entries, catching_up = self._replay_groups.pop(key)
        was, self._catching_up = self._catching_up, catching_up
        try:
            self._micro_batch(slot, entries, now_mono, out)
        finally:
            self._catching_up = was

    def catch_up(self, row: InboxRow, reading: Reading, now_mono: float) -> None:
        """Replay a reading at or before the checkpoint's position to its model, whose saved
        state is older (the checkpoint left it behind): the model learns it as it did live; the
        stream's own state (sequence numbers, counters, drift events) and the published
        messages are already past it, so nothing else changes and nothing is sent."""
        self._catching_up = True
        try:
            self.replay(row, reading, now_mono)
        finally:
            self._catching_up = False

    def behind(self, row: InboxRow) -> bool:
        """Whether inbox ``row`` (at or before the checkpoint's position) is one of a model's
        readings not in its saved state: a model saved before it, or not saved at all."""
        if row.kind != "reading" or not self.can_leave_behind:
            return False
        slot = self.slots.get(self.slot_key(row.device))
        return slot is None or slot.since < row.seq

    def _add_pending(self, join_id: str, key: str, x: np.ndarray, pred: Any, phash: int, at: float) -> None:
        if join_id in self.pending:  # a later reading with the same id replaces the older
            del self.pending[join_id]
            self.counters["readings_expired"] += 1
        self.pending[join_id] = (key, x, pred, phash, at)
        while len(self.pending) > self.config.label.max_pending:
            self.pending.popitem(last=False)
            self.counters["readings_expired"] += 1

    def _expire(self, now: float) -> None:
        ttl = self.config.label.ttl_seconds
        while self.pending:
            join_id, item = next(iter(self.pending.items()))
            if now - item[4] <= ttl:
                break
            del self.pending[join_id]
            self.counters["readings_expired"] += 1

    def _on_label(self, reading: Reading, row: InboxRow, out: list[tuple[str, bytes]], replay: bool) -> None:
        assert reading.join_id is not None and reading.target is not None
        item = self.pending.pop(reading.join_id, None)
        slot = None if item is None else self.slots.get(item[0])
        if item is None or slot is None:
            self.counters["labels_unmatched"] += 1
            return
        self._before_change(slot)
        self._unsummed.add(slot.key)
        _, x, pred, phash, _ = item
        self._learn(slot, x, reading.target, pred, phash, row, out, replay)

    # -- output ---------------------------------------------------------------------

    def _prediction_topic(self, device: str) -> str:
        topic = self._prediction_topics.get(device)
        if topic is None:
            topic = self._prediction_topics[device] = f"{self._topic_base}/{device}/prediction"
        return topic

    def _prediction_payload(
        self, row: InboxRow, reading: Reading, slot: Slot, prediction: Any,
        received_mono: float | None, now_mono: float, extra: dict[str, Any],
    ) -> bytes:
        body: dict[str, Any] = {
            "stream": self.name,
            "device": reading.device,
            "seq": row.seq,
            "id": reading.msg_id if reading.msg_id is not None else reading.join_id,
        }
        if self.task == "regression":
            body["prediction"] = float(prediction)
        else:
            p = float(prediction) if self.task == "binary" else 0.0
            probs = np.array([1.0 - p, p]) if self.task == "binary" else np.asarray(prediction)
            names = self.classes if self.classes is not None else [0, 1]
            body["prediction"] = names[int(np.argmax(probs))]
            body["probabilities"] = {str(n): round(float(q), 6) for n, q in zip(names, probs)}
        body["model_version"] = slot.learner.version
        body["lr"] = slot.lr
        body.update(extra)
        if received_mono is None:
            body["replay"] = True
        else:
            body["latency_ms"] = round((now_mono - received_mono) * 1000.0, 3)
        return orjson.dumps(body)

    # -- state ----------------------------------------------------------------------

    # A checkpoint written in steps (see streamlearn.checkpointing): begin_capture names the
    # changed models at the checkpoint's position; take_capture hands each one over, as it
    # was then; end_capture or abandon_capture closes it.

    def changed(self) -> list[tuple[int, str]]:
        """``(since, key)`` of each model changed since it was last saved."""
        return [(since, key) for key, since in self._unsaved.items()]

    def changed_count(self) -> int:
        """How many models changed since they were last saved."""
        return len(self._unsaved)

    @property
    def can_leave_behind(self) -> bool:
        """Whether a checkpoint may leave changed models with older saved states: their readings
        can be replayed to them alone (``catch_up``). Not when labels come on a topic of their
        own: a label joins a reading through the stream's state."""
        return self.source != "topic"

    def begin_capture(self, write: Callable[[SlotState], bool] | None = None,
                      keys: list[str] | None = None) -> list[str]:
        """Begin capturing the models changed since the last checkpoint, or those of ``keys``
        among them (the others stay changed); returns the keys captured (now marked saved).

        ``write`` stores a model of the capture that is about to change, as it is, and returns
        True; False when it cannot now (no transaction open): the model is copied instead.
        """
        assert not self._capture_pending and not self._captured and not self._capture_written, \
            "a capture is already open"
        if keys is None:
            keys = list(self._unsaved)
        for key in keys:
            self.slots[key].mark_saved()
        self._capture_pending = set(keys)
        self._capture_write = write
        self._capture_keys = keys
        return keys

    def take_capture(self, key: str) -> SlotState | None:
        """Model ``key`` as it was when the capture began; None when it was written already."""
        if key in self._capture_written:
            self._capture_written.discard(key)
            return None
        saved = self._captured.pop(key, None)
        if saved is not None:
            return saved
        self._capture_pending.discard(key)
        return self.slots[key].to_state(self.name)  # unchanged since: the live state is that state

    def end_capture(self, position: int) -> None:
        """The checkpoint at ``position`` is complete: its models' saved states belong there."""
        assert not self._capture_pending and not self._captured and not self._capture_written, \
            "models of the capture were not taken"
        for key in self._capture_keys:
            slot = self.slots.get(key)
            if slot is not None:
                slot.saved_at(position)
        self._capture_keys = []
        self._capture_write = None

    def abandon_capture(self, keys: list[str]) -> None:
        """The checkpoint was not written: these models count as changed again."""
        for key in keys:
            slot = self.slots.get(key)
            if slot is not None:
                slot.mark_changed()
        self._capture_pending.clear()
        self._captured.clear()
        self._capture_written.clear()
        self._capture_keys = []
        self._capture_write = None

    def take_events(self) -> list[DriftEvent]:
        events, self.events = self.events, []
        return events

    def state(self) -> dict[str, Any]:
        return {
            "counters": dict(self.counters),
            "pending": [[j, k, x.tolist(), p, h, at] for j, (k, x, p, h, at) in self.pending.items()],
            "last_seq": list(self.last_seq.items()),
        }

    def load(self, slots: list[SlotState], state: dict[str, Any] | None) -> None:
        for saved in slots:
            slot = Slot(saved.model_key, self.config, self._scratch, self._unsaved)
            try:
                slot.load(saved, self.horizon)
            except (KeyError, ValueError) as exc:
                raise ValueError(f"stream {self.name!r}, model {saved.model_key!r}: {exc}") from None
            self.slots[saved.model_key] = slot
            self._unsummed.add(saved.model_key)
        if state:
            self.counters.update(state.get("counters", {}))
            self.pending = OrderedDict(
                (j, (k, np.asarray(x, dtype=F32), p, int(h), float(at)))
                for j, k, x, p, h, at in state.get("pending", [])
            )
            self.last_seq = OrderedDict((scope, int(seq)) for scope, seq in state.get("last_seq", []))

    def refresh_metrics(self) -> None:
        """Bring the metrics rows of the models that handled readings since up to date (the agent
        calls it after each batch, while those models are fresh in the cache)."""
        if not self._unsummed:
            return
        rows, table = self._metric_rows, self._metric_table
        for key in self._unsummed:
            slot = self.slots.get(key)
            if slot is None:  # (its creation failed)
                continue
            i = rows.get(key)
            if i is None:
                i = rows[key] = len(rows)
                if i == len(table):
                    table = self._metric_table = np.concatenate([table, np.zeros_like(table)])
            table[i] = slot.metric_values()
        self._unsummed.clear()

    def metrics_row(self) -> dict[str, Any]:
        """One row of the ``metrics`` table: totals and averages over the stream's models."""
        self.refresh_metrics()
        table = self._metric_table[:len(self._metric_rows)]
        totals = table[:, :N_METRIC_COUNTS].sum(axis=0)
        values = table[:, N_METRIC_COUNTS:]
        present = ~np.isnan(values)
        counts = present.sum(axis=0)
        sums = np.where(present, values, 0.0).sum(axis=0)
        row: dict[str, Any] = {"stream": self.name}
        row.update((name, int(total)) for name, total in zip(METRIC_FIGURES, totals))
        row["dead_letters"] = self.counters["dead_letters"]
        row.update((name, float(total / n) if n else None)
                   for name, total, n in zip(METRIC_FIGURES[N_METRIC_COUNTS:], sums, counts))
        return row
