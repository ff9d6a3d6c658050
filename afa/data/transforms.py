"""Image/mask transforms of the AFA data pipeline, in numpy (HWC uint8 RGB in, CHW float32 out).

Training augmentation follows the paper (docs/method.md, 'Schedule'): random rescale of the whole
image by a ratio in ``[0.5, 2.0]``, random horizontal flip, then a random ``crop_size`` crop.
Where the image is smaller than the crop it is placed at a random offset on a zero canvas. The padding happens on
the 0-255 RGB image, *before* normalisation, so padded pixels denormalise to black; masks are
padded with the ignore index. The crop records ``box``:

    box = (y0, y1, x0, x1), int64: crop[y0:y1, x0:x1] is image content, everything else is padding.

The pseudo-label code sets its labels to ignore outside exactly this box.

Every random transform takes an explicit ``np.random.Generator`` so that the caller decides where
randomness comes from (the datasets derive one per sample from torch's RNG, see ``afa.data.voc``).
"""

from __future__ import annotations

import functools

import cv2
import numpy as np
import torch

from afa.constants import IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "normalize",
    "denormalize",
    "random_rescale",
    "random_hflip",
    "random_crop",
    "color_jitter",
    "Augment",
]

_MEAN = np.asarray(IMAGENET_MEAN, dtype=np.float32)
_STD = np.asarray(IMAGENET_STD, dtype=np.float32)


def normalize(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) RGB in 0-255 (uint8 or float) -> (3, H, W) float32 tensor, ImageNet-normalised."""
    out = (image.astype(np.float32) - _MEAN) / _STD
    return torch.from_numpy(np.ascontiguousarray(out.transpose(2, 0, 1)))


@functools.cache
def _mean_std(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The (3, 1, 1) ImageNet statistics on ``device``, made once: a copy from host memory in
    every training step would make the host wait for the GPU."""
    return tuple(torch.as_tensor(v, dtype=dtype, device=device).view(3, 1, 1)
                 for v in (IMAGENET_MEAN, IMAGENET_STD))


def denormalize(image: torch.Tensor, max_value: float = 1.0) -> torch.Tensor:
    """Undo :func:`normalize`: (..., 3, H, W) normalised -> RGB in ``[0, max_value]``.

    ``max_value=1.0`` gives the ``rgb`` that PAR expects; ``max_value=255.0`` the 0-255 image (e.g.
    for the DenseCRF loss or visualisation). Works on any device and keeps the dtype.
    """
    if image.ndim < 3 or image.shape[-3] != 3:
        raise ValueError(f"denormalize expects (..., 3, H, W), got shape {tuple(image.shape)}")
    mean, std = _mean_std(image.device, image.dtype)
    rgb = image * std + mean  # 0-255
    return (rgb * (max_value / 255.0)).clamp_(0.0, max_value)


def random_rescale(
    image: np.ndarray,
    mask: np.ndarray | None,
    scale_range: tuple[float, float],
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Resize both sides by one ratio drawn from ``scale_range`` (image bilinear, mask nearest)."""
    ratio = rng.uniform(scale_range[0], scale_range[1])
    height, width = image.shape[:2]
    size = (max(1, int(width * ratio + 0.5)), max(1, int(height * ratio + 0.5)))  # cv2: (W, H)
    image = cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)
    if mask is not None:
        mask = cv2.resize(mask, size, interpolation=cv2.INTER_NEAREST)
    return image, mask


def random_hflip(
    image: np.ndarray, mask: np.ndarray | None, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray | None]:
    """Flip image and mask left-right together with probability 0.5."""
    if rng.random() < 0.5:
        image = image[:, ::-1]
        mask = None if mask is None else mask[:, ::-1]
    return image, mask


def _crop_axis(size: int, crop: int, rng: np.random.Generator) -> tuple[int, int, int]:
    """For one axis of the crop: (start in the source, start on the canvas, length copied).

    If the image is at least as long as the crop, a random window of the image is taken; otherwise
    the whole image is pasted at a random offset of the zero canvas.
    """
    if size >= crop:
        src0 = int(rng.integers(0, size - crop + 1))
        return src0, 0, crop
    dst0 = int(rng.integers(0, crop - size + 1))
    return 0, dst0, size


def random_crop(
    image: np.ndarray,
    mask: np.ndarray | None,
    crop_size: int,
    rng: np.random.Generator,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Random ``crop_size`` x ``crop_size`` crop with zero padding; returns (image, mask, box).

    The image canvas is filled with 0 (black, before normalisation), the mask canvas with
    ``ignore_index``. ``box = (y0, y1, x0, x1)`` (int64) is the region of the crop holding image
    content: ``crop[y0:y1, x0:x1]``.
    """
    height, width = image.shape[:2]
    sy, dy, ly = _crop_axis(height, crop_size, rng)
    sx, dx, lx = _crop_axis(width, crop_size, rng)
    out_image = np.zeros((crop_size, crop_size, image.shape[2]), dtype=image.dtype)
    out_image[dy:dy + ly, dx:dx + lx] = image[sy:sy + ly, sx:sx + lx]
    out_mask = None
    if mask is not None:
        out_mask = np.full((crop_size, crop_size), ignore_index, dtype=mask.dtype)
        out_mask[dy:dy + ly, dx:dx + lx] = mask[sy:sy + ly, sx:sx + lx]
    box = np.asarray([dy, dy + ly, dx, dx + lx], dtype=np.int64)
    return out_image, out_mask, box


def color_jitter(
    image: np.ndarray,
    rng: np.random.Generator,
    brightness: float = 0.0,
    contrast: float = 0.0,
    saturation: float = 0.0,
    hue: float = 0.0,
) -> np.ndarray:
    """Photometric jitter of an RGB uint8 image, in the spirit of torchvision's ``ColorJitter``.

    Brightness, contrast and saturation factors are drawn from ``[1 - s, 1 + s]``; the hue shift
    from ``[-hue, hue]`` (fraction of the colour circle, at most 0.5). Applied in that fixed order.
    """
    out = image.astype(np.float32)
    if brightness > 0:
        out *= rng.uniform(1 - brightness, 1 + brightness)
    if contrast > 0:
        grey_mean = (out @ np.float32([0.299, 0.587, 0.114])).mean()
        out = (out - grey_mean) * rng.uniform(1 - contrast, 1 + contrast) + grey_mean
    if saturation > 0:
        grey = (out @ np.float32([0.299, 0.587, 0.114]))[..., None]
        out = (out - grey) * rng.uniform(1 - saturation, 1 + saturation) + grey
    out = np.clip(out, 0, 255).astype(np.uint8)
    if hue > 0:
        hsv = cv2.cvtColor(out, cv2.COLOR_RGB2HSV)  # uint8 hue in 0..179
        shift = int(round(rng.uniform(-hue, hue) * 180))
        hsv[..., 0] = ((hsv[..., 0].astype(np.int32) + shift) % 180).astype(np.uint8)
        out = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    return out


class Augment:
    """The training-time pipeline: rescale -> flip -> colour jitter -> crop/pad.

    Each step is off unless configured: ``scale_range=None`` keeps the size, ``hflip=False`` never
    flips, ``jitter=None`` keeps colours (a ``(brightness, contrast, saturation, hue)`` tuple turns
    it on), ``crop_size=None`` keeps the whole image (``box`` then covers all of it). Jitter comes
    before padding so that padded pixels stay exactly zero.
    """

    def __init__(
        self,
        crop_size: int | None = None,
        scale_range: tuple[float, float] | None = None,
        hflip: bool = False,
        jitter: tuple[float, float, float, float] | None = None,
        ignore_index: int = IGNORE_INDEX,
    ):
        if crop_size is not None and crop_size <= 0:
            raise ValueError(f"crop_size must be positive, got {crop_size}")
        if scale_range is not None and not 0 < scale_range[0] <= scale_range[1]:
            raise ValueError(f"scale_range must be (low, high) with 0 < low <= high, "
                             f"got {scale_range}")
        self.crop_size = crop_size
        self.scale_range = None if scale_range is None else tuple(scale_range)
        self.hflip = hflip
        self.jitter = None if jitter is None else tuple(jitter)
        self.ignore_index = ignore_index

    def __call__(
        self, image: np.ndarray, mask: np.ndarray | None, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        """(H, W, 3) uint8 image [+ (H, W) mask] -> augmented image, mask and ``box`` (int64)."""
        if self.scale_range is not None:
            image, mask = random_rescale(image, mask, self.scale_range, rng)
        if self.hflip:
            image, mask = random_hflip(image, mask, rng)
        if self.jitter is not None:
            image = color_jitter(image, rng, *self.jitter)
        if self.crop_size is not None:
            return random_crop(image, mask, self.crop_size, rng, self.ignore_index)
        box = np.asarray([0, image.shape[0], 0, image.shape[1]], dtype=np.int64)
        return image, mask, box

    def __repr__(self) -> str:
        return (f"Augment(crop_size={self.crop_size}, scale_range={self.scale_range}, "
                f"hflip={self.hflip}, jitter={self.jitter})")
