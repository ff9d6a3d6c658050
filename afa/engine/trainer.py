"""The AFA training loop: one plain, iteration-counted function for VOC, COCO and the demo.

Per iteration (DESIGN.md sections 3-4): forward with gradients, multi-scale CAM without them,
pseudo labels and losses (``afa.pseudo_labels.compute_afa_losses``), backward, AdamW step. The
learning rate is a pure function of the iteration, gradients are accumulated so that the config's
global batch holds for any number of processes, and a checkpoint captures everything needed to
continue bit-for-bit (``afa.engine.checkpoint``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import time
from collections import defaultdict
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
from afa.constants import COCO_CLASSES, VOC_CLASSES
from afa.data import VOCStyleDataset, denormalize, seed_worker
from afa.engine import distributed as D
from afa.engine.checkpoint import (CheckpointManager, capture_rng_state, restore_rng_state,
                                   unwrap_model)
from afa.engine.data_order import ResumableSampler, SeededDataset, stream_seed
from afa.engine.logger import RunLogger, setup_logging
from afa.engine.optim import build_optimizer, lr_at, set_lr
from afa.engine.validate import format_table, validate
from afa.models import PAR, AFANet, convert_sync_batchnorm
from afa.pseudo_labels import AFALosses, compute_afa_losses

__all__ = ["StepOutput", "TrainResult", "TrainingInterrupted", "build_datasets", "class_names", "train", "train_step"]

_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


def class_names(cfg: DictConfig) -> list[str]:
    if cfg.data.name == "voc":
        return list(VOC_CLASSES)
    if cfg.data.name == "coco":
        return list(COCO_CLASSES)
    from afa.data.synthetic import DEMO_CLASSES  # the demo set names its own classes

    return list(DEMO_CLASSES)


def build_datasets(cfg: DictConfig) -> tuple[VOCStyleDataset, VOCStyleDataset]:
    """The classification training set and the segmentation validation set of ``cfg.data``."""
    d = cfg.data
    list_dir = Path(d.list_dir)
    common = dict(num_classes=d.num_classes, mask_dir=d.mask_dir)
    train_set = VOCStyleDataset(
        d.root, list_dir / f"{d.train_split}.txt", list_dir / "cls_labels.json", mode="cls",
        split=d.train_split if d.split_subdirs else None, crop_size=d.crop_size,
        scale_range=tuple(d.scale_range), hflip=True, **common)
    val_set = VOCStyleDataset(
        d.root, list_dir / f"{d.val_split}.txt", None, mode="seg",
        split=d.val_split if d.split_subdirs else None, **common)
    return train_set, val_set


def _loss_kwargs(cfg: DictConfig) -> dict:
    c, t, l = cfg.cam, cfg.train, cfg.loss
    return dict(bkg_score=c.bkg_score, high=c.high, low=c.low, ignore_index=c.ignore_index,
                radius=c.radius, cam_iters=t.cam_iters, aff_switch_iter=t.aff_switch_iter,
                w_seg=l.w_seg, w_aff=l.w_aff, w_reg=l.w_reg)


def _autocast(device: torch.device, amp: str):
    if amp == "none" or device.type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


class StepOutput(NamedTuple):
    terms: AFALosses  # pseudo labels and losses
    cam: torch.Tensor | None  # (B, C-1, H, W) multi-scale CAM, None in the classification phase
    seg_logits: torch.Tensor | None  # (B, C, H/4, W/4); None after a cls_only forward


def train_step(model, batch: dict, iteration: int, *, device: torch.device, par: PAR,
               crf_loss, cam_scales, amp: str, loss_kwargs: dict,
               cls_phase_full_forward: bool = True, reuse_train_forward: bool = False) -> StepOutput:
    """Forward, multi-scale CAM, pseudo labels and losses of one (micro-)batch; no backward.

    Before ``cam_iters`` with ``cls_phase_full_forward=False`` the forward runs the encoder and
    classifier only; the idle decoder and affinity head join the graph with weight 0 (for DDP).
    ``reuse_train_forward``: the multi-scale CAM takes its un-flipped scale-1 copy from this
    forward (``cam.reuse_train_forward``).
    """
    images = batch["image"].to(device, non_blocking=True)  # (B, 3, H, W) normalised
    labels = batch["label"].to(device, non_blocking=True)  # (B, C-1) multi-hot
    boxes = batch["box"].to(device, non_blocking=True)  # (B, 4) [y0, y1, x0, x1]
    # The CAMs feed only the pseudo labels, which count from cam_iters on: skip them before.
    need_cams = iteration >= loss_kwargs["cam_iters"]
    cls_only = not (need_cams or cls_phase_full_forward)
    with _autocast(device, amp):
        out = model(images, cls_only=cls_only)
        scale1 = (out.cam_logits, out.aff_pred) if reuse_train_forward else None
        cams = (multi_scale_cam(unwrap_model(model), images, cam_scales, scale1=scale1)
                if need_cams else None)
    cam = cams.cam.float() if need_cams else None
    seg_logits = None if cls_only else out.seg_logits.float()
    terms = compute_afa_losses(
        out.cls_logits.float(), seg_logits, None if cls_only else out.aff_pred.float(), cam,
        cams.aff.float() if need_cams else None, denormalize(images), labels, boxes, iteration,
        par=par, crf_loss=crf_loss, **loss_kwargs)
    if cls_only:
        idle = sum(0.0 * p.sum() for p in unwrap_model(model).idle_params())
        terms = dataclasses.replace(terms, total=terms.total + idle)
    return StepOutput(terms, cam, None if cls_only else seg_logits.detach())


class TrainingInterrupted(Exception):
    """Raised after the checkpoint that a stop signal (Ctrl-C, SIGTERM, SIGUSR1) asked for."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by signal {signal.Signals(signum).name}")
        self.signum = int(signum)


class _StopFlag:
    """Remembers a stop signal so the loop can save a checkpoint before exiting."""

    def __init__(self):
        self.signum = None
        self._previous = {}

    def __enter__(self):
        for sig in _STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signum = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _all_agree(flag: bool, device: torch.device) -> bool:
    """True on every rank if ``flag`` is true on any rank."""
    t = torch.tensor([float(flag)], device=device)
    return bool(D.all_reduce_sum(t).item() > 0)


class TrainResult(NamedTuple):
    model: torch.nn.Module  # the trained model (unwrapped), on this rank's device
    scores: dict  # the last validation scores (see afa.engine.validate)


def train(cfg: DictConfig, resume: str | None = None) -> TrainResult:
    """Train with ``cfg`` (see ``afa.config``), from scratch or from ``resume`` (auto|path)."""
    info = D.init_distributed(cfg.device)
    main = info.rank == 0
    work_dir = Path(cfg.work_dir)
    log = setup_logging(work_dir, main)
    try:
        return _train(cfg, resume, info, main, work_dir, log)
    finally:
        D.cleanup()


def _train(cfg, resume, info, main, work_dir, log) -> TrainResult:
    t = cfg.train
    world = info.world_size
    per_step = t.batch_per_gpu * world
    if t.global_batch % per_step:
        raise C.ConfigError(f"train.global_batch={t.global_batch} is not a multiple of "
                            f"train.batch_per_gpu x processes = {t.batch_per_gpu} x {world}")
    if t.amp != "none" and info.device.type != "cuda":
        # Autocast is CUDA-only here; running fp32 under an amp setting would be a silent lie.
        raise C.ConfigError(f"train.amp={t.amp} needs a CUDA device, but this run is on "
                            f"{info.device.type}; set train.amp=none")
    accum = t.global_batch // per_step
    if main:
        C.save_config(cfg, work_dir / "config.yaml")
    torch.manual_seed(cfg.seed + info.rank)

    train_set, val_set = build_datasets(cfg)
    names = class_names(cfg)
    if len(names) != cfg.data.num_classes:
        raise ValueError(f"data.name={cfg.data.name} has {len(names)} classes but "
                         f"data.num_classes={cfg.data.num_classes}")
    if cfg.data.val_max_images:
        val_set = Subset(val_set, range(min(cfg.data.val_max_images, len(val_set))))

    model = AFANet(**C.model_kwargs(cfg)).to(info.device)
    optimizer = build_optimizer(model.param_groups(), cfg.optim.lr, cfg.optim.weight_decay,
                                cfg.optim.betas, lr_mults=C.lr_mults(cfg))
    scaler = torch.amp.GradScaler("cuda", enabled=t.amp == "fp16" and info.device.type == "cuda")
    par = PAR(**C.par_kwargs(cfg)).to(info.device)
    crf_loss = None
    if cfg.loss.reg_loss:
        from afa.losses import DenseCRFLoss

        crf_loss = DenseCRFLoss(sigma_rgb=cfg.loss.reg_rgb_sigma, sigma_xy=cfg.loss.reg_xy_sigma,
                                scale_factor=cfg.loss.reg_scale,
                                ignore_index=cfg.cam.ignore_index)

    ckpt = CheckpointManager(work_dir / "checkpoints", keep_last=t.keep_last)
    start_iter, best = 0, -1.0
    resume_path = ckpt.resolve(resume)
    if resume_path is not None:
        state = torch.load(resume_path, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        start_iter, best = state["iteration"], state["best"]
        if state["data"]["global_batch"] != t.global_batch:
            raise ValueError(f"{resume_path} was trained with global batch "
                             f"{state['data']['global_batch']}, the config says {t.global_batch}")
        if len(state["rng"]) == world:
            restore_rng_state(state["rng"][info.rank])
        log.info("Resumed from %s at iteration %d", resume_path, start_iter)

    model = convert_sync_batchnorm(model, world, info.device)
    if world > 1:
        ids = [info.device.index] if info.device.type == "cuda" else None
        model = DistributedDataParallel(model, device_ids=ids)

    # The data stream and all randomness are functions of the position in it (see data_order),
    # so resuming at an iteration needs nothing else, on any number of processes.
    sampler = ResumableSampler(len(train_set), t.batch_per_gpu, t.global_batch, cfg.seed,
                               info.rank, world, start_batches=start_iter * accum)
    loader = DataLoader(SeededDataset(train_set), batch_size=t.batch_per_gpu, sampler=sampler,
                        num_workers=cfg.data.num_workers, worker_init_fn=seed_worker,
                        pin_memory=info.device.type == "cuda", drop_last=True,
                        persistent_workers=cfg.data.num_workers > 0)
    batches = iter(loader)
    log.info("Training %s on %s: %d images, %d processes x %d per batch x %d accumulation = "
             "global batch %d, %d iterations from %d", cfg.model.backbone, info.device,
             len(train_set), world, t.batch_per_gpu, accum, t.global_batch, t.max_iters,
             start_iter)

    step_kwargs = dict(device=info.device, par=par, crf_loss=crf_loss,
                       cam_scales=tuple(cfg.cam.scales), amp=t.amp, loss_kwargs=_loss_kwargs(cfg),
                       cls_phase_full_forward=t.cls_phase_full_forward,
                       reuse_train_forward=cfg.cam.reuse_train_forward)
    run_log = RunLogger(work_dir, main)
    sums, logged, skipped, scores = defaultdict(float), 0, 0, {}
    bar = tqdm(total=t.max_iters, initial=start_iter, disable=not main, dynamic_ncols=True,
               desc="train")
    tic = time.time()

    def checkpoint(iteration: int, is_best: bool = False) -> None:
        rng = [None] * world
        if world > 1:
            torch.distributed.all_gather_object(rng, capture_rng_state())
        else:
            rng[0] = capture_rng_state()
        if main:
            ckpt.save({"model": unwrap_model(model).state_dict(),
                       "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                       "iteration": iteration, "best": best, "rng": rng,
                       "data": {"stream_position": iteration * t.global_batch,
                                "global_batch": t.global_batch},
                       "config": OmegaConf.to_container(cfg)}, iteration, is_best)
        D.barrier()

    with _StopFlag() as stop:
        iteration = start_iter
        while iteration < t.max_iters:
            lr = lr_at(iteration, cfg.optim.lr, t.max_iters, cfg.optim.warmup_iters,
                       cfg.optim.warmup_ratio, cfg.optim.power)
            set_lr(optimizer, lr)
            model.train()
            finite = True
            for micro in range(accum):
                batch = next(batches)
                chunk = (iteration * accum + micro) * world + info.rank
                torch.manual_seed(stream_seed(cfg.seed, chunk, salt=1))  # dropout, drop-path
                sync = micro == accum - 1 or world == 1
                with contextlib.nullcontext() if sync else model.no_sync():
                    step = train_step(model, batch, iteration, **step_kwargs)
                    terms = step.terms
                    scaler.scale(terms.total / accum).backward()
                finite &= bool(torch.isfinite(terms.total))
                for key in ("cls_loss", "seg_loss", "aff_loss", "reg_loss", "total"):
                    sums[key] += float(getattr(terms, key).detach()) / accum
            logged += 1
            if _all_agree(not finite, info.device):
                message = (f"Non-finite loss at iteration {iteration}: " + ", ".join(
                    f"{k}={float(getattr(terms, k).detach()):.4g}"
                    for k in ("cls_loss", "seg_loss", "aff_loss", "reg_loss")))
                if t.nonfinite == "stop":
                    checkpoint(iteration)
                    raise FloatingPointError(message + " (train.nonfinite=skip skips such steps)")
                skipped += 1
                log.warning("%s; step skipped (%d so far)", message, skipped)
            else:
                scaler.step(optimizer)
                scaler.update()
            optimizer.zero_grad(set_to_none=True)
            iteration += 1
            bar.update(1)

            if iteration % t.log_iters == 0 or iteration == t.max_iters:
                means = D.all_reduce_mean({k: v / logged for k, v in sums.items()}, info.device)
                means.update(lr=lr, skipped_steps=skipped, sec_per_iter=(time.time() - tic) / logged)
                sums.clear()
                logged, tic = 0, time.time()
                run_log.scalars(iteration, means, prefix="train/")
                bar.set_postfix(loss=f"{means['total']:.3f}", lr=f"{lr:.2e}")
                log.info("iter %d/%d lr %.3e loss %.4f (cls %.4f seg %.4f aff %.4f reg %.4f)",
                         iteration, t.max_iters, lr, means["total"], means["cls_loss"],
                         means["seg_loss"], means["aff_loss"], means["reg_loss"])
            if (main and t.image_log_iters and iteration % t.image_log_iters == 0
                    and terms.seg_target is not None):
                _log_images(run_log, iteration, batch, step)

            is_best = False
            if iteration % t.eval_iters == 0 or iteration == t.max_iters:
                D.broadcast_buffers(unwrap_model(model))
                scores = validate(unwrap_model(model), val_set, par=par, device=info.device,
                                  cam_scales=tuple(cfg.cam.scales), bkg_score=cfg.cam.bkg_score,
                                  low=cfg.cam.low, radius=cfg.cam.radius, class_names=names,
                                  amp=t.amp)
                summary = {k: v["miou"] for k, v in scores.items() if isinstance(v, dict)}
                summary["cls_f1"] = scores["cls_f1"]
                run_log.scalars(iteration, summary, prefix="val/")
                run_log.val_scores(iteration, scores)
                log.info("val iter %d: %s\n%s", iteration,
                         " ".join(f"{k} {100 * v:.2f}" for k, v in summary.items()),
                         format_table(scores, names))
                is_best = summary["seg"] > best
                best = max(best, summary["seg"])
            stop_now = _all_agree(stop.signum is not None, info.device)
            if (iteration % t.ckpt_iters == 0 or iteration == t.max_iters or is_best
                    or stop_now):
                checkpoint(iteration, is_best)
            if stop_now:
                bar.close()
                run_log.close()
                log.warning("Stopped by a signal at iteration %d; checkpoint saved. Continue with "
                            "--resume auto", iteration)
                raise TrainingInterrupted(stop.signum or signal.SIGTERM)
    D.broadcast_buffers(unwrap_model(model))
    bar.close()
    run_log.close()
    return TrainResult(unwrap_model(model), scores)


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
