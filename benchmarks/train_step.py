"""Time one complete AFA training iteration, and each of its stages, on random data.

    python benchmarks/train_step.py --backbone mit_b1 --crop 320 --batch 2 --device cpu --threads 2
    python benchmarks/train_step.py --crop 512 --batch 2 --iters 3 --warmup 1   # larger ones
    python benchmarks/train_step.py --device cuda --amp bf16 --crop 512 --batch 4 --reg-loss
    python benchmarks/train_step.py --device cuda --tf32 --crop 512 --batch 4
    python benchmarks/train_step.py --config configs/demo.yaml --crop 128 --batch 16 --phase cls

``--config`` (default: the built-in defaults, i.e. the paper's VOC setting) and ``key=value``
overrides pick the model, the CAM scales and the thresholds; ``--backbone`` overrides the config's.

The timed iteration is the trainer's own code path: ``afa.engine.trainer.train_step`` (forward,
multi-scale CAM, pseudo labels and losses), ``total.backward()``, the AdamW step of
``afa.engine.optim.build_optimizer`` and ``zero_grad``. The iteration number is
``max(cam_iters, aff_switch_iter)`` of the config, so every pseudo-label step runs; with
``--phase cls`` it is 0, a classification-phase step (``train.cls_phase_full_forward`` decides
whether the decoder and affinity head run). Inputs: random normalised images, random multi-hot
labels with 1-2 classes, full boxes.

The per-stage breakdown is measured in separate iterations that call the same functions one by
one (``afa.cam``, ``afa.affinity``, ``afa.losses``) with a timer around each; its sum is close to,
not equal to, the whole iteration. Medians over ``--iters`` after ``--warmup`` iterations. The last
line of output is one JSON object with everything. Peak memory: RSS (ru_maxrss) of the process on
CPU, ``torch.cuda.max_memory_allocated`` on CUDA. Freed host memory is kept for reuse as in the
trainer (``afa.host_memory``); ``AFA_KEEP_HOST_MEMORY=0`` measures with the C library's defaults.
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import statistics
import time
from collections import defaultdict

import torch

from afa import config as C
from afa.affinity import affinity_label, propagate_cams
from afa.cam import cam_to_label, multi_scale_cam, refine_cams_with_par, refine_propagated_cams
from afa.config import load_config
from afa.data import denormalize
from afa.engine.optim import build_optimizer
from afa.engine import distributed as D
from afa.engine.precision import autocast, set_tf32
from afa.engine.trainer import _loss_kwargs, _reg_workers, train_step
from afa.host_memory import keep_freed_host_memory
from afa.losses import (DenseCRFLoss, affinity_loss, balanced_seg_loss,
                        classification_loss)
from afa.models import PAR, AFANet
from afa.pseudo_labels import seg_probs

STAGES = ("forward", "reg_start", "multi_scale_cam", "par", "random_walk", "affinity_labels",
          "losses", "backward", "optimizer")


def random_batch(batch: int, crop: int, num_fg: int = 20) -> dict:
    labels = torch.zeros(batch, num_fg)
    for b in range(batch):
        present = torch.randperm(num_fg)[: int(torch.randint(1, 3, ()))]  # 1 or 2 classes
        labels[b, present] = 1.0
    return {"image": torch.randn(batch, 3, crop, crop), "label": labels,
            "box": torch.tensor([[0, crop, 0, crop]] * batch)}


class Timer:
    """Accumulates wall time per stage name; synchronises CUDA around each stage."""

    def __init__(self, device: torch.device):
        self.device, self.times = device, defaultdict(float)

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def __call__(self, name: str):
        timer = self

        class _Stage:
            def __enter__(self):
                timer._sync()
                self.start = time.perf_counter()

            def __exit__(self, *exc):
                timer._sync()
                timer.times[name] += time.perf_counter() - self.start

        return _Stage()


def staged_iteration(model, optimizer, batch, iteration, *, device, par, crf_loss, amp,
                     loss_kwargs, cam_scales, reuse_train_forward=False,
                     update_decoder_bn=False) -> dict:
    """One iteration with the body of train_step / compute_afa_losses split into timed stages."""
    t = Timer(device)
    kw = loss_kwargs
    images = batch["image"].to(device)
    labels = batch["label"].to(device)
    boxes = batch["box"].to(device)
    host = dict(box_list=batch["box"].tolist(), max_present=int(batch["label"].sum(dim=1).max()))
    with t("forward"), autocast(device, amp):
        out = model(images)
    rgb = denormalize(images)
    pending = None
    if crf_loss is not None:  # as train_step: the filter starts before the CAMs
        with t("reg_start"):
            pending = crf_loss.start(rgb, seg_probs(out.seg_logits, rgb.shape[-2:]), boxes)
    with t("multi_scale_cam"), autocast(device, amp):
        cams = multi_scale_cam(model, images, cam_scales,
                               scale1=out if reuse_train_forward else None,
                               update_decoder_bn=update_decoder_bn)
    cam, cam_aff = cams.cam.float(), cams.aff.float()
    with torch.no_grad():
        with t("par"):  # includes the cheap CAM label, which the trainer only logs
            cam_to_label(cam, labels, bkg_score=kw["bkg_score"], boxes=boxes,
                         ignore_index=kw["ignore_index"])
            refined = refine_cams_with_par(par, rgb, cam, labels, boxes, high=kw["high"],
                                           low=kw["low"], ignore_index=kw["ignore_index"],
                                           max_present=host["max_present"])
        with t("affinity_labels"):
            aff_label = affinity_label(refined, out.grid, radius=kw["radius"],
                                       ignore_index=kw["ignore_index"])
        with t("random_walk"):
            walked_high = propagate_cams(cam, labels, cam_aff, cams.aff_grid,
                                         bkg_score=kw["high"], radius=kw["radius"])
            walked_low = propagate_cams(cam, labels, cam_aff, cams.aff_grid, bkg_score=kw["low"],
                                        radius=kw["radius"])
        with t("par"):
            aff_pseudo = refine_propagated_cams(par, rgb, walked_high, walked_low, labels, boxes,
                                                ignore_index=kw["ignore_index"], **host)
    target = refined if iteration < kw["aff_switch_iter"] else aff_pseudo
    with t("losses"):
        seg_logits = out.seg_logits.float()
        total = (classification_loss(out.cls_logits.float(), labels)
                 + kw["w_seg"] * balanced_seg_loss(seg_logits, target,
                                                   ignore_index=kw["ignore_index"])
                 + kw["w_aff"] * affinity_loss(out.aff_pred.float(), aff_label))
        if pending is not None:  # waits for the filter
            total = total + kw["w_reg"] * pending.loss(target)
    with t("backward"):
        total.backward()
    with t("optimizer"):
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return dict(t.times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=None, help="YAML config (default: the paper's VOC one)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    p.add_argument("--backbone", default=None, help="default: the config's (mit_b1)")
    p.add_argument("--phase", default="joint", choices=("joint", "cls"),
                   help="joint: every pseudo-label step; cls: a classification-phase step")
    p.add_argument("--crop", type=int, default=320)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--amp", default="none", choices=("none", "bf16", "fp16"))
    p.add_argument("--iters", type=int, default=5, help="timed iterations (each measurement)")
    p.add_argument("--warmup", type=int, default=2, help="untimed iterations first (at least 1)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (CPU)")
    p.add_argument("--tf32", action="store_true",
                   help="CUDA: TF32 tensor cores for fp32 matmuls/convolutions (train.tf32)")
    p.add_argument("--reg-loss", action="store_true", help="add the DenseCRF regularized loss")
    p.add_argument("--reg-workers", type=int, default=None,
                   help="processes for its filter (loss.reg_workers; default: the trainer's rule, "
                        "one per image on CUDA, none on CPU)")
    p.add_argument("--no-breakdown", action="store_true", help="skip the per-stage iterations")
    args = p.parse_args()
    if args.amp == "fp16" and args.device != "cuda":
        p.error("--amp fp16 needs --device cuda (bf16 runs on CPU too)")

    torch.set_num_threads(args.threads)
    host_memory = keep_freed_host_memory()  # as the trainer does; AFA_KEEP_HOST_MEMORY=0: not
    torch.manual_seed(0)
    device = torch.device(args.device)
    set_tf32(device, args.tf32)
    overrides = list(args.overrides) + [f"train.amp={args.amp}", "model.pretrained=null"]
    if args.backbone:
        overrides.append(f"model.backbone={args.backbone}")
    cfg = load_config(args.config, overrides)
    args.backbone = cfg.model.backbone
    loss_kwargs = _loss_kwargs(cfg)
    cam_scales = tuple(cfg.cam.scales)
    iteration = max(cfg.train.cam_iters, cfg.train.aff_switch_iter) if args.phase == "joint" else 0
    model = AFANet(**C.model_kwargs(cfg)).to(device).train()
    par = PAR(**C.par_kwargs(cfg)).to(device)
    crf_loss = None
    if args.reg_loss:
        workers = args.reg_workers
        if workers is None:
            info = D.DistInfo(rank=0, local_rank=0, world_size=1, device=device)
            workers = _reg_workers(None, info, args.batch)
        crf_loss = DenseCRFLoss(sigma_rgb=cfg.loss.reg_rgb_sigma, sigma_xy=cfg.loss.reg_xy_sigma,
                                scale_factor=cfg.loss.reg_scale,
                                ignore_index=cfg.cam.ignore_index, workers=workers)
    optimizer = build_optimizer(model.param_groups(), cfg.optim.lr, cfg.optim.weight_decay,
                                lr_mults=C.lr_mults(cfg))
    scaler = torch.amp.GradScaler("cuda", enabled=args.amp == "fp16" and device.type == "cuda")
    batch = random_batch(args.batch, args.crop, num_fg=cfg.data.num_classes - 1)
    step_kwargs = dict(device=device, par=par, crf_loss=crf_loss, cam_scales=cam_scales,
                       amp=args.amp, loss_kwargs=loss_kwargs,
                       cls_phase_full_forward=cfg.train.cls_phase_full_forward,
                       reuse_train_forward=cfg.cam.reuse_train_forward,
                       update_decoder_bn=cfg.cam.update_decoder_bn)

    def full_iteration() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step = train_step(model, batch, iteration, **step_kwargs)
        scaler.scale(step.terms.total).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    # Random data and a random model drift within a few AdamW steps (towards denormal numbers that
    # are slow on CPU), so every timed iteration starts from the state after the first warm-up one.
    full_iteration()
    snapshot = copy.deepcopy((model.state_dict(), optimizer.state_dict()))

    def restore() -> None:
        model.load_state_dict(snapshot[0])
        optimizer.load_state_dict(snapshot[1])

    def timed_full() -> float:
        restore()
        return full_iteration()

    for _ in range(args.warmup - 1):
        timed_full()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = [timed_full() for _ in range(args.iters)]
    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:  # ru_maxrss is in KiB on Linux; the peak of the whole process, warm-up included
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    stages = {}
    if not args.no_breakdown and args.phase == "joint":
        runs = [restore() or staged_iteration(model, optimizer, batch, iteration, par=par, crf_loss=crf_loss,
                                 amp=args.amp,
                                 device=device, loss_kwargs=loss_kwargs, cam_scales=cam_scales,
                                 reuse_train_forward=cfg.cam.reuse_train_forward,
                                 update_decoder_bn=cfg.cam.update_decoder_bn)
                for _ in range(args.iters)]
        stages = {s: round(statistics.median(r.get(s, 0.0) for r in runs), 4) for s in STAGES}

    median = statistics.median(times)
    print(f"{args.backbone} crop {args.crop} batch {args.batch} {args.device} amp={args.amp} "
          f"phase={args.phase} config={args.config or 'defaults'} "
          f"threads={args.threads} tf32={args.tf32} reg_loss={args.reg_loss}: median {median:.3f} s/iter "
          f"(min {min(times):.3f}, {args.iters} iters after {args.warmup} warm-up), "
          f"peak {'RSS' if device.type == 'cpu' else 'CUDA allocated'} {peak_mb:.0f} MB; "
          f"host memory: {host_memory}")
    for s, v in stages.items():
        print(f"  {s:16s} {v:7.3f} s  {100 * v / max(sum(stages.values()), 1e-9):5.1f} %")
    print(json.dumps({"backbone": args.backbone, "crop": args.crop, "batch": args.batch,
                      "device": args.device, "amp": args.amp, "threads": args.threads,
                      "tf32": args.tf32, "reg_loss": args.reg_loss,
                      "reg_workers": crf_loss.workers if crf_loss else None, "config": args.config, "overrides": args.overrides,
                      "phase": args.phase, "iteration": iteration, "iters": args.iters,
                      "warmup": args.warmup, "median_s": round(median, 4),
                      "min_s": round(min(times), 4), "peak_mb": round(peak_mb, 1),
                      "peak_kind": "rss" if device.type == "cpu" else "cuda_allocated",
                      "stages_s": stages, "stages_sum_s": round(sum(stages.values()), 4),
                      "host_memory": host_memory}))


if __name__ == "__main__":
    main()
