"""Does one training step give the same pseudo labels and losses on two devices?

    python benchmarks/device_agreement.py              # cuda vs cpu, fp32, mit_b1, crop 320
    python benchmarks/device_agreement.py --tf32       # TF32 on cuda vs fp32 on cpu
    python benchmarks/device_agreement.py --amp bf16   # bf16 autocast on cuda vs fp32 on cpu
    python benchmarks/device_agreement.py --device cpu --other cpu --backbone mit_b0 --crop 64

One randomly initialised model (``--seed``) and one batch are run through the trainer's own
``afa.engine.step.train_step`` (forward, multi-scale CAM, pseudo labels, losses) and a
backward, once on ``--device`` and once on ``--other``, from the same weights (a copy of one
state dict) and the same batch. The iteration is ``max(cam_iters, aff_switch_iter)`` of the
config, so every pseudo-label step runs and the segmentation learns from the affinity pseudo
label. ``--other`` always runs fp32 with TF32 off; ``--device`` too unless ``--tf32`` or
``--amp`` say otherwise.

Inputs are smooth random colour fields (bicubic-upsampled 8x8 noise plus mild grain) rather than
white noise, so that PAR's colour kernel sees regions, with 1-2 random classes per image and the
full crop as box (``train_step.random_batch``). Stochastic layers are off (drop-path 0, decoder
dropout in eval mode: their random draws differ between devices); BatchNorm uses batch statistics
as in training. An untrained affinity head predicts about 0.5 for every pair, after which the
random walk averages the whole crop and the affinity pseudo label is ignore almost everywhere; as
``tests/test_plain_path.py`` does, its projection is sharpened (weights x10, bias x10 - 10) so
that the affinity label holds every kind of value. The ignore fraction of every label is printed.

Reported: for each label map (CAM label, PAR-refined, affinity pseudo label, segmentation target,
pairwise affinity target) the fraction of equal entries; for each loss term both values and their
absolute and relative difference; the largest CAM and segmentation-logit differences; the
relative difference of the whole gradient. A table, then one JSON line (last). Exit status 1 when
a label agreement is below ``--min-agreement`` (0.99) or a loss's relative difference above
``--max-loss-rel`` (1e-3); with ``--device cpu --other cpu`` in fp32 the two runs must be
identical (agreement 1.0, difference 0), which checks the script itself.
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from afa import config as C
from afa.constants import IMAGENET_MEAN, IMAGENET_STD
from afa.constants import IGNORE_INDEX
from afa.engine.schedule import Schedule
from afa.engine.step import StepSettings, train_step
from afa.losses import DenseCRFLoss
from afa.models import PAR, AFANet

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_step import random_batch  # noqa: E402  (benchmarks/ is not a package)

LABELS = ("cam_label", "refined_label", "aff_pseudo_label", "seg_target", "aff_label")
LOSSES = ("cls_loss", "seg_loss", "aff_loss", "reg_loss", "total")


def smooth_batch(batch: int, crop: int, num_fg: int, seed: int) -> dict:
    """``random_batch``'s labels and boxes, with smooth random images instead of white noise."""
    torch.manual_seed(seed)
    out = random_batch(batch, crop, num_fg=num_fg)
    gen = torch.Generator().manual_seed(seed)
    rgb = F.interpolate(torch.rand(batch, 3, 8, 8, generator=gen), size=(crop, crop),
                        mode="bicubic", align_corners=False)
    rgb = (rgb + 0.02 * torch.randn(rgb.shape, generator=gen)).clamp(0, 1)  # (B, 3, H, W)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    out["image"] = (rgb * 255 - mean) / std
    return out


def build_model(cfg, seed: int) -> AFANet:
    """The random-init model both devices start from (on the CPU)."""
    torch.manual_seed(seed)
    model = AFANet(**{**C.model_kwargs(cfg), "pretrained": None, "drop_path_rate": 0.0})
    with torch.no_grad():  # a trained-like affinity head (see the module docstring)
        model.attn_proj.weight.mul_(10.0)
        model.attn_proj.bias.mul_(10.0).sub_(10.0)
    return model.train()


def run_step(model: AFANet, batch: dict, iteration: int, device: torch.device, *, amp: str,
             tf32: bool, cfg, reg_loss: bool) -> dict:
    """train_step + backward on ``device``; everything returned on the CPU."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
    model = copy.deepcopy(model).to(device).train()
    for m in model.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.eval()
    crf_loss = None
    if reg_loss:
        crf_loss = DenseCRFLoss()
    start = time.perf_counter()
    par = PAR(**C.par_kwargs(cfg)).to(device)
    step = train_step(model, batch, Schedule.from_config(cfg).phase(iteration),
                      StepSettings.from_config(cfg, amp), par=par, crf_loss=crf_loss,
                      device=device)
    step.terms.total.backward()
    grads = torch.cat([p.grad.flatten().cpu() for p in model.parameters() if p.grad is not None])
    seconds = time.perf_counter() - start  # the .cpu() above waited for the device
    if crf_loss is not None and hasattr(crf_loss, "close"):
        crf_loss.close()
    terms = step.terms
    return {"labels": {k: getattr(terms, k).cpu() for k in LABELS},
            "losses": {k: float(getattr(terms, k).detach()) for k in LOSSES},
            "cam": step.cam.cpu(), "seg_logits": step.seg_logits.float().cpu(), "grads": grads,
            "seconds": seconds}


def compare(a: dict, b: dict, ignore_index: int) -> dict:
    labels = {}
    for name in LABELS:
        x, y = a["labels"][name], b["labels"][name]
        labels[name] = {"agreement": (x == y).double().mean().item(),
                        "ignore_device": (x == ignore_index).double().mean().item(),
                        "ignore_other": (y == ignore_index).double().mean().item()}
    losses = {}
    for name in LOSSES:
        x, y = a["losses"][name], b["losses"][name]
        diff = abs(x - y)
        losses[name] = {"device": x, "other": y, "abs_diff": diff,
                        "rel_diff": diff / abs(y) if y != 0 else (0.0 if x == 0 else float("inf"))}
    grad_rel = ((a["grads"] - b["grads"]).norm() / b["grads"].norm().clamp_min(1e-30)).item()
    return {"labels": labels, "losses": losses,
            "cam_max_abs_diff": (a["cam"] - b["cam"]).abs().max().item(),
            "seg_logits_max_abs_diff": (a["seg_logits"] - b["seg_logits"]).abs().max().item(),
            "grad_rel_diff": grad_rel}


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=Path(__file__).resolve().parents[1],
                              timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.split("\n")[1:7]))
    p.add_argument("--config", default=None, help="YAML config (default: the paper's VOC one)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    p.add_argument("--backbone", default=None, help="default: the config's (mit_b1)")
    p.add_argument("--device", default="cuda", help="the device under test (default cuda)")
    p.add_argument("--other", default="cpu", help="the reference device, fp32 (default cpu)")
    p.add_argument("--crop", type=int, default=320)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seed", type=int, default=0, help="weights and batch")
    p.add_argument("--amp", default="none", choices=("none", "bf16", "fp16"),
                   help="autocast of --device's forwards (default none: fp32)")
    p.add_argument("--tf32", action="store_true", help="TF32 on --device (CUDA; default off)")
    p.add_argument("--reg-loss", action="store_true", help="add the DenseCRF regularized loss")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--min-agreement", type=float, default=0.99,
                   help="least fraction of equal entries of every label map (default 0.99)")
    p.add_argument("--max-loss-rel", type=float, default=1e-3,
                   help="largest relative difference of every loss term (default 1e-3)")
    args = p.parse_args()
    device, other = torch.device(args.device), torch.device(args.other)
    for d in (device, other):
        if d.type == "cuda" and not torch.cuda.is_available():
            p.error(f"--device/--other {d} but CUDA is not available here")
    if args.amp == "fp16" and device.type != "cuda":
        p.error("--amp fp16 needs a CUDA --device")
    if args.threads:
        torch.set_num_threads(args.threads)

    overrides = list(args.overrides) + ["model.pretrained=null"]
    if args.backbone:
        overrides.append(f"model.backbone={args.backbone}")
    cfg = C.load_config(args.config, overrides)
    iteration = max(cfg.train.cam_iters, cfg.train.aff_switch_iter)
    model = build_model(cfg, args.seed)
    batch = smooth_batch(args.batch, args.crop, C.num_classes(cfg) - 1, args.seed)
    common = dict(cfg=cfg, reg_loss=args.reg_loss)
    torch.manual_seed(args.seed)
    ref = run_step(model, batch, iteration, other, amp="none", tf32=False, **common)
    torch.manual_seed(args.seed)
    out = run_step(model, batch, iteration, device, amp=args.amp, tf32=args.tf32, **common)
    result = compare(out, ref, IGNORE_INDEX)

    # The same device twice in fp32 on the CPU must be bit-identical: a check of this script.
    exact = device == other and device.type == "cpu" and args.amp == "none"
    min_agreement = 1.0 if exact else args.min_agreement
    max_rel = 0.0 if exact else args.max_loss_rel
    failures = [f"{k} agreement {v['agreement']:.6f} < {min_agreement}"
                for k, v in result["labels"].items() if v["agreement"] < min_agreement]
    failures += [f"{k} relative difference {v['rel_diff']:.3g} > {max_rel}"
                 for k, v in result["losses"].items() if not v["rel_diff"] <= max_rel]
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    precision = "bf16" if args.amp == "bf16" else "fp16" if args.amp == "fp16" else (
        "tf32" if args.tf32 and device.type == "cuda" else "fp32")
    record = {"device": str(device), "other": str(other), "gpu": gpu, "precision": precision,
              "amp": args.amp, "tf32": bool(args.tf32 and device.type == "cuda"),
              "backbone": cfg.model.backbone, "crop": args.crop, "batch": args.batch,
              "iteration": iteration, "seed": args.seed, "reg_loss": args.reg_loss,
              "torch": torch.__version__, "commit": _commit(),
              "seconds": {"device": round(out["seconds"], 3), "other": round(ref["seconds"], 3)},
              **result, "thresholds": {"min_agreement": min_agreement, "max_loss_rel": max_rel},
              "failures": failures, "passed": not failures}

    print(f"{cfg.model.backbone} crop {args.crop} batch {args.batch} iteration {iteration}: "
          f"{device} ({precision}{', ' + gpu if gpu else ''}) vs {other} (fp32)")
    print(f"{'label map':18s} {'agreement':>10s} {'ignore dev':>11s} {'ignore ref':>11s}")
    for name, v in result["labels"].items():
        print(f"{name:18s} {v['agreement']:10.6f} {v['ignore_device']:11.4f} "
              f"{v['ignore_other']:11.4f}")
    print(f"{'loss':18s} {str(device):>12s} {str(other):>12s} {'abs diff':>10s} {'rel diff':>10s}")
    for name, v in result["losses"].items():
        print(f"{name:18s} {v['device']:12.6f} {v['other']:12.6f} {v['abs_diff']:10.3g} "
              f"{v['rel_diff']:10.3g}")
    print(f"max |CAM diff| {result['cam_max_abs_diff']:.3g}, max |seg logit diff| "
          f"{result['seg_logits_max_abs_diff']:.3g}, gradient relative difference "
          f"{result['grad_rel_diff']:.3g}")
    print("PASS" if not failures else "FAIL: " + "; ".join(failures))
    print(json.dumps(record))
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
