"""One agent per MQTT client id on this machine.

Two clients with the same client id knock each other off the broker: Mosquitto
2.0.11 closes the older connection (without a reason code) each time the other
one connects, and each agent ends up with part of the other's messages. An agent
holds a :class:`ClientIdLock` for as long as it may connect, so a second agent on
the same machine with the same broker ``host:port`` and client id refuses to
start and names the pid that holds the id.

The lock is ``fcntl.flock`` on a small file named from a hash of
``host:port:client_id``: the kernel releases it when the process exits, however
it exits (``kill -9`` included), so a stale lock file never blocks a restart.
The file is never deleted (deleting a lock file races with a process that just
opened it) and holds the holder's pid for the error message.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import os
import stat
import tempfile
from pathlib import Path

from streamlearn.errors import TransportError

logger = logging.getLogger(__name__)

LOCK_DIR_NAME = "streamlearn-locks"


def default_lock_dir() -> Path:
    """``<tempdir>/streamlearn-locks``: shared by every agent of this machine (mind systemd's PrivateTmp)."""
    return Path(tempfile.gettempdir()) / LOCK_DIR_NAME


def lock_name(host: str, port: int, client_id: str) -> str:
    """File name of the lock of one broker address and client id."""
    key = f"{host.strip().lower()}:{int(port)}:{client_id}".encode()
    return f"client-{hashlib.sha256(key).hexdigest()[:24]}.lock"


class ClientIdLock:
    """An exclusive, process-wide claim on one MQTT client id at one broker.

    Parameters
    ----------
    host, port
        The broker address as configured (the host is compared as written, lowercased).
    client_id
        The MQTT client id.
    directory
        Where the lock files live (default :func:`default_lock_dir`). Every agent that
        must see the others has to use the same directory.
    """

    def __init__(self, host: str, port: int, client_id: str, directory: str | Path | None = None) -> None:
        self.host = host
        self.port = int(port)
        self.client_id = client_id
        self.directory = Path(directory) if directory is not None else default_lock_dir()
        self.path = self.directory / lock_name(host, port, client_id)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def _what(self) -> str:
        return f"MQTT client id {self.client_id!r} at {self.host}:{self.port}"

    def acquire(self) -> None:
        """Take the lock, or raise :class:`TransportError` naming the pid that holds it."""
        if self._fd is not None:
            return
        try:
            if not self.directory.is_dir():
                self.directory.mkdir(parents=True, exist_ok=True)
                if self.directory == default_lock_dir():
                    # world-writable and sticky, like /tmp: agents of other users add their own files
                    self.directory.chmod(0o1777)
            flags = os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
            try:
                fd = os.open(self.path, flags | os.O_RDWR, 0o644)
            except PermissionError:  # another user's file: flock works read-only too
                fd = os.open(self.path, flags | os.O_RDONLY)
        except OSError as exc:
            raise TransportError(f"cannot create the lock file for the {self._what()} at {self.path}: "
                                 f"{exc.strerror or exc}") from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise TransportError(f"the lock file {self.path} is not a regular file")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise TransportError(f"cannot lock {self.path}: {exc.strerror or exc}") from None
                holder = self._read_holder(fd)
                who = f"pid {holder}" if holder else "another process (pid unknown)"
                raise TransportError(
                    f"the {self._what()} is in use by another streamlearn agent on this machine "
                    f"({who}; lock file {self.path}). Two clients with one client id knock each other "
                    "off the broker: stop the other agent, or give this one its own mqtt.client_id"
                ) from None
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()} {self.host}:{self.port} {self.client_id}\n".encode(), 0)
            except OSError as exc:  # read-only (another user's file): the lock holds, the pid is not recorded
                logger.debug("cannot record our pid in %s: %s", self.path, exc)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    @staticmethod
    def _read_holder(fd: int) -> int | None:
        try:
            text = os.pread(fd, 200, 0).decode("utf-8", "replace")
            return int(text.split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def holder(self) -> int | None:
        """The pid written by the current (or last) holder, if any."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            return None
        try:
            return self._read_holder(fd)
        finally:
            os.close(fd)

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.ftruncate(fd, 0)
        except OSError:
            pass
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def __enter__(self) -> ClientIdLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"ClientIdLock({self.host!r}, {self.port}, {self.client_id!r}, held={self.held})"
