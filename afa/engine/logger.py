"""Run logging on the main process: a human log file, JSON lines of every scalar, TensorBoard."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

from afa.atomic import write_atomic

__all__ = ["RunLogger", "setup_logging"]


def setup_logging(work_dir: Path | None, main: bool) -> logging.Logger:
    """``afa`` logger: INFO to stderr and ``work_dir/train.log`` on the main process, WARNING elsewhere."""
    logger = logging.getLogger("afa")
    logger.handlers.clear()
    logger.propagate = False
    logger.setLevel(logging.INFO if main else logging.WARNING)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
    stream = logging.StreamHandler(sys.stderr)
    stream.setFormatter(fmt)
    logger.addHandler(stream)
    if main and work_dir is not None:
        work_dir.mkdir(parents=True, exist_ok=True)
        file = logging.FileHandler(work_dir / "train.log")
        file.setFormatter(fmt)
        logger.addHandler(file)
    return logger


class RunLogger:
    """Scalars to ``metrics.jsonl`` and TensorBoard, images to TensorBoard; silent off the main rank."""

    def __init__(self, work_dir: Path, enabled: bool):
        self.enabled = enabled
        self.work_dir = work_dir
        self.writer = None
        self.jsonl = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(work_dir / "tb"))
            self.jsonl = open(work_dir / "metrics.jsonl", "a", encoding="utf-8")

    def scalars(self, iteration: int, values: dict[str, float], prefix: str = "") -> None:
        if not self.enabled:
            return
        record = {"iter": iteration, "time": round(time.time(), 3)}
        for key, value in values.items():
            name = f"{prefix}{key}"
            record[name] = float(value)
            self.writer.add_scalar(name, float(value), iteration)
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()

    def val_scores(self, iteration: int, scores: dict) -> None:
        """``val_scores.json``: the full scores of the latest validation with its iteration
        (atomically replaced), what ``tools/evaluate.py --json`` writes, without re-running it."""
        if self.enabled:
            record = json.dumps({"iteration": iteration, "scores": scores}, indent=2) + "\n"
            write_atomic(self.work_dir / "val_scores.json", lambda tmp: tmp.write_text(record))

    def image(self, iteration: int, tag: str, image_hwc: np.ndarray) -> None:
        if self.enabled:
            self.writer.add_image(tag, image_hwc, iteration, dataformats="HWC")

    def close(self) -> None:
        if self.enabled:
            self.writer.close()
            self.jsonl.close()
