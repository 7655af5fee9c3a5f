"""fsync of the store's WAL on a thread of its own, with what waits for it run afterwards.

With ``synchronous = "full"`` SQLite fsyncs the WAL inside every COMMIT, on the
agent's thread: 0.4-0.9 ms on this disk, up to 5 ms in a 15 s run at 1,000 msg/s,
and at times far longer (one such run had a p99 latency of 135 ms), during which
no reading is handled. So the store commits at ``synchronous = NORMAL``
(SQLite writes the WAL and syncs it before each of its checkpoints, but not at
COMMIT) and hands the fsync to this thread: a COMMIT asks for one (``after``),
with what may only happen once the transaction is on disk, the acknowledgement of
its messages. The thread fsyncs the WAL once for every request made before it
began (a burst of commits costs one fsync), then runs those callbacks. An
acknowledged message is therefore on disk exactly as with ``synchronous =
"full"``; what changes is that the agent's thread goes on predicting and learning
meanwhile.

A failed fsync cannot be retried: Linux may already have dropped the dirty pages
it could not write, and a second fsync would report success for data that is not
on disk. So the thread stops at the first failure, runs no callback (nothing it
stood for is acknowledged: the broker delivers it again) and keeps the error in
``error`` for the agent, which stops.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger(__name__)


class WalSyncer:
    """fsyncs ``wal_path`` on request from a thread of its own; see the module's text.

    Parameters
    ----------
    wal_path
        The WAL file (``<store>-wal``). It is opened at the first request (SQLite
        creates it with the connection) and its directory is fsynced once then, so
        that a WAL created since the last boot is found after a power loss.
    """

    def __init__(self, wal_path: Path) -> None:
        self.wal_path = wal_path
        self.error: str | None = None
        self.syncs = 0  # fsyncs done
        self._cond = threading.Condition()
        self._requested = 0
        self._done = 0
        self._callbacks: list[Callable[[], None]] = []
        self._stopping = False
        self._fd: int | None = None
        self._thread = threading.Thread(target=self._run, name="streamlearn-fsync", daemon=True)
        self._thread.start()

    def after(self, callback: Callable[[], None] | None = None) -> None:
        """Ask for an fsync of everything written so far; ``callback`` runs (on this thread)
        once it is done. After a failure nothing runs: the caller learns of it from ``error``."""
        with self._cond:
            if self.error is not None or self._stopping:
                return
            self._requested += 1
            if callback is not None:
                self._callbacks.append(callback)
            self._cond.notify()

    def wait(self, timeout: float) -> bool:
        """Wait until every fsync asked for is done and what waited for it has run (or an fsync
        failed); False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self._done >= self._requested or self.error is not None, timeout)

    @property
    def behind(self) -> int:
        """Requests not yet covered by a finished fsync."""
        return self._requested - self._done

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._requested > self._done or self._stopping)
                if self._requested == self._done:
                    return  # stopping, and nothing is left
                target, callbacks, self._callbacks = self._requested, self._callbacks, []
            try:
                self._sync()
            except OSError as exc:
                with self._cond:
                    self.error = f"fsync of {self.wal_path} failed: {exc.strerror or exc}"
                    self._cond.notify_all()
                logger.error("%s: %d commits are not acknowledged (the broker delivers them again)",
                             self.error, target - self._done)
                return
            self.syncs += 1
            for callback in callbacks:
                try:
                    callback()
                except Exception:  # an acknowledgement that failed: the broker delivers it again
                    logger.exception("what waited for the fsync of %s failed", self.wal_path)
            with self._cond:  # done only now, so that wait() returns once the callbacks have run
                self._done = target
                self._cond.notify_all()

    def _sync(self) -> None:
        if self._fd is None:
            self._fd = os.open(self.wal_path, os.O_RDONLY)
            try:  # the WAL's directory entry, once: some file systems refuse to fsync a directory
                directory = os.open(self.wal_path.parent, os.O_RDONLY)
                try:
                    os.fsync(directory)
                finally:
                    os.close(directory)
            except OSError as exc:
                logger.warning("could not fsync the directory of %s (%s); its WAL is fsynced all the same",
                               self.wal_path, exc.strerror or exc)
        os.fdatasync(self._fd)

    def stop(self, timeout: float = 10.0) -> None:
        """Finish what was asked for (its callbacks too), then end the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout)
        if self._thread.is_alive():
            logger.warning("the fsync thread of %s did not stop within %g s", self.wal_path, timeout)
            return
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
