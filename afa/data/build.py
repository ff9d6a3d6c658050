"""The datasets and class names of a config's ``data`` section, for the trainer and the tools."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from afa.config import class_names, num_classes
from afa.data.voc import VOCStyleDataset

__all__ = ["build_datasets", "class_names"]


def build_datasets(cfg: DictConfig) -> tuple[VOCStyleDataset, VOCStyleDataset]:
    """The classification training set and the segmentation validation set of ``cfg.data``."""
    d = cfg.data
    list_dir = Path(d.list_dir)
    common = dict(num_classes=num_classes(cfg), mask_dir=d.mask_dir, skip_bad=d.skip_bad)
    train_set = VOCStyleDataset(
        d.root, list_dir / f"{d.train_split}.txt", list_dir / "cls_labels.json", mode="cls",
        split=d.train_split if d.split_subdirs else None, crop_size=d.crop_size,
        scale_range=tuple(d.scale_range), hflip=True, **common)
    if d.name == "custom":
        # Your own images: every one has its tags, masks are optional (validation scores the
        # mIoU over those that have one, and the classifier's AP and F1 over all).
        val_set = VOCStyleDataset(
            d.root, list_dir / f"{d.val_split}.txt", list_dir / "cls_labels.json", mode="infer",
            split=d.val_split if d.split_subdirs else None, **common)
    else:
        val_set = VOCStyleDataset(
            d.root, list_dir / f"{d.val_split}.txt", None, mode="seg",
            split=d.val_split if d.split_subdirs else None, **common)
    return train_set, val_set
