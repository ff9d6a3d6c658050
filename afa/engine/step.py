"""One training (micro-)step of AFA, read top to bottom: forward, multi-scale CAM, pseudo labels
and losses (docs/method.md, steps 1-12). No backward and no optimizer: the trainer's loop does
those, and accumulates micro-steps into an iteration.

What depends on the iteration comes in as its :class:`~afa.engine.schedule.Phase`; what is fixed
for the run comes in as :class:`StepSettings`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import NamedTuple

import torch
from omegaconf import DictConfig

from afa import config as C
from afa.cam import multi_scale_cam
from afa.constants import CamThresholds
from afa.data import denormalize
from afa.engine.checkpoint import unwrap_model
from afa.engine.precision import autocast
from afa.engine.schedule import Phase
from afa.pseudo_labels import AFALosses, compute_afa_losses, seg_probs

__all__ = ["StepOutput", "StepSettings", "train_step"]


@dataclass(frozen=True)
class StepSettings:
    """The arguments of every step that the config fixes for the run."""

    cam_scales: tuple[float, ...] = (1.0, 0.5, 1.5)
    thresholds: CamThresholds = CamThresholds()
    radius: int = 8
    w_seg: float = 0.1
    w_aff: float = 0.1
    w_reg: float = 0.01
    aff_balance: bool = False
    amp: str = "none"  # resolved: none | bf16 | fp16 (see afa.engine.precision.resolve_amp)

    @classmethod
    def from_config(cls, cfg: DictConfig, amp: str) -> "StepSettings":
        loss = cfg.loss
        return cls(cam_scales=tuple(cfg.cam.scales), thresholds=C.thresholds(cfg),
                   radius=cfg.cam.radius, w_seg=loss.w_seg, w_aff=loss.w_aff, w_reg=loss.w_reg,
                   aff_balance=loss.aff_balance, amp=amp)


class StepOutput(NamedTuple):
    terms: AFALosses  # pseudo labels and losses
    cam: torch.Tensor | None  # (B, C-1, H, W) multi-scale CAM; None when not made
    seg_logits: torch.Tensor | None  # (B, C, H/4, W/4); None after a classification-only forward


def train_step(model, batch: dict, phase: Phase, settings: StepSettings, *, par,
               crf_loss=None, device: torch.device) -> StepOutput:
    """Forward, multi-scale CAM, pseudo labels and losses of one (micro-)batch; no backward.

    ``model``: the AFANet, or its DDP wrapper (the training forward goes through it, the CAM
    forwards through the bare model). ``crf_loss``: a ``DenseCRFLoss`` or None.
    """
    images = batch["image"].to(device, non_blocking=True)  # (B, 3, H, W) normalised
    labels = batch["label"].to(device, non_blocking=True)  # (B, C-1) multi-hot
    boxes = batch["box"].to(device, non_blocking=True)  # (B, 4) [y0, y1, x0, x1]
    # Read on the host from the CPU batch, so that the pseudo labels never wait for the device.
    host = dict(box_list=batch["box"].tolist(),
                max_present=int(batch["label"].sum(dim=1).max()) if len(batch["label"]) else 0)
    rgb = denormalize(images)

    # 1. The training forward (with gradients).
    with autocast(device, settings.amp):
        out = model(images, cls_only=not phase.full_forward)
    seg_logits = out.seg_logits.float() if phase.full_forward else None

    # 12, started early: the regularized loss's CPU filter needs only this softmax, so it runs
    # (in crf_loss's worker processes) while the multi-scale CAM and pseudo labels are made.
    pending_reg = None
    if crf_loss is not None and phase.joint:
        pending_reg = crf_loss.start(rgb, seg_probs(seg_logits, rgb.shape[-2:]), boxes)

    # 2. The multi-scale CAM (no gradients). In the classification phase its forwards run only
    # for what they do to the decoder's BatchNorm statistics (the paper's).
    cams = None
    if phase.cams:
        with autocast(device, settings.amp):
            cams = multi_scale_cam(unwrap_model(model), images, settings.cam_scales,
                                   scale1=out if phase.reuse_forward else None,
                                   update_decoder_bn=not phase.reuse_forward,
                                   with_aff=phase.joint)
    cam = cams.cam.float() if phase.joint else None

    # 3-12. Pseudo labels and losses.
    terms = compute_afa_losses(
        out.cls_logits.float(), seg_logits, out.aff_pred.float() if phase.full_forward else None,
        cam, cams.aff.float() if phase.joint else None,
        (out.grid, cams.aff_grid) if phase.joint else None, rgb, labels, boxes, par=par,
        joint=phase.joint, affinity_target=phase.affinity_target, crf_loss=pending_reg,
        thresholds=settings.thresholds, radius=settings.radius, w_seg=settings.w_seg,
        w_aff=settings.w_aff, w_reg=settings.w_reg, aff_balance=settings.aff_balance, **host)
    if not phase.full_forward:  # DDP wants every parameter in the graph: the idle ones at 0
        idle = sum(0.0 * p.sum() for p in unwrap_model(model).idle_params())
        terms = dataclasses.replace(terms, total=terms.total + idle)
    return StepOutput(terms, cam, seg_logits.detach() if seg_logits is not None else None)
