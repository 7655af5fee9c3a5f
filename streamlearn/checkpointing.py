"""A checkpoint written in steps, so that no step stalls message handling for long.

A checkpoint is the state of every changed model and of every stream at one
inbox position. With a few models it is written in one step; with a thousand
(one model per device) writing them all at once would hold up the messages
behind it for hundreds of milliseconds. So a :class:`PendingCheckpoint` is
written a few models at a time, one step per batch of messages (or back to back
while no message waits), each step stopping once it has used its time budget:

    begin (at position P)   stream states, metrics and drift events taken now;
                            the changed models are named, not copied
    step, step, ...         models written under the checkpoint's id; a model that
                            is about to learn before its step is written first, in
                            the batch's open transaction (StreamRunner._before_change;
                            copied instead when no transaction is open, as in a
                            replay), so every model is written as it was at P and
                            no copy of a thousand models is held meanwhile
    last step               stream states, metrics, events and the row in
                            ``checkpoints``: from this commit on a restart loads
                            this checkpoint and replays the inbox after P

Until the last step commits, a restart loads the previous complete checkpoint
(every model keeps its row of it) and the store deletes the rows of this one.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from streamlearn.store import DriftEvent, SlotState, SQLiteStore

if TYPE_CHECKING:
    from streamlearn.stream import StreamRunner

# A step writes at least this many models: a gateway with a handful of models writes each
# checkpoint in one step, in the batch transaction it begins in, as if it were not split
# (so a restart replays at most the checkpoint interval); each model costs ~0.2-0.4 ms.
MIN_MODELS_PER_STEP = 4


class PendingCheckpoint:
    """One checkpoint at ``position``, begun but not yet complete.

    Parameters
    ----------
    checkpoint_id
        The id it will complete under (``SQLiteStore.next_checkpoint_id``).
    position
        The inbox position the state belongs to.
    reason
        Why it was taken (``interval``, ``shutdown``, ``replay``...).
    runners
        The agent's stream runners; their changed models are named now.
    store
        Where a model about to change before its step is written at once, when a
        transaction is open (None: such models are copied until their step).
    """

    def __init__(self, checkpoint_id: int, position: int, reason: str,
                 runners: dict[str, StreamRunner], store: SQLiteStore | None = None) -> None:
        self.id = checkpoint_id
        self.position = position
        self.reason = reason
        self.runners = runners
        self.store = store
        self.streams = {name: r.state() for name, r in runners.items()}
        self.metrics = [r.metrics_row() for r in runners.values()]
        self.events: list[DriftEvent] = [e for r in runners.values() for e in r.take_events()]
        write = self._write_early if store is not None else None
        self.keys = {name: r.begin_capture(write) for name, r in runners.items()}
        self._todo = [(name, key) for name, keys in self.keys.items() for key in keys]
        self._todo.reverse()  # popped from the end: in stream and model order
        self.slots_written = 0
        self.bytes_written = 0
        self.written_early = 0
        self.work_s = 0.0  # time spent writing it (steps and early writes): its cost to the agent
        self.steps = 0  # steps taken; one when it fitted in a single step (a few models)

    def _write_early(self, saved: SlotState) -> bool:
        """A model about to learn before its step: write it now, in the open transaction (a
        pause of one model, ~0.1-0.4 ms); False when none is open (the runner copies it)."""
        store = self.store
        if store is None or not store.in_batch:
            return False
        started = time.perf_counter()
        self.bytes_written += store.write_models(self.id, [saved], started=started)
        self.slots_written += 1
        self.written_early += 1
        self.work_s += time.perf_counter() - started
        return True

    @property
    def remaining(self) -> int:
        return len(self._todo)

    def step(self, store: SQLiteStore, budget_s: float, started: float | None = None) -> bool:
        """Write models until ``budget_s`` seconds have gone since ``started`` (at least
        ``MIN_MODELS_PER_STEP``), and complete the checkpoint when none is left (the last
        part is small: stream states, metrics, one row); True when complete.

        Needs an open transaction; the checkpoint is durable when it commits.
        """
        started = time.perf_counter() if started is None else started
        deadline = started + budget_s
        wrote = 0
        self.steps += 1
        while self._todo:
            name, key = self._todo.pop()
            saved = self.runners[name].take_capture(key)
            if saved is None:
                continue  # written before its step, as it was about to change
            self.bytes_written += store.write_models(self.id, [saved], started=started)
            self.slots_written += 1
            wrote += 1
            if wrote >= MIN_MODELS_PER_STEP and time.perf_counter() >= deadline:
                break
        if self._todo:
            self.work_s += time.perf_counter() - started
            return False  # the rest next time
        store.finish_checkpoint(self.id, self.position, self.streams, self.metrics, self.reason, self.events,
                                slots_written=self.slots_written, bytes_written=self.bytes_written,
                                started=started)
        for runner in self.runners.values():
            runner.end_capture()
        self.work_s += time.perf_counter() - started
        return True

    def abandon(self) -> None:
        """It will not be completed (a step failed): its models count as changed again, its
        drift events go back to be stored with the next checkpoint."""
        for name, runner in self.runners.items():
            runner.abandon_capture(self.keys.get(name, []))
            runner.events[:0] = [e for e in self.events if e.stream == name]
