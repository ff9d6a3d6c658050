"""AFA's training losses (steps 7, 10, 11 and 12 of the method's training iteration).

- ``classification_loss``: multi-label soft margin on the image-level logits.
- ``affinity_loss``: pulls the predicted affinity to 1 on same-label pairs and to 0 across labels.
- ``balanced_seg_loss``: cross-entropy averaged separately over background and foreground pixels.
- ``DenseCRFLoss``: the regularized (DenseCRF) loss of Tang et al. as gated by AFA, with the
  bilateral filter evaluated on a permutohedral lattice: ``pydensecrf2``'s, in worker processes
  of :mod:`afa.worker_pool` (they ignore stop signals and die with the trainer), or the same
  lattice in PyTorch on the training device (:mod:`afa.permutohedral`).
"""

from __future__ import annotations

import logging
import time
import weakref
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from afa.cam import box_mask, host_to_device
from afa.constants import IGNORE_INDEX
from afa.permutohedral import bilateral_filter_torch
from afa.worker_pool import children_ignore_stop_signals, kill_pool, make_pool

try:
    import pydensecrf.densecrf as dcrf
    import pydensecrf.eigen as eigen
except ImportError:  # optional: only DenseCRFLoss needs it, and it says so when built
    dcrf = None
    eigen = None

__all__ = [
    "classification_loss",
    "affinity_loss",
    "balanced_seg_loss",
    "bilateral_filter",
    "DenseCRFLoss",
    "PendingCRFLoss",
    "REG_BACKENDS",
    "time_filter",
]

REG_BACKENDS = ("pydensecrf", "torch")


def classification_loss(cls_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Multi-label soft margin loss of (B, C-1) logits against (B, C-1) multi-hot labels."""
    return F.multilabel_soft_margin_loss(cls_logits.float(), labels.float())


def affinity_loss(aff_pred: torch.Tensor, aff_label: torch.Tensor,
                  background_pairs: torch.Tensor | None = None) -> torch.Tensor:
    """Affinity loss (docs/method.md, step 7): (B, N, N) predictions in (0, 1), labels in
    {0, 1, ignore}.

    Positive and negative pairs are averaged separately (the +1 guards empty sets) so that the many
    same-label pairs of a large object do not drown the few boundary pairs.

    ``background_pairs`` (B, N, N) bool, True where both positions are background (not in the
    paper; ``loss.aff_balance``): the positive term then averages background-background and
    foreground-foreground pairs separately, so that small objects, whose few same-class pairs
    are drowned by the background's, count as much as the background.
    """
    aff_pred = aff_pred.float()
    pos = (aff_label == 1).float()
    neg = (aff_label == 0).float()
    if background_pairs is None:
        pos_loss = (pos * (1 - aff_pred)).sum() / (pos.sum() + 1)
    else:
        parts = (pos * background_pairs, pos * ~background_pairs)
        pos_loss = 0.5 * sum((p * (1 - aff_pred)).sum() / (p.sum() + 1) for p in parts)
    neg_loss = (neg * aff_pred).sum() / (neg.sum() + 1)
    return 0.5 * pos_loss + 0.5 * neg_loss


def _masked_mean_ce(logits: torch.Tensor, target: torch.Tensor, keep: torch.Tensor,
                    ignore_index: int) -> torch.Tensor:
    """Mean cross-entropy over the pixels in ``keep``; 0 (not NaN) when there are none."""
    target = torch.where(keep, target, torch.full_like(target, ignore_index))
    ce = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="sum")
    return ce / keep.sum().clamp(min=1)


def balanced_seg_loss(seg_logits: torch.Tensor, target: torch.Tensor,
                      ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Mean of the background CE and the foreground CE (docs/method.md, step 10).

    Args:
        seg_logits: (B, C, h, w) logits, upsampled (bilinear) to the label size here.
        target: (B, H, W) long label with ``ignore_index``.

    Weighting background and foreground equally keeps the large background from dominating. An
    empty part (e.g. no foreground pixel in the batch) contributes 0 instead of NaN.
    """
    logits = F.interpolate(seg_logits.float(), size=target.shape[-2:], mode="bilinear",
                           align_corners=False)
    target = target.long()
    bkg = target == 0
    fg = (target != 0) & (target != ignore_index)
    return 0.5 * (_masked_mean_ce(logits, target, bkg, ignore_index)
                  + _masked_mean_ce(logits, target, fg, ignore_index))


def bilateral_filter(values: np.ndarray, image: np.ndarray, sigma_rgb: float,
                     sigma_xy: float) -> np.ndarray:
    """``W @ values`` for the dense bilateral Gaussian ``W`` on the permutohedral lattice.

    Args:
        values: (K, N) float32, N = h * w pixels in row-major order.
        image: (h, w, 3) float32 RGB in 0-255.
        sigma_rgb, sigma_xy: kernel widths in intensity and pixel units.

    Returns:
        (K, N) float32 ``sum_j k(i, j) values[:, j]`` with
        ``k(i, j) ~ exp(-|p_i - p_j|^2 / 2 sigma_xy^2 - |I_i - I_j|^2 / 2 sigma_rgb^2)`` (self
        included); the lattice approximates the Gaussian up to a near-constant factor.

    With ``compat=-1`` the Potts compatibility (which computes ``-compat * filtered``) returns the
    filtered values themselves; ``NO_NORMALIZATION`` skips the per-pixel normalisation. One
    ``stepInference`` writes the last pairwise term, i.e. this filter, into ``tmp2`` (its update
    of ``Q`` is discarded). ``tmp2`` must be allocated at full size: the Python wrapper keeps the
    shape it was created with, and an equal-size Eigen assignment writes in place.
    """
    num_labels, num_pixels = values.shape
    height, width, _ = image.shape
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    feats = np.stack([xs.ravel() / sigma_xy, ys.ravel() / sigma_xy,
                      *(image[..., c].ravel() / sigma_rgb for c in range(3))])  # (5, N)
    crf = dcrf.DenseCRF(num_pixels, num_labels)
    crf.addPairwiseEnergy(np.ascontiguousarray(feats, dtype=np.float32), compat=-1,
                          kernel=dcrf.DIAG_KERNEL, normalization=dcrf.NO_NORMALIZATION)
    q = eigen.matrixXf(np.ascontiguousarray(values, dtype=np.float32))
    tmp1 = eigen.MatrixXf()
    tmp2 = eigen.matrixXf(np.zeros((num_labels, num_pixels), dtype=np.float32))
    crf.stepInference(q, tmp1, tmp2)
    return np.array(tmp2, dtype=np.float32, order="C")


class _DenseEnergy(torch.autograd.Function):
    """``E = -sum(S * G) / B`` with ``G = gate * W S`` given; backward ``dE/dS = -2 G / B``.

    The backward treats ``gate`` as a constant and uses the symmetric-W shortcut of the authors'
    implementation; it equals the exact gradient where ``gate`` is locally constant.
    """

    @staticmethod
    def forward(ctx, probs, gated):
        ctx.save_for_backward(gated)
        return -(probs * gated).sum() / probs.shape[0]

    @staticmethod
    def backward(ctx, grad_output):
        (gated,) = ctx.saved_tensors
        return -2.0 * grad_output * gated / gated.shape[0], None


log = logging.getLogger(__name__)


class PendingCRFLoss:
    """A regularized loss whose bilateral filtering has started (:meth:`DenseCRFLoss.start`).

    ``loss(label)`` waits for the filter and returns the scalar loss; the filter does not depend
    on the pseudo label, so it can run while the pseudo labels are being made.

    ``work``: the filtered values as a tensor on the device (the torch backend), or per image a
    NumPy array or the Future of one (pydensecrf), whose ``inputs`` refilter here if a worker
    process died.
    """

    def __init__(self, owner: "DenseCRFLoss", probs: torch.Tensor, work, inputs=None):
        self.owner, self.probs, self._work, self._inputs = owner, probs, work, inputs

    def _filtered(self) -> torch.Tensor:
        """(B, K, h, w) float32 on the device of ``probs``."""
        if isinstance(self._work, torch.Tensor):
            return self._work
        try:
            filtered = np.stack([w.result() if isinstance(w, Future) else w for w in self._work])
        except BrokenProcessPool:  # a filter process was killed (out of memory, say)
            self.owner._discard_broken_pool()
            filtered = np.stack([bilateral_filter(*args) for args in self._inputs])
        filtered = torch.from_numpy(filtered).view(self.probs.shape)
        return host_to_device(filtered, self.probs.device, dtype=filtered.dtype)  # no GPU wait

    def loss(self, label: torch.Tensor) -> torch.Tensor:
        """Scalar loss; ``label`` (B, H, W) pseudo label: ignore pixels are fully regularized."""
        probs = self.probs  # (B, K, h, w) at the loss resolution, masked to the boxes
        filtered = self._filtered()
        label = F.interpolate(label[:, None].float(), size=probs.shape[-2:], mode="nearest")[:, 0]
        # Confident pixels are left alone (gate 1 - max S); unsupervised pixels get the full term.
        gate = torch.where(label == self.owner.ignore_index, torch.ones_like(label),
                           1 - probs.detach().amax(dim=1))  # (B, h, w)
        energy = _DenseEnergy.apply(probs, gate[:, None] * filtered.to(probs))
        return self.owner.energy_scale * energy


class DenseCRFLoss(nn.Module):
    """Regularized (DenseCRF) loss on the segmentation softmax (step 12 of the training iteration).

    Args:
        sigma_rgb: bilateral kernel width in 0-255 intensity units.
        sigma_xy: kernel width in pixels of the full-resolution crop; scaled with ``scale_factor``.
        scale_factor: the loss is evaluated at this fraction of the crop resolution.
        energy_scale: multiplies the energy (the authors' 1e-7); the caller applies the loss weight.
        ignore_index: pixels with this pseudo label get the full gate of 1.
        workers: with ``backend="pydensecrf"``, processes that run the bilateral filter (on the
            CPU, one image each) while the caller goes on (:meth:`start`); 0 filters in this
            process, at once. The numbers are the same either way. The processes
            (:func:`afa.worker_pool.make_pool`) ignore the stop signals, which the trainer
            handles, and end when the process that started them ends, however it ends
            (``kill -9`` included).
        backend: where the bilateral filter runs. ``"pydensecrf"``: ``pydensecrf2``'s
            permutohedral lattice on the CPU, the reference; the trainer starts it right after
            the training forward, so that on a GPU it overlaps with the multi-scale CAM and the
            pseudo labels. ``"torch"``: the same lattice in PyTorch on the inputs' device
            (:func:`afa.permutohedral.bilateral_filter_torch`), the whole batch at once, with
            no CPU process; its values equal pydensecrf2's to float rounding (bit for bit on
            the CPU).
    """

    def __init__(self, sigma_rgb: float = 15.0, sigma_xy: float = 100.0, scale_factor: float = 0.5,
                 energy_scale: float = 1e-7, ignore_index: int = IGNORE_INDEX, workers: int = 0,
                 backend: str = "pydensecrf"):
        super().__init__()
        if backend not in REG_BACKENDS:
            raise ValueError(f"backend must be one of {REG_BACKENDS}, got {backend!r}")
        if backend == "pydensecrf" and dcrf is None:
            raise ImportError("The regularized (DenseCRF) loss needs pydensecrf2: "
                              "`pip install pydensecrf2`, disable the loss, or use "
                              "loss.reg_backend=torch.")
        self.backend = backend
        self.sigma_rgb = sigma_rgb
        self.sigma_xy = sigma_xy
        self.scale_factor = scale_factor
        self.energy_scale = energy_scale
        self.ignore_index = ignore_index
        self.workers = workers if backend == "pydensecrf" else 0
        self._pool = None

    def _executor(self) -> ProcessPoolExecutor | None:
        if self.workers and self._pool is None:
            self._pool = make_pool(self.workers)
            # Without an explicit close(), the processes end with this module object.
            weakref.finalize(self, self._pool.shutdown, wait=False, cancel_futures=True)
        return self._pool

    def close(self) -> None:
        """Shut the filter processes down (they are started again when needed)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def _discard_broken_pool(self) -> None:
        """A filter process died: end the others and start a new pool at the next step.

        The pool's own clean-up of a broken pool sends SIGTERM, which its processes ignore, and
        would then wait for them forever, as would this process's exit: they are killed instead
        (:func:`afa.worker_pool.kill_pool`). The current step filters in this process.
        """
        pool, self._pool = self._pool, None
        if pool is None:
            return
        log.warning("A filter process of the regularized loss died; this step filters in the "
                    "training process (the same numbers), and new processes start at the next")
        kill_pool(pool)

    def start(self, rgb: torch.Tensor, probs: torch.Tensor,
              boxes: torch.Tensor) -> PendingCRFLoss:
        """Resize to the loss resolution and start filtering; finish with ``.loss(label)``.

        Args:
            rgb: (B, 3, H, W) image in [0, 1].
            probs: (B, K, H, W) softmax of the segmentation logits (carries the gradient).
            boxes: (B, 4) valid regions ``[y0, y1, x0, x1]``; probabilities outside are zeroed.
        """
        _, _, height, width = probs.shape
        size = (int(height * self.scale_factor), int(width * self.scale_factor))
        image = F.interpolate(rgb.float() * 255, size=size, mode="bilinear", align_corners=False)
        probs = F.interpolate(probs.float(), size=size, mode="bilinear", align_corners=False)
        inside = box_mask(boxes, height, width, device=probs.device)[:, None].float()
        inside = F.interpolate(inside, size=size, mode="nearest")  # (B, 1, h, w)
        probs = probs * inside
        batch, num_labels = probs.shape[:2]
        sigma_xy = self.sigma_xy * self.scale_factor
        if self.backend == "torch":
            with torch.autocast(probs.device.type, enabled=False):
                filtered = bilateral_filter_torch(probs.detach(), image.detach(), self.sigma_rgb,
                                                  sigma_xy)
            return PendingCRFLoss(self, probs, filtered)
        # The one wait for the device: the filter runs on the CPU.
        probs_np = probs.detach().cpu().numpy().reshape(batch, num_labels, -1)
        images_np = image.detach().permute(0, 2, 3, 1).cpu().numpy()
        inputs = [(probs_np[b], images_np[b], self.sigma_rgb, sigma_xy) for b in range(batch)]
        pool = self._executor()
        if pool is None:
            filtered = [bilateral_filter(*args) for args in inputs]
            return PendingCRFLoss(self, probs, filtered, inputs)
        try:
            with children_ignore_stop_signals():  # the pool starts its processes on submit
                work = [pool.submit(bilateral_filter, *args) for args in inputs]
        except BrokenProcessPool:  # broken since the last step: filter here, renew next step
            self._discard_broken_pool()
            work = [bilateral_filter(*args) for args in inputs]
        return PendingCRFLoss(self, probs, work, inputs)

    def forward(self, rgb: torch.Tensor, probs: torch.Tensor, label: torch.Tensor,
                boxes: torch.Tensor) -> torch.Tensor:
        """Scalar loss: :meth:`start` and ``.loss(label)`` in one.

        Args:
            rgb: (B, 3, H, W) image in [0, 1].
            probs: (B, K, H, W) softmax of the segmentation logits (carries the gradient).
            label: (B, H, W) pseudo label; ignore pixels are fully regularized.
            boxes: (B, 4) valid regions ``[y0, y1, x0, x1]``; probabilities outside are zeroed.
        """
        return self.start(rgb, probs, boxes).loss(label)


def time_filter(crf: DenseCRFLoss, rgb: torch.Tensor, probs: torch.Tensor, boxes: torch.Tensor,
                repeats: int = 3) -> list[float]:
    """Seconds from :meth:`DenseCRFLoss.start` until the filtered values are on the inputs'
    device, for each of ``repeats`` runs after one untimed warm-up (which starts any worker
    processes and warms the kernels up): the cost the trainer reports for the chosen backend, and
    ``benchmarks/bilateral_filter.py``'s figures."""
    device, times = probs.device, []
    for i in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        begin = time.perf_counter()
        crf.start(rgb, probs, boxes)._filtered()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:
            times.append(time.perf_counter() - begin)
    return times
