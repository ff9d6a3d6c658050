"""The AFA training loop: one plain, iteration-counted loop for VOC, COCO and the demo.

Read it in this order:

- :func:`train` takes the work dir (one run at a time), builds the run (:func:`_build`: data,
  model, optimizer, resume, DDP) and runs :func:`_loop`.
- :func:`_loop` is the loop, a screen long: per iteration the :class:`~afa.engine.schedule.Phase`
  (learning rate, strides, which forwards and losses count), the batches, one optimizer step
  (:func:`_optimizer_step`: micro-steps of ``afa.engine.step.train_step`` with gradient
  accumulation, then AdamW), and at the boundaries the named pieces of ``afa.engine.hooks``:
  the loss report, the checkpoint, the stop signal, the validation.
- ``afa.engine.step.train_step`` is one micro-step: forward, multi-scale CAM, pseudo labels and
  losses (docs/method.md, steps 1-12).

The learning rate is a pure function of the iteration, the data order and all randomness are
functions of the position in the data stream (``afa.engine.data_order``), gradients are
accumulated so that the config's global batch holds for any number of processes, and a
checkpoint captures everything needed to continue bit for bit (``afa.engine.checkpoint``).
"""

from __future__ import annotations

import contextlib
import signal
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from afa import config as C
from afa.constants import STOP_SIGNALS
from afa.data import DataError, build_datasets, denormalize, seed_worker
from afa.data.lists import subset_note
from afa.engine import distributed as D
from afa.engine.checkpoint import (CheckpointManager, load_scaler_state, restore_rng_state,
                                   unwrap_model)
from afa.engine.data_order import ResumableSampler, SeededDataset, stream_seed
from afa.engine.hooks import (LOSS_KEYS, Checkpointer, LossReport, StopFlag,
                              TrainingInterrupted, Validator, data_problem)
from afa.engine.logger import (RunLogger, progress_enabled, record_failure, run_record,
                               setup_logging)
from afa.engine.optim import build_optimizer, load_optimizer_state, set_lr
from afa.engine.precision import precision_warning, resolve_amp, set_tf32
from afa.engine.run_lock import WorkDirBusy, WorkDirLock
from afa.engine.schedule import Phase, Schedule
from afa.engine.step import StepOutput, StepSettings, train_step
from afa.engine.work_dir import check_resume_config, prepare_work_dir
from afa.host_memory import keep_freed_host_memory
from afa.models import PAR, AFANet, convert_sync_batchnorm

__all__ = ["TrainResult", "TrainingInterrupted", "train"]


class TrainResult(NamedTuple):
    model: torch.nn.Module  # the trained model (unwrapped), on this rank's device
    scores: dict  # the last validation scores (see afa.engine.validate)


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
        prepare_work_dir(work_dir, resume, overwrite, main)
        log = setup_logging(work_dir, main)
        try:
            run = _build(cfg, resume, tuple(allow_config_change), info, log)
            return _loop(run)
        except (Exception, TrainingInterrupted) as err:
            record_failure(err)  # train.log keeps why the run ended, not only the terminal
            raise
    finally:
        lock.release()
        D.cleanup()


@dataclass
class _Run:
    """Everything the loop needs, made once by :func:`_build`."""

    cfg: DictConfig
    info: D.DistInfo
    log: object
    model: torch.nn.Module  # the DDP wrapper under several processes, else the bare model
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    par: PAR
    crf_loss: object  # DenseCRFLoss or None
    schedule: Schedule
    settings: StepSettings
    train_set: object
    val_set: object
    batch_size: int  # per process and micro-batch
    accum: int  # micro-batches per iteration
    manager: CheckpointManager
    start_iter: int = 0
    best: float = -1.0
    pending_validation: bool = False  # the checkpoint's validation did not finish: redo it

    @property
    def bare(self) -> torch.nn.Module:
        return unwrap_model(self.model)


def _loop(run: _Run) -> TrainResult:
    cfg, t, log = run.cfg, run.cfg.train, run.log
    world, main = run.info.world_size, run.info.rank == 0
    run_log = RunLogger(Path(cfg.work_dir), main, run.start_iter)
    report = LossReport(run_log, t.log_iters, t.max_iters, world, t.nonfinite)
    bar = tqdm(total=t.max_iters, initial=run.start_iter, disable=not progress_enabled(),
               dynamic_ncols=True, desc="train")
    with StopFlag() as stop:
        ckpt = Checkpointer(run.manager, run.bare, run.optimizer, run.scaler,
                            OmegaConf.to_container(cfg, resolve=True), t.global_batch, stop,
                            world, main, best=run.best)
        validate = Validator(run.bare, run.val_set, ckpt, run_log, C.class_names(cfg), dict(
            par=run.par, device=run.info.device, cam_scales=run.settings.cam_scales,
            thresholds=run.settings.thresholds, radius=cfg.cam.radius, amp=run.settings.amp,
            skip_bad=cfg.data.skip_bad, batch_size=cfg.data.val_batch),
            subset=t.eval_subset, max_iters=t.max_iters)
        batches = iter(_loader(run))  # its workers start after the signal handlers are set
        log.info("Training %s on %s: %d images, %d processes x %d per batch x %d accumulation = "
                 "global batch %d, %d iterations from %d", cfg.model.backbone, run.info.device,
                 len(run.train_set), world, run.batch_size, run.accum, t.global_batch,
                 t.max_iters, run.start_iter)
        iteration = run.start_iter
        if run.pending_validation:
            log.info("Redoing the validation of iteration %d, which did not finish", iteration)
            run.bare.encoder.set_strides(run.schedule.phase(iteration - 1).strides)
            validate(iteration)
        while iteration < t.max_iters:
            phase = run.schedule.phase(iteration)
            set_lr(run.optimizer, phase.lr)
            run.bare.encoder.set_strides(phase.strides)
            run.model.train()
            micro_batches = _next_batches(batches, run.accum, iteration, ckpt)
            terms, finite, step = _optimizer_step(run, micro_batches, phase, iteration, report)
            report.add(iteration, terms, finite)
            iteration += 1
            bar.update(1)

            stop_now = D.any_rank([stop.requested()])[0]  # host flags only: no device sync
            validate_now = iteration % t.eval_iters == 0 or iteration == t.max_iters
            checkpoint_now = validate_now or iteration % t.ckpt_iters == 0 or stop_now
            if report.due(iteration) or checkpoint_now:
                problem = report.check_finite()  # the loop's one host-device sync
                if problem:
                    ckpt.save(iteration)
                    raise FloatingPointError(
                        f"{problem}. The step was dropped, and the checkpoint of iteration "
                        f"{iteration} (finite: every such step is dropped) is saved; "
                        "train.nonfinite=skip goes on instead")
                if report.due(iteration):
                    means = report.write(iteration, phase.lr)
                    bar.set_postfix(loss=f"{means['total']:.3f}", lr=f"{phase.lr:.2e}")
            if (main and t.image_log_iters and iteration % t.image_log_iters == 0
                    and step.terms.seg_target is not None):
                _log_images(run_log, iteration, micro_batches[-1], step, C.class_names(cfg))
            if checkpoint_now:  # before validating: a failed validation costs no iterations
                ckpt.save(iteration, validated=not validate_now)
            if stop_now:
                bar.close()
                run_log.close()
                pending = " (its validation is redone on resume)" if validate_now else ""
                raise stop.interrupted(f"stopped by {signal.Signals(stop.signum).name} at "
                                       f"iteration {iteration}; checkpoint saved{pending}")
            if validate_now:
                validate(iteration)
        stop.finished = True
    D.broadcast_buffers(run.bare)
    bar.close()
    run_log.close()
    return TrainResult(run.bare, validate.scores)


def _optimizer_step(run: _Run, micro_batches: list[dict], phase: Phase, iteration: int,
                    report: LossReport) -> tuple[torch.Tensor, torch.Tensor, StepOutput]:
    """One iteration's micro-steps, backward passes and AdamW step; returns the iteration's
    loss terms (``LOSS_KEYS``) and whether it was finite, both on the device, and the last
    micro-step's outputs.

    A non-finite step is dropped on the device: no weight, moment, step count or BatchNorm
    statistic changes, and nothing waits for the device here; the loss report finds it.
    """
    info, world, accum = run.info, run.info.world_size, run.accum
    buffers = list(run.bare.buffers())
    before = [b.detach().clone() for b in buffers]  # kept if the step is dropped
    finite = torch.ones((), dtype=torch.bool, device=info.device)
    iter_terms = 0.0  # the loss terms of this iteration, summed on the device
    for micro, batch in enumerate(micro_batches):
        for replaced in batch.get("skipped", ()):  # data.skip_bad replacements
            for line in filter(None, replaced.split("\n")):
                report.skipped_files += 1
                run.log.warning("skipped a bad training sample (data.skip_bad): %s", line)
        chunk = (iteration * accum + micro) * world + info.rank
        torch.manual_seed(stream_seed(run.cfg.seed, chunk, salt=1))  # dropout, drop-path
        sync = micro == accum - 1 or world == 1
        with contextlib.nullcontext() if sync else run.model.no_sync():
            step = train_step(run.model, batch, phase, run.settings, par=run.par,
                              crf_loss=run.crf_loss, device=info.device)
            run.scaler.scale(step.terms.total / accum).backward()
        finite &= torch.isfinite(step.terms.total)
        values = torch.stack([getattr(step.terms, k).detach().float() for k in LOSS_KEYS])
        iter_terms = iter_terms + values / accum
    if not run.scaler.is_enabled():  # fp16's scaler handles overflowing gradients itself
        grads = [p.grad for p in run.bare.parameters() if p.requires_grad and p.grad is not None]
        finite &= torch.isfinite(_total_norm(grads))
    finite = D.all_ranks_true(finite)
    if run.scaler.is_enabled():
        run.scaler.step(run.optimizer)
        run.scaler.update()
    else:
        run.optimizer.found_inf = (~finite).float()  # fused AdamW skips on the device
        run.optimizer.step()
    for b, saved in zip(buffers, before):  # BatchNorm statistics of a bad forward
        b.copy_(torch.where(finite, b, saved))
    run.optimizer.zero_grad(set_to_none=True)
    return iter_terms, finite, step


def _next_batches(batches, accum: int, iteration: int, ckpt: Checkpointer) -> list[dict]:
    """The iteration's micro-batches; a bad file stops every rank after a checkpoint."""
    micro_batches, problem = [], None
    try:
        for _ in range(accum):
            micro_batches.append(next(batches))
    except DataError as err:
        problem = data_problem(err)
    if D.any_rank([problem is not None])[0]:
        ckpt.save(iteration)
        raise DataError(
            f"{problem or 'another process met a bad training file (see its message)'}"
            f"\nTraining stopped before iteration {iteration + 1}; the checkpoint of "
            f"iteration {iteration} is saved. Fix or remove the file (or set "
            "data.skip_bad=true), then continue with --resume auto")
    return micro_batches


def _loader(run: _Run) -> DataLoader:
    """The training stream from ``run.start_iter`` on: a function of the position in it (see
    ``afa.engine.data_order``), so resuming needs nothing else, on any number of processes."""
    cfg, info = run.cfg, run.info
    sampler = ResumableSampler(len(run.train_set), run.batch_size, cfg.train.global_batch,
                               cfg.seed, info.rank, info.world_size,
                               start_batches=run.start_iter * run.accum)
    return DataLoader(SeededDataset(run.train_set), batch_size=run.batch_size, sampler=sampler,
                      num_workers=cfg.data.num_workers, worker_init_fn=_init_worker,
                      pin_memory=info.device.type == "cuda", drop_last=True,
                      persistent_workers=cfg.data.num_workers > 0)


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


# --------------------------------------------------------------------------------------------
# Building a run


def _build(cfg: DictConfig, resume: str | None, allowed, info: D.DistInfo, log) -> _Run:
    """Data, model, optimizer, losses and the resume point of a run, wrapped for DDP."""
    t, world = cfg.train, info.world_size
    batch_size = _batch_per_process(t, world)
    if t.amp == "fp16" and info.device.type != "cuda":
        # fp16 needs the CUDA gradient scaler; running fp32 instead would be a silent lie.
        raise C.ConfigError(f"train.amp=fp16 needs a CUDA device, but this run is on "
                            f"{info.device.type}; set train.amp=bf16 or none")
    set_tf32(info.device, t.tf32)
    for line in run_record():
        log.info("%s", line)
    log.info("Host memory: %s", keep_freed_host_memory())
    amp = resolve_amp(info.device, t.amp)
    if t.amp == "auto":
        log.info("Precision: train.amp=auto is %s on this %s", amp, info.device.type)
    for warning in filter(None, [precision_warning(info.device, amp), *C.config_warnings(cfg)]):
        log.warning("%s", warning)
    torch.manual_seed(cfg.seed + info.rank)

    train_set, val_set = build_datasets(cfg)
    for dataset, split in ((train_set, cfg.data.train_split), (val_set, cfg.data.val_split)):
        note = subset_note(Path(cfg.data.list_dir) / f"{split}.txt")
        if note:  # tools/prepare_voc.py --skip-missing wrote a shortened list
            log.warning("%s", note)
        for _, problem in dataset.skipped:  # data.skip_bad: ids left out before the run
            log.warning("left out (data.skip_bad): %s", problem)
    if cfg.data.val_max_images:
        val_set = Subset(val_set, range(min(cfg.data.val_max_images, len(val_set))))

    model = AFANet(**C.model_kwargs(cfg)).to(info.device)
    _log_weights(cfg, model, log)
    optimizer = build_optimizer(model.param_groups(), cfg.optim.lr, cfg.optim.weight_decay,
                                lr_mults=C.lr_mults(cfg))
    scaler = torch.amp.GradScaler("cuda", enabled=amp == "fp16" and info.device.type == "cuda")
    run = _Run(cfg, info, log, model, optimizer, scaler, PAR(**C.par_kwargs(cfg)).to(info.device),
               _crf_loss(cfg, info, batch_size, log), Schedule.from_config(cfg),
               StepSettings.from_config(cfg, amp), train_set, val_set, batch_size,
               t.global_batch // (batch_size * world),
               CheckpointManager(Path(cfg.work_dir) / "checkpoints", keep_last=t.keep_last))
    _resume(run, resume, allowed)
    if info.rank == 0:
        C.save_config(cfg, Path(cfg.work_dir) / "config.yaml")
    run.model = _wrap_for_processes(model, world, info.device)
    return run


def _log_weights(cfg: DictConfig, model: AFANet, log) -> None:
    weights = model.pretrained_info
    if weights is not None:
        log.info("Loaded %s", weights)
        return
    log.info("No pretrained weights (model.pretrained=null): the model starts from scratch")
    m = cfg.optim.lr_mults
    if m.backbone_norm == 0 or m.heads > m.backbone:
        log.warning("Training from scratch with frozen backbone norms (optim.lr_mults."
                    "backbone_norm=%g) or %gx heads: the paper's setting for ImageNet weights "
                    "stays near chance from scratch; configs/demo.yaml shows a working "
                    "from-scratch setting", m.backbone_norm, m.heads)


def _crf_loss(cfg: DictConfig, info: D.DistInfo, batch_size: int, log):
    """The regularized loss on the backend ``loss.reg_backend`` names, its cost measured once."""
    if not cfg.loss.reg_loss:
        return None
    from afa import losses

    backend, why = reg_backend(cfg.loss.reg_backend, info.device)
    crf = losses.DenseCRFLoss(workers=_reg_workers(cfg.loss.reg_workers, info, batch_size),
                              backend=backend)
    # The cost, timed on random inputs of the step's size in this process: the worker processes
    # start at the first step that needs them.
    size, classes = int(cfg.data.crop_size * crf.scale_factor), C.num_classes(cfg)
    gen = torch.Generator().manual_seed(0)  # the global generators stay untouched
    rgb = torch.rand(batch_size, 3, size, size, generator=gen).to(info.device)
    probs = torch.rand(batch_size, classes, size, size, generator=gen).softmax(1).to(info.device)
    boxes = torch.tensor([[0, size, 0, size]] * batch_size, device=info.device)
    probe = crf if not crf.workers else losses.DenseCRFLoss(backend=backend)
    seconds = min(losses.time_filter(probe, rgb, probs, boxes))
    where = (f"on {info.device.type}" if backend == "torch" else
             f"in {crf.workers} CPU processes" if crf.workers else "in the training process")
    log.info("Regularized loss: bilateral filter by %s %s (%s); %d x %d x %d x %d takes %.1f ms%s",
             backend, where, why, batch_size, classes, size, size, seconds * 1e3,
             " in one process" if crf.workers else "")
    return crf


def reg_backend(configured: str, device: torch.device) -> tuple[str, str]:
    """``loss.reg_backend`` resolved, and why: auto is torch on CUDA, pydensecrf on the CPU,
    where pydensecrf2's C++ lattice is the faster (docs/BENCHMARKS.md), unless it is absent."""
    if configured != "auto":
        return configured, f"loss.reg_backend={configured}"
    from afa import losses

    if device.type == "cuda":
        return "torch", "loss.reg_backend=auto on CUDA"
    if losses.dcrf is None:
        return "torch", "loss.reg_backend=auto, pydensecrf2 is not installed"
    return "pydensecrf", "loss.reg_backend=auto on the CPU"


def _resume(run: _Run, resume: str | None, allowed) -> None:
    """Load the checkpoint ``resume`` names (auto: the newest readable one) into ``run``."""
    cfg, log, world = run.cfg, run.log, run.info.world_size
    point = run.manager.find_resume(resume, log)
    if point is None:
        return
    path, state = point
    check_resume_config(state["config"], cfg, allowed, path, log)
    if state["data"]["global_batch"] != cfg.train.global_batch:
        raise C.ConfigError(f"{path} was trained with global batch "
                            f"{state['data']['global_batch']}: its data order cannot "
                            f"continue with train.global_batch={cfg.train.global_batch}")
    run.model.load_state_dict(state["model"])
    load_optimizer_state(run.optimizer, state["optimizer"])
    note = load_scaler_state(run.scaler, state["scaler"])
    if note:
        log.warning("%s", note)
    run.start_iter, run.best = state["iteration"], state["best"]
    # A checkpoint written just before a validation that did not finish: redo it first.
    run.pending_validation = not state.get("validated", True)
    if len(state["rng"]) == world:
        restore_rng_state(state["rng"][run.info.rank])
    else:  # randomness is a function of the stream position; see data_order
        log.info("The checkpoint comes from %d processes, this run has %d: RNG states not "
                 "restored (the data order and augmentations do not depend on them)",
                 len(state["rng"]), world)
    log.info("Resumed from %s at iteration %d", path, run.start_iter)
    if run.start_iter >= cfg.train.max_iters and not run.pending_validation:
        log.info("This run is already finished: %s is iteration %d of train.max_iters=%d, "
                 "nothing is left to train (raise it with train.max_iters=N "
                 "--allow-config-change train.max_iters to train on)", path.name,
                 run.start_iter, cfg.train.max_iters)


def _wrap_for_processes(model: AFANet, world: int, device: torch.device) -> torch.nn.Module:
    """SyncBatchNorm and DDP under several processes; the model itself otherwise."""
    model = convert_sync_batchnorm(model, world, device)
    if world == 1:
        return model
    # DDP compares each gradient's strides with its bucket view's, exactly. The depthwise
    # (C, 1, 3, 3) Mix-FFN convolutions and the (1, K, 1, 1) affinity projection get
    # gradients whose strides differ only along a size-1 dimension: the same memory layout,
    # copied into the bucket like any gradient. tests/test_trainer.py checks that no gradient
    # differs in any other dimension, so the one-time "Grad strides do not match bucket view
    # strides" warning says nothing here and is silenced (that message only).
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


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


def _total_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of all ``tensors`` together, on their device, without a sync."""
    if not tensors:
        return torch.zeros(())
    if hasattr(torch.nn.utils, "get_total_norm"):  # torch >= 2.6: a few fused kernels
        return torch.nn.utils.get_total_norm(tensors)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in tensors]))


def _log_images(run_log: RunLogger, iteration: int, batch: dict, step: StepOutput,
                class_names: list[str]) -> None:
    """TensorBoard grid of the first crop: image, CAM of its first class (named), labels,
    prediction. Masks play no part: a set with tags only gets it too."""
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
    grid = make_grid(panels, titles=["crop", f"CAM {class_names[first_class + 1]}", "CAM label",
                                     "refined (PAR)", "affinity", "seg target", "prediction"])
    run_log.image(iteration, "train/pseudo_labels", grid)
