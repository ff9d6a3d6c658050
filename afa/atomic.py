"""Atomic file writes: write under a temporary name in the same folder, then ``os.replace``.

A reader (or a resumed run) therefore sees either the old file or the complete new one, never a
truncated file left by a crash, Ctrl-C or pre-emption in the middle of a write. Every module that
writes outputs (checkpoints, masks, CAMs, scores) goes through :func:`write_atomic`; it imports
nothing from ``afa`` so that any module can use it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

__all__ = ["write_atomic"]


def write_atomic(path: str | os.PathLike, write: Callable[[Path], object]) -> None:
    """Call ``write(tmp_path)``, then rename the result to ``path`` (parents are created).

    The temporary name is hidden and carries the process id, so concurrent writers of different
    files in one folder never collide; it is removed if ``write`` fails.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.unlink(missing_ok=True)  # left by a killed process with the same id: links need it gone
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
