"""The named pieces around the training loop: stop signals, checkpoints, validation and the loss
report. Each holds its own state; ``afa.engine.trainer`` calls them at the iteration boundaries
it decides, so that the loop itself stays a screen long.
"""

from __future__ import annotations

import logging
import signal
import time
from dataclasses import dataclass, field

import torch
from torch.utils.data import Subset

from afa.constants import STOP_SIGNALS
from afa.data import DataError
from afa.engine import distributed as D
from afa.engine.checkpoint import CheckpointManager, capture_rng_state, non_finite_tensors
from afa.engine.logger import RunLogger
from afa.engine.validate import KINDS, ValidationStopped, format_table, validate

__all__ = ["Checkpointer", "LOSS_KEYS", "LossReport", "StopFlag", "TrainingInterrupted",
           "Validator", "data_problem"]

log = logging.getLogger("afa")

LOSS_KEYS = ("cls_loss", "seg_loss", "aff_loss", "reg_loss", "total")


class TrainingInterrupted(BaseException):
    """Raised once a stop signal (Ctrl-C, SIGTERM, SIGUSR1) has been handled: the checkpoint of
    the last finished iteration is on disk (``forced``: a second signal exited at once, after
    the last checkpoint written). A BaseException, like KeyboardInterrupt, so that no
    ``except Exception`` on the way swallows it."""

    def __init__(self, signum: int, message: str, forced: bool = False):
        super().__init__(message)
        self.signum = int(signum)
        self.forced = forced


class StopFlag:
    """Turns the first stop signal into a flag the loop checks, and a second one into an exit.

    The loop saves a checkpoint at the next iteration boundary (or at once during validation,
    whose checkpoint is already written) and raises :class:`TrainingInterrupted`. A second signal
    raises it at once, wherever the loop is: what was checkpointed last is what remains.
    """

    def __init__(self):
        self.signum = None
        self.last_checkpoint = None  # iteration of the last checkpoint written by this run
        self.finished = False  # every iteration done and saved: see __exit__
        self._previous = {}
        self._announced = False

    def requested(self) -> bool:
        """Whether a stop signal came; the first call that sees it logs it.

        The handler itself only sets the flag: a signal arrives between any two bytecodes of the
        main thread, also inside a log handler's write to train.log, and logging from there is a
        reentrant call into that buffered file (a RuntimeError, seen in CI)."""
        if self.signum is not None and not self._announced:
            self._announced = True
            log.warning("%s received: stopping after a checkpoint of the last finished iteration "
                        "(send it again to exit at once)", signal.Signals(self.signum).name)
        return self.signum is not None

    def interrupted(self, message: str) -> TrainingInterrupted:
        return TrainingInterrupted(self.signum, message)

    def __enter__(self) -> "StopFlag":
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is None:
            self.signum = signum
            return
        saved = ("no checkpoint was written by this run" if self.last_checkpoint is None else
                 f"the last checkpoint is iteration {self.last_checkpoint}")
        raise TrainingInterrupted(signum, f"second stop signal ({signal.Signals(signum).name}): "
                                  f"exited at once; {saved}", forced=True)

    def __exit__(self, exc_type, *exc):
        for sig, handler in self._previous.items():
            if (sig == signal.SIGUSR1 and self.finished and exc_type is None
                    and handler == signal.SIG_DFL):
                # A finished run has nothing left to save. SLURM's time-limit signal arriving
                # while the process winds down would otherwise end it with status 138, which
                # launch/slurm_*.sh answer with a needless requeue.
                handler = _after_the_run
            signal.signal(sig, handler)


def _after_the_run(signum, frame) -> None:
    """Ignore the signal (without logging: a handler must not write to train.log, see
    :meth:`StopFlag.requested`). A caught signal, unlike SIG_IGN, is not inherited by programs
    this process starts."""


def data_problem(err: Exception) -> str:
    """The message of a DataError, without the traceback a DataLoader worker wraps around it."""
    text = str(err)
    if "Original Traceback" in text:
        last = [line for line in text.splitlines() if line.strip()][-1]
        text = last.split("DataError: ", 1)[-1]
    return text


@dataclass
class Checkpointer:
    """Writes the checkpoint of an iteration: everything a resumed run needs (see
    ``afa.engine.checkpoint``), from the main process, with every rank's RNG state."""

    manager: CheckpointManager
    model: torch.nn.Module  # the bare model
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    config: dict  # the resolved config, saved with every checkpoint
    global_batch: int
    stop: StopFlag
    world: int
    main: bool
    best: float = -1.0  # the best validation seg mIoU so far

    def save(self, iteration: int, *, validated: bool = True, is_best: bool = False) -> None:
        bad = non_finite_tensors(self.model)
        if bad:  # never leave a checkpoint that cannot be trained on
            raise FloatingPointError(f"Not writing the checkpoint of iteration {iteration}: "
                                     f"non-finite values in {', '.join(bad[:5])}")
        rng = [None] * self.world
        if self.world > 1:
            torch.distributed.all_gather_object(rng, capture_rng_state())
        else:
            rng[0] = capture_rng_state()
        if self.main:
            state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                     "scaler": self.scaler.state_dict(), "iteration": iteration,
                     "best": self.best, "validated": validated, "rng": rng,
                     "data": {"stream_position": iteration * self.global_batch,
                              "global_batch": self.global_batch},
                     "config": self.config}
            path = self.manager.save(state, iteration, is_best)
            if is_best:
                log.info("best.pth updated: seg mIoU %.2f at iteration %d (%s)", 100 * self.best,
                         iteration, path.name)
        D.barrier()
        self.stop.last_checkpoint = iteration


@dataclass
class Validator:
    """Validates the model at an iteration whose checkpoint is written, logs the scores and
    writes the checkpoint again, marked validated (and ``best.pth`` when the segmentation
    improved)."""

    model: torch.nn.Module  # the bare model
    dataset: object
    checkpointer: Checkpointer
    run_log: RunLogger
    class_names: list[str]
    kwargs: dict  # validate()'s arguments: par, device, cam_scales, thresholds, radius, amp, ...
    scores: dict = field(default_factory=dict)
    subset: int | None = None  # train.eval_subset: images of the periodic validations
    max_iters: int = 0  # whose validation scores the whole split

    def _dataset(self, iteration: int):
        """The whole split, or (train.eval_subset, before the last iteration) every k-th image."""
        total = len(self.dataset)
        if self.subset is None or self.subset >= total or iteration >= self.max_iters:
            return self.dataset
        return Subset(self.dataset, [i * total // self.subset for i in range(self.subset)])

    def __call__(self, iteration: int) -> None:
        stop = self.checkpointer.stop
        D.broadcast_buffers(self.model)
        dataset = self._dataset(iteration)
        if dataset is not self.dataset:
            log.info("val iter %d: %d of the %d val images, evenly spread (train.eval_subset; "
                     "the last iteration's validation scores them all)", iteration,
                     len(dataset), len(self.dataset))
        try:
            self.scores = validate(self.model, dataset, should_stop=stop.requested,
                                   class_names=self.class_names, **self.kwargs)
        except ValidationStopped:
            raise stop.interrupted(
                f"stopped by {signal.Signals(stop.signum).name} during the validation of "
                f"iteration {iteration}; its checkpoint is saved and --resume auto redoes the "
                "validation") from None
        except DataError as err:
            raise DataError(
                f"{data_problem(err)}\nValidation at iteration {iteration} stopped; the "
                f"checkpoint of iteration {iteration} is saved. Fix or remove the file (or set "
                "data.skip_bad=true), then continue with --resume auto, which redoes this "
                "validation") from None
        if dataset is not self.dataset:
            self.scores["subset_images"] = len(dataset)
        summary = _summary(self.scores)
        self.run_log.scalars(iteration, summary, prefix="val/")
        self.run_log.val_scores(iteration, self.scores)
        log.info("val iter %d: %s\n%s", iteration,
                 " ".join(f"{k} {100 * v:.2f}" for k, v in summary.items()
                          if k in KINDS or k in ("cls_f1", "cls_map")),
                 format_table(self.scores, self.class_names))
        # best.pth: the segmentation's mIoU; with no mask anywhere, the classifier's mAP.
        score = summary.get("seg", summary.get("cls_map", summary["cls_f1"]))
        is_best = score > self.checkpointer.best
        self.checkpointer.best = max(self.checkpointer.best, score)
        self.checkpointer.save(iteration, validated=True, is_best=is_best)


def _summary(scores: dict) -> dict:
    """The scalars of a validation for the logs: every finite mIoU, F1, mAP, coverage."""
    summary = {k: scores[k]["miou"] for k in KINDS if scores[k]["miou"] is not None}
    summary["cls_f1"] = scores["cls_f1"]
    if scores.get("cls_map") is not None:
        summary["cls_map"] = scores["cls_map"]
    summary.update({f"coverage_{k}": v for k, v in scores.get("coverage", {}).items()})
    for key in ("skipped_images", "masked_images", "subset_images"):
        if key in scores:
            summary[key] = scores[key]
    return summary


class LossReport:
    """The loss terms and finiteness of every iteration, kept on the device until the next
    report: reading them is the loop's one host-device sync (every ``log_iters``, and at a
    checkpoint)."""

    def __init__(self, run_log: RunLogger, log_iters: int, max_iters: int, world: int,
                 nonfinite: str):
        self.run_log, self.log_iters, self.max_iters = run_log, log_iters, max_iters
        self.world, self.nonfinite = world, nonfinite
        self.window, self.sums, self.logged = [], None, 0
        self.skipped_steps, self.skipped_files = 0, 0
        self.tic = time.time()

    def add(self, iteration: int, terms: torch.Tensor, finite: torch.Tensor) -> None:
        """Iteration ``iteration``'s (5,) loss terms (``LOSS_KEYS``) and its finiteness."""
        self.window.append((iteration, terms, finite))
        self.sums = terms if self.sums is None else self.sums + terms
        self.logged += 1

    def due(self, iteration: int) -> bool:
        return iteration % self.log_iters == 0 or iteration == self.max_iters

    def check_finite(self) -> str | None:
        """Reads the window (the sync); a dropped step is counted (``skip``) or returned as the
        message to stop with (``stop``)."""
        good = torch.stack([f for _, _, f in self.window]).cpu().tolist()
        rows = torch.stack([v for _, v, _ in self.window]).cpu().tolist()
        bad_iterations = [(it, row) for (it, _, _), ok, row in zip(self.window, good, rows)
                          if not ok]
        self.window.clear()
        for bad_iter, row in bad_iterations:
            message = (f"Non-finite loss or gradient at iteration {bad_iter}: " + ", ".join(
                f"{k}={v:.4g}" for k, v in zip(LOSS_KEYS[:-1], row)))
            if self.nonfinite == "stop":
                return message
            self.skipped_steps += 1
            log.warning("%s; step dropped (%d so far)", message, self.skipped_steps)
        return None

    def write(self, iteration: int, lr: float) -> dict:
        """Averages since the last report, over iterations and ranks, to every log."""
        totals = self.sums.double() / self.logged
        D.all_reduce_sum(totals)
        means = dict(zip(LOSS_KEYS, (totals / self.world).tolist()))
        means.update(lr=lr, skipped_steps=self.skipped_steps, skipped_files=self.skipped_files,
                     sec_per_iter=(time.time() - self.tic) / self.logged)
        self.sums, self.logged, self.tic = None, 0, time.time()
        self.run_log.scalars(iteration, means, prefix="train/")
        log.info("iter %d/%d lr %.3e loss %.4f (cls %.4f seg %.4f aff %.4f reg %.4f)",
                 iteration, self.max_iters, lr, means["total"], means["cls_loss"],
                 means["seg_loss"], means["aff_loss"], means["reg_loss"])
        return means
