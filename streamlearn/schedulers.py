"""Learning-rate policies: how fast each model learns, decided after every step.

Every policy implements :class:`LRPolicy`. The learner asks ``lr()`` before a
step and reports the step's loss with ``update``; drift detectors call
``on_drift``. Every policy keeps the rate within ``[min_lr, max_lr]`` and can
save and restore its state as JSON.

>>> policy = Constant(lr=0.01)
>>> policy.update(loss=0.5, t=1); policy.lr()
0.01
"""

from __future__ import annotations

from typing import Any, Protocol

from streamlearn.config import ScheduleConfig


class LRPolicy(Protocol):
    def lr(self) -> float:
        """The learning rate for the next step."""
        ...

    def update(self, loss: float, t: int) -> None:
        """Report the loss of step ``t``."""
        ...

    def on_drift(self, t: int) -> None:
        """A drift detector fired at step ``t``."""
        ...

    def state(self) -> dict[str, Any]: ...

    def load(self, state: dict[str, Any]) -> None: ...


class Constant:
    """A fixed learning rate."""

    def __init__(self, lr: float, min_lr: float = 1e-6, max_lr: float = 1.0) -> None:
        if not min_lr <= lr <= max_lr:
            raise ValueError(f"lr {lr} is outside [min_lr, max_lr] = [{min_lr}, {max_lr}]")
        self.base_lr = lr
        self.min_lr = min_lr
        self.max_lr = max_lr

    def lr(self) -> float:
        return self.base_lr

    def update(self, loss: float, t: int) -> None:
        return None

    def on_drift(self, t: int) -> None:
        return None

    def state(self) -> dict[str, Any]:
        return {}

    def load(self, state: dict[str, Any]) -> None:
        return None


def make_policy(config: ScheduleConfig, lr: float) -> LRPolicy:
    """The policy a stream's ``[schedule]`` section names."""
    if config.policy == "constant":
        return Constant(lr, min_lr=config.min_lr, max_lr=config.max_lr)
    raise ValueError(f"unknown learning-rate policy {config.policy!r}")
