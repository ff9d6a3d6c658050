"""Segmentation and classification metrics.

Segmentation is scored the way the AFA paper (and every WSSS paper since) does it: one confusion
matrix accumulated over *all pixels of all images* (not a mean of per-image scores), ground-truth
pixels equal to ``ignore_index`` (255) skipped, and the mean IoU taken over the classes that occur
in the prediction or the ground truth (a class absent from both has union 0 and no IoU; it is left
out of the mean rather than counted as 0 or 1).

The accumulator keeps its matrix as a plain ``torch.int64`` tensor in ``.matrix`` so that a
distributed caller can sum it across ranks in place::

    cm = ConfusionMatrix(21, device="cuda")
    for pred, gt in loader:
        cm.update(pred, gt)
    torch.distributed.all_reduce(cm.matrix)     # or cm.reduce_(torch.distributed.all_reduce)
    scores = segmentation_scores(cm.matrix, class_names=VOC_CLASSES)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

from afa.constants import IGNORE_INDEX

__all__ = [
    "confusion_matrix",
    "ConfusionMatrix",
    "SegmentationScores",
    "segmentation_scores",
    "format_scores",
    "score_columns",
    "format_table",
    "multilabel_f1",
    "average_precision",
]

ArrayLike = np.ndarray | torch.Tensor


def _as_long_tensor(array: ArrayLike, name: str) -> torch.Tensor:
    tensor = torch.as_tensor(array)
    if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer class indices, got dtype {tensor.dtype}")
    return tensor.long()


def _check_range(values: torch.Tensor, num_classes: int, name: str) -> None:
    """Raise naming the first value outside ``[0, num_classes)``."""
    if values.numel() == 0:
        return
    bad = (values < 0) | (values >= num_classes)
    if bool(bad.any()):
        offending = sorted({int(v) for v in values[bad].unique()[:10].tolist()})
        raise ValueError(
            f"{name} contains label value(s) {offending} outside [0, {num_classes}) "
            f"(num_classes={num_classes}, ignore index {IGNORE_INDEX} is allowed only in the "
            f"ground truth)"
        )


def confusion_matrix(
    pred: ArrayLike,
    target: ArrayLike,
    num_classes: int,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Confusion matrix ``(K, K)`` int64, ``K = num_classes``; rows = ground truth, cols = pred.

    ``pred`` and ``target`` are integer label maps of the same shape (any number of dimensions,
    numpy or torch, on any device). Target pixels equal to ``ignore_index`` are skipped. Every other
    target value, and every prediction value at a scored pixel, must lie in ``[0, num_classes)``;
    anything else raises ``ValueError`` naming the offending value(s).
    """
    pred_t = _as_long_tensor(pred, "prediction")
    target_t = _as_long_tensor(target, "ground truth").to(pred_t.device)
    if pred_t.shape != target_t.shape:
        raise ValueError(
            f"prediction shape {tuple(pred_t.shape)} != ground-truth shape {tuple(target_t.shape)}"
        )
    valid = target_t != ignore_index
    target_v = target_t[valid]
    pred_v = pred_t[valid]
    _check_range(target_v, num_classes, "ground truth")
    _check_range(pred_v, num_classes, "prediction")
    flat = target_v * num_classes + pred_v
    counts = torch.bincount(flat, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


class ConfusionMatrix:
    """Accumulates a confusion matrix over many ``(pred, target)`` label maps.

    ``.matrix`` is the raw ``(K, K)`` int64 tensor (rows = ground truth); sum it across ranks
    before calling :func:`segmentation_scores`.
    """

    def __init__(
        self,
        num_classes: int,
        ignore_index: int = IGNORE_INDEX,
        device: torch.device | str = "cpu",
    ) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def update(self, pred: ArrayLike, target: ArrayLike) -> None:
        """Add one batch (or one image) of integer label maps of identical shape."""
        counts = confusion_matrix(pred, target, self.num_classes, self.ignore_index)
        self.matrix += counts.to(self.matrix.device)

    def add_matrix(self, matrix: ArrayLike) -> None:
        """Add an already-computed ``(K, K)`` confusion matrix (e.g. from a worker)."""
        other = torch.as_tensor(matrix, dtype=torch.int64)
        if other.shape != self.matrix.shape:
            raise ValueError(f"matrix shape {tuple(other.shape)} != {tuple(self.matrix.shape)}")
        self.matrix += other.to(self.matrix.device)

    def reduce_(self, fn: Callable[[torch.Tensor], object]) -> ConfusionMatrix:
        """Apply an in-place collective such as ``torch.distributed.all_reduce`` to the matrix."""
        fn(self.matrix)
        return self

    def reset(self) -> None:
        self.matrix.zero_()

    def compute(self, class_names: Sequence[str] | None = None) -> SegmentationScores:
        return segmentation_scores(self.matrix, class_names=class_names)


@dataclass
class SegmentationScores:
    """Scores derived from a confusion matrix; per-class lists hold ``nan`` for excluded classes."""

    pixel_acc: float
    mean_acc: float
    miou: float
    iou: list[float]
    acc: list[float]
    precision: list[float]
    class_names: list[str]
    num_pixels: int

    def to_dict(self) -> dict:
        """JSON-friendly dict: ``nan`` becomes ``None``, plus an ``iou_per_class`` name map."""

        def clean(value: float) -> float | None:
            return None if np.isnan(value) else float(value)

        out = asdict(self)
        out["iou"] = [clean(v) for v in self.iou]
        out["acc"] = [clean(v) for v in self.acc]
        out["precision"] = [clean(v) for v in self.precision]
        out["pixel_acc"] = clean(self.pixel_acc)
        out["mean_acc"] = clean(self.mean_acc)
        out["miou"] = clean(self.miou)
        out["iou_per_class"] = {name: clean(v) for name, v in zip(self.class_names, self.iou)}
        return out


def _nanmean(values: np.ndarray) -> float:
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else float("nan")


def segmentation_scores(
    matrix: ArrayLike, class_names: Sequence[str] | None = None
) -> SegmentationScores:
    """Pixel accuracy, mean (per-class) accuracy, mIoU and per-class IoU of a confusion matrix.

    ``IoU_c = TP / (TP + FP + FN)``; classes whose union is 0 get ``nan`` and are excluded from the
    mean. ``acc_c = TP / (pixels of class c in the ground truth)`` (the recall); classes absent from
    the ground truth get ``nan`` and are excluded from the mean accuracy. ``precision_c = TP /
    (pixels predicted as c)``, ``nan`` for classes never predicted. Precision and recall tell a
    partial CAM (high precision, low recall: only the most discriminative part) from one that
    spills into its surroundings (the reverse), which the IoU alone does not.
    """
    if isinstance(matrix, torch.Tensor):
        matrix = matrix.detach().cpu().numpy()
    cm = np.asarray(matrix, dtype=np.float64)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"confusion matrix must be square (K, K), got shape {cm.shape}")
    num_classes = cm.shape[0]
    if class_names is None:
        class_names = [str(i) for i in range(num_classes)]
    if len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class names given for {num_classes} classes")
    tp = np.diag(cm)
    gt_count = cm.sum(axis=1)
    pred_count = cm.sum(axis=0)
    union = gt_count + pred_count - tp
    total = cm.sum()
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
        acc = np.where(gt_count > 0, tp / gt_count, np.nan)
        precision = np.where(pred_count > 0, tp / pred_count, np.nan)
    return SegmentationScores(
        pixel_acc=float(tp.sum() / total) if total > 0 else float("nan"),
        mean_acc=_nanmean(acc),
        miou=_nanmean(iou),
        iou=iou.tolist(),
        acc=acc.tolist(),
        precision=precision.tolist(),
        class_names=list(class_names),
        num_pixels=int(total),
    )


def format_table(columns: dict[str, Sequence], class_names: Sequence[str],
                 summary: dict[str, Sequence] | None = None) -> str:
    """The one table of the project's tools: a row per class, a column per entry of ``columns``,
    then the ``summary`` rows; every value is a fraction printed in %.

    ``columns`` maps a title to per-class values; ``summary`` maps a row name to one value per
    column (a shorter list leaves the rest blank). None or NaN prints ``-``: a class absent from
    both prediction and ground truth has no IoU.
    """
    summary = summary or {}

    def cell(value) -> str:
        if value is None or (isinstance(value, float) and np.isnan(value)):
            return "-"
        return f"{100 * value:.2f}"

    width = max(len(name) for name in [*class_names, *summary, "class (in %)"]) + 2
    size = max(9, *(len(title) + 1 for title in columns))
    lines = [f"{'class (in %)':<{width}}" + "".join(f"{t:>{size}}" for t in columns)]
    for index, name in enumerate(class_names):
        lines.append(f"{name:<{width}}"
                     + "".join(f"{cell(v[index]):>{size}}" for v in columns.values()))
    lines.append("-" * len(lines[0]))
    for name, values in summary.items():
        lines.append(f"{name:<{width}}" + "".join(f"{cell(v):>{size}}" for v in values))
    return "\n".join(lines)


def score_columns(scores: SegmentationScores) -> dict[str, list[float]]:
    """The per-class columns of :func:`format_scores`: IoU, precision and recall."""
    return {"IoU": scores.iou, "precision": scores.precision, "recall": scores.acc}


def format_scores(scores: SegmentationScores) -> str:
    """:func:`format_table` of one prediction: per-class IoU, precision and recall (``acc``), then
    pixel accuracy, mean accuracy (of the recalls) and mIoU."""
    return format_table(score_columns(scores), scores.class_names,
                        {"pixel acc": [scores.pixel_acc], "mean recall": [scores.mean_acc],
                         "mIoU": [scores.miou]})


def multilabel_f1(
    logits: torch.Tensor,
    labels: torch.Tensor,
    threshold: float = 0.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """Per-image F1 of multi-label classification (``logit > threshold`` vs multi-hot ``labels``).

    ``logits`` and ``labels`` are ``(B, C)``. Each image's F1 is ``2 TP / (2 TP + FP + FN)``; an
    image with no positive label and no positive prediction scores 1. ``reduction`` is ``"mean"``
    (average over images), ``"sum"`` (for summing across ranks, then dividing by the image count)
    or ``"none"`` (the ``(B,)`` vector).
    """
    if logits.shape != labels.shape or logits.dim() != 2:
        raise ValueError(
            f"logits and labels must both be (B, C); got {tuple(logits.shape)} and "
            f"{tuple(labels.shape)}"
        )
    pred = logits > threshold
    truth = labels > 0.5
    tp = (pred & truth).sum(dim=1).float()
    fp = (pred & ~truth).sum(dim=1).float()
    fn = (~pred & truth).sum(dim=1).float()
    denom = 2 * tp + fp + fn
    f1 = torch.where(denom > 0, 2 * tp / denom.clamp(min=1), torch.ones_like(denom))
    if reduction == "none":
        return f1
    if reduction == "sum":
        return f1.sum()
    if reduction == "mean":
        return f1.mean()
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def average_precision(scores: torch.Tensor, labels: torch.Tensor) -> list[float]:
    """Per-class average precision of image-level scores: ``(N, C)`` logits (any monotone
    score) against ``(N, C)`` multi-hot labels; ``nan`` for a class no image has.

    Non-interpolated AP, as scikit-learn's ``average_precision_score``: the mean, over the
    images of the class, of the precision among the images scored at least as high. Ties are
    broken by image order (stable sort), which only matters for equal scores.
    """
    if scores.shape != labels.shape or scores.dim() != 2:
        raise ValueError(f"scores and labels must both be (N, C); got {tuple(scores.shape)} and "
                         f"{tuple(labels.shape)}")
    order = torch.sort(scores.double(), dim=0, descending=True, stable=True).indices
    hits = torch.gather(labels.double() > 0.5, 0, order).double()  # (N, C) by rank
    rank = torch.arange(1, len(scores) + 1, dtype=torch.float64, device=scores.device)[:, None]
    precision_at_hit = hits.cumsum(0) / rank * hits
    positives = hits.sum(0)
    ap = precision_at_hit.sum(0) / positives.clamp(min=1)
    return torch.where(positives > 0, ap, torch.full_like(ap, float("nan"))).tolist()
