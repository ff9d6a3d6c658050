r"""Does the learned affinity help? The random walk against no walk and a perfect affinity.

    python tools/ablate_affinity.py --config configs/demo_full.yaml \
        --checkpoint work_dirs/demo_full/checkpoints/iter_004250.pth \
        [--split val] [--limit N] [--json OUT.json] [key=value ...]

The validation (afa/engine/validate.py, tools/evaluate.py) compares the affinity CAM with the CAM
as the paper does: the CAM label is thresholded at ``cam.thresholds.background`` (0.45) and the
walk runs with ``cam.thresholds.low`` (0.35) as background score. Part of a gain of ``aff_cam``
over ``cam`` is then the lower background score, not the affinity; and the walk also passes the CAMs through the stage-4
grid, which smooths them by itself. This tool separates the three. For every validation image it
makes, from one multi-scale CAM, the same labels with five kinds of scores (rows) and scores each
twice: as the argmax of those scores and after PAR (columns):

    row          scores                                        argmax      after PAR
    bkg_score    CAM, background cam.thresholds.background     = cam       = refined
    low          CAM, background cam.thresholds.low            CAM label   refined label
    grid         CAM on the stage-4 grid and back, ...low      the walk with the identity affinity
    learned      the random walk with the predicted affinity   = aff_cam   = affinity
    perfect      the walk with the ground truth's affinity     its ceiling on this grid

(``=`` rows are the validation's numbers, exactly.) The walk helps when ``learned`` beats
``grid``; ``perfect`` (1 where the two positions' ground-truth labels, sampled like the training's
affinity labels, agree; 0 elsewhere and at unlabelled positions) says how much any affinity could
add at this grid and radius. The walk's radius is ``cam.radius``: override it (``cam.radius=2``)
to see others. Also printed: the predicted affinity of the position pairs within the radius,
grouped by their ground-truth labels, with the share on the wrong side of 0.5.

One process (on ``device``; not under torchrun); images one at a time at their own size; the
network in ``train.amp`` precision, the labels in fp32. Exit status: 0 done; 2 bad config, data or
checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from torch.utils.data import Subset
from tqdm import tqdm

from afa import config as C
from afa import metrics
from afa.affinity import affinity_label, radius_mask, token_labels
from afa.cam import multi_scale_cam
from afa.config import ConfigError, load_config
from afa.constants import IGNORE_INDEX, CamThresholds
from afa.data import build_datasets, class_names, denormalize
from afa.engine.precision import autocast, resolve_amp
from afa.engine.run_config import model_config_from_checkpoint
from afa.engine.validate import check_image_size
from afa.errors import USER_ERRORS, UsageError
from afa.host_memory import keep_freed_host_memory
from afa.metrics import ConfusionMatrix
from afa.models import PAR, AFANet
from afa.pseudo_labels import make_pseudo_labels

ROWS = ("bkg_score", "low", "grid", "learned", "perfect")
COLUMNS = ("argmax", "par")
PAIRS = ("background-background", "same object class", "object-background",
         "different object classes")


def perfect_affinity(mask: torch.Tensor, grid: tuple[int, int],
                     ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """(B, N, N) float: 1 where the ground truth ``mask`` (B, H, W) gives two positions of the
    (h, w) grid the same label (sampled as the affinity labels are), 0 elsewhere, and 0 for every
    pair with an unlabelled position."""
    n = grid[0] * grid[1]
    return (affinity_label(mask, grid, radius=n, ignore_index=ignore_index) == 1).float()


def pair_groups(mask: torch.Tensor, grid: tuple[int, int], radius: int,
                ignore_index: int = IGNORE_INDEX) -> dict[str, torch.Tensor]:
    """``PAIRS`` -> (B, N, N) bool: the pairs of distinct positions within ``radius`` whose two
    ground-truth labels (sampled at the grid) are both known, split by what those labels are."""
    tokens = token_labels(mask, grid)  # (B, N)
    known = tokens != ignore_index
    background = tokens == 0
    n = tokens.shape[1]
    near = radius_mask(grid[0], grid[1], radius, mask.device) & ~torch.eye(
        n, dtype=torch.bool, device=mask.device)
    valid = known[:, :, None] & known[:, None, :] & near
    same = tokens[:, :, None] == tokens[:, None, :]
    bg_i, bg_j = background[:, :, None], background[:, None, :]
    return {
        PAIRS[0]: valid & bg_i & bg_j,
        PAIRS[1]: valid & same & ~bg_i,
        PAIRS[2]: valid & (bg_i ^ bg_j),
        PAIRS[3]: valid & ~same & ~bg_i & ~bg_j,
    }


@torch.no_grad()
def ablation_labels(model, image: torch.Tensor, label: torch.Tensor, mask: torch.Tensor, *,
                    par, cam_scales, bkg_score: float, low: float, radius: int,
                    amp: str = "none") -> tuple[dict, dict]:
    """The label maps of every (row, column) of an image batch (B, 3, H, W), its labels (B, C-1)
    and masks (B, H, W); and, per ``PAIRS`` group, the predicted affinities of those pairs."""
    batch, _, height, width = image.shape
    with autocast(image.device, amp):  # the forwards of validate.predict_labels
        out = model(image)
        reuse = 1.0 in cam_scales
        cam = multi_scale_cam(model, image, cam_scales, aff_scale=1.0 if reuse else None,
                              scale1=out if reuse else None).cam.float()
    aff, grid = out.aff_pred.float(), out.grid
    rgb = denormalize(image.float())
    box_list = [[0, height, 0, width]] * batch
    box = torch.tensor(box_list, device=image.device)
    label = label.float()
    identity = torch.eye(aff.shape[-1], device=aff.device).expand_as(aff)
    runs = {  # background score of the CAM rows, affinity of the walk
        ("bkg_score", "learned"): (bkg_score, aff),
        ("low", "grid"): (low, identity),
        (None, "perfect"): (low, perfect_affinity(mask, grid)),
    }
    labels = {}
    for (cam_row, walk_row), (cam_bkg, walk_aff) in runs.items():
        pseudo = make_pseudo_labels(cam, label, rgb, box, par=par, band=False,
                                    thresholds=CamThresholds(cam_bkg, low, low), aff=walk_aff,
                                    aff_grid=grid, radius=radius, box_list=box_list)
        if cam_row is not None:
            labels[cam_row, "argmax"] = pseudo.cam_label
            labels[cam_row, "par"] = pseudo.refined_label
        labels[walk_row, "argmax"] = pseudo.walked.max(dim=1).indices
        labels[walk_row, "par"] = pseudo.aff_pseudo_label
    pairs = {name: aff[group] for name, group in pair_groups(mask, grid, radius).items()}
    return labels, pairs


@torch.no_grad()
def ablate(model, dataset, *, par, device: torch.device, cam_scales, bkg_score: float,
           low: float, radius: int, class_names: list[str], amp: str = "none",
           progress: bool = True) -> dict:
    """Scores of every row and column (``SegmentationScores.to_dict()``, keyed ``row/column``)
    and the pair statistics (``pairs``: per group the number of pairs, their mean predicted
    affinity and the share on the wrong side of 0.5)."""
    was_training = model.training
    model.eval()
    matrices = {(r, c): ConfusionMatrix(len(class_names), device=device)
                for r in ROWS for c in COLUMNS}
    count = {name: 0 for name in PAIRS}
    total = {name: 0.0 for name in PAIRS}
    wrong = {name: 0 for name in PAIRS}
    for index in tqdm(range(len(dataset)), desc="ablate", disable=not progress):
        sample = dataset[index]
        check_image_size(sample.get("name", f"image {index}"), tuple(sample["image"].shape[-2:]),
                         model, cam_scales)
        labels, pairs = ablation_labels(
            model, sample["image"][None].to(device), sample["label"][None].to(device),
            sample["mask"][None].to(device), par=par, cam_scales=cam_scales,
            bkg_score=bkg_score, low=low, radius=radius, amp=amp)
        for key, pred in labels.items():
            matrices[key].update(pred, sample["mask"][None].to(device))
        for name, values in pairs.items():
            count[name] += values.numel()
            total[name] += values.sum().item()
            # Same-label pairs should be near 1, the others near 0.
            off = values < 0.5 if name in PAIRS[:2] else values >= 0.5
            wrong[name] += int(off.sum())
    model.train(was_training)
    scores = {f"{r}/{c}": m.compute(class_names).to_dict() for (r, c), m in matrices.items()}
    scores["pairs"] = {name: {"pairs": count[name],
                              "mean_affinity": total[name] / count[name] if count[name] else None,
                              "wrong_side": wrong[name] / count[name] if count[name] else None}
                       for name in PAIRS}
    return scores


def format_report(scores: dict, names: list[str], *, bkg_score: float, low: float,
                  radius: int) -> str:
    """Two tables (per-class IoU of every row and column; the pair statistics)."""
    titles = {"bkg_score": f"cam@{bkg_score:g}", "low": f"cam@{low:g}", "grid": "grid",
              "learned": "learned", "perfect": "perfect"}
    columns, summary = {}, {"mIoU": []}
    for c in COLUMNS:
        for r in ROWS:
            key = f"{r}/{c}"
            columns[titles[r] + ("+PAR" if c == "par" else "")] = scores[key]["iou"]
            summary["mIoU"].append(scores[key]["miou"])
    lines = [f"walks: radius {radius}, background score {low:g}; IoU in %",
             metrics.format_table(columns, names, summary), "",
             f"predicted affinity of the position pairs within radius {radius} (ground-truth "
             "labels at the grid)"]
    width = max(len(name) for name in PAIRS) + 2
    lines.append(f"{'pairs':<{width}}{'count':>10}{'mean':>8}{'wrong side of 0.5':>20}")
    for name in PAIRS:
        entry = scores["pairs"][name]
        if not entry["pairs"]:
            lines.append(f"{name:<{width}}{0:>10}{'-':>8}{'-':>20}")
            continue
        lines.append(f"{name:<{width}}{entry['pairs']:>10}{entry['mean_affinity']:>8.3f}"
                     f"{100 * entry['wrong_side']:>19.1f}%")
    learned, grid = scores["learned/argmax"]["miou"], scores["grid/argmax"]["miou"]
    lines.append("")
    lines.append(f"the walk with the learned affinity {'beats' if learned > grid else 'loses to'} "
                 f"no walk by {100 * abs(learned - grid):.2f} mIoU (argmax; "
                 f"{100 * (scores['learned/par']['miou'] - scores['grid/par']['miou']):+.2f} "
                 "after PAR); a perfect affinity would add "
                 f"{100 * (scores['perfect/argmax']['miou'] - grid):+.2f}")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True,
                        help="the YAML config of the data, e.g. configs/demo_full.yaml (our "
                             "checkpoints bring their own network settings)")
    parser.add_argument("--checkpoint", required=True, help="our checkpoint or the authors'")
    parser.add_argument("--split", help="split to score (default: the config's data.val_split)")
    parser.add_argument("--limit", type=int, metavar="N",
                        help="only the first N images of the split (a quick look)")
    parser.add_argument("--json", metavar="OUT.json",
                        help="also write the scores (fractions) and the pair statistics here")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. cam.radius=2 device=cpu")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    keep_freed_host_memory()  # afa.host_memory: the same large tensors for every batch
    if args.limit is not None and args.limit < 1:
        print(f"error: --limit must be at least 1, got {args.limit}", file=sys.stderr)
        return 2
    try:
        overrides = list(args.overrides)
        if args.split:
            overrides.append(f"data.val_split={args.split}")
        cfg = load_config(args.config, overrides)
        cfg, _, taken = model_config_from_checkpoint(cfg, args.checkpoint, args.overrides)
        if taken:
            print(taken, flush=True)
        names = class_names(cfg)
        _, dataset = build_datasets(cfg)
        if args.limit:
            dataset = Subset(dataset, range(min(args.limit, len(dataset))))
        model = AFANet(**C.model_kwargs(cfg))
        model.load_weights(args.checkpoint)
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise UsageError("tools/ablate_affinity.py runs in one process: start it with "
                               "python, not torchrun")
        if cfg.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device=cuda was requested but CUDA is not available; use "
                               "device=cpu")
        use_cuda = cfg.device in ("auto", "cuda") and torch.cuda.is_available()
        device = torch.device("cuda" if use_cuda else "cpu")
        model.to(device)
        scores = ablate(model, dataset, par=PAR(**C.par_kwargs(cfg)).to(device), device=device,
                        cam_scales=tuple(cfg.cam.scales), bkg_score=cfg.cam.thresholds.background,
                        low=cfg.cam.thresholds.low, radius=cfg.cam.radius, class_names=names,
                        amp=resolve_amp(device, cfg.train.amp))
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{cfg.data.val_split}, {len(dataset)} images")
    print(format_report(scores, names, bkg_score=cfg.cam.thresholds.background,
                        low=cfg.cam.thresholds.low, radius=cfg.cam.radius))
    if args.json:
        record = {**scores, "split": cfg.data.val_split, "num_images": len(dataset),
                  "radius": cfg.cam.radius, "bkg_score": cfg.cam.thresholds.background,
                  "low": cfg.cam.thresholds.low,
                  "checkpoint": str(Path(args.checkpoint).resolve())}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
