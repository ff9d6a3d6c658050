"""Time one complete AFA training iteration, and each of its stages, on random data.

    python benchmarks/train_step.py --backbone mit_b1 --crop 320 --batch 2 --device cpu --threads 2
    python benchmarks/train_step.py --crop 512 --batch 2 --iters 3 --warmup 1   # larger ones
    python benchmarks/train_step.py --device cuda --amp bf16 --crop 512 --batch 4 --reg-loss
    python benchmarks/train_step.py --device cuda --tf32 --crop 512 --batch 4
    python benchmarks/train_step.py --config configs/demo.yaml --crop 128 --batch 16 --phase cls

``--config`` (default: the built-in defaults, i.e. the paper's VOC setting) and ``key=value``
overrides pick the model, the CAM scales and the thresholds; ``--backbone`` overrides the config's.

The timed iteration is the trainer's own: ``afa.engine.trainer._optimizer_step`` (the micro-step
``afa.engine.step.train_step``: forward, multi-scale CAM, pseudo labels and losses; backward;
the finiteness check; the AdamW step; ``zero_grad``), one micro-batch, in the phase of iteration
``max(cam_iters, aff_switch_iter)`` of the config, so every pseudo-label step runs; with
``--phase cls`` iteration 0, a classification-phase step (``train.lean_forwards`` decides which
forwards run). Inputs: random normalised images, random multi-hot labels with 1-2 classes, full
boxes.

The per-stage breakdown is measured in separate iterations of the same code with timing hooks
around the functions it calls (the model's forward, ``multi_scale_cam``, PAR, the random walk,
the affinity labels, the regularized loss's start; ``losses`` is the rest of
``compute_afa_losses``; backward and the optimizer step), synchronising CUDA around each; their
sum is close to, not equal to, the whole iteration. Medians over ``--iters`` after ``--warmup``
iterations. The last line of output is one JSON object with everything. Peak memory: RSS
(ru_maxrss) of the process on CPU, ``torch.cuda.max_memory_allocated`` on CUDA. Freed host
memory is kept for reuse as in the trainer (``afa.host_memory``); ``AFA_KEEP_HOST_MEMORY=0``
measures with the C library's defaults.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import resource
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch

import afa.engine.step as step_module
import afa.pseudo_labels as pseudo_module
from afa import config as C
from afa.config import load_config
from afa.engine import distributed as D
from afa.engine import trainer
from afa.engine.hooks import LossReport
from afa.engine.logger import RunLogger
from afa.engine.optim import build_optimizer
from afa.engine.precision import set_tf32
from afa.engine.schedule import Schedule
from afa.engine.step import StepSettings
from afa.host_memory import keep_freed_host_memory
from afa.losses import DenseCRFLoss
from afa.models import PAR, AFANet

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

    @contextlib.contextmanager
    def __call__(self, name: str):
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.times[name] += time.perf_counter() - start

    def wrap(self, name: str, function):
        def timed(*args, **kwargs):
            with self(name):
                return function(*args, **kwargs)
        return timed


class _TimedModel(torch.nn.Module):
    """The model behind a forward timer; ``unwrap_model`` finds it as ``.module``, as it finds
    a DDP wrapper's, so the multi-scale CAM's own forwards are not counted as ``forward``."""

    def __init__(self, model, timer: Timer):
        super().__init__()
        self.module, self.timer = model, timer

    def forward(self, *args, **kwargs):
        with self.timer("forward"):
            return self.module(*args, **kwargs)


@contextlib.contextmanager
def stage_hooks(timer: Timer, run):
    """Timing hooks on the functions the trainer's step calls, and on backward and the
    optimizer step; everything is restored afterwards."""
    patches = [(step_module, "multi_scale_cam"), (step_module, "compute_afa_losses"),
               (pseudo_module, "run_par"), (pseudo_module, "propagate_cams"),
               (pseudo_module, "affinity_label")]
    names = {"compute_afa_losses": "losses_total", "run_par": "par",
             "propagate_cams": "random_walk", "affinity_label": "affinity_labels"}
    saved = [(module, name, getattr(module, name)) for module, name in patches]
    model, optimizer = run.model, run.optimizer
    backward = torch.Tensor.backward
    try:
        for module, name, function in saved:
            setattr(module, name, timer.wrap(names.get(name, name), function))
        if run.crf_loss is not None:
            run.crf_loss.start = timer.wrap("reg_start", run.crf_loss.start)
        run.model = _TimedModel(model, timer)
        torch.Tensor.backward = timer.wrap("backward", backward)
        run.optimizer.step = timer.wrap("optimizer", optimizer.step)
        yield
    finally:
        for module, name, function in saved:
            setattr(module, name, function)
        if run.crf_loss is not None:
            del run.crf_loss.start
        run.model = model
        torch.Tensor.backward = backward
        del optimizer.step


def staged_times(timer: Timer) -> dict:
    """The stage table of one iteration: ``losses`` is compute_afa_losses without its timed
    parts (the CAM label, the PAR jobs, the loss terms, waiting for the regularized filter)."""
    times = dict(timer.times)
    inner = sum(times.get(k, 0.0) for k in ("par", "random_walk", "affinity_labels"))
    times["losses"] = times.pop("losses_total", 0.0) - inner
    return times


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
    p.add_argument("--reg-backend", default="auto", choices=("auto", "torch", "pydensecrf"),
                   help="where its bilateral filter runs (loss.reg_backend; auto: torch on CUDA, "
                        "pydensecrf on CPU)")
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
    schedule = Schedule.from_config(cfg)
    phase = schedule.phase(max(cfg.train.cam_iters, cfg.train.aff_switch_iter)
                           if args.phase == "joint" else 0)
    iteration = max(cfg.train.cam_iters, cfg.train.aff_switch_iter) if args.phase == "joint" else 0
    model = AFANet(**C.model_kwargs(cfg)).to(device).train()
    model.encoder.set_strides(phase.strides)
    info = D.DistInfo(rank=0, local_rank=0, world_size=1, device=device)
    crf_loss = None
    if args.reg_loss:
        workers = args.reg_workers
        if workers is None:
            workers = trainer._reg_workers(None, info, args.batch)
        backend, _ = trainer.reg_backend(args.reg_backend, device)
        crf_loss = DenseCRFLoss(workers=workers, backend=backend)
        args.reg_backend = backend
    optimizer = build_optimizer(model.param_groups(), cfg.optim.lr, cfg.optim.weight_decay,
                                lr_mults=C.lr_mults(cfg))
    scaler = torch.amp.GradScaler("cuda", enabled=args.amp == "fp16" and device.type == "cuda")
    run = trainer._Run(cfg, info, logging.getLogger("afa"), model, optimizer, scaler,
                       PAR(**C.par_kwargs(cfg)).to(device), crf_loss, schedule,
                       StepSettings.from_config(cfg, args.amp), None, None, args.batch, 1, None)
    report = LossReport(RunLogger(Path("."), False), 1, 1, 1, "skip")
    batch = random_batch(args.batch, args.crop, num_fg=C.num_classes(cfg) - 1)

    def full_iteration() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        trainer._optimizer_step(run, [batch], phase, iteration, report)
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
        runs = []
        for _ in range(args.iters):
            restore()
            timer = Timer(device)
            with stage_hooks(timer, run):
                trainer._optimizer_step(run, [batch], phase, iteration, report)
            runs.append(staged_times(timer))
        stages = {s: round(statistics.median(r.get(s, 0.0) for r in runs), 4) for s in STAGES}

    median = statistics.median(times)
    backend_note = f" ({args.reg_backend})" if args.reg_loss else ""
    print(f"{args.backbone} crop {args.crop} batch {args.batch} {args.device} amp={args.amp} "
          f"phase={args.phase} config={args.config or 'defaults'} "
          f"threads={args.threads} tf32={args.tf32} reg_loss={args.reg_loss}"
          f"{backend_note}: median {median:.3f} s/iter "
          f"(min {min(times):.3f}, {args.iters} iters after {args.warmup} warm-up), "
          f"peak {'RSS' if device.type == 'cpu' else 'CUDA allocated'} {peak_mb:.0f} MB; "
          f"host memory: {host_memory}")
    for s, v in stages.items():
        print(f"  {s:16s} {v:7.3f} s  {100 * v / max(sum(stages.values()), 1e-9):5.1f} %")
    print(json.dumps({"backbone": args.backbone, "crop": args.crop, "batch": args.batch,
                      "device": args.device, "amp": args.amp, "threads": args.threads,
                      "tf32": args.tf32, "reg_loss": args.reg_loss,
                      "reg_workers": crf_loss.workers if crf_loss else None,
                      "reg_backend": args.reg_backend if crf_loss else None, "config": args.config, "overrides": args.overrides,
                      "phase": args.phase, "iteration": iteration, "iters": args.iters,
                      "warmup": args.warmup, "median_s": round(median, 4),
                      "min_s": round(min(times), 4), "peak_mb": round(peak_mb, 1),
                      "peak_kind": "rss" if device.type == "cpu" else "cuda_allocated",
                      "stages_s": stages, "stages_sum_s": round(sum(stages.values()), 4),
                      "host_memory": host_memory}))


if __name__ == "__main__":
    main()
