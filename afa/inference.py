"""Test-time inference: multi-scale + flip segmentation, and what the inference tools share.

The math (DESIGN.md section 5) is :func:`predict_seg_logits`: resize the image so that its long
side is ``long_side``; for each scale resize again (bilinear, size ``int(s * h), int(s * w)``), run
the image together with its horizontal flip, resize both logit maps straight to the original image
size, average the logits with the flipped-back ones, and take the element-wise maximum over the
scales. The argmax of the result is the prediction; its softmax is what the dense CRF refines.
(The authors' script sums the flip pair instead of averaging it: the same argmax, but the softmax
fed to the CRF would be twice as sharp.)

The rest serves ``tools/infer_seg.py`` and ``tools/infer_cam.py``: :class:`ImageSet` reads the ids
of a split with their images, optional masks and image-level labels; :class:`OutputFiles` names
the per-image outputs and tells which images are done (resuming); :func:`check_run_settings`
refuses to resume into a directory written with other settings; :func:`run_sharded` runs a tool's
job on this process's share of the images and sums the results over processes;
:func:`save_npy_atomic` and
:func:`write_rgb_png_atomic` (through :func:`afa.atomic.write_atomic`) write each file under a
temporary name first, so that an interrupted run never leaves a truncated
file that a resumed run would take for finished work.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from afa.atomic import write_atomic
from afa.constants import IGNORE_INDEX
from afa.data.voc import (DataError, labels_from_mask, read_image, read_label_file, read_mask,
                          read_name_list)
from afa.engine import distributed as D

__all__ = [
    "SETTINGS_FILE",
    "resize_long_side",
    "predict_seg_logits",
    "likely_classes",
    "ImageSet",
    "OutputFiles",
    "check_run_settings",
    "run_sharded",
    "write_rgb_png_atomic",
    "save_npy_atomic",
    "mask_ignored",
]


# --------------------------------------------------------------------------------------------
# Multi-scale + flip segmentation
# --------------------------------------------------------------------------------------------


def resize_long_side(images: torch.Tensor, long_side: int | None) -> torch.Tensor:
    """Resize (B, 3, H, W) images (bilinear) so that ``max(H, W) == long_side``, keeping the aspect.

    Small images are enlarged too (VOC's 500-pixel images go to 512). ``None`` or 0 keeps the size.
    """
    height, width = images.shape[-2:]
    if not long_side or max(height, width) == long_side:
        return images
    ratio = long_side / max(height, width)
    size = (max(1, int(height * ratio)), max(1, int(width * ratio)))
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False)


@torch.no_grad()
def predict_seg_logits(model: nn.Module, images: torch.Tensor,
                       scales: Sequence[float] = (1.0, 0.5, 0.75), flip: bool = True,
                       long_side: int | None = 512) -> torch.Tensor:
    """Fused multi-scale (+ flip) segmentation logits at the input's size (DESIGN section 5).

    Args:
        model: returns an object with ``seg_logits`` (B, C, h, w) for (B, 3, H', W') input; call
            it in eval mode (the decoder has BatchNorm and Dropout).
        images: (B, 3, H, W) normalised images of one size.
        scales: resize factors applied after the long-side resize.
        flip: also run the horizontal flip of every scale and average the pair.
        long_side: the long side the image is first resized to; None keeps the size.

    Returns:
        (B, C, H, W) float32: per scale the (flip-averaged) logits resized to (H, W), then the
        element-wise maximum over scales.
    """
    if not scales:
        raise ValueError("predict_seg_logits needs at least one scale")
    batch, _, height, width = images.shape
    base = resize_long_side(images, long_side)
    base_h, base_w = base.shape[-2:]
    fused = None
    for scale in scales:
        size = (max(1, int(scale * base_h)), max(1, int(scale * base_w)))
        x = base if size == (base_h, base_w) else F.interpolate(
            base, size=size, mode="bilinear", align_corners=False)
        if flip:
            x = torch.cat([x, x.flip(-1)], dim=0)  # one forward for the pair
        logits = F.interpolate(model(x).seg_logits.float(), size=(height, width),
                               mode="bilinear", align_corners=False)
        if flip:
            logits = (logits[:batch] + logits[batch:].flip(-1)) / 2
        fused = logits if fused is None else torch.maximum(fused, logits)
    return fused


def likely_classes(probs: np.ndarray, min_prob: float) -> np.ndarray:
    """Indices of the channels of (C, H, W) ``probs`` whose maximum exceeds ``min_prob``.

    A class that nowhere reaches a small probability cannot win the CRF's argmax, so the CRF may
    skip it; its cost grows with the number of channels. Every class that is the argmax somewhere
    is kept, whatever ``min_prob``.
    """
    flat = probs.reshape(probs.shape[0], -1)
    keep = flat.max(axis=1) > min_prob
    keep[np.unique(flat.argmax(axis=0))] = True
    return np.flatnonzero(keep)


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


class ImageSet:
    """The ids of a name list with their images and, where they exist, masks and labels.

    Unlike :class:`afa.data.VOCStyleDataset` nothing is required beyond the images: a split
    without masks (VOC ``test``) is predicted but not scored, and image-level labels come from the
    label file when it lists the id, else from the mask.

    Args:
        root: dataset root holding ``JPEGImages`` and ``mask_dir``.
        name_list: file with one id per line.
        num_classes: classes including background.
        mask_dir: folder of the class-index PNGs.
        split_subdir: COCO layout: images in ``JPEGImages/<split>``, masks in
            ``<mask_dir>/<split>``.
        label_file: JSON ``{id: [classes]}``, or None; a missing file is the same as None.
    """

    def __init__(self, root: str | os.PathLike, name_list: str | os.PathLike, num_classes: int,
                 *, mask_dir: str = "SegmentationClassAug", split_subdir: str | None = None,
                 label_file: str | os.PathLike | None = None):
        self.root = Path(root)
        self.num_classes = num_classes
        self.image_dir = self.root / "JPEGImages"
        self.mask_dir = self.root / mask_dir
        if split_subdir:
            self.image_dir = self.image_dir / split_subdir
            self.mask_dir = self.mask_dir / split_subdir
        if not self.image_dir.is_dir():
            raise DataError(f"{self.image_dir}: image folder not found (root={self.root})")
        self.names = read_name_list(name_list)
        if not self.names:
            raise DataError(f"{name_list}: name list is empty")
        self.label_file = label_file
        self.labels = None
        if label_file is not None and Path(label_file).is_file():
            self.labels = read_label_file(label_file, num_classes)

    def image_path(self, name: str) -> Path:
        return self.image_dir / f"{name}.jpg"

    def mask_path(self, name: str) -> Path:
        return self.mask_dir / f"{name}.png"

    def has_mask(self, name: str) -> bool:
        return self.mask_path(name).is_file()

    def image(self, name: str) -> np.ndarray:
        """(H, W, 3) uint8 RGB; ``DataError`` naming the file when it is missing or corrupt."""
        return read_image(self.image_path(name))

    def mask(self, name: str, shape: tuple[int, int] | None = None) -> np.ndarray:
        """(H, W) uint8 class indices; with ``shape``, a mask of another size is an error."""
        mask = read_mask(self.mask_path(name), self.num_classes)
        if shape is not None and mask.shape != tuple(shape):
            raise DataError(f"{self.mask_path(name)}: mask is {mask.shape[1]}x{mask.shape[0]} "
                            f"(WxH), the image {self.image_path(name)} is {shape[1]}x{shape[0]}")
        return mask

    def classes(self, name: str) -> list[int]:
        """Image-level labels (1..C-1): the label file's entry, else the classes of the mask."""
        if self.labels is not None and name in self.labels:
            return list(self.labels[name])
        if self.has_mask(name):
            return labels_from_mask(self.mask(name), self.num_classes)
        where = f"the label file {self.label_file}" if self.labels is not None else "a label file"
        raise DataError(f"no image-level labels for {name!r}: neither {where} nor a mask "
                        f"{self.mask_path(name)} has them")

    def multi_hot(self, classes: Iterable[int]) -> torch.Tensor:
        """(C-1,) float32 multi-hot of class indices 1..C-1."""
        label = torch.zeros(self.num_classes - 1, dtype=torch.float32)
        label[[c - 1 for c in classes]] = 1.0
        return label


# --------------------------------------------------------------------------------------------
# Outputs and resuming
# --------------------------------------------------------------------------------------------


class OutputFiles:
    """Per-image output files ``out_dir/<kind>/<id><suffix>`` and which images are complete.

    Args:
        out_dir: the run's output directory.
        kinds: ``{kind: suffix}`` of the files every image gets, e.g. ``{"pred": ".png"}``.

    An image counts as done when every kind's file exists. Files are written atomically, so an
    existing file is a complete one.
    """

    def __init__(self, out_dir: str | os.PathLike, kinds: dict[str, str]):
        self.out_dir = Path(out_dir)
        self.kinds = dict(kinds)

    def path(self, kind: str, name: str) -> Path:
        return self.out_dir / kind / f"{name}{self.kinds[kind]}"

    def make_dirs(self) -> None:
        for kind in self.kinds:
            (self.out_dir / kind).mkdir(parents=True, exist_ok=True)

    def prepare(self, config_yaml: str, settings: dict) -> None:
        """Create the folders and record the run: ``config.yaml`` and the settings file."""
        self.make_dirs()
        write_atomic(self.out_dir / "config.yaml", lambda tmp: tmp.write_text(config_yaml))
        write_atomic(self.out_dir / SETTINGS_FILE,
                     lambda tmp: tmp.write_text(json.dumps(settings, indent=2) + "\n"))

    def done(self, name: str) -> bool:
        return all(self.path(kind, name).is_file() for kind in self.kinds)


SETTINGS_FILE = "run.json"  # in the output directory: the settings its outputs were made with


def check_run_settings(out_dir: str | os.PathLike, settings: dict, overwrite: bool) -> None:
    """Refuse to resume into ``out_dir`` when it was written with other ``settings``.

    Without ``overwrite``, existing outputs are kept and reused; mixing, say, CRF and plain
    predictions in one directory would silently corrupt the scores, so differing settings raise
    ``ValueError`` naming the keys. With ``overwrite`` everything is recomputed anyway. The caller
    writes the new settings (:func:`write_atomic` of ``json.dumps(settings)``) once all processes
    have checked.
    """
    path = Path(out_dir) / SETTINGS_FILE
    if overwrite or not path.is_file():
        return
    try:
        old = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not a JSON settings file ({err}); pass --overwrite") from err
    normalised = json.loads(json.dumps(settings))  # tuples -> lists, as stored
    differing = sorted(key for key in set(old) | set(normalised)
                       if old.get(key) != normalised.get(key))
    if differing:
        details = "; ".join(f"{key}: {old.get(key)!r} -> {normalised.get(key)!r}"
                            for key in differing)
        raise ValueError(f"{path}: {out_dir} holds outputs of a run with other settings "
                         f"({details}); pass --overwrite to recompute them or pick another "
                         "--out-dir")


def run_sharded(job, names: list[str], files: OutputFiles, config_yaml: str,
                settings: dict) -> tuple[int, int] | None:
    """The distributed part of ``tools/infer_seg.py`` and ``tools/infer_cam.py``.

    Inside an initialised process group: rank 0 records the run in the output directory, every
    rank runs ``job.run(names[rank::world_size])`` (which returns how many images it processed and
    counts the scored ones in ``job.scored``), then the counts and the job's own statistics
    (``job.reduce_(all_reduce_sum)``) are summed over the ranks. Returns ``(processed, scored)``
    over all ranks, or None on every rank when any rank met bad input (that rank prints the
    error); the ranks agree on it first, so none is left waiting in a collective.
    """
    if D.rank() == 0:
        files.prepare(config_yaml, settings)
    D.barrier()
    ran, failed = 0, 0
    try:
        ran = job.run(names[D.rank()::D.world_size()])
    except (DataError, ValueError) as err:
        print(f"error (rank {D.rank()}): {err}", file=sys.stderr)
        failed = 1
    counts = torch.tensor([ran, job.scored, failed], dtype=torch.int64, device=job.device)
    D.all_reduce_sum(counts)
    ran, scored, failed = counts.tolist()
    if failed:
        return None
    job.reduce_(D.all_reduce_sum)
    return ran, scored


def write_rgb_png_atomic(path: str | os.PathLike, image: np.ndarray) -> None:
    """Save an (H, W, 3) uint8 RGB array as PNG, atomically."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected (H, W, 3) uint8, got shape {image.shape} dtype {image.dtype}")
    write_atomic(path, lambda tmp: Image.fromarray(image).save(tmp, format="PNG"))


def save_npy_atomic(path: str | os.PathLike, array: np.ndarray) -> None:
    """``np.save`` to ``path`` exactly (no ``.npy`` appended), atomically."""
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            np.save(handle, array)
    write_atomic(path, write)


def mask_ignored(pred: np.ndarray, gt: np.ndarray,
                 ignore_index: int = IGNORE_INDEX) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Prepare a pseudo label with ignore pixels for scoring against the ground truth.

    Returns ``(pred, gt, ignored, valid)``: the ground truth set to ``ignore_index`` where the
    prediction is ignore (so the mIoU covers only the pixels the label commits to), the prediction
    with those pixels set to 0 (never scored), the number of such pixels among the ground truth's
    valid ones, and the number of valid ground-truth pixels.
    """
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} != ground-truth shape {gt.shape}")
    ignored = pred == ignore_index
    valid = gt != ignore_index
    gt = np.where(ignored, ignore_index, gt)
    pred = np.where(ignored, 0, pred)
    return pred, gt, int((ignored & valid).sum()), int(valid.sum())
