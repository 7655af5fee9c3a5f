"""An in-process Transport for unit tests: no broker, no threads."""

from __future__ import annotations

import time
from collections import deque

from streamlearn.transport import Message


class MemoryTransport:
    """Messages go in with :meth:`inject` and come out of :meth:`receive`.

    Published messages are kept in ``published``; acknowledged mids in ``acked``.

    >>> t = MemoryTransport()
    >>> t.start(["a/#"]); _ = t.inject("a/b", b"{}")
    >>> [m.topic for m in t.receive(10, 0.0)]
    ['a/b']
    """

    def __init__(self) -> None:
        self._inbox: deque[Message] = deque()
        self._mid = 0
        self.subscriptions: list[str] = []
        self.published: list[tuple[str, bytes, int, bool]] = []
        self.acked: list[int] = []
        self.started = False
        self.stopped = False

    def inject(self, topic: str, payload: bytes, dup: bool = False, qos: int = 1) -> Message:
        self._mid += 1
        msg = Message(topic, payload, qos, dup, self._mid, time.time(), time.perf_counter())
        self._inbox.append(msg)
        return msg

    def start(self, subscriptions: list[str]) -> None:
        self.subscriptions = list(subscriptions)
        self.started = True

    def receive(self, max_messages: int, timeout: float) -> list[Message]:
        out = []
        while self._inbox and len(out) < max_messages:
            out.append(self._inbox.popleft())
        return out

    def ack(self, messages: list[Message]) -> None:
        self.acked.extend(m.mid for m in messages if m.qos > 0)

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> bool:
        self.published.append((topic, payload, qos, retain))
        return True

    def backlog(self) -> int:
        return len(self._inbox)

    @property
    def connected(self) -> bool:
        return self.started and not self.stopped

    def stats(self) -> dict[str, int | float | bool]:
        return {"connected": self.connected, "pending": len(self._inbox)}

    def stop(self) -> None:
        self.stopped = True
