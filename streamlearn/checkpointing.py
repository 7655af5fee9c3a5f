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

With more changed models than ``checkpoint_models_max`` (a thousand per-device
models each learn a reading or two per interval) an interval's checkpoint writes
only that many, those saved longest ago first, and every one saved
``checkpoint_replay_max`` inbox rows ago or more (:func:`choose_models`); the
others keep their older rows. Each model row records its position, the
checkpoint records the oldest position left behind (``replay_from``), and a
restart replays the rows from there to the checkpoint's position to their own
models only (``StreamRunner.catch_up``). Each model is then written every
~0.8 x ``checkpoint_replay_max`` rows instead of every interval: with a thousand
models 63 writes an interval instead of 1,000 (2 MB of WAL instead of 31 MB).
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING

from streamlearn.store import DriftEvent, SlotState, SQLiteStore

if TYPE_CHECKING:
    from streamlearn.stream import StreamRunner

# A step writes at least this many models: a gateway with a handful of models writes each
# checkpoint in one step, in the batch transaction it begins in, as if it were not split
# (so a restart replays at most the checkpoint interval); each model costs ~0.2-0.4 ms.
MIN_MODELS_PER_STEP = 4
# A transaction takes no more steps once it holds this much model state (a group of messages
# 5 ms long took a step per batch, and its COMMIT carried the whole checkpoint: 1.9 MB, 5.7 ms
# here; ~1.5 ms and 2 ms more per MB). Models about to change are still written in it (they are
# few: the checkpoint's own, touched before their step).
CHECKPOINT_BYTES_PER_TX = 128 << 10


def room_for_step(store: SQLiteStore) -> bool:
    """Whether the open transaction (if any) may take a step of a checkpoint now."""
    return store.in_batch and store.checkpoint_bytes_in_tx < CHECKPOINT_BYTES_PER_TX


# Each checkpoint writes enough models, oldest first, that they all come round within this
# share of checkpoint_replay_max rows: steadily, rather than in a burst of every model saved
# replay_max rows ago (after a start every model is saved at the same position).
ROTATION_SHARE = 0.8


def choose_models(runners: dict[str, StreamRunner], position: int, models_max: int,
                  replay_max: int, rows: int = 0) -> tuple[dict[str, list[str]] | None, int]:
    """Which changed models a checkpoint at ``position`` writes, per stream (None: all of
    them), and where a restart then replays from (``position`` when none is left behind).

    All when there are at most ``models_max``; else, those saved longest ago first,
    ``models_max`` of them, or as many as it takes for all to come round within
    ``ROTATION_SHARE`` of ``replay_max`` rows at ``rows`` rows per checkpoint (the rows since
    the last one), or more if more were saved ``replay_max`` rows ago or earlier: a restart
    replays at most ``replay_max`` rows, and the inbox, which keeps ``inbox_retention``,
    still holds them. A stream whose models cannot be left behind (topic labels) has all
    its changed models written.
    """
    changed = {name: runner.changed() for name, runner in runners.items()}
    if sum(len(c) for c in changed.values()) <= models_max:
        return None, position
    chosen: dict[str, list[str]] = {name: [] for name in runners}
    candidates: list[tuple[int, str, str]] = []
    for name, items in changed.items():
        if runners[name].can_leave_behind:
            candidates.extend((since, name, key) for since, key in items)
        else:
            chosen[name].extend(key for _, key in items)
    candidates.sort()
    forced = sum(1 for since, _, _ in candidates if since <= position - replay_max)
    rotation = math.ceil(len(candidates) * rows / (ROTATION_SHARE * replay_max))
    n = max(models_max - sum(len(k) for k in chosen.values()), rotation, forced)
    for _, name, key in candidates[:n]:
        chosen[name].append(key)
    left = candidates[n:]
    return chosen, (left[0][0] if left else position)


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
    models_max, replay_max, rows
        Leave changed models behind as :func:`choose_models` says (None: write all).
    """

    def __init__(self, checkpoint_id: int, position: int, reason: str,
                 runners: dict[str, StreamRunner], store: SQLiteStore | None = None,
                 models_max: int | None = None, replay_max: int = 0, rows: int = 0) -> None:
        self.id = checkpoint_id
        self.position = position
        self.reason = reason
        self.runners = runners
        self.store = store
        self.streams = {name: r.state() for name, r in runners.items()}
        self.metrics = [r.metrics_row() for r in runners.values()]
        self.events: list[DriftEvent] = [e for r in runners.values() for e in r.take_events()]
        write = self._write_early if store is not None else None
        chosen, self.replay_from = (None, position) if models_max is None else \
            choose_models(runners, position, models_max, replay_max, rows)
        self.keys = {name: r.begin_capture(write, None if chosen is None else chosen[name])
                     for name, r in runners.items()}
        self.left_behind = sum(r.changed_count() for r in runners.values()) if chosen is not None else 0
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
        self.bytes_written += store.write_models(self.id, [saved], started=started, position=self.position)
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
            self.bytes_written += store.write_models(self.id, [saved], started=started, position=self.position)
            self.slots_written += 1
            wrote += 1
            if wrote >= MIN_MODELS_PER_STEP and time.perf_counter() >= deadline:
                break
        if self._todo:
            self.work_s += time.perf_counter() - started
            return False  # the rest next time
        store.finish_checkpoint(self.id, self.position, self.streams, self.metrics, self.reason, self.events,
                                slots_written=self.slots_written, bytes_written=self.bytes_written,
                                started=started, replay_from=self.replay_from)
        for runner in self.runners.values():
            runner.end_capture(self.position)
        self.work_s += time.perf_counter() - started
        return True

    def abandon(self) -> None:
        """It will not be completed (a step failed): its models count as changed again, its
        drift events go back to be stored with the next checkpoint."""
        for name, runner in self.runners.items():
            runner.abandon_capture(self.keys.get(name, []))
            runner.events[:0] = [e for e in self.events if e.stream == name]
