"""PAR: pixel-adaptive refinement of score maps by local RGB and position affinities.

Reference: Ru, Zhan, Yu, Du, "Learning Affinity from Attention: End-to-End Weakly-Supervised
Semantic Segmentation with Transformers", CVPR 2022, section 3.3 (PAR).

Every pixel i looks at 8 neighbours j (the axis and diagonal ones) at each dilation d, 48 in all for
the default dilations, with replicate padding at the image border. The weights

    k_rgb(i, j) = -(|I_i - I_j| / (sigma_i + 1e-8) / w1)^2     averaged over the 3 colour channels
    k_pos(i, j) = -(|p_i - p_j| / (sigma_pos + 1e-8) / w2)^2
    alpha(i, j) = softmax_j k_rgb(i, j) + w3 * softmax_j k_pos(i, j)

(sigma_i: unbiased std of the neighbours' colour, per channel; sigma_pos: unbiased std of the 48
neighbour distances d or sqrt(2) d) are applied ``num_iter`` times: ``m_i <- sum_j alpha_ij m_j``.

``bounds`` refines several images of different sizes in one call: each is placed at the top left
of a common canvas and PAR sees only its own region, replicate-padded at the region's border, as
if it had been refined alone (equal to the per-image call; tested). One call per batch keeps the
kernel count of a training iteration independent of the batch size.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["PAR"]

# The 8 neighbour directions (dy, dx) used at every dilation: 4 axis-aligned, then 4 diagonal.
_DIRECTIONS = ((-1, 0), (1, 0), (0, -1), (0, 1), (-1, -1), (-1, 1), (1, -1), (1, 1))


class PAR(nn.Module):
    """Pixel-adaptive refinement.

    Args:
        dilations: neighbour distances; each contributes the 8 surrounding pixels.
        num_iter: number of propagation steps (10 for VOC, 15 for COCO).
        w1: temperature of the colour kernel.
        w2: temperature of the positional kernel.
        w3: weight of the positional kernel relative to the colour kernel.
    """

    def __init__(self, dilations: Sequence[int] = (1, 2, 4, 8, 12, 24), num_iter: int = 10,
                 w1: float = 0.3, w2: float = 0.3, w3: float = 0.01):
        super().__init__()
        self.dilations = tuple(int(d) for d in dilations)
        self.num_iter = num_iter
        self.w1 = w1
        self.w2 = w2
        self.w3 = w3
        # (dy, dx) of every neighbour, in the order of the neighbour axis used below.
        self.offsets = tuple((dy * d, dx * d) for d in self.dilations for dy, dx in _DIRECTIONS)
        self.pad = max(self.dilations)
        # The positional weights depend only on the configuration, so they are computed once;
        # a non-persistent buffer follows .to(device) without entering the state dict.
        self.register_buffer("pos_weight", self._positional_weight(), persistent=False)

    def _positional_weight(self) -> torch.Tensor:
        """``w3 * softmax_j k_pos(j)``, (n_neighbours,) float32; identical for every pixel."""
        dist = torch.tensor([math.hypot(dy, dx) for dy, dx in self.offsets], dtype=torch.float64)
        k_pos = -(dist / (dist.std() + 1e-8) / self.w2) ** 2
        return (self.w3 * k_pos.softmax(dim=0)).float()

    def _neighbours(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Views of ``x`` (B, C, H, W) shifted per neighbour: entry j holds x at p_i + offset_j."""
        _, _, height, width = x.shape
        p = self.pad
        padded = F.pad(x, (p, p, p, p), mode="replicate")  # (B, C, H + 2p, W + 2p)
        return [padded[..., p + dy:p + dy + height, p + dx:p + dx + width]
                for dy, dx in self.offsets]

    def affinity(self, rgb: torch.Tensor) -> torch.Tensor:
        """Propagation weights ``alpha``, (B, n_neighbours, H, W), from an RGB image in [0, 1]."""
        neighbours = torch.stack(self._neighbours(rgb), dim=2)  # (B, 3, n_neighbours, H, W)
        sigma = neighbours.std(dim=2, keepdim=True)  # (B, 3, 1, H, W), unbiased
        # -(|I_i - I_j| / (sigma + 1e-8) / w1)^2 with the same operations in the same order, in
        # place on one temporary: the same bits, a third less time on CPU than out of place.
        k_rgb = (neighbours - rgb.unsqueeze(2)).abs_().div_(sigma.add_(1e-8)).div_(self.w1)
        k_rgb = k_rgb.square_().neg_().mean(dim=1)  # (B, n_neighbours, H, W)
        return k_rgb.softmax(dim=1) + self.pos_weight.view(1, -1, 1, 1)

    def forward(self, rgb: torch.Tensor, masks: torch.Tensor,
                bounds: torch.Tensor | None = None) -> torch.Tensor:
        """Refine ``masks`` (B, K, h, w) with the image ``rgb`` (B, 3, H, W) in [0, 1].

        The masks are first resized to (H, W) (bilinear, ``align_corners=True``). Returns
        (B, K, H, W) float32. Computed in float32 whatever the input dtype: the 1e-8 guard of the
        colour kernel underflows in half precision.

        ``bounds``: (B, 2) integer ``(height, width)`` of each image's region at the top left of
        the canvas, already at its own size (``masks`` then has the canvas size too, and is not
        resized). Each region is refined as ``PAR(rgb[b, :, :h, :w], masks[b, :, :h, :w])``
        would; the values outside it are unspecified.
        """
        rgb = rgb.float()
        masks = masks.float()
        if bounds is None:
            masks = F.interpolate(masks, size=rgb.shape[-2:], mode="bilinear", align_corners=True)
            extend = None
        else:
            if masks.shape[-2:] != rgb.shape[-2:]:
                raise ValueError(f"with bounds, masks {tuple(masks.shape)} and rgb "
                                 f"{tuple(rgb.shape)} must share the canvas size")
            extend = self._replicate_index(bounds, *rgb.shape[-2:])
            rgb, masks = self._extend(rgb, extend), self._extend(masks, extend)
        alpha = self.affinity(rgb).unsqueeze(1)  # (B, 1, n_neighbours, H, W)
        for _ in range(self.num_iter):
            refined = torch.zeros_like(masks)
            # Accumulating shifted views keeps memory at O(B K H W) instead of stacking all
            # neighbours of every channel (and is 10x faster on CPU than one gather of them).
            for j, shifted in enumerate(self._neighbours(masks)):
                refined.addcmul_(shifted, alpha[:, :, j])
            masks = refined if extend is None else self._extend(refined, extend)
        return masks

    @staticmethod
    def _replicate_index(bounds: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """(B, 1, H * W) flat index of the in-region pixel nearest to every canvas pixel."""
        bounds = bounds.to(dtype=torch.long)
        ys = torch.arange(height, device=bounds.device)
        xs = torch.arange(width, device=bounds.device)
        ys = torch.minimum(ys[None, :], bounds[:, 0:1] - 1).clamp(min=0)  # (B, H)
        xs = torch.minimum(xs[None, :], bounds[:, 1:2] - 1).clamp(min=0)  # (B, W)
        return (ys[:, :, None] * width + xs[:, None, :]).flatten(1)[:, None]

    @staticmethod
    def _extend(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Replace everything outside each region by its nearest in-region value.

        Replicate padding of the canvas then gives every in-region pixel exactly the neighbours
        replicate padding of the region alone would: clamping to the canvas and then to the
        region is clamping to the region.
        """
        batch, channels, height, width = x.shape
        flat = x.reshape(batch, channels, height * width)
        return torch.gather(flat, 2, index.expand(-1, channels, -1)).view_as(x)

    def extra_repr(self) -> str:
        return (f"dilations={self.dilations}, num_iter={self.num_iter}, w1={self.w1}, "
                f"w2={self.w2}, w3={self.w3}")
