"""The AFA training loop: one plain, iteration-counted function for VOC, COCO and the demo.

Per iteration (docs/method.md, steps 1-12 and 'Schedule'): forward with gradients, multi-scale
CAM without them, pseudo labels and losses (``afa.pseudo_labels.compute_afa_losses``), backward, AdamW step. The
learning rate is a pure function of the iteration, gradients are accumulated so that the config's
global batch holds for any number of processes, and a checkpoint captures everything needed to
continue bit-for-bit (``afa.engine.checkpoint``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import shutil
import signal
import time
import warnings
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from afa import config as C
from afa.cam import multi_scale_cam
from afa.constants import STOP_SIGNALS
from afa.data import DataError, build_datasets, class_names, denormalize, seed_worker
from afa.data.lists import subset_note
from afa.engine import distributed as D
from afa.engine.checkpoint import (CheckpointManager, capture_rng_state, load_scaler_state,
                                   non_finite_tensors, restore_rng_state, unwrap_model)
from afa.engine.data_order import ResumableSampler, SeededDataset, stream_seed
from afa.engine.logger import (RunLogger, progress_enabled, record_failure, run_record,
                               setup_logging)
from afa.engine.precision import autocast, precision_warning, resolve_amp, set_tf32
from afa.engine.optim import build_optimizer, load_optimizer_state, lr_at, set_lr
from afa.engine.run_lock import WorkDirBusy, WorkDirLock
from afa.engine.validate import ValidationStopped, format_table, validate
from afa.host_memory import keep_freed_host_memory
from afa.models import PAR, AFANet, convert_sync_batchnorm
from afa.pseudo_labels import AFALosses, compute_afa_losses, seg_probs

__all__ = ["RESUME_FREE_KEYS", "StepOutput", "TrainResult", "TrainingInterrupted", "config_differences",
           "train", "train_step"]

def _loss_kwargs(cfg: DictConfig) -> dict:
    c, t, l = cfg.cam, cfg.train, cfg.loss
    return dict(bkg_score=c.bkg_score, high=c.high, low=c.low, ignore_index=c.ignore_index,
                radius=c.radius, cam_iters=t.cam_iters, aff_switch_iter=t.aff_switch_iter,
                w_seg=l.w_seg, w_aff=l.w_aff, w_reg=l.w_reg, aff_balance=l.aff_balance)


class StepOutput(NamedTuple):
    terms: AFALosses  # pseudo labels and losses
    cam: torch.Tensor | None  # (B, C-1, H, W) multi-scale CAM, None in the classification phase
    seg_logits: torch.Tensor | None  # (B, C, H/4, W/4); None after a cls_only forward


def train_step(model, batch: dict, iteration: int, *, device: torch.device, par: PAR,
               crf_loss, cam_scales, amp: str, loss_kwargs: dict,
               cls_phase_full_forward: bool = True, reuse_train_forward: bool = False,
               update_decoder_bn: bool = False) -> StepOutput:
    """Forward, multi-scale CAM, pseudo labels and losses of one (micro-)batch; no backward.

    Before ``cam_iters`` with ``cls_phase_full_forward=False`` the forward runs the encoder and
    classifier only; the idle decoder and affinity head join the graph with weight 0 (for DDP).
    ``reuse_train_forward``: the multi-scale CAM takes its un-flipped scale-1 copy from this
    forward (``cam.reuse_train_forward``). ``update_decoder_bn``: the CAM forwards also run the
    decoder, updating its BatchNorm statistics as the authors' code does
    (``cam.update_decoder_bn``); they then run in the classification phase too, whose pseudo
    labels are not needed, as the authors' loop runs them every iteration.
    """
    images = batch["image"].to(device, non_blocking=True)  # (B, 3, H, W) normalised
    labels = batch["label"].to(device, non_blocking=True)  # (B, C-1) multi-hot
    boxes = batch["box"].to(device, non_blocking=True)  # (B, 4) [y0, y1, x0, x1]
    # Read on the host from the CPU batch, so that the pseudo labels never wait for the device.
    host = dict(box_list=batch["box"].tolist(),
                max_present=int(batch["label"].sum(dim=1).max()) if len(batch["label"]) else 0)
    rgb = denormalize(images)
    # The CAMs feed only the pseudo labels, which count from cam_iters on: skip them before,
    # unless their forwards must update the decoder's statistics.
    need_cams = iteration >= loss_kwargs["cam_iters"]
    cls_only = not (need_cams or cls_phase_full_forward)
    run_cams = need_cams or (update_decoder_bn and not cls_only)
    with autocast(device, amp):
        out = model(images, cls_only=cls_only)
    seg_logits = None if cls_only else out.seg_logits.float()
    pending_reg = None
    if crf_loss is not None and need_cams:
        # The regularized loss's CPU filter needs only this softmax: it runs (in crf_loss's
        # worker processes) while the multi-scale CAM and the pseudo labels are computed.
        pending_reg = crf_loss.start(rgb, seg_probs(seg_logits, rgb.shape[-2:]), boxes)
    with autocast(device, amp):
        cams = (multi_scale_cam(unwrap_model(model), images, cam_scales,
                                scale1=out if reuse_train_forward else None,
                                update_decoder_bn=update_decoder_bn, with_aff=need_cams)
                if run_cams else None)
    cam = cams.cam.float() if need_cams else None
    terms = compute_afa_losses(
        out.cls_logits.float(), seg_logits, None if cls_only else out.aff_pred.float(), cam,
        cams.aff.float() if need_cams else None, (out.grid, cams.aff_grid) if need_cams else None,
        rgb, labels, boxes, iteration, par=par, crf_loss=pending_reg, **host, **loss_kwargs)
    if cls_only:
        idle = sum(0.0 * p.sum() for p in unwrap_model(model).idle_params())
        terms = dataclasses.replace(terms, total=terms.total + idle)
    return StepOutput(terms, cam, None if cls_only else seg_logits.detach())


class TrainingInterrupted(BaseException):
    """Raised once a stop signal (Ctrl-C, SIGTERM, SIGUSR1) has been handled: the checkpoint of
    the last finished iteration is on disk (``forced``: a second signal exited at once, after
    the last checkpoint written). A BaseException, like KeyboardInterrupt, so that no
    ``except Exception`` on the way swallows it."""

    def __init__(self, signum: int, message: str, forced: bool = False):
        super().__init__(message)
        self.signum = int(signum)
        self.forced = forced


class _StopFlag:
    """Turns the first stop signal into a flag the loop checks, and a second one into an exit.

    The loop saves a checkpoint at the next iteration boundary (or at once during validation,
    whose checkpoint is already written) and raises :class:`TrainingInterrupted`. A second signal
    raises it at once, wherever the loop is: what was checkpointed last is what remains.
    """

    def __init__(self):
        self.signum = None
        self.last_checkpoint = None  # iteration of the last checkpoint written by this run
        self._previous = {}
        self._announced = False

    def requested(self) -> bool:
        """Whether a stop signal came; the first call that sees it logs it.

        The handler itself only sets the flag: a signal arrives between any two bytecodes of the
        main thread, also inside a log handler's write to train.log, and logging from there is a
        reentrant call into that buffered file (a RuntimeError, seen in CI)."""
        if self.signum is not None and not self._announced:
            self._announced = True
            logging.getLogger("afa").warning(
                "%s received: stopping after a checkpoint of the last finished iteration (send "
                "it again to exit at once)", signal.Signals(self.signum).name)
        return self.signum is not None

    def __enter__(self):
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

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _lr_at(cfg: DictConfig, iteration: int) -> float:
    """Base learning rate of step ``iteration``: one schedule over the run (the paper), or with
    ``optim.joint_lr`` one per phase (the joint phase restarting at that rate, no warm-up)."""
    o, t = cfg.optim, cfg.train
    if o.joint_lr is None:
        return lr_at(iteration, o.lr, t.max_iters, o.warmup_iters, o.warmup_ratio, o.power)
    if iteration < t.cam_iters:
        return lr_at(iteration, o.lr, t.cam_iters, o.warmup_iters, o.warmup_ratio, o.power)
    return lr_at(iteration - t.cam_iters, o.joint_lr, t.max_iters - t.cam_iters, 0,
                 power=o.power)


def _set_phase_strides(cfg: DictConfig, model: torch.nn.Module, iteration: int) -> None:
    """The encoder strides of step ``iteration``: train.cls_phase_stride before cam_iters when
    set, model.stride otherwise."""
    t = cfg.train
    if t.cls_phase_stride is not None:
        model.encoder.set_strides(t.cls_phase_stride if iteration < t.cam_iters
                                  else cfg.model.stride)


def _init_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: seeding, and stop signals left to the main process.

    A terminal's Ctrl-C and SLURM's signals go to the whole process group. A worker killed by
    one would take the run down ("DataLoader worker exited unexpectedly") before the main
    process has saved; ignoring them, the workers live until the main process shuts them down.
    (Forked workers also inherit the main process's handler, which covers the instant before
    this runs.)
    """
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    seed_worker(worker_id)


def _data_problem(err: Exception) -> str:
    """The message of a DataError, without the traceback a DataLoader worker wraps around it."""
    text = str(err)
    if "Original Traceback" in text:
        last = [line for line in text.splitlines() if line.strip()][-1]
        text = last.split("DataError: ", 1)[-1]
    return text


class TrainResult(NamedTuple):
    model: torch.nn.Module  # the trained model (unwrapped), on this rank's device
    scores: dict  # the last validation scores (see afa.engine.validate)


# Saved-config keys that a resumed run may change freely: they change no number of the run.
RESUME_FREE_KEYS = ("work_dir", "data.num_workers")
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
    """``(key, saved value, current value)`` for every key that differs (``<absent>`` if new)."""
    old = _flatten(OmegaConf.to_container(OmegaConf.create(saved), resolve=True))
    new = _flatten(OmegaConf.to_container(cfg, resolve=True))
    return [(k, old.get(k, "<absent>"), new.get(k, "<absent>")) for k in sorted(set(old) | set(new))
            if old.get(k, "<absent>") != new.get(k, "<absent>") and k not in RESUME_FREE_KEYS]


def _check_resume_config(saved: dict, cfg: DictConfig, allowed, path: Path, log) -> None:
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


def _prepare_work_dir(work_dir: Path, resume: str | None, overwrite: bool, main: bool) -> None:
    """A fresh run never mixes its files with another run's; ``overwrite`` removes those first."""
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


def train(cfg: DictConfig, resume: str | None = None, *, overwrite: bool = False,
          allow_config_change=()) -> TrainResult:
    """Train with ``cfg`` (see ``afa.config``), from scratch or from ``resume`` (auto|path).

    ``overwrite``: a work dir holding another run is emptied first (otherwise that is an error).
    ``allow_config_change``: config keys (or sections, or ``all``) a resumed run may change.
    """
    if overwrite and resume:
        raise C.ConfigError("--overwrite and --resume contradict each other: choose one")
    info = D.init_distributed(cfg.device)
    main = info.rank == 0
    work_dir = Path(cfg.work_dir)
    lock = WorkDirLock(work_dir)
    try:
        busy = None
        if main:  # before anything in the work dir is read, written or removed
            try:
                lock.acquire()
            except WorkDirBusy as err:
                busy = err
        if D.any_rank([busy is not None])[0]:
            raise busy or WorkDirBusy(f"{work_dir} is in use by another training run (the "
                                      "first process says by which)")
        _prepare_work_dir(work_dir, resume, overwrite, main)
        log = setup_logging(work_dir, main)
        try:
            return _train(cfg, resume, tuple(allow_config_change), info, main, work_dir, log)
        except (Exception, TrainingInterrupted) as err:
            record_failure(err)  # train.log keeps why the run ended, not only the terminal
            raise
    finally:
        lock.release()
        D.cleanup()


def _reg_workers(configured: int | None, info: D.DistInfo, batch_size: int) -> int:
    """``loss.reg_workers``; null: one per image on CUDA (within this process's CPU share)."""
    if configured is not None:
        return int(configured)
    if info.device.type != "cuda":
        return 0
    local = torch.cuda.device_count() or 1  # processes sharing this machine's CPUs
    return max(0, min(batch_size, D.usable_cpus() // local - 1))


def _batch_per_process(t: DictConfig, world: int) -> int:
    """``train.batch_per_gpu``, or the global batch split over the processes when it is null."""
    if t.batch_per_gpu is None:
        if t.global_batch % world:
            raise C.ConfigError(f"train.global_batch={t.global_batch} cannot be split over "
                                f"{world} processes; set train.batch_per_gpu to a divisor of it")
        return t.global_batch // world
    if t.global_batch % (t.batch_per_gpu * world):
        raise C.ConfigError(f"train.global_batch={t.global_batch} is not a multiple of "
                            f"train.batch_per_gpu x processes = {t.batch_per_gpu} x {world}; "
                            "train.batch_per_gpu=null splits the global batch evenly")
    return t.batch_per_gpu


def _train(cfg, resume, allowed, info, main, work_dir, log) -> TrainResult:
    t = cfg.train
    world = info.world_size
    batch_size = _batch_per_process(t, world)
    if t.amp == "fp16" and info.device.type != "cuda":
        # fp16 needs the CUDA gradient scaler; running fp32 instead would be a silent lie.
        raise C.ConfigError(f"train.amp=fp16 needs a CUDA device, but this run is on "
                            f"{info.device.type}; set train.amp=bf16 or none")
    set_tf32(info.device, t.tf32)
    accum = t.global_batch // (batch_size * world)
    for line in run_record():
        log.info("%s", line)
    log.info("Host memory: %s", keep_freed_host_memory())
    amp = resolve_amp(info.device, t.amp)
    if t.amp == "auto":
        log.info("Precision: train.amp=auto is %s on this %s", amp, info.device.type)
    slow = precision_warning(info.device, amp)
    if slow:
        log.warning("%s", slow)
    for warning in C.config_warnings(cfg):
        log.warning("%s", warning)
    torch.manual_seed(cfg.seed + info.rank)

    train_set, val_set = build_datasets(cfg)
    for dataset, split in ((train_set, cfg.data.train_split), (val_set, cfg.data.val_split)):
        note = subset_note(Path(cfg.data.list_dir) / f"{split}.txt")
        if note:  # tools/prepare_voc.py --skip-missing wrote a shortened list
            log.warning("%s", note)
        for _, problem in dataset.skipped:  # data.skip_bad: ids left out before the run
            log.warning("left out (data.skip_bad): %s", problem)
    names = class_names(cfg)  # as many as data.num_classes: load_config checks it
    if cfg.data.val_max_images:
        val_set = Subset(val_set, range(min(cfg.data.val_max_images, len(val_set))))

    model = AFANet(**C.model_kwargs(cfg)).to(info.device)
    weights = model.pretrained_info
    if weights is None:
        log.info("No pretrained weights (model.pretrained=null): the model starts from scratch")
        m = cfg.optim.lr_mults
        if m.backbone_norm == 0 or m.heads > m.backbone:
            log.warning("Training from scratch with frozen backbone norms (optim.lr_mults."
                        "backbone_norm=%g) or %gx heads: the paper's setting for ImageNet weights "
                        "stays near chance from scratch; configs/demo.yaml shows a working "
                        "from-scratch setting", m.backbone_norm, m.heads)
    else:
        log.info("Loaded %s", weights)
    optimizer = build_optimizer(model.param_groups(), cfg.optim.lr, cfg.optim.weight_decay,
                                cfg.optim.betas, lr_mults=C.lr_mults(cfg))
    scaler = torch.amp.GradScaler("cuda", enabled=amp == "fp16" and info.device.type == "cuda")
    par = PAR(**C.par_kwargs(cfg)).to(info.device)
    crf_loss = None
    if cfg.loss.reg_loss:
        from afa.losses import DenseCRFLoss

        crf_loss = DenseCRFLoss(sigma_rgb=cfg.loss.reg_rgb_sigma, sigma_xy=cfg.loss.reg_xy_sigma,
                                scale_factor=cfg.loss.reg_scale,
                                ignore_index=cfg.cam.ignore_index,
                                workers=_reg_workers(cfg.loss.reg_workers, info, batch_size))

    ckpt = CheckpointManager(work_dir / "checkpoints", keep_last=t.keep_last)
    start_iter, best, pending_validation = 0, -1.0, False
    resume_point = ckpt.find_resume(resume, log)
    if resume_point is not None:
        resume_path, state = resume_point
        _check_resume_config(state["config"], cfg, allowed, resume_path, log)
        if state["data"]["global_batch"] != t.global_batch:
            raise C.ConfigError(f"{resume_path} was trained with global batch "
                                f"{state['data']['global_batch']}: its data order cannot "
                                f"continue with train.global_batch={t.global_batch}")
        model.load_state_dict(state["model"])
        load_optimizer_state(optimizer, state["optimizer"])
        note = load_scaler_state(scaler, state["scaler"])
        if note:
            log.warning("%s", note)
        start_iter, best = state["iteration"], state["best"]
        # A checkpoint written just before a validation that did not finish: redo it first.
        pending_validation = not state.get("validated", True)
        if len(state["rng"]) == world:
            restore_rng_state(state["rng"][info.rank])
        else:  # randomness is a function of the stream position; see data_order
            log.info("The checkpoint comes from %d processes, this run has %d: RNG states not "
                     "restored (the data order and augmentations do not depend on them)",
                     len(state["rng"]), world)
        log.info("Resumed from %s at iteration %d", resume_path, start_iter)
        if start_iter >= t.max_iters and not pending_validation:
            log.info("This run is already finished: %s is iteration %d of train.max_iters=%d, "
                     "nothing is left to train (raise it with train.max_iters=N "
                     "--allow-config-change train.max_iters to train on)", resume_path.name,
                     start_iter, t.max_iters)
        del state
    if main:
        C.save_config(cfg, work_dir / "config.yaml")

    model = convert_sync_batchnorm(model, world, info.device)
    if world > 1:
        # DDP compares each gradient's strides with its bucket view's, exactly. The depthwise
        # (C, 1, 3, 3) Mix-FFN convolutions and the (1, K, 1, 1) affinity projection get
        # gradients whose strides differ only along a size-1 dimension: the same memory layout,
        # copied into the bucket like any gradient. tests/test_train.py checks that no gradient
        # differs in any other dimension, so the one-time "Grad strides do not match bucket view
        # strides" warning says nothing here and is silenced (that message only).
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        ids = [info.device.index] if info.device.type == "cuda" else None
        model = DistributedDataParallel(model, device_ids=ids)
    bare = unwrap_model(model)
    buffers = list(bare.buffers())
    params = [p for p in bare.parameters() if p.requires_grad]

    step_kwargs = dict(device=info.device, par=par, crf_loss=crf_loss,
                       cam_scales=tuple(cfg.cam.scales), amp=amp, loss_kwargs=_loss_kwargs(cfg),
                       cls_phase_full_forward=t.cls_phase_full_forward,
                       reuse_train_forward=cfg.cam.reuse_train_forward,
                       update_decoder_bn=cfg.cam.update_decoder_bn)
    run_log = RunLogger(work_dir, main, start_iter)
    window, sums, logged, skipped, bad_files, scores = [], None, 0, 0, 0, {}
    bar = tqdm(total=t.max_iters, initial=start_iter, disable=not progress_enabled(),
               dynamic_ncols=True, desc="train")
    tic = time.time()

    def checkpoint(iteration: int, *, validated: bool = True, is_best: bool = False) -> None:
        bad = non_finite_tensors(bare)
        if bad:  # never leave a checkpoint that cannot be trained on
            raise FloatingPointError(f"Not writing the checkpoint of iteration {iteration}: "
                                     f"non-finite values in {', '.join(bad[:5])}")
        rng = [None] * world
        if world > 1:
            torch.distributed.all_gather_object(rng, capture_rng_state())
        else:
            rng[0] = capture_rng_state()
        if main:
            path = ckpt.save({"model": bare.state_dict(), "optimizer": optimizer.state_dict(),
                              "scaler": scaler.state_dict(), "iteration": iteration,
                              "best": best, "validated": validated, "rng": rng,
                              "data": {"stream_position": iteration * t.global_batch,
                                       "global_batch": t.global_batch},
                              "config": OmegaConf.to_container(cfg, resolve=True)},
                             iteration, is_best)
            if is_best:
                log.info("best.pth updated: seg mIoU %.2f at iteration %d (%s)", 100 * best,
                         iteration, path.name)
        D.barrier()
        stop.last_checkpoint = iteration

    def run_validation(iteration: int) -> None:
        """Validate at ``iteration``, whose checkpoint is written; then mark it validated."""
        nonlocal best, scores
        D.broadcast_buffers(bare)
        try:
            scores = validate(bare, val_set, par=par, device=info.device,
                              cam_scales=tuple(cfg.cam.scales), bkg_score=cfg.cam.bkg_score,
                              low=cfg.cam.low, radius=cfg.cam.radius, class_names=names,
                              amp=amp, should_stop=stop.requested,
                              skip_bad=cfg.data.skip_bad, batch_size=cfg.data.val_batch)
        except ValidationStopped:
            raise TrainingInterrupted(stop.signum, (
                f"stopped by {signal.Signals(stop.signum).name} during the validation of "
                f"iteration {iteration}; its checkpoint is saved and --resume auto redoes the "
                "validation")) from None
        except DataError as err:
            raise DataError(
                f"{_data_problem(err)}\nValidation at iteration {iteration} stopped; the "
                f"checkpoint of iteration {iteration} is saved. Fix or remove the file (or set "
                "data.skip_bad=true), then continue with --resume auto, which redoes this "
                "validation") from None
        summary = {k: v["miou"] for k, v in scores.items() if isinstance(v, dict)}
        summary["cls_f1"] = scores["cls_f1"]
        if "skipped_images" in scores:
            summary["skipped_images"] = scores["skipped_images"]
        run_log.scalars(iteration, summary, prefix="val/")
        run_log.val_scores(iteration, scores)
        log.info("val iter %d: %s\n%s", iteration,
                 " ".join(f"{k} {100 * v:.2f}" for k, v in summary.items()
                          if k != "skipped_images"), format_table(scores, names))
        is_best = summary["seg"] > best
        best = max(best, summary["seg"])
        checkpoint(iteration, validated=True, is_best=is_best)

    with _StopFlag() as stop:
        # The loader's workers start here, after the handlers are in place (see _init_worker).
        # The data stream and all randomness are functions of the position in it (see
        # data_order), so resuming at an iteration needs nothing else, on any number of processes.
        sampler = ResumableSampler(len(train_set), batch_size, t.global_batch, cfg.seed,
                                   info.rank, world, start_batches=start_iter * accum)
        loader = DataLoader(SeededDataset(train_set), batch_size=batch_size, sampler=sampler,
                            num_workers=cfg.data.num_workers, worker_init_fn=_init_worker,
                            pin_memory=info.device.type == "cuda", drop_last=True,
                            persistent_workers=cfg.data.num_workers > 0)
        batches = iter(loader)
        log.info("Training %s on %s: %d images, %d processes x %d per batch x %d accumulation = "
                 "global batch %d, %d iterations from %d", cfg.model.backbone, info.device,
                 len(train_set), world, batch_size, accum, t.global_batch, t.max_iters,
                 start_iter)
        iteration = start_iter
        if pending_validation:
            log.info("Redoing the validation of iteration %d, which did not finish", iteration)
            _set_phase_strides(cfg, bare, iteration - 1)  # those of the step that made the weights
            run_validation(iteration)
        while iteration < t.max_iters:
            lr = _lr_at(cfg, iteration)
            set_lr(optimizer, lr)
            _set_phase_strides(cfg, bare, iteration)
            model.train()
            micro_batches, problem = [], None
            try:
                for _ in range(accum):
                    micro_batches.append(next(batches))
            except DataError as err:
                problem = _data_problem(err)
            (bad_data,) = D.any_rank([problem is not None])
            if bad_data:
                checkpoint(iteration)
                raise DataError(
                    f"{problem or 'another process met a bad training file (see its message)'}"
                    f"\nTraining stopped before iteration {iteration + 1}; the checkpoint of "
                    f"iteration {iteration} is saved. Fix or remove the file (or set "
                    "data.skip_bad=true), then continue with --resume auto")
            before = [b.detach().clone() for b in buffers]  # kept if the step is dropped
            finite = torch.ones((), dtype=torch.bool, device=info.device)
            iter_terms = 0.0  # the loss terms of this iteration, summed on the device
            for micro, batch in enumerate(micro_batches):
                for replaced in batch.get("skipped", ()):  # data.skip_bad replacements
                    for line in filter(None, replaced.split("\n")):
                        bad_files += 1
                        log.warning("skipped a bad training sample (data.skip_bad): %s", line)
                chunk = (iteration * accum + micro) * world + info.rank
                torch.manual_seed(stream_seed(cfg.seed, chunk, salt=1))  # dropout, drop-path
                sync = micro == accum - 1 or world == 1
                with contextlib.nullcontext() if sync else model.no_sync():
                    step = train_step(model, batch, iteration, **step_kwargs)
                    terms = step.terms
                    scaler.scale(terms.total / accum).backward()
                finite &= torch.isfinite(terms.total)
                values = torch.stack([getattr(terms, k).detach().float() for k in _LOSS_KEYS])
                iter_terms = iter_terms + values / accum
            if not scaler.is_enabled():  # fp16's scaler handles overflowing gradients itself
                grads = [p.grad for p in params if p.grad is not None]
                finite &= torch.isfinite(_total_norm(grads))
            # Everything below stays on the device: a non-finite step is dropped there (no
            # weight, moment, step count or BatchNorm statistic changes) and only found at the
            # next report, the loop's one host-device sync.
            finite = D.all_ranks_true(finite)
            if scaler.is_enabled():
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.found_inf = (~finite).float()  # fused AdamW skips on the device
                optimizer.step()
            for b, saved in zip(buffers, before):  # BatchNorm statistics of a bad forward
                b.copy_(torch.where(finite, b, saved))
            optimizer.zero_grad(set_to_none=True)
            window.append((iteration, iter_terms, finite))
            sums = iter_terms if sums is None else sums + iter_terms
            logged += 1
            iteration += 1
            bar.update(1)
            (stop_now,) = D.any_rank([stop.requested()])  # host flags only: no device sync

            validate_now = iteration % t.eval_iters == 0 or iteration == t.max_iters
            checkpoint_now = validate_now or iteration % t.ckpt_iters == 0 or stop_now
            if iteration % t.log_iters == 0 or iteration == t.max_iters or checkpoint_now:
                # The host-device sync: the finiteness (and loss terms) of the iterations since
                # the last check.
                good = torch.stack([f for _, _, f in window]).cpu().tolist()
                rows = torch.stack([v for _, v, _ in window]).cpu().tolist()
                for (bad_iter, _, _), ok, row in zip(window, good, rows):
                    if ok:
                        continue
                    message = (f"Non-finite loss or gradient at iteration {bad_iter}: " + ", ".join(
                        f"{k}={v:.4g}" for k, v in zip(_LOSS_KEYS[:-1], row)))
                    if t.nonfinite == "stop":
                        checkpoint(iteration)
                        raise FloatingPointError(
                            f"{message}. The step was dropped, and the checkpoint of iteration "
                            f"{iteration} (finite: every such step is dropped) is saved; "
                            "train.nonfinite=skip goes on instead")
                    skipped += 1
                    log.warning("%s; step dropped (%d so far)", message, skipped)
                window.clear()
                if iteration % t.log_iters == 0 or iteration == t.max_iters:
                    totals = sums.double() / logged
                    D.all_reduce_sum(totals)
                    means = dict(zip(_LOSS_KEYS, (totals / world).tolist()))
                    means.update(lr=lr, skipped_steps=skipped, skipped_files=bad_files,
                                 sec_per_iter=(time.time() - tic) / logged)
                    sums, logged, tic = None, 0, time.time()
                    run_log.scalars(iteration, means, prefix="train/")
                    bar.set_postfix(loss=f"{means['total']:.3f}", lr=f"{lr:.2e}")
                    log.info("iter %d/%d lr %.3e loss %.4f (cls %.4f seg %.4f aff %.4f reg %.4f)",
                             iteration, t.max_iters, lr, means["total"], means["cls_loss"],
                             means["seg_loss"], means["aff_loss"], means["reg_loss"])
            if (main and t.image_log_iters and iteration % t.image_log_iters == 0
                    and terms.seg_target is not None):
                _log_images(run_log, iteration, micro_batches[-1], step)

            if checkpoint_now:
                # Before validating: a failing validation must not cost the iterations before it.
                checkpoint(iteration, validated=not validate_now)
            if stop_now:
                bar.close()
                run_log.close()
                pending = " (its validation is redone on resume)" if validate_now else ""
                raise TrainingInterrupted(stop.signum, (
                    f"stopped by {signal.Signals(stop.signum).name} at iteration {iteration}; "
                    f"checkpoint saved{pending}"))
            if validate_now:
                run_validation(iteration)
    D.broadcast_buffers(bare)
    bar.close()
    run_log.close()
    return TrainResult(bare, scores)


_LOSS_KEYS = ("cls_loss", "seg_loss", "aff_loss", "reg_loss", "total")


def _total_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of all ``tensors`` together, on their device, without a sync."""
    if not tensors:
        return torch.zeros(())
    if hasattr(torch.nn.utils, "get_total_norm"):  # torch >= 2.6: a few fused kernels
        return torch.nn.utils.get_total_norm(tensors)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in tensors]))


def _log_images(run_log: RunLogger, iteration: int, batch: dict, step: StepOutput) -> None:
    """TensorBoard grid of the first crop: image, CAM of its first class, labels, prediction."""
    from afa.viz import colorize_label, make_grid, overlay_heatmap

    image = (denormalize(batch["image"][:1])[0] * 255).byte().permute(1, 2, 0).cpu().numpy()
    first_class = int(batch["label"][0].nonzero()[0, 0])
    seg = F.interpolate(step.seg_logits[:1].float(), size=image.shape[:2], mode="bilinear",
                        align_corners=False).max(dim=1).indices[0]
    t = step.terms
    panels = [image, overlay_heatmap(image, step.cam[0, first_class])]
    panels += [colorize_label(label[0]) for label in
               (t.cam_label, t.refined_label, t.aff_pseudo_label, t.seg_target)]
    panels.append(colorize_label(seg))
    grid = make_grid(panels, titles=["crop", f"CAM class {first_class + 1}", "CAM label",
                                     "refined (PAR)", "affinity", "seg target", "prediction"])
    run_log.image(iteration, "train/pseudo_labels", grid)
