"""Validation during training (docs/method.md, step 13), sharded across ranks.

Each rank runs every ``world_size``-th validation image at its own size (single-scale forward and
the multi-scale CAM), images of equal size together in batches of up to ``batch_size``;
confusion matrices and F1 sums are added across ranks, so every rank ends with the scores of the
whole set. The network runs under the training's precision (``amp``), the pseudo labels in fp32.
Five label maps are scored against the ground truth:

- ``cam``: the multi-scale CAM thresholded at ``thresholds.background``;
- ``refined``: the same CAMs refined by PAR (background score ``thresholds.background``), the
  refined pseudo label of step 4 without the ignore band;
- ``aff_cam``: the CAMs propagated by the random walk with the image's own (scale 1) affinity and
  ``thresholds.low`` as background score;
- ``affinity``: those propagated maps refined by PAR, the affinity pseudo label of step 9 without
  the ignore band;
- ``seg``: the argmax of the segmentation logits upsampled to the image.

Masks may be missing for some or all images (a custom set, ``data.name=custom``): those images
count in everything but the mIoUs, whose ``miou`` is None when no image had a mask. What needs no
mask is always reported: the classifier's per-image F1 (``cls_f1``), its per-class average
precision and their mean (``cls_ap``, ``cls_map``), and the share of pixels each label kind gives
to a foreground class (``coverage``), which tells a CAM that covers its objects from one that
marks a few pixels; ``masked_images`` counts the images that had a mask.
"""

from __future__ import annotations

import logging
import math
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm import tqdm

from afa.cam import multi_scale_cam
from afa.constants import IGNORE_INDEX, CamThresholds
from afa.data import DataError, denormalize
from afa.engine import distributed as D
from afa.engine.logger import progress_enabled
from afa.engine.precision import autocast
from afa import metrics
from afa.metrics import ConfusionMatrix, average_precision, multilabel_f1
from afa.pseudo_labels import make_pseudo_labels

__all__ = ["KINDS", "ValidationStopped", "check_image_size", "format_table", "predict_labels",
           "validate"]

KINDS = ("cam", "refined", "aff_cam", "affinity", "seg")


@torch.no_grad()
def predict_labels(model, image: torch.Tensor, label: torch.Tensor, *, par, cam_scales,
                   thresholds: CamThresholds = CamThresholds(), radius: int = 8,
                   amp: str = "none") -> tuple[dict, torch.Tensor]:
    """The five label maps of images (B, 3, H, W) with labels (B, C-1); and the cls logits.

    One forward gives the segmentation, the scale-1 affinity and, when 1.0 is a CAM scale, the
    multi-scale CAM's un-flipped scale-1 copy (eval mode: the same numbers a second forward would
    give); the other CAM forwards run fused attention and compute no affinity. The forwards run
    under ``amp``; the random walk and PAR always in fp32.
    """
    batch, _, height, width = image.shape
    with autocast(image.device, amp):
        out = model(image)
        reuse = 1.0 in cam_scales
        cam = multi_scale_cam(model, image, cam_scales, aff_scale=1.0 if reuse else None,
                              scale1=out if reuse else None).cam.float()
    rgb = denormalize(image.float())
    box = torch.tensor([[0, height, 0, width]] * batch, device=image.device)
    pseudo = make_pseudo_labels(cam, label.float(), rgb, box, par=par, thresholds=thresholds,
                                band=False, aff=out.aff_pred.float(), aff_grid=out.grid,
                                radius=radius, box_list=[[0, height, 0, width]] * batch)
    seg = F.interpolate(out.seg_logits.float(), size=(height, width), mode="bilinear",
                        align_corners=False)
    labels = {
        "cam": pseudo.cam_label,
        "refined": pseudo.refined_label,
        "aff_cam": pseudo.walked.max(dim=1).indices,
        "affinity": pseudo.aff_pseudo_label,
        "seg": seg.max(dim=1).indices,
    }
    return labels, out.cls_logits.float()


def check_image_size(name: str, size: tuple[int, int], model, cam_scales) -> None:
    """Raise a :class:`~afa.data.DataError` naming the image when a side of ``size`` (H, W) is
    too short for the encoder at the smallest CAM scale (the multi-scale CAM resizes each side to
    ``int(scale * side)``); validation runs images at their own size."""
    encoder = getattr(model, "module", model).encoder
    least, scale = encoder.min_input_side, min(1.0, *cam_scales)  # the scale-1 forward too
    short = min(size)
    if int(scale * short) >= least:
        return
    need = math.ceil(least / scale)
    while int(scale * need) < least:
        need += 1
    raise DataError(f"{name}: {size[0]}x{size[1]} px is too small for the encoder: at scale "
                    f"{scale:g} its short side becomes {int(scale * short)} px, below the {least} "
                    f"px it accepts (scales {list(cam_scales)} need a short side of at least "
                    f"{need} px)")


class ValidationStopped(Exception):
    """A stop signal arrived during validation; the scores of this pass are incomplete."""


@torch.no_grad()
def validate(model, dataset, *, par, device: torch.device, cam_scales,
             thresholds: CamThresholds = CamThresholds(), radius: int = 8,
             class_names: list[str], amp: str = "none",
             should_stop: Callable[[], bool] | None = None, skip_bad: bool = False,
             batch_size: int = 1) -> dict:
    """Scores of every kind in ``KINDS`` (``SegmentationScores.to_dict()``) plus ``cls_f1``.

    ``batch_size``: images of equal size run together, up to this many (the same labels up to
    float rounding; faster on a GPU).

    ``should_stop`` is asked before each image (all ranks agree on the answer): when it says yes,
    :class:`ValidationStopped` is raised at once instead of finishing the pass. A sample that
    cannot be read raises its :class:`~afa.data.DataError` on every rank, or with ``skip_bad`` is
    left out of the scores (``scores["skipped_images"]`` counts them over all ranks, and each
    rank logs its own).
    """
    was_training = model.training
    model.eval()
    matrices = {k: ConfusionMatrix(len(class_names), device=device) for k in KINDS}
    f1 = torch.zeros(2, dtype=torch.float64, device=device)  # sum of per-image F1, image count
    # Per label kind but seg: (foreground pixels, pixels); and the images that had a mask.
    cover = torch.zeros(len(KINDS) - 1, 2, dtype=torch.float64, device=device)
    masked = torch.zeros(1, dtype=torch.float64, device=device)
    logits_seen, labels_seen = [], []  # for the classifier's average precision
    world, rank = D.world_size(), D.rank()
    groups: dict[tuple[int, int], list[dict]] = {}  # samples waiting for a batch of their size

    def run(samples: list[dict]) -> None:
        image = torch.stack([s["image"] for s in samples]).to(device)
        label = torch.stack([s["label"] for s in samples]).to(device)
        # An image without a mask is all ignore: it takes no part in the confusion matrices.
        mask = torch.stack([s["mask"] if "mask" in s else torch.full(
            s["image"].shape[-2:], IGNORE_INDEX, dtype=torch.int64) for s in samples]).to(device)
        masked[0] += sum("mask" in s for s in samples)
        labels, cls_logits = predict_labels(model, image, label, par=par, cam_scales=cam_scales,
                                            thresholds=thresholds, radius=radius, amp=amp)
        for kind, pred in labels.items():
            matrices[kind].update(pred, mask)
        for row, kind in enumerate(KINDS[:-1]):
            foreground = (labels[kind] > 0) & (labels[kind] != IGNORE_INDEX)
            cover[row] += torch.stack([foreground.sum(), torch.tensor(foreground.numel())
                                       .to(device)]).double()
        f1[0] += multilabel_f1(cls_logits, label, reduction="sum").double()
        f1[1] += len(samples)
        logits_seen.append(cls_logits)
        labels_seen.append(label)

    skipped = torch.zeros(1, dtype=torch.float64, device=device)
    # Every rank takes the same number of turns (the last may have no image) so that the
    # per-image agreement below pairs up across ranks.
    turns = -(-len(dataset) // world)
    for turn in tqdm(range(turns), desc="val", disable=not progress_enabled(), leave=False):
        index = turn * world + rank
        sample, problem = None, None
        if index < len(dataset):
            try:
                sample = dataset[index]
                check_image_size(sample.get("name", f"image {index}"),
                                 tuple(sample["image"].shape[-2:]), model, cam_scales)
            except DataError as err:
                sample = None
                if not skip_bad:
                    problem = err
                else:
                    logging.getLogger("afa").warning("validation: left out a bad image: %s", err)
                    skipped += 1
        stop, bad = D.any_rank([should_stop is not None and should_stop(), problem is not None])
        if bad:
            model.train(was_training)
            raise problem or DataError("validation: another process met a bad file (see its "
                                       "message)")
        if stop:
            model.train(was_training)
            raise ValidationStopped()
        if sample is None:
            continue
        group = groups.setdefault(tuple(sample["image"].shape[-2:]), [])
        group.append(sample)
        if len(group) >= batch_size:
            run(groups.pop(tuple(sample["image"].shape[-2:])))
    for group in groups.values():
        run(group)
    D.all_reduce_sum(f1)
    D.all_reduce_sum(cover)
    D.all_reduce_sum(masked)
    scores = {"cls_f1": float(f1[0] / f1[1].clamp(min=1))}
    ap = average_precision(*_gathered(logits_seen, labels_seen, len(class_names) - 1, device))
    scores["cls_ap"] = {name: (None if math.isnan(v) else v) for name, v in zip(class_names[1:], ap)}
    present = [v for v in ap if not math.isnan(v)]
    scores["cls_map"] = sum(present) / len(present) if present else None
    scores["coverage"] = {kind: float(c[0] / c[1].clamp(min=1)) for kind, c in zip(KINDS, cover)}
    scores["masked_images"] = int(masked.item())
    for kind, matrix in matrices.items():
        matrix.reduce_(D.all_reduce_sum)
        scores[kind] = matrix.compute(class_names).to_dict()
    if skip_bad:
        scores["skipped_images"] = int(D.all_reduce_sum(skipped).item())
    model.train(was_training)
    return scores


def _gathered(logits: list, labels: list, num_fg: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's classifier logits and labels, and every other rank's: (N, C-1) each."""
    mine = (torch.cat(logits) if logits else torch.zeros(0, num_fg, device=device),
            torch.cat(labels) if labels else torch.zeros(0, num_fg, device=device))
    if D.world_size() == 1:
        return mine
    everyone = [None] * D.world_size()
    torch.distributed.all_gather_object(everyone, tuple(t.cpu() for t in mine))
    return tuple(torch.cat([part[i] for part in everyone]) for i in range(2))


def format_table(scores: dict, names: list[str]) -> str:
    """The validation table: per-class IoU of every label kind and the mIoU row (when some image
    had a mask), the classifier's F1 and mAP, and each label kind's foreground share."""
    lines = []
    if scores.get("masked_images", 1):
        lines.append(metrics.format_table({k: scores[k]["iou"] for k in KINDS}, names,
                                          {"mIoU": [scores[k]["miou"] for k in KINDS]}))
    else:
        lines.append("no validation image has a mask: no mIoU (scores without masks below)")
    cls = f"classification F1 {100 * scores['cls_f1']:.2f} %"
    if scores.get("cls_map") is not None:
        cls += f", mAP {100 * scores['cls_map']:.2f} %"
    lines.append(cls)
    if "coverage" in scores:
        lines.append("foreground share of the pixels: " + ", ".join(
            f"{kind} {100 * share:.1f} %" for kind, share in scores["coverage"].items()))
    return "\n".join(lines)
