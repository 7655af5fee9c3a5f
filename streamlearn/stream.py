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

import math
from collections import OrderedDict, deque
from typing import Any

import numpy as np
import orjson

from streamlearn.codec import Reading
from streamlearn.config import StreamConfig
from streamlearn.features import FeatureState
from streamlearn.learner import Learner
from streamlearn.models import ModelShape
from streamlearn.schedulers import LRPolicy, make_policy
from streamlearn.store import InboxRow, SlotState

F32 = np.float32
SHARED = "*"
EWMA_ALPHA = 0.01
_DIGEST_MOD = 1 << 64


class SlotMetrics:
    """Prequential figures of one model, as exponentially weighted averages.

    ``loss`` is on the model's scale (squared error of the standardised target,
    or log loss); ``error`` is the absolute error in the target's units (or the
    error rate); ``baseline_error`` is the same error of the naive baseline
    (the running mean of the targets so far, or the majority class so far).
    """

    __slots__ = ("messages", "labelled", "loss", "error", "baseline_error", "abs_err_scale",
                 "_target_n", "_target_mean", "_class_counts")

    def __init__(self, n_classes: int) -> None:
        self.messages = 0
        self.labelled = 0
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

    def record_class(self, y: int, probs: np.ndarray) -> None:
        self.labelled += 1
        p = float(probs[y])
        self.loss = self._ewma(self.loss, -math.log(max(p, 1e-12)))
        self.error = self._ewma(self.error, float(int(np.argmax(probs)) != y))
        if sum(self._class_counts) > 0:
            majority = int(np.argmax(self._class_counts))
            self.baseline_error = self._ewma(self.baseline_error, float(majority != y))
        self._class_counts[y] += 1

    def state(self) -> dict[str, Any]:
        return {
            "messages": self.messages, "labelled": self.labelled, "loss": self.loss,
            "error": self.error, "baseline_error": self.baseline_error,
            "abs_err_scale": self.abs_err_scale, "target_n": self._target_n,
            "target_mean": self._target_mean, "class_counts": self._class_counts,
        }

    def load(self, state: dict[str, Any]) -> None:
        self.messages = int(state["messages"])
        self.labelled = int(state["labelled"])
        self.loss = state["loss"]
        self.error = state["error"]
        self.baseline_error = state["baseline_error"]
        self.abs_err_scale = state["abs_err_scale"]
        self._target_n = int(state["target_n"])
        self._target_mean = float(state["target_mean"])
        self._class_counts = [int(c) for c in state["class_counts"]]


def make_learner(shape: ModelShape, config: StreamConfig) -> Learner:
    """The learner of the configured engine (``auto`` = fused for every model kind so far)."""
    if config.model.engine == "torch":
        from streamlearn.learner_torch import TorchLearner  # imports torch: ~220 MB, ~1 s

        return TorchLearner(shape, config.task, config.optimizer, seed=config.model.seed)  # type: ignore[return-value]
    return Learner(shape, config.task, config.optimizer, seed=config.model.seed)


class Slot:
    """One model with its features, learning-rate policy and metrics."""

    def __init__(self, key: str, config: StreamConfig) -> None:
        self.key = key
        n_fields = len(config.features)
        self.features = FeatureState(n_fields, config.lags)
        shape = ModelShape(
            n_in=self.features.dim,
            hidden=tuple(config.model.hidden) if config.model.kind == "mlp" else (),
            n_out=config.n_outputs,
            activation=config.model.activation,
        )
        self.learner = make_learner(shape, config)
        self.policy: LRPolicy = make_policy(config.schedule, config.optimizer.lr)
        self.learner.lr = self.policy.lr()
        self.metrics = SlotMetrics(config.n_outputs if config.task == "multiclass" else 2)
        # forecast: per device, the readings still waiting for their target
        self.waiting: dict[str, deque[tuple[np.ndarray, float, int]]] = {}
        self.dirty = True

    def to_state(self, stream: str) -> SlotState:
        return SlotState(
            stream=stream,
            model_key=self.key,
            tensors=self.learner.state_arrays(),
            state={
                "learner": self.learner.state_scalars(),
                "features": self.features.state(),
                "metrics": self.metrics.state(),
                "policy": self.policy.state(),
                "waiting": {
                    d: [[x.tolist(), p, h] for x, p, h in q] for d, q in self.waiting.items()
                },
            },
        )

    def load(self, saved: SlotState, horizon: int) -> None:
        self.learner.load_state(saved.tensors, saved.state["learner"])
        self.features.load(saved.state["features"])
        self.metrics.load(saved.state["metrics"])
        self.policy.load(saved.state["policy"])
        self.waiting = {
            d: deque(((np.asarray(x, dtype=F32), float(p), int(h)) for x, p, h in q), maxlen=horizon)
            for d, q in saved.state["waiting"].items()
        }
        self.dirty = False


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
        self._topic_base = f"{topic_prefix}/{gateway}/{config.name}"
        self._prediction_topics: dict[str, str] = {}
        # topic labels: join id -> (slot key, x, prediction, payload hash, received_at)
        self.pending: OrderedDict[str, tuple[str, np.ndarray, Any, int, float]] = OrderedDict()
        self.counters = {
            "labels_unmatched": 0, "readings_expired": 0, "dead_letters": 0,
            "learned_count": 0, "learned_digest": 0,
        }

    # -- slots --------------------------------------------------------------------

    def slot_key(self, device: str) -> str:
        return device if self.config.per_device else SHARED

    def has_room_for(self, device: str, limit: int) -> bool:
        return self.slot_key(device) in self.slots or len(self.slots) < limit

    def _slot(self, device: str) -> Slot:
        key = self.slot_key(device)
        slot = self.slots.get(key)
        if slot is None:
            slot = self.slots[key] = Slot(key, self.config)
        return slot

    # -- the pipeline ------------------------------------------------------------------

    def handle(self, row: InboxRow, reading: Reading, received_mono: float | None,
               now_mono: float) -> list[tuple[str, bytes]]:
        """Process one inbox row; returns ``(topic, payload)`` pairs to publish."""
        if reading.kind == "label":
            self._on_label(reading)
            return []
        if self.source == "topic":
            self._expire(row.received_at)
        slot = self._slot(reading.device)
        slot.dirty = True
        slot.metrics.messages += 1
        x = slot.features.transform(reading.device, reading.features)
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
                extra["anomaly_score"] = self._learn(slot, old_x, y, old_pred, old_hash)
            prediction = slot.learner.predict_one(x)
            queue.append((x, float(prediction[0]), row.payload_hash))
            extra["horizon"] = self.horizon
        else:
            prediction = slot.learner.predict_one(x)
            if self.source == "payload":
                if reading.target is not None:
                    self._learn(slot, x, reading.target, self._pred_value(prediction), row.payload_hash)
            else:
                assert reading.join_id is not None
                self._add_pending(reading.join_id, slot.key, x, self._pred_value(prediction),
                                  row.payload_hash, row.received_at)
        return [(self._prediction_topic(reading.device),
                 self._prediction_payload(row, reading, slot, prediction, received_mono, now_mono, extra))]

    def _pred_value(self, prediction: np.ndarray) -> Any:
        """The copy-0 prediction as saved with a pending reading (float or list)."""
        if self.task == "multiclass":
            return [float(p) for p in prediction[0]]
        return float(prediction[0])

    def _learn(self, slot: Slot, x: np.ndarray, y: float, predicted: Any, phash: int) -> float | None:
        """One learning step plus the prequential record of the prediction made for ``x``."""
        score: float | None = None
        if self.task == "regression":
            score = slot.metrics.record_regression(y, float(predicted), slot.learner.target.std)
        elif self.task == "binary":
            p1 = float(predicted)
            slot.metrics.record_class(int(y), np.array([1.0 - p1, p1]))
        else:
            slot.metrics.record_class(int(y), np.asarray(predicted))
        slot.learner.lr = slot.policy.lr()
        loss = slot.learner.learn_one(x, y)
        if loss is not None:
            slot.policy.update(float(loss[0]), slot.learner.version)
        self.counters["learned_count"] += 1
        self.counters["learned_digest"] = (self.counters["learned_digest"] + phash) % _DIGEST_MOD
        slot.dirty = True
        return score

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

    def _on_label(self, reading: Reading) -> None:
        assert reading.join_id is not None and reading.target is not None
        item = self.pending.pop(reading.join_id, None)
        if item is None:
            self.counters["labels_unmatched"] += 1
            return
        key, x, pred, phash, _ = item
        slot = self.slots.get(key)
        if slot is None:  # cannot happen unless the state was edited by hand
            self.counters["labels_unmatched"] += 1
            return
        self._learn(slot, x, reading.target, pred, phash)

    # -- output ---------------------------------------------------------------------

    def _prediction_topic(self, device: str) -> str:
        topic = self._prediction_topics.get(device)
        if topic is None:
            topic = self._prediction_topics[device] = f"{self._topic_base}/{device}/prediction"
        return topic

    def _prediction_payload(
        self, row: InboxRow, reading: Reading, slot: Slot, prediction: np.ndarray,
        received_mono: float | None, now_mono: float, extra: dict[str, Any],
    ) -> bytes:
        body: dict[str, Any] = {
            "stream": self.name,
            "device": reading.device,
            "seq": row.seq,
            "id": reading.msg_id if reading.msg_id is not None else reading.join_id,
        }
        if self.task == "regression":
            body["prediction"] = float(prediction[0])
        else:
            probs = prediction[0] if self.task == "multiclass" else np.array([1 - prediction[0], prediction[0]])
            names = self.classes if self.classes is not None else [0, 1]
            best = int(np.argmax(probs))
            body["prediction"] = names[best]
            body["probabilities"] = {str(n): round(float(p), 6) for n, p in zip(names, probs)}
        body["model_version"] = slot.learner.version
        body["lr"] = slot.learner.lr
        body.update(extra)
        if received_mono is None:
            body["replay"] = True
        else:
            body["latency_ms"] = round((now_mono - received_mono) * 1000.0, 3)
        return orjson.dumps(body)

    # -- state ----------------------------------------------------------------------

    def dirty_slots(self) -> list[SlotState]:
        out = []
        for slot in self.slots.values():
            if slot.dirty:
                out.append(slot.to_state(self.name))
                slot.dirty = False
        return out

    def state(self) -> dict[str, Any]:
        return {
            "counters": dict(self.counters),
            "pending": [[j, k, x.tolist(), p, h, at] for j, (k, x, p, h, at) in self.pending.items()],
        }

    def load(self, slots: list[SlotState], state: dict[str, Any] | None) -> None:
        for saved in slots:
            slot = Slot(saved.model_key, self.config)
            try:
                slot.load(saved, self.horizon)
            except (KeyError, ValueError) as exc:
                raise ValueError(f"stream {self.name!r}, model {saved.model_key!r}: {exc}") from None
            self.slots[saved.model_key] = slot
        if state:
            self.counters.update(state.get("counters", {}))
            self.pending = OrderedDict(
                (j, (k, np.asarray(x, dtype=F32), p, int(h), float(at)))
                for j, k, x, p, h, at in state.get("pending", [])
            )

    def metrics_row(self) -> dict[str, Any]:
        """One row of the ``metrics`` table: totals and averages over the stream's models."""
        slots = list(self.slots.values())

        def mean(values: list[float | None]) -> float | None:
            vals = [v for v in values if v is not None]
            return sum(vals) / len(vals) if vals else None

        lrs = [s.learner.lr for s in slots]
        return {
            "stream": self.name,
            "messages": sum(s.metrics.messages for s in slots),
            "labelled": sum(s.metrics.labelled for s in slots),
            "learned": sum(s.learner.n_learned for s in slots),
            "skipped": sum(s.learner.n_skipped for s in slots),
            "dead_letters": self.counters["dead_letters"],
            "loss": mean([s.metrics.loss for s in slots]),
            "error": mean([s.metrics.error for s in slots]),
            "baseline_error": mean([s.metrics.baseline_error for s in slots]),
            "lr": mean([float(lr) for lr in lrs if not isinstance(lr, np.ndarray)]),
        }
