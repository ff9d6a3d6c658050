"""Atomic file writes: write under a temporary name in the same folder, then ``os.replace``.

A reader (or a resumed run) therefore sees either the old file or the complete new one, never a
truncated file left by a crash, Ctrl-C or pre-emption in the middle of a write. Every module that
writes outputs (checkpoints, masks, CAMs, scores) goes through :func:`write_atomic`; it imports
nothing from ``afa`` so that any module can use it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

__all__ = ["remove_stale_temporaries", "write_atomic"]

_TEMPORARY = re.compile(r"^\..+\.tmp(\d+)$")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str | os.PathLike, write: Callable[[Path], object],
                 durable: bool = False) -> None:
    """Call ``write(tmp_path)``, then rename the result to ``path`` (parents are created).

    The temporary name is hidden and carries the process id, so concurrent writers of different
    files in one folder never collide; it is removed if ``write`` fails. ``durable``: the file's
    bytes and then the folder's entry are flushed to the disk (``fsync``) before and after the
    rename, so that a power loss or a node crash right after cannot leave an empty or missing
    file under either name (checkpoints; per-image outputs skip the cost).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.unlink(missing_ok=True)  # left by a killed process with the same id: links need it gone
    try:
        write(tmp)
        if durable:
            _fsync(tmp)
        os.replace(tmp, path)
        if durable:
            _fsync(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_temporaries(directory: str | os.PathLike) -> list[Path]:
    """Remove the temporary files of :func:`write_atomic` whose writer is no longer running
    (killed with ``kill -9``, say: it had no chance to clean up); returns what was removed.

    Only names of the form ``.<name>.tmp<pid>`` are considered, and only when no process with that
    id runs on this machine, so a live writer's file is never touched.
    """
    directory = Path(directory)
    removed = []
    if not directory.is_dir():
        return removed
    for entry in directory.iterdir():
        match = _TEMPORARY.match(entry.name)
        if match and entry.is_file() and not _alive(int(match[1])):
            entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed
