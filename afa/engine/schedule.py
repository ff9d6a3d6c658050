"""What one training iteration does, as a value: the :class:`Phase` of an iteration.

AFA trains in two phases (docs/method.md, steps 10-11): before ``train.cam_iters`` the
classification loss alone, then the joint phase in which pseudo labels are made and the
segmentation and affinity losses count; from ``train.aff_switch_iter`` the segmentation learns
from the affinity pseudo label instead of the PAR-refined one. Everything that depends on where
an iteration falls (the learning rate, the encoder strides, which forwards run) is decided here,
once per iteration, and handed down; the step and the losses never compare an iteration with a
threshold themselves.
"""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import DictConfig

from afa.engine.optim import lr_at

__all__ = ["Phase", "Schedule"]


@dataclass(frozen=True)
class Phase:
    iteration: int  # 0-based
    joint: bool  # from cam_iters: pseudo labels are made, segmentation and affinity losses count
    affinity_target: bool  # the segmentation learns from the affinity pseudo label (else refined)
    lr: float  # base learning rate (each parameter group applies its multiplier)
    strides: tuple[int, int, int, int]  # of the encoder's four stages
    # The training forward runs the decoder and the affinity head too (always in the joint
    # phase; in the classification phase unless train.lean_forwards).
    full_forward: bool
    cams: bool  # the multi-scale CAM runs (joint phase; and the paper's classification phase)
    # The multi-scale CAM takes its un-flipped scale-1 copy from the training forward
    # (train.lean_forwards); otherwise its own forwards also update the decoder's BatchNorm
    # statistics, as the authors' whole-network CAM forwards do.
    reuse_forward: bool


@dataclass(frozen=True)
class Schedule:
    """The phase of every iteration, from the config (see ``afa.config``)."""

    max_iters: int
    cam_iters: int
    aff_switch_iter: int
    lr: float
    warmup_iters: int
    joint_lr: float | None  # optim.joint_lr: the joint phase restarts its own schedule
    strides: tuple[int, ...]
    cls_phase_strides: tuple[int, ...] | None
    lean_forwards: bool

    @classmethod
    def from_config(cls, cfg: DictConfig) -> "Schedule":
        t, o = cfg.train, cfg.optim
        return cls(max_iters=t.max_iters, cam_iters=t.cam_iters,
                   aff_switch_iter=t.aff_switch_iter, lr=o.lr, warmup_iters=o.warmup_iters,
                   joint_lr=o.joint_lr, strides=tuple(cfg.model.stride),
                   cls_phase_strides=(tuple(t.cls_phase_stride) if t.cls_phase_stride
                                      else None),
                   lean_forwards=t.lean_forwards)

    def lr_at(self, iteration: int) -> float:
        """One warm-up + poly schedule over the run (the paper), or with ``joint_lr`` one per
        phase, the joint one restarting at that rate without warm-up."""
        if self.joint_lr is None:
            return lr_at(iteration, self.lr, self.max_iters, self.warmup_iters)
        if iteration < self.cam_iters:
            return lr_at(iteration, self.lr, self.cam_iters, self.warmup_iters)
        return lr_at(iteration - self.cam_iters, self.joint_lr,
                     self.max_iters - self.cam_iters, 0)

    def phase(self, iteration: int) -> Phase:
        joint = iteration >= self.cam_iters
        strides = self.strides
        if not joint and self.cls_phase_strides is not None:
            strides = self.cls_phase_strides
        return Phase(iteration=iteration, joint=joint,
                     affinity_target=iteration >= self.aff_switch_iter,
                     lr=self.lr_at(iteration), strides=tuple(strides),
                     full_forward=joint or not self.lean_forwards,
                     cams=joint or not self.lean_forwards,
                     reuse_forward=self.lean_forwards)
