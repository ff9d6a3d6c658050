"""A Gaussian filter on the permutohedral lattice, in PyTorch, on the tensors' device.

The regularized loss (:class:`afa.losses.DenseCRFLoss`) needs ``W @ S``: every pixel's class
probabilities averaged over all pixels with a Gaussian weight in a 5-D space (position and
colour). The dense matrix ``W`` has ``N^2`` entries; the permutohedral lattice of Adams, Baek and
Davis (Eurographics 2010) approximates the product in ``O(N d^2)``:

1. *Elevate*: each point's d features are mapped onto the hyperplane ``sum(x) = 0`` of
   ``R^(d+1)``, scaled so that the lattice's blur has the Gaussian's standard deviation.
2. *Enclose*: the lattice tiles that plane with simplices; the point's simplex is found by
   rounding to the nearest "remainder-0" lattice point and sorting the differences (its rank),
   and its d+1 vertices get barycentric weights.
3. *Splat*: each point's values are added to its d+1 vertices, weighted.
4. *Blur*: along each of the d+1 lattice directions, every vertex takes
   ``v + (left + right) / 2``; vertices that no point touched count as 0.
5. *Slice*: each point reads back the weighted sum of its vertices, times a constant ``alpha``.

This module reproduces, operation for operation and in float32, the lattice that ``pydensecrf2``
(Krähenbühl's ``densecrf``) builds for a dense kernel without normalisation, so that the two
agree to float rounding (on the CPU: bit for bit, tests/test_permutohedral.py). Where the C++
code keeps a hash table of vertices, this one packs each vertex's integer key (image index and d
lattice coordinates) into one int64, and ``torch.unique`` and ``torch.searchsorted`` replace the
table: the whole batch is one lattice, batched over images, with no Python loop over pixels or
vertices, and nothing to compile.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["lattice_filter", "bilateral_filter_torch", "bilateral_features"]


def _scale_factors(d: int) -> torch.Tensor:
    """The diagonal of the elevation's scaling: ``sqrt(2/3) (d+1) / sqrt((i+1)(i+2))``.

    Rounded as the C++ code rounds it: the first factor to float32, the product in double, the
    result to float32.
    """
    inv_std_dev = float(torch.tensor(math.sqrt(2.0 / 3.0) * (d + 1), dtype=torch.float32))
    return torch.tensor([1.0 / math.sqrt((i + 2) * (i + 1)) * inv_std_dev for i in range(d)],
                        dtype=torch.float32)


def _elevate(features: torch.Tensor) -> torch.Tensor:
    """(d, P) features -> (d+1, P) points on the plane ``sum = 0`` (step 1)."""
    d = features.shape[0]
    scaled = features * _scale_factors(d).to(features.device)[:, None]
    elevated = features.new_empty((d + 1, features.shape[1]))
    running = torch.zeros_like(features[0])
    for j in range(d, 0, -1):  # d iterations, each over every point, in the C++ order
        cf = scaled[j - 1]
        elevated[j] = running - j * cf
        running = running + cf
    elevated[0] = running
    return elevated


class _Lattice:
    """The simplex of every point and the lattice's vertices (steps 1 and 2), for one batch."""

    def __init__(self, features: torch.Tensor):
        """``features``: (B, d, N) float32; points of different images never share a vertex."""
        batch, d, n = features.shape
        device = features.device
        # pydensecrf2's SSE build enters the points in blocks of four, the last one padded with
        # points at the origin: they splat nothing, but their vertices join the lattice and carry
        # values along the blur. The same (at most three) points are added here, and dropped
        # again below, so that the two lattices are the same.
        pad = -n % 4
        features = F.pad(features, (0, pad))
        n += pad
        self.d, self.points = d, batch * n
        flat = features.permute(1, 0, 2).reshape(d, batch * n).float()
        elevated = _elevate(flat)  # (d+1, P)

        # Nearest remainder-0 point: round each coordinate to a multiple of d+1.
        down = torch.tensor(1.0 / (d + 1), dtype=torch.float32, device=device)
        nearest = torch.round(elevated * down)  # half to even, as the SSE rounding mode
        rem0 = nearest * (d + 1)
        total = nearest[0].clone()
        for i in range(1, d + 1):
            total = total + nearest[i]
        # rank[i]: how many coordinates' residuals exceed coordinate i's (ties go to the later one).
        residual = elevated - rem0
        greater = residual[None, :, :] > residual[:, None, :]  # [i, j]: residual j > residual i
        upper = torch.ones(d + 1, d + 1, dtype=torch.bool, device=device).triu(1)[:, :, None]
        rank = ((greater & upper).sum(1) + (~greater.transpose(0, 1) & upper.transpose(0, 1))
                .sum(1)).float()
        # The rounded point may lie off the plane (total != 0): move it back.
        rank = rank + total
        wrap = (d + 1) * ((rank < 0).float() - (rank >= d + 1).float())
        rank, rem0 = rank + wrap, rem0 + wrap
        rank_long = rank.long()

        # Barycentric weights, accumulated coordinate by coordinate as the C++ code does.
        bary = features.new_zeros((d + 2, self.points))
        for i in range(d + 1):
            value = (elevated[i] - rem0[i]) * down
            slot = (d - rank_long[i])[None]
            bary.scatter_add_(0, slot, value[None])
            bary.scatter_add_(0, slot + 1, -value[None])
        bary[0] = bary[0] + (1 + bary[d + 1])  # float32, as the SSE build does
        weights = bary[: d + 1].t()  # (P, d+1)

        # The d+1 vertices' keys: rem0 plus the canonical simplex's column of each rank.
        remainder = torch.arange(d + 1, device=device)[:, None, None]  # (d+1, 1, 1)
        canonical = torch.where(rank_long[None, :d] <= d - remainder, remainder,
                                remainder - (d + 1))  # (d+1 vertices, d coords, P)
        keys = rem0[None, :d].long() + canonical
        image = torch.arange(batch, device=device).repeat_interleave(n)  # (P,)
        self._packing(keys, batch)
        packed = self._pack(keys, image[None].expand(d + 1, -1))  # (d+1, P)
        self.vertices, inverse = torch.unique(packed.t().reshape(-1), sorted=True,
                                              return_inverse=True)
        # Point-major, as the C++ code splats; the padding's points are dropped.
        real = slice(0, n - pad)
        self.offsets = inverse.view(batch, n, d + 1)[:, real].reshape(-1, d + 1)
        self.weights = weights.reshape(batch, n, d + 1)[:, real].reshape(-1, d + 1).contiguous()
        self.count = self.vertices.numel()
        self.neighbours = [self._neighbours(j) for j in range(d + 1)]

    def _packing(self, keys: torch.Tensor, batch: int) -> None:
        """Mixed-radix digits for (image, d coordinates), with room for the blur's shifts."""
        margin = self.d + 1
        low = keys.amin(dim=(0, 2)) - margin
        high = keys.amax(dim=(0, 2)) + margin
        sizes = (high - low + 1).tolist()
        strides, stride = [], 1
        for size in reversed(sizes):
            strides.append(stride)
            stride *= size
        if stride * batch >= 2 ** 62:
            raise ValueError("Lattice keys do not fit in 64 bits: the features span too wide a "
                             "range for the kernel widths (sigma too small?)")
        self._low = low
        self._stride_list = strides[::-1]
        self._strides = torch.tensor(self._stride_list, device=keys.device)  # (d,)
        self._image_stride = stride

    def _pack(self, keys: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """(..., d, P) int keys and (..., P) image index -> (..., P) int64."""
        digits = (keys - self._low[:, None]) * self._strides[:, None]
        return digits.sum(dim=-2) + image * self._image_stride

    def _neighbours(self, j: int) -> torch.Tensor:
        """Indices (shifted by 1; 0 = no vertex) of each vertex's two neighbours along axis j."""
        shift = [self.d if i == j else -1 for i in range(self.d)]
        # The packing is linear in the coordinates: a shift is one offset for every vertex.
        delta = sum(step * stride for step, stride in zip(shift, self._stride_list))
        found = []
        for step in (delta, -delta):
            target = self.vertices + step
            where = torch.searchsorted(self.vertices, target).clamp(max=self.count - 1)
            hit = self.vertices[where] == target
            found.append(torch.where(hit, where + 1, torch.zeros_like(where)))
        return torch.stack(found)  # (2, M)

    def filter(self, values: torch.Tensor) -> torch.Tensor:
        """(P, K) float32 -> (P, K): splat, blur along every axis, slice (steps 3 to 5)."""
        d, k = self.d, values.shape[1]
        lattice = values.new_zeros((self.count + 1, k))  # row 0: "no vertex", always 0
        splat = (self.weights[:, :, None] * values[:, None, :]).reshape(-1, k)
        lattice.index_add_(0, self.offsets.reshape(-1) + 1, splat)
        for j in range(d + 1):
            left, right = self.neighbours[j]
            blurred = lattice[1:] + 0.5 * (lattice[left] + lattice[right])
            lattice = torch.cat([lattice[:1], blurred])
        alpha = float(torch.tensor(1.0, dtype=torch.float32)
                      / (1 + torch.tensor(2.0, dtype=torch.float32) ** -d))
        gathered = lattice[self.offsets + 1]  # (P, d+1, K)
        out = torch.zeros_like(values)
        if k <= 2:  # the C++ code slices one or two channels without SSE: (w * v) * alpha
            for j in range(d + 1):
                out = out + self.weights[:, j, None] * gathered[:, j] * alpha
        else:
            scaled = self.weights * alpha
            for j in range(d + 1):
                out = out + scaled[:, j, None] * gathered[:, j]
        return out


def lattice_filter(values: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """``W @ values`` per image for the Gaussian kernel on ``features``, on the permutohedral lattice.

    Args:
        values: (B, K, N) float32, the signal at N points of each of B images.
        features: (B, d, N) float32, the points' positions; the kernel is
            ``exp(-|f_i - f_j|^2 / 2)`` up to the lattice's near-constant factor.

    Returns:
        (B, K, N) float32 on the inputs' device, without gradient: what ``pydensecrf2``'s
        ``DenseKernel`` with ``NO_NORMALIZATION`` returns for each image.
    """
    batch, k, n = values.shape
    if features.shape[0] != batch or features.shape[2] != n:
        raise ValueError(f"values {tuple(values.shape)} and features {tuple(features.shape)} "
                         "differ in batch or point count")
    with torch.no_grad():
        lattice = _Lattice(features.float())
        flat = values.float().permute(0, 2, 1).reshape(batch * n, k)
        out = lattice.filter(flat)
    return out.view(batch, n, k).permute(0, 2, 1).contiguous()


def bilateral_features(image: torch.Tensor, sigma_rgb: float, sigma_xy: float) -> torch.Tensor:
    """(B, 3, h, w) image in 0-255 -> (B, 5, h*w) features ``(x, y) / sigma_xy, rgb / sigma_rgb``.

    Rounded as :func:`afa.losses.bilateral_filter` rounds them for ``pydensecrf2`` (float32
    division of float32 coordinates and intensities).
    """
    batch, _, height, width = image.shape
    ys, xs = torch.meshgrid(torch.arange(height, dtype=torch.float32, device=image.device),
                            torch.arange(width, dtype=torch.float32, device=image.device),
                            indexing="ij")
    position = torch.stack([xs, ys]).reshape(1, 2, -1).expand(batch, -1, -1)
    colour = image.float().reshape(batch, 3, -1)
    sigmas = torch.tensor([sigma_xy] * 2 + [sigma_rgb] * 3, dtype=torch.float32,
                          device=image.device).view(1, 5, 1)
    return torch.cat([position, colour], dim=1) / sigmas


def bilateral_filter_torch(values: torch.Tensor, image: torch.Tensor, sigma_rgb: float,
                           sigma_xy: float) -> torch.Tensor:
    """The bilateral filter of the regularized loss on the tensors' device.

    Args:
        values: (B, K, h, w) float32.
        image: (B, 3, h, w) float32 RGB in 0-255.
        sigma_rgb, sigma_xy: kernel widths in intensity and pixel units.

    Returns:
        (B, K, h, w): what :func:`afa.losses.bilateral_filter` returns for each image.
    """
    batch, k, height, width = values.shape
    features = bilateral_features(image, sigma_rgb, sigma_xy)
    out = lattice_filter(values.reshape(batch, k, height * width), features)
    return out.view(batch, k, height, width)
