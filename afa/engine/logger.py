"""Run logging on the main process: a human log file, JSON lines of every scalar, TensorBoard.

Progress bars are drawn only on an interactive terminal: in a redirected log (a SLURM ``.out``
file, ``2> log``) tqdm's carriage-return updates would glue onto the log lines, and the periodic
log lines already say how far the run is. On a terminal, log lines are printed above the bar.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import numpy as np
from tqdm import tqdm

from afa.atomic import write_atomic

__all__ = ["RunLogger", "progress_enabled", "record_failure", "run_record", "setup_logging"]


def progress_enabled() -> bool:
    """Draw progress bars: on the main process, when stderr is an interactive terminal."""
    from afa.engine import distributed as D

    return D.is_main() and sys.stderr.isatty()


class _AboveTheBar(logging.StreamHandler):
    """Writes each record through ``tqdm.write`` so that it appears above a live progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # noqa: BLE001 - logging must never raise; report as logging does
            self.handleError(record)


def setup_logging(work_dir: Path | None, main: bool) -> logging.Logger:
    """``afa`` logger: INFO to stderr and ``work_dir/train.log`` on the main process, WARNING elsewhere."""
    logger = logging.getLogger("afa")
    logger.handlers.clear()
    logger.propagate = False
    logger.setLevel(logging.INFO if main else logging.WARNING)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
    stream = _AboveTheBar(sys.stderr)
    stream.setFormatter(fmt)
    logger.addHandler(stream)
    if main and work_dir is not None:
        work_dir.mkdir(parents=True, exist_ok=True)
        file = logging.FileHandler(work_dir / "train.log")
        file.setFormatter(fmt)
        logger.addHandler(file)
    return logger


def record_failure(err: BaseException) -> None:
    """Write why a run ended into ``train.log`` (the file handlers of the ``afa`` logger only:
    the tool prints the same message on the terminal)."""
    logger = logging.getLogger("afa")
    record = logger.makeRecord(logger.name, logging.ERROR, __file__, 0, "run ended: %s: %s",
                               (type(err).__name__, err), None)
    for handler in logger.handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def _git_commit(repo: Path) -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return f"unknown ({repo} is not a git checkout)"
    return commit + (" with uncommitted changes" if dirty else "")


def run_record(argv: list[str] | None = None) -> list[str]:
    """Lines that say what ran: command line, code version, library versions, host."""
    import torch

    versions = [f"python {platform.python_version()}",
                f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'})"]
    modules = {"torchvision": "torchvision", "numpy": "numpy", "omegaconf": "omegaconf",
               "pydensecrf2": "pydensecrf", "opencv-python-headless": "cv2"}
    for package, module in modules.items():
        try:
            versions.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:  # e.g. built from source onto the path
            found = importlib.util.find_spec(module) is not None
            versions.append(f"{package} " + ("version unknown (importable, no package metadata)"
                                             if found else "not installed"))
    repo = Path(__file__).resolve().parents[2]
    return [f"command: {' '.join(sys.argv if argv is None else argv)}",
            f"code: afa at {repo}, git commit {_git_commit(repo)}",
            f"libraries: {', '.join(versions)}",
            f"host: {platform.node()}, {platform.platform()}"]


def _iteration(line: str) -> int | None:
    """The ``iter`` of a ``metrics.jsonl`` line; None for a line cut short by a killed run."""
    try:
        return int(json.loads(line)["iter"])
    except (ValueError, KeyError, TypeError):
        return None


class RunLogger:
    """Scalars to ``metrics.jsonl`` and TensorBoard, images to TensorBoard; silent off the main rank.

    ``start_iter``: the iteration a resumed run continues from. Records of later iterations,
    written by the interrupted run after its last checkpoint, are dropped from ``metrics.jsonl``
    and TensorBoard, since the resumed run logs those iterations again.
    """

    def __init__(self, work_dir: Path, enabled: bool, start_iter: int = 0):
        self.enabled = enabled
        self.work_dir = work_dir
        self.writer = None
        self.jsonl = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            path = work_dir / "metrics.jsonl"
            if path.is_file():
                kept = [line for line in path.read_text(encoding="utf-8").splitlines(True)
                        if (_iteration(line) or start_iter + 1) <= start_iter]
                write_atomic(path, lambda tmp: tmp.write_text("".join(kept), encoding="utf-8"))
            self.writer = SummaryWriter(str(work_dir / "tb"), purge_step=start_iter + 1)
            self.jsonl = open(path, "a", encoding="utf-8")

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
