"""Affinity between stage-4 positions: radius mask, affinity labels and random-walk propagation.

docs/method.md, steps 6 and 8. Positions are the tokens of the stride-16 grid (h, w), flattened
row-major (index ``y * w + x``), so an affinity matrix is (B, N, N) with N = h * w.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from afa.constants import IGNORE_INDEX

__all__ = [
    "radius_mask",
    "token_labels",
    "affinity_label",
    "random_walk",
    "propagate_cams",
]


@functools.lru_cache(maxsize=16)
def radius_mask(h: int, w: int, radius: int = 8,
                device: torch.device | str = "cpu") -> torch.Tensor:
    """(N, N) bool, True where two positions of the (h, w) grid are within Chebyshev ``radius``.

    Cached per size, radius and device, since every iteration asks for the same few grids. The
    returned tensor is shared: do not modify it in place.
    """
    ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device),
                            indexing="ij")
    ys, xs = ys.reshape(-1), xs.reshape(-1)  # (N,)
    near_y = (ys[:, None] - ys[None, :]).abs() <= radius
    near_x = (xs[:, None] - xs[None, :]).abs() <= radius
    return near_y & near_x


def token_labels(label: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, N) long: the (B, H, W) label at the positions of the (h, w) grid (nearest)."""
    return F.interpolate(label[:, None].float(), size=grid, mode="nearest").long().flatten(1)


def affinity_label(label: torch.Tensor, grid: tuple[int, int], radius: int = 8,
                   ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Pairwise affinity targets from a pseudo label (docs/method.md, step 6).

    Args:
        label: (B, H, W) integer pseudo label with ``ignore_index``.
        grid: (h, w) of the stage-4 positions the affinity is predicted for.
        radius: pairs farther apart (Chebyshev distance on the grid) are ignored.

    Returns:
        (B, N, N) long: 1 for same label, 0 for different labels, ``ignore_index`` where either
        position is ignore or the pair lies outside the radius.
    """
    small = token_labels(label, grid)  # (B, N)
    same = small[:, :, None] == small[:, None, :]  # (B, N, N)
    valid = (small != ignore_index)[:, :, None] & (small != ignore_index)[:, None, :]
    valid &= radius_mask(grid[0], grid[1], radius, small.device)
    return same.long().masked_fill(~valid, ignore_index)


def random_walk(scores: torch.Tensor, aff: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One random-walk step of ``scores`` (B, K, N) with affinity ``aff`` (B, N, N)
    (docs/method.md, step 8).

    The affinity is restricted to ``mask`` (N, N), squared to sharpen it, and each column j is
    divided by its sum + 0.1: the extra 0.1 lets weakly connected positions keep less mass instead
    of amplifying noise. Returns ``out[b, c, j] = sum_i scores[b, c, i] * A[b, i, j]``, (B, K, N).
    """
    trans = (aff * mask) ** 2  # (B, N, N)
    trans = trans / (trans.sum(dim=1, keepdim=True) + 0.1)
    return torch.bmm(scores, trans)


def propagate_cams(cams: torch.Tensor, labels: torch.Tensor, aff: torch.Tensor,
                   grid: tuple[int, int], bkg_score: float, radius: int = 8) -> torch.Tensor:
    """Random-walk propagation of CAMs with a constant background channel (docs/method.md, step 8).

    Args:
        cams: (B, C-1, H, W) normalised CAMs in [0, 1].
        labels: (B, C-1) multi-hot image labels.
        aff: (B, N, N) predicted affinity, N = h * w.
        grid: (h, w) stage-4 grid of the forward that predicted ``aff`` (``AFAOutput.grid``,
            ``MultiScaleCAM.aff_grid``).
        bkg_score: value of the background channel before the softmax.
        radius: Chebyshev radius on the token grid outside of which affinities are dropped.

    Returns:
        (B, C, H, W) propagated scores, channel 0 background; channels of absent classes are 0.
    """
    _, _, height, width = cams.shape
    if grid[0] * grid[1] != aff.shape[-1]:
        raise ValueError(f"an affinity over {aff.shape[-1]} positions cannot lie on a "
                         f"{grid[0]}x{grid[1]} grid")
    small = F.interpolate(cams * labels[:, :, None, None], size=grid, mode="bilinear",
                          align_corners=False)  # (B, C-1, h, w)
    scores = F.pad(small, (0, 0, 0, 0, 1, 0), value=bkg_score)  # (B, C, h, w), background first
    present = F.pad(labels.bool(), (1, 0), value=True)  # (B, C)
    # The softmax runs over background + present classes only; absent classes get probability 0.
    scores = scores.masked_fill(~present[:, :, None, None], float("-inf")).softmax(dim=1)
    mask = radius_mask(grid[0], grid[1], radius, aff.device)
    walked = random_walk(scores.flatten(2), aff.float(), mask)  # (B, C, N)
    walked = walked.view(*scores.shape)
    return F.interpolate(walked, size=(height, width), mode="bilinear", align_corners=False)
