"""Plain records that cross the store seam."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class InboxRow:
    """One accepted message. ``seq`` is its position, set when it is stored.

    ``micro_batch``: the ``seq`` of the first row of the micro-batch it was learned in
    under a backlog (None: learned on its own), so that a replay learns it the same way.
    """

    received_at: float
    topic: str
    stream: str
    kind: str
    device: str
    msg_key: str | None
    payload_hash: int
    payload: bytes
    seq: int = 0
    micro_batch: int | None = None


@dataclass(slots=True)
class DeadLetter:
    """One rejected message and why."""

    received_at: float
    topic: str
    stream: str | None
    reason: str
    detail: str
    payload: bytes


@dataclass(slots=True)
class SlotState:
    """The saved state of one model slot (a stream's shared model or one device's)."""

    stream: str
    model_key: str
    tensors: dict[str, Any]
    state: dict[str, Any]
    state_json: str | None = None  # the state already serialised (a snapshot taken before a change)
    # the inbox position this state belongs to (as loaded: None for a row written without one,
    # which belongs to the checkpoint's position)
    position: int | None = None


@dataclass(slots=True)
class Checkpoint:
    """What a restart resumes from."""

    id: int
    created_at: float
    position: int
    slots: list[SlotState] = field(default_factory=list)
    streams: dict[str, dict[str, Any]] = field(default_factory=dict)
    # where a replay begins: at ``position``, or before it when models were left behind
    # (each model's own position is in its SlotState)
    replay_from: int | None = None


@dataclass(slots=True)
class DriftEvent:
    """One drift detection or learning-rate decision, as stored in ``drift_events``.

    ``detector`` names the detectors that agreed, or ``policy`` for a decision the
    policy took on its own (a plateau, a population re-spread).
    """

    at: float
    stream: str
    model_key: str
    step: int
    detector: str
    statistic: float | None
    action: str
    lr_before: float
    lr_after: float
    loss_before: float | None
