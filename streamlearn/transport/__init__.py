"""Getting messages in and out: the Transport seam.

The agent talks to a :class:`Transport`: it receives batches of :class:`Message`,
acknowledges them once they are committed, and publishes. ``MqttTransport`` is the
real one (paho-mqtt); ``MemoryTransport`` is an in-process fake for unit tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(slots=True)
class Message:
    """One received message.

    ``generation`` counts connections: an acknowledgement is only sent back on the
    connection that delivered the message (after a reconnect the broker redelivers
    it, and the inbox dedupe drops the copy).
    """

    topic: str
    payload: bytes
    qos: int
    dup: bool
    mid: int
    received_at: float
    received_mono: float
    generation: int = 0


class Transport(Protocol):
    def start(self, subscriptions: list[str]) -> None:
        """Connect (in the background, retrying) and subscribe to the filters."""
        ...

    def receive(self, max_messages: int, timeout: float) -> list[Message]:
        """Up to ``max_messages`` received messages; waits at most ``timeout`` for the first."""
        ...

    def ack(self, messages: list[Message]) -> None:
        """Acknowledge messages that are safely stored."""
        ...

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> bool:
        """Queue a message for the broker; False when it had to be dropped."""
        ...

    @property
    def connected(self) -> bool: ...

    def backlog(self) -> int:
        """Messages received and not yet taken by :meth:`receive`."""
        ...

    def stats(self) -> dict[str, int | float | bool]: ...

    def stop(self) -> None:
        """Publish the offline status, disconnect and stop the network thread."""
        ...
