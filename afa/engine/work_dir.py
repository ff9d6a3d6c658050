"""A run's work dir: a fresh run never mixes its files with another's, and a resumed run continues
with the config its checkpoint was trained with (or with the changes the user allowed)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from afa import config as C
from afa.engine import distributed as D

__all__ = ["RESUME_FREE_KEYS", "check_resume_config", "config_differences", "prepare_work_dir"]

# Saved-config keys that a resumed run may change freely: they change no number of the run
# (the two filters of the regularized loss agree to float rounding, bit for bit on the CPU).
RESUME_FREE_KEYS = ("work_dir", "data.num_workers", "loss.reg_workers", "loss.reg_backend")
# What a run writes into its work dir; a fresh run refuses a dir holding the first three.
_RUN_FILES = ("checkpoints", "metrics.jsonl", "tb", "val_scores.json", "train.log", "config.yaml")


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_differences(saved: dict, cfg: DictConfig) -> list[tuple[str, object, object]]:
    """``(key, saved value, current value)`` for every key that differs (``<absent>`` if new).

    ``saved`` may come from an earlier version of afa: it is read in today's keys first
    (:func:`afa.config.upgrade_saved_config`)."""
    saved = C.upgrade_saved_config(saved)
    old = _flatten(OmegaConf.to_container(OmegaConf.create(saved), resolve=True))
    new = _flatten(OmegaConf.to_container(cfg, resolve=True))
    return [(k, old.get(k, "<absent>"), new.get(k, "<absent>")) for k in sorted(set(old) | set(new))
            if old.get(k, "<absent>") != new.get(k, "<absent>") and k not in RESUME_FREE_KEYS]


def check_resume_config(saved: dict, cfg: DictConfig, allowed, path: Path,
                        log: logging.Logger) -> None:
    """Refuse to resume with a config other than the checkpoint's, except for allowed keys."""
    def is_allowed(key: str) -> bool:
        return any(a in ("all", key) or key.startswith(f"{a}.") for a in allowed)

    diffs = config_differences(saved, cfg)
    refused = [d for d in diffs if not is_allowed(d[0])]
    lines = [f"  {k}: {old!r} in the checkpoint, {new!r} now" for k, old, new in diffs]
    if refused:
        keys = " ".join(k for k, _, _ in refused)
        raise C.ConfigError(
            f"--resume: the config differs from the one {path} was trained with:\n"
            + "\n".join(lines) + f"\nResume with the same config, allow the change with "
            f"--allow-config-change {keys}, or train the new config in another --work-dir")
    if diffs:
        log.warning("Resuming with config changes (allowed):\n%s", "\n".join(lines))


def prepare_work_dir(work_dir: Path, resume: str | None, overwrite: bool, main: bool) -> None:
    """A fresh run never mixes its files with another run's; ``overwrite`` removes those first
    (only the files a run writes: anything else in the folder is left alone)."""
    found = []
    checkpoints = work_dir / "checkpoints"
    if checkpoints.is_dir():
        found += sorted(f"checkpoints/{p.name}" for p in checkpoints.iterdir())[:3]
    if (work_dir / "metrics.jsonl").is_file():
        found.append("metrics.jsonl")
    if (work_dir / "tb").is_dir() and any((work_dir / "tb").iterdir()):
        found.append("tb/")
    D.barrier()  # every rank has looked before rank 0 removes anything
    if found and resume is None and not overwrite:
        raise C.ConfigError(
            f"{work_dir} holds another run ({', '.join(found)}). Continue it with --resume auto, "
            f"replace it with --overwrite, or choose another --work-dir")
    if overwrite and main:
        for name in _RUN_FILES:
            path = work_dir / name
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
    D.barrier()
