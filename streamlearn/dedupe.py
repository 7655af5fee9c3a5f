"""Is this message new? Redeliveries are dropped, conflicting ids dead-lettered.

MQTT QoS 1 is at-least-once: after a reconnect the broker redelivers every
message we had not acknowledged, including ones already committed to the inbox.
A message is recognised as seen by

* its configured id (``id_fields``): the same id with the same payload is a
  redelivery and dropped; the same id with a different payload is a faulty
  sensor and becomes a ``duplicate_id`` dead letter;
* otherwise, only when the broker marks it as a redelivery (DUP flag), a hash of
  topic and payload. Two identical readings without an id and without the flag
  are two readings (a sensor may well report the same value twice).
"""

from __future__ import annotations

from hashlib import blake2b

from streamlearn.errors import DecodeError
from streamlearn.store import Store

NEW = "new"
REDELIVERY = "redelivery"


def payload_hash(topic: str, payload: bytes) -> int:
    """A stable signed 64-bit hash of topic and payload (fits an SQLite INTEGER).

    >>> payload_hash("a/b", b"{}") == payload_hash("a/b", b"{}") != payload_hash("a/c", b"{}")
    True
    """
    digest = blake2b(topic.encode("utf-8", "surrogatepass") + b"\x00" + payload, digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


class Deduper:
    """Checks messages of one batch against the store and against each other."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._batch_keys: dict[str, int] = {}
        self._batch_hashes: set[tuple[str, int]] = set()

    def begin_batch(self) -> None:
        self._batch_keys.clear()
        self._batch_hashes.clear()

    def remember(self, msg_key: str | None, phash: int) -> None:
        """Note a message known to be new without asking the store (its sequence number is new)."""
        if msg_key is not None:
            self._batch_keys[msg_key] = phash

    def check(self, topic: str, msg_key: str | None, phash: int, dup: bool) -> str:
        """``NEW`` or ``REDELIVERY``; raises DecodeError ``duplicate_id`` on a conflicting id."""
        if msg_key is not None:
            previous = self._batch_keys.get(msg_key)
            if previous is None:
                previous = self._store.find_key(msg_key)
            if previous is None:
                self._batch_keys[msg_key] = phash
                return NEW
            if previous == phash:
                return REDELIVERY
            raise DecodeError(
                "duplicate_id", f"message id {msg_key.split('|', 2)[-1]!r} was already used by a different payload"
            )
        marker = (topic, phash)
        if dup and (marker in self._batch_hashes or self._store.seen_hash(topic, phash)):
            return REDELIVERY
        self._batch_hashes.add(marker)
        return NEW
