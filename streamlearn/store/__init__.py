"""The SQLite store: inbox, dead letters, checkpoints and metrics in one file.

:class:`SQLiteStore` is the agent's single writer. :mod:`streamlearn.store.reader`
opens the same file read-only for the CLI while the agent runs.
"""

from streamlearn.store.records import Checkpoint, DeadLetter, DriftEvent, InboxRow, SlotState
from streamlearn.store.sqlite import SQLiteStore, Store

__all__ = ["Checkpoint", "DeadLetter", "DriftEvent", "InboxRow", "SQLiteStore", "SlotState", "Store"]
