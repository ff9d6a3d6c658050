"""Radius mask, affinity labels and random-walk propagation, on ``TORCH_DEVICE``."""

import pytest
import torch
import torch.nn.functional as F
from conftest import device_tol

from afa.affinity import affinity_label, propagate_cams, radius_mask, random_walk


@pytest.mark.parametrize("radius", [3, 8])
def test_radius_mask_counts_and_symmetry(radius, device):
    h, w = 20, 21
    mask = radius_mask(h, w, radius, device)
    assert mask.shape == (h * w, h * w) and mask.dtype == torch.bool
    assert mask.device.type == device.type
    assert torch.equal(mask, mask.T)
    counts = mask.sum(dim=1).view(h, w)
    r = radius
    assert counts[0, 0] == (r + 1) ** 2  # corner
    assert counts[h - 1, w - 1] == (r + 1) ** 2
    assert counts[0, 10] == (r + 1) * (2 * r + 1)  # top edge, away from the corners
    assert counts[10, 0] == (r + 1) * min(2 * r + 1, h)  # left edge
    assert counts[10, 10] == min(2 * r + 1, h) * min(2 * r + 1, w)  # centre
    # Chebyshev, not Euclidean: the far corner of the square window is in, one step beyond is out.
    centre = 10 * w + 10
    assert mask[centre, (10 - r) * w + (10 - r)]
    if 10 - r - 1 >= 0:
        assert not mask[centre, (10 - r - 1) * w + 10]


def test_radius_mask_is_cached(device):
    assert radius_mask(5, 6, 2, device) is radius_mask(5, 6, 2, device)
    assert radius_mask(5, 6, 2, device) is not radius_mask(5, 6, 3, device)


def test_affinity_label_two_regions(device):
    # 8x8 grid, labels given at stride 4 (32x32), nearest-resized to the grid.
    small = torch.full((8, 8), 1, dtype=torch.long)
    small[:, 5:] = 2
    small[0, 0] = 255
    label = small.repeat_interleave(4, 0).repeat_interleave(4, 1)[None]  # (1, 32, 32)
    radius = 3
    target = affinity_label(label.to(device), (8, 8), radius=radius)
    assert target.shape == (1, 64, 64) and target.device.type == device.type
    target = target.cpu()  # 4096 lookups below
    flat = small.flatten()
    for i in range(64):
        for j in range(64):
            yi, xi, yj, xj = i // 8, i % 8, j // 8, j % 8
            if flat[i] == 255 or flat[j] == 255 or max(abs(yi - yj), abs(xi - xj)) > radius:
                expected = 255
            else:
                expected = int(flat[i] == flat[j])
            assert target[0, i, j] == expected, (i, j)
    # Both kinds of pairs exist, so the loop above checked all three outcomes.
    assert (target == 1).any() and (target == 0).any() and (target == 255).any()


def _normalised_transition(aff, mask):
    """random_walk applied to identity scores returns its transition matrix itself."""
    n = aff.shape[-1]
    return random_walk(torch.eye(n, device=aff.device).expand(aff.shape[0], n, n), aff, mask)


def test_random_walk_columns_sum_below_one(device):
    torch.manual_seed(0)
    aff = torch.rand(2, 25, 25, device=device)
    mask = radius_mask(5, 5, 2, device)
    trans = _normalised_transition(aff, mask)
    assert (trans[:, ~mask] == 0).all()  # nothing beyond the radius
    col = trans.sum(dim=1)  # (B, N): sum over i of A[i, j]
    assert (col < 1).all() and (col > 0.5).all()
    expected = (aff * mask) ** 2
    expected = expected / (expected.sum(dim=1, keepdim=True) + 0.1)
    torch.testing.assert_close(trans, expected, **device_tol(device, 1.3e-6, 1e-5))


def test_random_walk_direction(device):
    torch.manual_seed(1)
    aff = torch.rand(1, 6, 6)  # deliberately not symmetric
    scores = torch.rand(1, 3, 6)
    mask = torch.ones(6, 6, dtype=torch.bool)
    out = random_walk(scores.to(device), aff.to(device), mask.to(device)).cpu()
    a = aff[0] ** 2
    a = a / (a.sum(dim=0, keepdim=True) + 0.1)
    for c in range(3):
        for j in range(6):
            expected = sum(scores[0, c, i] * a[i, j] for i in range(6))
            assert out[0, c, j] == pytest.approx(float(expected),
                                                 rel=device_tol(device, 1e-5, 0)["rtol"])


def test_random_walk_identity_affinity_scales_by_normaliser(device):
    scores = torch.rand(2, 4, 16, device=device)
    eye = torch.eye(16, device=device).expand(2, 16, 16)
    out = random_walk(scores, eye, radius_mask(4, 4, 1, device))
    torch.testing.assert_close(out, scores / 1.1, **device_tol(device, 1.3e-6, 1e-5))


def test_propagate_cams_identity_affinity_and_absent_classes(device):
    torch.manual_seed(2)
    b, c1, height, width = 2, 5, 32, 32
    cams = torch.rand(b, c1, height, width, device=device)
    labels = torch.zeros(b, c1, device=device)
    labels[0, [1, 3]] = 1
    labels[1, 4] = 1
    grid = (4, 4)
    eye = torch.eye(16, device=device).expand(b, 16, 16)
    out = propagate_cams(cams, labels, eye, grid, bkg_score=0.4, radius=8)
    with pytest.raises(ValueError, match="16 positions cannot lie on a 2x4 grid"):
        propagate_cams(cams, labels, eye, (2, 4), bkg_score=0.4)
    assert out.shape == (b, c1 + 1, height, width)
    # Absent classes stay exactly zero.
    assert (out[0, [1, 3, 5]] == 0).all() and (out[1, 1:5] == 0).all()
    assert (out[0, [0, 2, 4]] > 0).all() and (out[1, [0, 5]] > 0).all()
    # Identity affinity: the softmax over background + present classes, divided by 1.1.
    small = F.interpolate(cams, size=grid, mode="bilinear", align_corners=False)
    for i, keys in enumerate(([1, 3], [4])):
        stack = torch.cat([torch.full((1, 4, 4), 0.4, device=device), small[i, keys]])
        stack = stack.softmax(dim=0) / 1.1
        expected = F.interpolate(stack[None], size=(height, width), mode="bilinear",
                                 align_corners=False)[0]
        torch.testing.assert_close(out[i, [0] + [k + 1 for k in keys]], expected,
                                   **device_tol(device, 1.3e-6, 1e-5))
