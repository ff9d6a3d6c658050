"""MS COCO 2014 instances -> VOC-style class-index masks (used by ``tools/prepare_coco.py``).

The 80 categories (COCO ids 1..90 with gaps) map to class indices 1..80 in the standard order,
which is :data:`afa.constants.COCO_CLASSES`. A mask is painted as follows: crowd regions first, as
255 (ignore); then the non-crowd instances, largest area first, so that where instances overlap
the smaller (usually the nearer) one stays visible and a precise instance outline wins over a
crowd region. Image-level labels are then the classes present in the mask, as for VOC.

After conversion the COCO set is read by :class:`afa.data.voc.VOCStyleDataset` with
``split="train"`` or ``"val"`` and ``mask_dir="SegmentationClass"``.
"""

from __future__ import annotations

import warnings

import numpy as np
from pycocotools import mask as mask_utils

from afa.constants import COCO_CLASSES, IGNORE_INDEX
from afa.data.voc import DataError

__all__ = [
    "COCO_CATEGORY_IDS",
    "CATEGORY_TO_INDEX",
    "check_categories",
    "segmentation_to_mask",
    "instances_to_mask",
]

COCO_CATEGORY_IDS = (
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28,
    31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54,
    55, 56, 57, 58, 59, 60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81,
    82, 84, 85, 86, 87, 88, 89, 90,
)
CATEGORY_TO_INDEX = {cat_id: index for index, cat_id in enumerate(COCO_CATEGORY_IDS, start=1)}


def check_categories(categories: list[dict], source: str) -> None:
    """Check that the ``categories`` of an annotation file use the standard ids and names."""
    for cat in categories:
        index = CATEGORY_TO_INDEX.get(cat["id"])
        if index is None or COCO_CLASSES[index] != cat["name"]:
            raise DataError(f"{source}: category {cat['id']} {cat['name']!r} is not one of the 80 "
                            "standard COCO categories")


def segmentation_to_mask(segmentation, height: int, width: int) -> np.ndarray:
    """A COCO ``segmentation`` (polygons, RLE or compressed RLE) -> (H, W) bool mask."""
    if isinstance(segmentation, list):  # polygons: [[x0, y0, x1, y1, ...], ...]
        polygons = [p for p in segmentation if len(p) >= 6]
        if not polygons:
            return np.zeros((height, width), dtype=bool)
        rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    elif isinstance(segmentation.get("counts"), list):  # uncompressed RLE (crowds)
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
        rle = segmentation
    with warnings.catch_warnings():  # pycocotools' decode trips a numpy 2 DeprecationWarning
        warnings.filterwarnings("ignore", "__array__ implementation", DeprecationWarning)
        return mask_utils.decode(rle).astype(bool)


def instances_to_mask(annotations: list[dict], height: int, width: int) -> np.ndarray:
    """Paint the instances of one image into an (H, W) uint8 class-index mask (see module doc)."""
    mask = np.zeros((height, width), dtype=np.uint8)
    crowds = [ann for ann in annotations if ann.get("iscrowd", 0)]
    instances = sorted((ann for ann in annotations if not ann.get("iscrowd", 0)),
                       key=lambda ann: ann.get("area", 0.0), reverse=True)
    for ann in crowds:
        mask[segmentation_to_mask(ann["segmentation"], height, width)] = IGNORE_INDEX
    for ann in instances:
        index = CATEGORY_TO_INDEX.get(ann["category_id"])
        if index is None:
            raise DataError(f"annotation {ann.get('id')}: unknown category id {ann['category_id']}")
        mask[segmentation_to_mask(ann["segmentation"], height, width)] = index
    return mask
