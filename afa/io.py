"""Reading and writing images and class-index label PNGs.

Label maps are stored as palette ("P" mode) PNGs whose pixel *indices* are the class ids
(0 = background, 255 = ignore) and whose palette is the VOC colour map, so the files are both
machine-readable and viewable. Reading returns the indices, never the colours.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from afa.constants import color_palette
from afa.data.voc import read_image  # one reader of images: RGB, errors name the file

__all__ = ["read_image", "read_label_png", "write_label_png", "write_rgb_png"]


def read_label_png(path: str | Path) -> np.ndarray:
    """The class indices of a palette or greyscale label PNG as ``(H, W)`` uint8.

    Raises ``ValueError`` for colour (RGB/RGBA) PNGs, whose colours cannot be read as class ids.
    """
    with Image.open(path) as image:
        if image.mode not in ("P", "L"):
            raise ValueError(
                f"{path}: label PNG has mode {image.mode!r}; expected a palette ('P') or "
                f"greyscale ('L') PNG holding class indices, not a colour rendering"
            )
        return np.array(image, dtype=np.uint8)


def write_label_png(path: str | Path, label: np.ndarray) -> None:
    """Save an ``(H, W)`` integer label map (values 0..255) as a VOC-palette PNG."""
    label = np.asarray(label)
    if label.ndim != 2:
        raise ValueError(f"label map must be (H, W), got shape {label.shape}")
    if label.size and (label.min() < 0 or label.max() > 255):
        raise ValueError(
            f"label values must lie in [0, 255] to fit a palette PNG, got "
            f"[{label.min()}, {label.max()}]"
        )
    image = Image.fromarray(label.astype(np.uint8))  # mode "L"; putpalette makes it "P"
    image.putpalette(color_palette(256).reshape(-1).tolist())
    image.save(path)


def write_rgb_png(path: str | Path, image: np.ndarray) -> None:
    """Save an ``(H, W, 3)`` uint8 RGB array as PNG."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected (H, W, 3) uint8, got shape {image.shape} dtype {image.dtype}")
    Image.fromarray(image).save(path)
