"""One training run per work dir, enforced by the operating system.

Two trainers writing one work dir would overwrite each other's checkpoints, interleave
``train.log`` and leave two TensorBoard event files, and both would exit 0. The main process
therefore holds an exclusive lock on ``<work_dir>/.afa-run.lock`` for the whole run; a second run
(fresh, ``--resume`` or ``--overwrite``) is refused at once, naming the process that holds it.

The lock is a POSIX record lock (``fcntl.lockf``): the kernel drops it when its process ends, by
any exit, ``kill -9`` included, so a crashed run never blocks the next one and there is no stale
lock file to clean up (the file stays; only the lock matters). Such locks belong to the process,
not to its file descriptor, so forked DataLoader workers do not inherit it, and they work on the
network file systems that support ``fcntl`` locks (NFSv4, Lustre, GPFS). Consequence to keep in
mind: closing *any* descriptor of this file in the holding process releases the lock, so nothing
else in the trainer may open it.
"""

from __future__ import annotations

import fcntl
import os
import socket
import sys
import time
from pathlib import Path

__all__ = ["LOCK_NAME", "WorkDirBusy", "WorkDirLock"]

LOCK_NAME = ".afa-run.lock"


class WorkDirBusy(RuntimeError):
    """Another process holds the work dir; the message names it."""


class WorkDirLock:
    """``with WorkDirLock(work_dir):`` holds ``work_dir`` for this process, or raises
    :class:`WorkDirBusy`. The lock file records who holds it (pid, host, start, command)."""

    def __init__(self, work_dir: str | os.PathLike):
        self.path = Path(work_dir) / LOCK_NAME
        self._fd = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 4096).decode(errors="replace").strip() or "an unknown process"
            os.close(fd)
            raise WorkDirBusy(
                f"{self.path.parent} is in use by another training run ({holder}): wait for it "
                "to finish, stop it, or choose another --work-dir") from None
        stamp = (f"pid {os.getpid()} on {socket.gethostname()}, started "
                 f"{time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(sys.argv)}")
        os.ftruncate(fd, 0)
        os.pwrite(fd, (stamp + "\n").encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.ftruncate(fd, 0)
            os.close(fd)  # closing drops the lock

    def __enter__(self) -> "WorkDirLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
