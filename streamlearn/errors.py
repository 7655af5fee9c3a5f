"""The one exception tree of streamlearn.

::

    StreamlearnError               anything streamlearn raises on purpose
    ├── ConfigError                the TOML config is missing, unreadable or invalid
    ├── DecodeError                a payload cannot become a Reading (carries a reason code)
    ├── StoreError                 the SQLite store cannot be opened, migrated or written
    │   ├── StoreLockedError       another agent holds the store
    │   └── StoreSyncError         an fsync of the WAL failed: stop, and start again
    ├── TransportError             the broker cannot be reached or refused us
    └── BrokerError                an embedded broker could not be started

The CLI turns every ``StreamlearnError`` into one line on stderr and a non-zero
exit code (1; 75 for a ``StoreSyncError``, which a restart is the cure for);
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class StreamlearnError(Exception):
    """Base class of every error streamlearn raises on purpose."""


class ConfigError(StreamlearnError):
    """The configuration is invalid; the message names the key path and the bad value."""


class DecodeError(StreamlearnError):
    """A payload was rejected.

    Parameters
    ----------
    reason
        A short, stable code for dashboards and tests (``"nan"``, ``"missing_field"``...).
    detail
        A human sentence naming the field and the bad value.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class StoreError(StreamlearnError):
    """The SQLite store cannot be opened, migrated or written."""


class StoreLockedError(StoreError):
    """Another process already runs an agent on this store."""


class StoreSyncError(StoreError):
    """An fsync of the store's WAL failed: what reached the disk is unknown, so the agent stops
    (a restart recovers from what the store holds; the broker resends what was not acknowledged)."""


class TransportError(StreamlearnError):
    """The MQTT broker cannot be reached, or refused the connection."""


class BrokerError(StreamlearnError):
    """An embedded broker for a first run could not be started."""
