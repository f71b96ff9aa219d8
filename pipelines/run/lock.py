"""One run per output folder: ``OUT/run.lock``, held with ``fcntl.flock`` for the whole run.

The lock is the kernel's (on a local file system, and on NFSv4, which maps it to a byte-range
lock), so it is taken atomically and released by the kernel when the process dies however it
dies. The file also says who holds it (pid, host, start time, command) for the message a second
run gets. A run that ends normally empties the file; one that was killed leaves its record
behind with the lock free: the next run explains that (a dead pid on this host, or a host that
no longer holds the lock) and takes over.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType

LOCK_NAME = "run.lock"


class RunLockedError(RuntimeError):
    """Another run holds the output folder (or its file system cannot lock files)."""


@dataclass(frozen=True)
class LockHolder:
    """Who holds (or held) a run lock."""

    pid: int
    host: str
    started: str
    command: str

    def describe(self) -> str:
        """``pid 123 on host node1, started 2024-05-01T18:00:00+00:00``."""
        return f"pid {self.pid} on host {self.host}, started {self.started}"

    def on_this_host(self) -> bool:
        """True when the holder ran on this machine."""
        return self.host == socket.gethostname()

    def is_alive(self) -> bool | None:
        """Whether the holder's pid still runs; None when it ran on another host."""
        if not self.on_this_host():
            return None
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # alive, owned by someone else
            return True
        return True


def _parse(text: str) -> LockHolder | None:
    if not text.strip():
        return None
    try:
        data = json.loads(text)
        return LockHolder(pid=int(data["pid"]), host=str(data["host"]),
                          started=str(data["started"]), command=str(data.get("command", "")))
    except (ValueError, KeyError, TypeError):
        return LockHolder(pid=0, host="unknown", started="unknown",
                          command=f"unreadable lock record: {text[:80]!r}")


def read_holder(folder: str | Path) -> LockHolder | None:
    """The record in ``folder``'s lock file, without taking the lock (None: no record)."""
    try:
        return _parse((Path(folder) / LOCK_NAME).read_text())
    except FileNotFoundError:
        return None


def _read_fd(fd: int) -> str:
    return os.pread(fd, 65536, 0).decode(errors="replace")


class RunLock:
    """The held lock of an output folder; use :meth:`acquire` as a context manager."""

    def __init__(self, path: Path, fd: int, holder: LockHolder,
                 previous: LockHolder | None) -> None:
        self.path = path
        self.holder = holder
        #: The record a killed run left behind, when this run took its lock over.
        self.previous = previous
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, folder: str | Path) -> RunLock:
        """Take ``folder``'s lock or raise :class:`RunLockedError` naming the holder."""
        path = Path(folder) / LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _parse(_read_fd(fd))
            os.close(fd)
            who = holder.describe() if holder else "a run that is just starting"
            raise RunLockedError(
                f"{folder} is in use by another slidepipe run ({who}); wait for it to end "
                f"(see `slidepipe status {folder}`) or choose another output folder") from None
        except OSError as error:
            os.close(fd)
            if error.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise RunLockedError(
                    f"{path}: the file system cannot lock files ({error.strerror}); use an "
                    "output folder on a local disk or on NFSv4") from error
            raise
        previous = _parse(_read_fd(fd))
        holder = LockHolder(pid=os.getpid(), host=socket.gethostname(),
                            started=datetime.now(UTC).isoformat(timespec="seconds"),
                            command=" ".join(sys.argv))
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(asdict(holder)) + "\n").encode(), 0)
            os.fsync(fd)
        except OSError:
            os.close(fd)
            raise
        return cls(path, fd, holder, previous)

    def takeover_message(self) -> str | None:
        """Why the lock was free although a record was there (None: it was released)."""
        previous = self.previous
        if previous is None:
            return None
        alive = previous.is_alive()
        if alive is False:
            why = f"pid {previous.pid} is no longer running on {previous.host}"
        elif alive is None:
            why = f"host {previous.host} no longer holds the lock"
        else:
            why = f"pid {previous.pid} no longer holds the lock"
        return (f"the previous run ({previous.describe()}) ended without releasing "
                f"{self.path} (killed or crashed): {why}; taking over. Its unfinished slides "
                "are redone.")

    def release(self) -> None:
        """Empty the record and release the lock (idempotent)."""
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.release()
