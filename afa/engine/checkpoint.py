"""Checkpoints that really resume: atomic writes, keep-last-N, best-by-metric, auto-resume.

A training checkpoint holds the model (never ``module.``-prefixed), the optimiser, the AMP scaler,
the iteration, the RNG states of every rank (Python, NumPy, torch, CUDA), the data-order state, the
merged config and the best validation score so far. It is written to a temporary file and moved
into place with ``os.replace``, so a crash while saving never leaves a truncated checkpoint.
"""

from __future__ import annotations

import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from afa.atomic import write_atomic

__all__ = [
    "CheckpointManager",
    "capture_rng_state",
    "load_scaler_state",
    "non_finite_tensors",
    "restore_rng_state",
    "unwrap_model",
]

_ITER_FILE = re.compile(r"^iter_(\d+)\.pth$")


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The bare model inside DDP / torch.compile wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or getattr(model, "_orig_mod")
    return model


def capture_rng_state() -> dict:
    """This process's RNG states; for CUDA only its own device (the one a rank trains on), so
    that a run resumed on a machine with another number of GPUs can restore it."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda_device"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
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

    def save(self, state: dict, iteration: int, is_best: bool = False) -> Path:
        path = self.directory / f"iter_{iteration:06d}.pth"
        write_atomic(path, lambda tmp: torch.save(state, tmp))
        if is_best:
            write_atomic(self.directory / "best.pth", lambda tmp: shutil.copyfile(path, tmp))
        if self.keep_last > 0:
            for _, old in self._iter_files()[:-self.keep_last]:
                old.unlink(missing_ok=True)
        return path

    def resolve(self, resume: str | None) -> Path | None:
        """``auto``: the latest checkpoint here (None on a fresh run); otherwise a path that must exist."""
        if not resume:
            return None
        if resume == "auto":
            return self.latest()
        path = Path(resume)
        if not path.is_file():
            raise FileNotFoundError(f"--resume: checkpoint not found: '{path}'")
        return path
