"""PAR against a slow reference written with explicit loops over pixels and neighbours, and a
batch of padded crops of different sizes (``bounds``) against one call per crop."""

import math
import statistics

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from afa.models.par import PAR
from conftest import smooth

DIRECTIONS = ((-1, 0), (1, 0), (0, -1), (0, 1), (-1, -1), (-1, 1), (1, -1), (1, 1))
PHOTO = "2007_009346.jpg"  # has flat saturated white next to texture
PHOTO_CROP = (274, 298, 272, 300)  # y0, y1, x0, x1


def _softmax(values):
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    total = sum(exps)
    return [e / total for e in exps]


def _resize_align_corners(masks, height, width):
    """Bilinear resize with align_corners=True, written out: (K, h, w) -> (K, H, W) float64."""
    _, h, w = masks.shape
    out = np.zeros((masks.shape[0], height, width))
    for y in range(height):
        sy = y * (h - 1) / (height - 1) if height > 1 else 0.0
        y0 = min(int(math.floor(sy)), h - 1)
        y1, fy = min(y0 + 1, h - 1), sy - y0
        for x in range(width):
            sx = x * (w - 1) / (width - 1) if width > 1 else 0.0
            x0 = min(int(math.floor(sx)), w - 1)
            x1, fx = min(x0 + 1, w - 1), sx - x0
            out[:, y, x] = ((1 - fy) * (1 - fx) * masks[:, y0, x0]
                            + (1 - fy) * fx * masks[:, y0, x1]
                            + fy * (1 - fx) * masks[:, y1, x0] + fy * fx * masks[:, y1, x1])
    return out


def reference_par(rgb, masks, dilations, num_iter, w1=0.3, w2=0.3, w3=0.01):
    """rgb (3, H, W), masks (K, h, w), numpy; returns (K, H, W) float64."""
    _, height, width = rgb.shape
    rgb = rgb.astype(np.float64).tolist()
    offsets = [(dy * d, dx * d) for d in dilations for dy, dx in DIRECTIONS]
    dist = [math.hypot(dy, dx) for dy, dx in offsets]
    sigma_pos = statistics.stdev(dist)
    pos = _softmax([-(r / (sigma_pos + 1e-8) / w2) ** 2 for r in dist])

    alpha = {}
    neighbours = {}
    for y in range(height):
        for x in range(width):
            # Replicate padding: a neighbour outside the image is the nearest border pixel.
            nbrs = [(min(max(y + dy, 0), height - 1), min(max(x + dx, 0), width - 1))
                    for dy, dx in offsets]
            kernel = [0.0] * len(offsets)
            for c in range(3):
                values = [rgb[c][ny][nx] for ny, nx in nbrs]
                sigma = statistics.stdev(values)
                for j, value in enumerate(values):
                    kernel[j] += -(abs(rgb[c][y][x] - value) / (sigma + 1e-8) / w1) ** 2 / 3
            alpha[y, x] = [a + w3 * p for a, p in zip(_softmax(kernel), pos)]
            neighbours[y, x] = nbrs

    current = _resize_align_corners(masks.astype(np.float64), height, width)
    for _ in range(num_iter):
        new = np.zeros_like(current)
        for y in range(height):
            for x in range(width):
                acc = [0.0] * current.shape[0]
                for weight, (ny, nx) in zip(alpha[y, x], neighbours[y, x]):
                    for k in range(current.shape[0]):
                        acc[k] += weight * current[k, ny, nx]
                new[:, y, x] = acc
        current = new
    return current


def _run_par(rgb, masks, dilations, num_iter):
    par = PAR(dilations=dilations, num_iter=num_iter)
    with torch.no_grad():
        return par(torch.from_numpy(rgb).float(), torch.from_numpy(masks).float()).numpy()


def test_par_matches_loop_reference_on_random_image():
    rng = np.random.default_rng(0)
    rgb = rng.uniform(size=(2, 3, 12, 14)).astype(np.float32)
    masks = rng.uniform(size=(2, 2, 7, 9)).astype(np.float32)  # resized to 12x14 inside
    out = _run_par(rgb, masks, dilations=(1, 2), num_iter=10)
    assert out.shape == (2, 2, 12, 14)
    for b in range(2):  # both images of one batch call
        ref = reference_par(rgb[b], masks[b], dilations=(1, 2), num_iter=10)
        np.testing.assert_allclose(out[b], ref, rtol=1e-4, atol=1e-6)


def test_par_default_dilations_exceeding_the_image():
    rng = np.random.default_rng(1)
    rgb = rng.uniform(size=(1, 3, 10, 11)).astype(np.float32)
    masks = rng.uniform(size=(1, 2, 10, 11)).astype(np.float32)
    out = _run_par(rgb, masks, dilations=(1, 2, 4, 8, 12, 24), num_iter=3)
    ref = reference_par(rgb[0], masks[0], dilations=(1, 2, 4, 8, 12, 24), num_iter=3)
    np.testing.assert_allclose(out[0], ref, rtol=1e-4, atol=1e-6)


def test_par_on_real_photo_with_flat_saturated_region(voc_photos):
    path = voc_photos / "JPEGImages" / PHOTO
    from PIL import Image

    y0, y1, x0, x1 = PHOTO_CROP
    image = np.asarray(Image.open(path).convert("RGB"))[y0:y1, x0:x1]
    rgb = (image.astype(np.float32) / 255).transpose(2, 0, 1)[None]  # (1, 3, 24, 28)
    # The case under test: pixels whose 5x5 neighbourhood is one flat value (std 0) in all channels.
    windows = np.lib.stride_tricks.sliding_window_view(image, (5, 5), axis=(0, 1))
    flat = (windows.max(axis=(-2, -1)) == windows.min(axis=(-2, -1))).all(-1)
    assert flat.sum() > 20 and image.std() > 30
    rng = np.random.default_rng(2)
    masks = rng.uniform(size=(1, 3, 12, 14)).astype(np.float32)
    out = _run_par(rgb, masks, dilations=(1, 2), num_iter=10)
    assert np.isfinite(out).all()
    ref = reference_par(rgb[0], masks[0], dilations=(1, 2), num_iter=10)
    np.testing.assert_allclose(out[0], ref, rtol=1e-4, atol=1e-6)


def test_par_positional_weights_and_device_buffer():
    par = PAR()
    assert par.pos_weight.shape == (48,)
    # Axis neighbours are closer than diagonal ones at the same dilation, hence weigh more.
    assert par.pos_weight[0] > par.pos_weight[4]
    assert par.pos_weight.sum() == pytest.approx(0.01, rel=1e-5)
    assert "pos_weight" not in par.state_dict()


def test_par_half_precision_input_stays_finite():
    rgb = torch.ones(1, 3, 16, 16, dtype=torch.float16)  # perfectly flat: every std is 0
    rgb[..., 5, 5] = 0.2
    out = PAR(num_iter=2)(rgb, torch.rand(1, 2, 8, 8, dtype=torch.float16))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_par_affinity_is_the_formula_bit_for_bit():
    """The in-place colour kernel keeps the formula's operations and their order: the same bits
    as the out-of-place expression (the pseudo labels stay the authors', not just close)."""
    par = PAR()
    rgb = torch.rand(2, 3, 37, 29, generator=torch.Generator().manual_seed(4))
    neighbours = torch.stack(par._neighbours(rgb), dim=2)
    sigma = neighbours.std(dim=2, keepdim=True)
    k_rgb = -((neighbours - rgb.unsqueeze(2)).abs() / (sigma + 1e-8) / par.w1) ** 2
    expected = k_rgb.mean(dim=1).softmax(dim=1) + par.pos_weight.view(1, -1, 1, 1)
    assert torch.equal(par.affinity(rgb), expected)

# ------------------------------------------------------------------------------------------------
# A batch of padded crops of different sizes in one call (bounds)
# ------------------------------------------------------------------------------------------------


def test_par_with_bounds_equals_one_call_per_image(device):
    g = torch.Generator().manual_seed(0)
    par = PAR(dilations=(1, 2, 4, 8), num_iter=5).to(device)
    sizes = [(37, 53), (61, 29), (23, 23), (61, 53)]  # odd, portrait, landscape, the canvas
    canvas = (61, 53)
    rgbs = [smooth((1, 3, *s), g) for s in sizes]
    masks = [smooth((1, 4, *s), g).softmax(dim=1) for s in sizes]
    pad = lambda x: F.pad(x, (0, canvas[1] - x.shape[-1], 0, canvas[0] - x.shape[-2]), value=7.0)
    batched = par(torch.cat([pad(r) for r in rgbs]).to(device),
                  torch.cat([pad(m) for m in masks]).to(device),
                  bounds=torch.tensor(sizes, device=device))
    for i, (h, w) in enumerate(sizes):
        alone = par(rgbs[i].to(device), masks[i].to(device))
        torch.testing.assert_close(batched[i:i + 1, :, :h, :w], alone, rtol=1e-5, atol=1e-6)
