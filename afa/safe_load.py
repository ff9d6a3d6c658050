"""Read a PyTorch file a user names as data, never as code.

``torch.load`` unpickles: a file can name any Python callable, and a load without the
``weights_only`` restriction calls it. Checkpoints are exchanged by link, so every checkpoint or
weight file afa opens goes through :func:`read_torch_file`, which loads with
``weights_only=True``: tensors, numbers, strings and plain containers only. Everything afa
writes is of that kind (the RNG states included, see ``afa.engine.checkpoint``), so no
allow-list of classes is needed.

A file that holds anything else is refused before a byte of it runs (:class:`UnsafeFileError`,
naming the objects it would have created), with one exception: training checkpoints written by
afa before this rule kept NumPy's RNG state as a NumPy array. Those are read with the same
restricted unpickler, which is also allowed to rebuild NumPy arrays and dtypes (plain data; no
other callable), and nothing else.
"""

from __future__ import annotations

import contextlib
import pickle
import re
from pathlib import Path

import numpy as np
import torch

__all__ = ["CheckpointError", "UnsafeFileError", "read_torch_file"]


class CheckpointError(RuntimeError):
    """A checkpoint or weight file that cannot be used; the message names the file."""


class UnsafeFileError(CheckpointError):
    """A file whose unpickling would create objects other than tensors and plain data."""


def _numpy_globals() -> dict[str, object]:
    """What ``np.random.get_state()`` pickles to (NumPy 1 and 2 module names)."""
    multiarray = getattr(np, "_core", None) or np.core
    found = {}
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        found[f"{module}._reconstruct"] = multiarray.multiarray._reconstruct
    found["numpy.ndarray"] = np.ndarray
    found["numpy.dtype"] = np.dtype
    for name in ("UInt32DType", "Float64DType", "Int64DType"):
        if hasattr(getattr(np, "dtypes", None), name):
            found[f"numpy.dtypes.{name}"] = getattr(np.dtypes, name)
    return found


def _unsafe_globals(path: Path, err: Exception) -> list[str]:
    """The globals (``module.name``) a weights-only load of ``path`` refuses."""
    with contextlib.suppress(Exception):
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    return sorted(set(re.findall(r"GLOBAL ([\w.]+)", str(err))))  # the legacy (non-zip) format


def _first_line(err: Exception) -> str:
    """The first sentence of an error message (torch's run to several lines of advice)."""
    text = str(err).strip()
    return text.splitlines()[0].split(". ")[0] if text else "empty message"


def read_torch_file(path: str | Path, what: str = "checkpoint"):
    """``torch.load`` of ``path`` onto the CPU with ``weights_only=True``.

    Raises ``FileNotFoundError`` (no such file), :class:`UnsafeFileError` (the file holds other
    Python objects; nothing of it ran) or :class:`CheckpointError` (truncated, damaged or not a
    PyTorch file). Every message is one line naming ``path``; ``what`` names the kind of file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what.capitalize()} not found: '{path}'")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        refused = _unsafe_globals(path, err)
        allowed = _numpy_globals()
        if not refused:  # no object the unpickler refused: the bytes themselves are broken
            raise CheckpointError(f"Cannot read {what} '{path}': damaged or not a PyTorch file "
                                  f"(UnpicklingError: {_first_line(err)})") from None
        if not set(refused) <= set(allowed):
            objects = ", ".join(g for g in refused if g not in allowed)
            raise UnsafeFileError(
                f"Refusing to load {what} '{path}': besides tensors and plain data it holds "
                f"Python objects ({objects}) whose unpickling could run code; afa never writes "
                "such a file. Nothing of it was executed") from None
        legacy = err
    # A damaged file fails in whichever layer its bytes break: the zip reader (RuntimeError,
    # BadZipFile), the file system (OSError), or the unpickler cut short (EOFError, IndexError,
    # struct.error, ValueError, ...). Nothing of it has run, whatever the type.
    except Exception as err:  # noqa: BLE001 - every failure here means "cannot be read"
        raise CheckpointError(f"Cannot read {what} '{path}': truncated, damaged or not a PyTorch "
                              f"file ({type(err).__name__}: {_first_line(err)})") from None
    # An afa training checkpoint written before RNG states were stored as tensors: the same
    # restricted unpickler, allowed to rebuild NumPy arrays (data only).
    try:
        with torch.serialization.safe_globals([(obj, name) for name, obj in allowed.items()]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - reported as the refusal it is
        raise CheckpointError(f"Cannot read {what} '{path}' ({type(err).__name__}: "
                              f"{_first_line(err)}; first refusal: {_first_line(legacy)})"
                              ) from None
