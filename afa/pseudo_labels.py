"""Pseudo labels (docs/method.md, steps 3-9) and one training iteration's losses (7-12).

``make_pseudo_labels`` is the one path from CAMs (and an affinity) to the CAM label, the
PAR-refined label and the affinity pseudo label: training, validation and ``tools/infer_cam.py``
all call it, with their own thresholds and affinity scale as arguments. ``compute_afa_losses``
takes what the network produced (the training forward and the multi-scale CAM with its affinity)
and returns every pseudo label and loss term of the iteration. Neither holds a network call or a
config object: callers map their config onto the keyword arguments.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from afa.affinity import affinity_label, propagate_cams, token_labels
from afa.cam import (cam_par_job, cam_par_label, cam_to_label, present_classes, run_par,
                     walk_par_job, walk_par_label)
from afa.constants import IGNORE_INDEX, CamThresholds
from afa.losses import (DenseCRFLoss, PendingCRFLoss, affinity_loss, balanced_seg_loss,
                        classification_loss)

__all__ = ["AFALosses", "PseudoLabels", "compute_afa_losses", "make_pseudo_labels", "seg_probs"]


class PseudoLabels(NamedTuple):
    cam_label: torch.Tensor  # (B, H, W) CAM thresholded at the background score (step 3)
    refined_label: torch.Tensor  # (B, H, W) PAR-refined CAM label (step 4)
    walked: torch.Tensor | None  # (B, C, H, W) CAMs propagated, low background (step 8)
    aff_pseudo_label: torch.Tensor | None  # (B, H, W) PAR on the propagated CAMs (step 9)


@torch.no_grad()
def make_pseudo_labels(cam: torch.Tensor, labels: torch.Tensor, rgb: torch.Tensor,
                       boxes: torch.Tensor, *, par: nn.Module,
                       thresholds: CamThresholds = CamThresholds(), band: bool = True,
                       aff: torch.Tensor | None = None, aff_grid: tuple[int, int] | None = None,
                       radius: int = 8, box_list=None,
                       max_present: int | None = None) -> PseudoLabels:
    """The pseudo labels of a batch of CAMs, all images at once.

    Args:
        cam: (B, C-1, H, W) normalised multi-scale CAM.
        labels: (B, C-1) multi-hot image labels.
        rgb: (B, 3, H, W) images in [0, 1] (padding 0).
        boxes: (B, 4) ``[y0, y1, x0, x1]`` image content; every label is ignore outside.
        par: the ``PAR`` module.
        thresholds: the background scores. The CAM label uses ``background``.
        band: True (training, ``tools/infer_cam.py``: the labels a segmentation learns from):
            the refined and the affinity labels are made with ``high`` and with ``low`` as
            background score, and pixels where the two disagree are ignore. False (validation,
            which scores them without a band): the refined label with ``background``, the
            random walk with ``low``, no ignore band; ``walked`` is then the affinity CAM.
        aff, aff_grid: (B, N, N) affinity and its (h, w) stage-4 grid; without them the affinity
            pseudo label is not made (None).
        radius: Chebyshev radius of the random walk on the stage-4 grid.
        box_list, max_present: ``boxes.tolist()`` and the largest number of classes of an
            image, when known on the host: without them the labels wait for the device (a sync).
    """
    cam_label = cam_to_label(cam, labels, bkg_score=thresholds.background, boxes=boxes,
                             ignore_index=IGNORE_INDEX)
    if band:
        (high, low), walk_bkg = (thresholds.high, thresholds.low), (thresholds.high,
                                                                     thresholds.low)
    else:
        (high, low) = (thresholds.background, thresholds.background)
        walk_bkg = (thresholds.low, thresholds.low)
    size = cam.shape[-2:]
    present = present_classes(labels, max_present)  # (index, valid), shared by both labels
    cam_job = cam_par_job(rgb, cam, present, high, low)
    if aff is None:
        refined = cam_par_label(par(cam_job.rgb, cam_job.stack), present[0], boxes, size,
                                IGNORE_INDEX)
        return PseudoLabels(cam_label, refined, None, None)
    high, low = walk_bkg
    walked_low = propagate_cams(cam, labels, aff, aff_grid, bkg_score=low, radius=radius)
    walked_high = walked_low if high == low else propagate_cams(cam, labels, aff, aff_grid,
                                                                bkg_score=high, radius=radius)
    walk = walk_par_job(rgb, walked_high, walked_low, present,
                        boxes.tolist() if box_list is None else box_list)
    # Both labels' refinements in one PAR call: a few large kernels per PAR iteration.
    jobs = [cam_job] + ([walk.job] if walk.job is not None else [])
    refined_maps = run_par(par, jobs)
    refined = cam_par_label(refined_maps[0], present[0], boxes, size, IGNORE_INDEX)
    aff_pseudo_label = walk_par_label(refined_maps[1] if walk.job is not None else None, walk,
                                      size, IGNORE_INDEX)
    return PseudoLabels(cam_label, refined, walked_low, aff_pseudo_label)


def seg_probs(seg_logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The softmax of the segmentation logits upsampled to the crop: the regularized loss's input."""
    return F.interpolate(seg_logits.float(), size=size, mode="bilinear",
                         align_corners=False).softmax(dim=1)


@dataclass
class AFALosses:
    # The label maps are None when the CAMs were not computed (classification phase).
    cam_label: torch.Tensor | None  # (B, H, W) CAM thresholded at bkg_score, for logging
    refined_label: torch.Tensor | None  # (B, H, W) PAR-refined CAM pseudo label (step 4)
    aff_pseudo_label: torch.Tensor | None  # (B, H, W) pseudo label from propagated CAMs (step 9)
    seg_target: torch.Tensor | None  # (B, H, W) the one of the two the segmentation is trained on
    aff_label: torch.Tensor | None  # (B, N, N) affinity target on the stage-4 grid (step 6)
    cls_loss: torch.Tensor
    seg_loss: torch.Tensor
    aff_loss: torch.Tensor
    reg_loss: torch.Tensor  # 0 when the regularized loss is off or before cam_iters
    total: torch.Tensor  # what to backpropagate


def compute_afa_losses(
    cls_logits: torch.Tensor,
    seg_logits: torch.Tensor | None,
    aff_pred: torch.Tensor | None,
    cam: torch.Tensor | None,
    cam_aff: torch.Tensor | None,
    grids: tuple[tuple[int, int], tuple[int, int]] | None,
    rgb: torch.Tensor,
    labels: torch.Tensor,
    boxes: torch.Tensor,
    *,
    par: nn.Module,
    joint: bool = True,
    affinity_target: bool = False,
    crf_loss: DenseCRFLoss | PendingCRFLoss | None = None,
    thresholds: CamThresholds = CamThresholds(),
    radius: int = 8,
    w_seg: float = 0.1,
    w_aff: float = 0.1,
    w_reg: float = 0.01,
    aff_balance: bool = False,
    box_list=None,
    max_present: int | None = None,
) -> AFALosses:
    """Pseudo labels and losses of one iteration (docs/method.md, steps 3-12).

    Args:
        cls_logits: (B, C-1) classification logits of the training forward.
        seg_logits: (B, C, H/4, W/4) segmentation logits of the training forward (None when a
            classification-phase forward skipped the decoder).
        aff_pred: (B, N, N) predicted affinity of the training forward, N = tokens of its
            stage-4 grid (None like ``seg_logits``).
        cam: (B, C-1, H, W) multi-scale CAM (``afa.cam.multi_scale_cam(...).cam``); None when the
            classification phase made none.
        cam_aff: (B, N', N') affinity of the CAM's largest scale (``multi_scale_cam(...).aff``).
        grids: the (h, w) stage-4 grids of ``aff_pred`` (``AFAOutput.grid``) and of ``cam_aff``
            (``MultiScaleCAM.aff_grid``); None with ``cam=None``.
        rgb: (B, 3, H, W) the crop de-normalised to [0, 1] (padding is 0).
        labels: (B, C-1) multi-hot image labels.
        boxes: (B, 4) integer ``[y0, y1, x0, x1]``, half-open: ``crop[y0:y1, x0:x1]`` is image
            content, the rest padding. All pseudo labels are ignore outside.
        par: the ``PAR`` module.
        joint, affinity_target: the iteration's phase (``afa.engine.schedule.Phase``): before
            the joint phase only the classification loss counts; with ``affinity_target`` the
            segmentation learns from the affinity pseudo label instead of the refined one.
        crf_loss: a ``DenseCRFLoss`` to add the regularized loss, or one already started on
            ``seg_probs(seg_logits, rgb.shape[-2:])`` (``DenseCRFLoss.start``: the trainer
            starts its filter before the multi-scale CAM), or None.
        thresholds: the CAM background scores.
        radius: Chebyshev radius of the affinity on the stride-16 grid.
        w_seg, w_aff, w_reg: loss weights of the joint phase.
        aff_balance: average the affinity loss's background and foreground positive pairs
            separately (``loss.aff_balance``; not in the paper, see ``affinity_loss``).
        box_list, max_present: host copies of ``boxes.tolist()`` and of the largest number of
            classes of an image; with them the pseudo labels never wait for the device.

    In the classification phase the caller may pass ``cam=None`` (no multi-scale CAM): no pseudo
    label is computed and the label fields are None. Otherwise the segmentation and affinity
    terms are computed and logged but added with weight 0. Either way every given output takes
    part in the backward pass, as DistributedDataParallel requires; the CPU-bound regularized
    loss is skipped in this phase.
    """
    height, width = rgb.shape[-2:]
    cls_loss = classification_loss(cls_logits, labels)
    if cam is None:
        if joint:
            raise ValueError("the joint phase needs the multi-scale CAM")
        # Zero-weighted outputs keep the decoder and affinity head in the autograd graph (a
        # lean forward passes None for both; the caller then keeps them in the graph).
        unused = sum(0.0 * t.sum() for t in (seg_logits, aff_pred) if t is not None)
        zero = cls_loss.new_zeros(())
        return AFALosses(cam_label=None, refined_label=None, aff_pseudo_label=None,
                         seg_target=None, aff_label=None, cls_loss=cls_loss, seg_loss=zero,
                         aff_loss=zero, reg_loss=zero, total=cls_loss + unused)

    aff_grid, cam_aff_grid = grids
    pseudo = make_pseudo_labels(cam, labels, rgb, boxes, par=par, thresholds=thresholds,
                                aff=cam_aff, aff_grid=cam_aff_grid, radius=radius,
                                box_list=box_list, max_present=max_present)
    cam_label, refined_label, aff_pseudo_label = (pseudo.cam_label, pseudo.refined_label,
                                                  pseudo.aff_pseudo_label)
    with torch.no_grad():
        aff_label = affinity_label(refined_label, aff_grid, radius=radius,
                                   ignore_index=IGNORE_INDEX)
    seg_target = aff_pseudo_label if affinity_target else refined_label

    background_pairs = None
    if aff_balance:
        background = token_labels(refined_label, aff_grid) == 0  # as affinity_label reads it
        background_pairs = background[:, :, None] & background[:, None, :]
    aff_loss = affinity_loss(aff_pred, aff_label, background_pairs)
    seg_loss = balanced_seg_loss(seg_logits, seg_target, ignore_index=IGNORE_INDEX)
    if crf_loss is not None and joint:
        if isinstance(crf_loss, DenseCRFLoss):
            crf_loss = crf_loss.start(rgb, seg_probs(seg_logits, (height, width)), boxes)
        reg_loss = crf_loss.loss(seg_target)
    else:
        reg_loss = cls_loss.new_zeros(())

    weight = 1.0 if joint else 0.0
    total = cls_loss + weight * (w_seg * seg_loss + w_aff * aff_loss + w_reg * reg_loss)
    return AFALosses(cam_label=cam_label, refined_label=refined_label,
                     aff_pseudo_label=aff_pseudo_label, seg_target=seg_target, aff_label=aff_label,
                     cls_loss=cls_loss, seg_loss=seg_loss, aff_loss=aff_loss, reg_loss=reg_loss,
                     total=total)
