"""Checkpoints that really resume: atomic writes, keep-last-N, best-by-metric, auto-resume.

A training checkpoint holds the model (never ``module.``-prefixed), the optimiser, the AMP scaler,
the iteration, the RNG states of every rank (Python, NumPy, torch, CUDA), the data-order state, the
merged config and the best validation score so far. It is written to a temporary file, flushed
to the disk and moved into place with ``os.replace``, so a crash while saving never leaves a truncated checkpoint, and a
failed write (a full disk, say) leaves the previous ones as they were. Every value is plain data,
so checkpoints load with ``weights_only=True`` (``afa.safe_load``).
"""

from __future__ import annotations

import random
import re
import shutil
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from afa.atomic import remove_stale_temporaries, write_atomic
from afa.safe_load import CheckpointError, UnsafeFileError, read_torch_file

__all__ = [
    "CheckpointManager",
    "ResumePoint",
    "capture_rng_state",
    "load_scaler_state",
    "non_finite_tensors",
    "restore_rng_state",
    "unwrap_model",
]

_ITER_FILE = re.compile(r"^iter_(\d+)\.pth$")
# What a checkpoint needs to continue a run (a file of weights alone has only the model).
_TRAINING_KEYS = ("model", "optimizer", "iteration", "config", "rng", "data")


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The bare model inside DDP / torch.compile wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or getattr(model, "_orig_mod")
    return model


def capture_rng_state() -> dict:
    """This process's RNG states; for CUDA only its own device (the one a rank trains on), so
    that a run resumed on a machine with another number of GPUs can restore it.

    Every value is a tensor, number, string or tuple: a checkpoint loads with
    ``weights_only=True`` (``afa.safe_load``). NumPy's key array is kept as an int64 tensor.
    """
    kind, key, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": {"kind": kind, "key": torch.from_numpy(key.astype(np.int64)), "pos": pos,
                       "has_gauss": has_gauss, "cached_gaussian": cached},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda_device"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    saved = state["numpy"]
    if isinstance(saved, dict):
        saved = (saved["kind"], saved["key"].numpy().astype(np.uint32), saved["pos"],
                 saved["has_gauss"], saved["cached_gaussian"])
    np.random.set_state(saved)  # a tuple with a NumPy array in checkpoints of older versions
    torch.set_rng_state(state["torch"])
    if "cuda_device" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda_device"])
    # Checkpoints before this format held every GPU's state ("cuda"); restoring them needs the
    # same GPU count, and the trainer reseeds torch per chunk anyway, so they are not restored.


def load_scaler_state(scaler: torch.amp.GradScaler, saved: dict) -> str | None:
    """Load an AMP gradient scaler's state when it fits this run; else say why it starts afresh.

    A scaler is enabled only for ``train.amp=fp16``; a checkpoint of a run with another setting
    holds an empty state, which ``GradScaler.load_state_dict`` refuses.
    """
    if not scaler.is_enabled():
        return None  # bf16 / fp32 use no scaler: a saved fp16 scale is simply not needed
    if not saved:
        return "the checkpoint has no fp16 gradient scaler state: the scaler starts afresh"
    scaler.load_state_dict(saved)
    return None


def non_finite_tensors(module: torch.nn.Module) -> list[str]:
    """Names of the parameters and floating-point buffers holding NaN or infinity."""
    named = list(module.named_parameters()) + [
        (n, b) for n, b in module.named_buffers() if b.is_floating_point()]
    finite = torch.stack([torch.isfinite(t.detach()).all() for _, t in named]).tolist()
    return [name for (name, _), ok in zip(named, finite) if not ok]


class CheckpointManager:
    """Writes ``iter_XXXXXX.pth`` into ``directory``, keeps the last ``keep_last``, and ``best.pth``."""

    def __init__(self, directory: str | Path, keep_last: int = 3):
        self.directory = Path(directory)
        self.keep_last = keep_last

    def _iter_files(self) -> list[tuple[int, Path]]:
        if not self.directory.is_dir():
            return []
        found = [(int(m[1]), p) for p in self.directory.iterdir() if (m := _ITER_FILE.match(p.name))]
        return sorted(found)

    def latest(self) -> Path | None:
        files = self._iter_files()
        return files[-1][1] if files else None

    def _write(self, path: Path, write) -> None:
        try:
            write_atomic(path, write, durable=True)
        except (OSError, RuntimeError) as err:
            cause = _os_error(err)  # a full disk, a read-only or vanished folder, a quota
            if cause is None:
                raise
            kept = self.latest()
            raise CheckpointError(
                f"Cannot write checkpoint '{path}': {cause.strerror or cause}"
                + (f"; the previous checkpoint {kept.name} is intact" if kept else "")) from None

    def save(self, state: dict, iteration: int, is_best: bool = False) -> Path:
        remove_stale_temporaries(self.directory)  # of writers killed mid-write
        path = self.directory / f"iter_{iteration:06d}.pth"

        def write(tmp: Path) -> None:
            # Through a Python file object: a failed write raises OSError with its cause
            # (torch's own writer reports only "enforce fail at inline_container.cc").
            with open(tmp, "wb") as file:
                torch.save(state, file)

        self._write(path, write)
        if is_best:
            self._write(self.directory / "best.pth", lambda tmp: shutil.copyfile(path, tmp))
        if self.keep_last > 0:
            for _, old in self._iter_files()[:-self.keep_last]:
                old.unlink(missing_ok=True)
        return path

    def find_resume(self, resume: str | None, log=None) -> ResumePoint | None:
        """The checkpoint to resume from, read: None on a fresh run (or ``auto`` with none).

        ``auto``: the newest readable ``iter_*.pth`` here; unreadable ones (truncated by a full
        disk or a copy, say) are skipped and named through ``log.warning``. A path: that file,
        which must be a readable training checkpoint. Raises ``FileNotFoundError`` and
        :class:`CheckpointError` (``UnsafeFileError`` included: a file holding code is never
        skipped over quietly) with one-line messages.
        """
        if not resume:
            return None
        if resume != "auto":
            path = Path(resume)
            if not path.is_file():
                raise FileNotFoundError(f"--resume: checkpoint not found: '{path}'")
            return ResumePoint(path, _training_state(path, read_torch_file(path)))
        skipped = []
        for _, path in reversed(self._iter_files()):
            try:
                state = _training_state(path, read_torch_file(path))
            except UnsafeFileError:
                raise
            except CheckpointError as err:
                skipped.append(str(err))
                if log is not None:
                    log.warning("--resume auto: skipped %s", err)
                continue
            return ResumePoint(path, state)
        if skipped:
            raise CheckpointError(f"--resume auto: no readable checkpoint in {self.directory} "
                                  f"({len(skipped)} skipped; the newest: {skipped[0]})")
        return None


def _os_error(err: BaseException | None) -> OSError | None:
    """The OSError behind ``err``: torch's zip writer may report a failed write of the file
    object as its own RuntimeError while it closes the archive, with the OSError as context."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, OSError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


class ResumePoint(NamedTuple):
    path: Path
    state: dict  # what CheckpointManager.save wrote


def _training_state(path: Path, state) -> dict:
    """``state`` if it is a training checkpoint of ours; otherwise a one-line CheckpointError."""
    if not isinstance(state, dict):
        raise CheckpointError(f"'{path}' holds a {type(state).__name__}, not a training "
                              "checkpoint")
    missing = [k for k in _TRAINING_KEYS if k not in state]
    if missing:
        what = ("model weights only" if "model" in state or "state_dict" in state
                or all(isinstance(v, torch.Tensor) for v in state.values()) else "something else")
        raise CheckpointError(
            f"'{path}' holds {what} (no {', '.join(missing)}): --resume needs a training "
            "checkpoint written by tools/train.py (work_dir/checkpoints/iter_*.pth); weights "
            "alone are evaluated with tools/evaluate.py --checkpoint")
    return state
