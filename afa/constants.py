"""Constants shared by loaders, evaluation, visualisation and the training processes."""

import signal
from typing import NamedTuple

import numpy as np

__all__ = [
    "CamThresholds",
    "IGNORE_INDEX",
    "STOP_SIGNALS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "VOC_CLASSES",
    "COCO_CLASSES",
    "DEMO_CLASSES",
    "CLASS_NAME_SETS",
    "color_palette",
]

IGNORE_INDEX = 255


class CamThresholds(NamedTuple):
    """The three background scores of the CAM labels (config ``cam.thresholds``; the authors'
    config calls them bkg_score, high_thre and low_thre). Defaults: the paper's, VOC and COCO."""
    background: float = 0.45  # the CAM label's background score (validation and evaluation)
    high: float = 0.55  # pseudo labels: background where the score with this background ...
    low: float = 0.35  # ... and with this one agree on background; ignore where they disagree

# What stops a training run after a checkpoint: Ctrl-C, SIGTERM, SLURM's warning signal. The
# trainer handles them; its helper processes (the regularized loss's filters) ignore them.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)

# Normalisation of 0-255 RGB images (the MiT ImageNet statistics).
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)

# The 80 COCO categories in the standard order (category ids 1..90 with gaps), background first.
COCO_CLASSES = (
    "background", "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck",
    "boat", "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat",
    "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)

# The synthetic set of `make demo` (afa.data.synthetic draws them).
DEMO_CLASSES = (
    "background", "disc", "square", "triangle", "star", "ring", "cross", "crescent", "ellipse",
)

# The class lists a tool's --class-names can pick, background first.
CLASS_NAME_SETS = {"voc": VOC_CLASSES, "coco": COCO_CLASSES, "demo": DEMO_CLASSES}


def color_palette(num_colors: int = 256) -> np.ndarray:
    """The PASCAL VOC colour map, ``(num_colors, 3)`` uint8; index 255 (ignore) is near-white."""
    palette = np.zeros((num_colors, 3), dtype=np.uint8)
    for index in range(num_colors):
        value, r, g, b = index, 0, 0, 0
        for bit in range(8):
            r |= ((value >> 0) & 1) << (7 - bit)
            g |= ((value >> 1) & 1) << (7 - bit)
            b |= ((value >> 2) & 1) << (7 - bit)
            value >>= 3
        palette[index] = (r, g, b)
    return palette
