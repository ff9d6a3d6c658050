"""Multi-scale CAM, CAM labels and the two PAR-refined pseudo labels, on ``TORCH_DEVICE``.

Thresholds tested on their boundaries sit on values exact in binary, so those labels are equal on
any device. Labels from a batched computation and a per-image reference are equal on the CPU; on
another device up to 0.1 % may differ (``assert_same_labels``): kernels picked by shape round
differently.
"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import assert_same_labels, device_tol, smooth

from afa.cam import (_combine_high_low, box_mask, cam_to_label, multi_scale_cam, present_classes,
                     refine_cams_with_par, refine_propagated_cams)
from afa.models import CAMForward
from afa.models.par import PAR


class TinyCAMModel(nn.Module):
    """Stand-in network: stride-4 CAMs from a fixed 1x1 conv; affinity from one pooled channel."""

    def __init__(self, num_fg=3):
        super().__init__()
        self.proj = nn.Conv2d(3, num_fg, 1)

    def forward_cam(self, x, return_aff=True):
        feat = F.avg_pool2d(x, 4)
        tokens = feat[:, 0].flatten(1)  # (B, N)
        aff = torch.sigmoid(tokens[:, :, None] - tokens[:, None, :]) if return_aff else None
        return CAMForward(self.proj(feat), aff, tuple(feat.shape[-2:]), [feat])


def test_multi_scale_cam_matches_per_copy_reference(device):
    torch.manual_seed(0)
    model = TinyCAMModel().to(device)
    images = torch.randn(2, 3, 32, 40, device=device)
    scales = (1.0, 0.5, 1.5)
    out = multi_scale_cam(model, images, scales=scales)

    expected = 0
    for s in scales:
        x = F.interpolate(images, size=(int(s * 32), int(s * 40)), mode="bilinear",
                          align_corners=False)
        plain = F.interpolate(model.forward_cam(x).cam, size=(32, 40), mode="bilinear",
                              align_corners=False)
        flipped = model.forward_cam(x.flip(-1)).cam
        flipped = F.interpolate(flipped, size=(32, 40), mode="bilinear", align_corners=False)
        expected = expected + F.relu(torch.maximum(plain, flipped.flip(-1)))
    expected = expected - expected.amin(dim=(2, 3), keepdim=True)
    expected = expected / (expected.amax(dim=(2, 3), keepdim=True) + 1e-5)
    torch.testing.assert_close(out.cam, expected.detach(), **device_tol(device, 1.3e-6, 1e-5))
    assert out.cam.amin() >= 0 and out.cam.amax() <= 1

    x_large = F.interpolate(images, size=(48, 60), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out.aff, model.forward_cam(x_large).aff.detach(),  # un-flipped
                               **device_tol(device, 1.3e-6, 1e-5))
    assert out.aff.shape == (2, 12 * 15, 12 * 15) and out.aff_grid == (12, 15)


def test_multi_scale_cam_gives_the_scale_1_classifier_logits(device):
    """MultiScaleCAM.cls_logits: the classifier on the un-flipped scale-1 copy, whichever path
    that copy took (batched with its flip, explicit attention for the affinity, or reused), so
    infer_cam --images needs no forward of its own to pick the classes."""
    from afa.models import AFANet

    torch.manual_seed(0)
    model = AFANet("mit_b0", num_classes=5, embedding_dim=16, drop_path_rate=0.0).to(device)
    model.eval()
    images = torch.randn(2, 3, 75, 66, device=device)  # odd sizes, portrait
    with torch.no_grad():
        out = model(images)
        expected = model(images, cls_only=True).cls_logits
    tol = device_tol(device, 1e-4, 1e-5)
    for kwargs in ({}, {"aff_scale": 1.0}, {"scale1": out}):
        ms = multi_scale_cam(model, images, (1.0, 0.5, 1.5), **kwargs)
        assert ms.cls_logits.shape == (2, 4)
        torch.testing.assert_close(ms.cls_logits, expected, **tol, msg=str(kwargs))
    assert multi_scale_cam(model, images, (0.5, 1.5)).cls_logits is None
    # A model whose CAM forward gives no logits (the stand-in above): None, not an error.
    assert multi_scale_cam(TinyCAMModel().to(device), images, (1.0, 0.5)).cls_logits is None


def test_cam_to_label_boundaries_are_inclusive(device):
    values = torch.tensor([0.2, 0.25, 0.3, 0.5, 0.6, 0.75, 0.8])  # exact in binary
    cam = torch.zeros(1, 2, 1, 7)
    cam[0, 1, 0] = values  # class 2 holds the scores
    cam = cam.to(device)
    labels = torch.tensor([[1.0, 1.0]], device=device)
    plain = cam_to_label(cam, labels, bkg_score=0.5)
    assert plain[0, 0].tolist() == [0, 0, 0, 0, 2, 2, 2]
    train = cam_to_label(cam, labels, bkg_score=0.5, high=0.75, low=0.25)
    assert train[0, 0].tolist() == [0, 0, 255, 255, 255, 255, 2]


def test_cam_to_label_default_thresholds_in_float32(device):
    cam = torch.tensor([0.35, 0.45, 0.55, 0.5501], device=device).view(1, 1, 1, 4)
    labels = torch.ones(1, 1, device=device)
    assert cam_to_label(cam, labels)[0, 0].tolist() == [0, 0, 1, 1]
    train = cam_to_label(cam, labels, high=0.55, low=0.35)
    assert train[0, 0].tolist() == [0, 255, 255, 1]
    with pytest.raises(ValueError):
        cam_to_label(cam, labels, high=0.55)


def test_cam_to_label_masks_absent_classes_and_box(device):
    cam = torch.zeros(2, 3, 4, 5, device=device)
    cam[:, 0] = 0.9  # class 1 is strongest everywhere ...
    cam[:, 2] = 0.7
    # ... but absent from image 0
    labels = torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 1.0]], device=device)
    boxes = torch.tensor([[0, 4, 0, 5], [1, 3, 2, 4]], device=device)
    label = cam_to_label(cam, labels, boxes=boxes)
    assert (label[0] == 3).all()
    inside = box_mask(boxes, 4, 5)
    assert inside[1].sum() == 4 and inside[1, 1:3, 2:4].all()
    assert (label[1][inside[1]] == 1).all() and (label[1][~inside[1]] == 255).all()


def _block_cams(device):
    """CAMs constant on 8x8 blocks of a 32x32 crop, scores chosen in each threshold band."""
    torch.manual_seed(3)
    blocks = torch.rand(2, 20, 4, 4)
    cams = blocks.repeat_interleave(8, dim=2).repeat_interleave(8, dim=3)
    labels = torch.zeros(2, 20)
    labels[0, [3, 16]] = 1
    labels[1, 11] = 1
    return cams.to(device), labels.to(device)


def test_refined_label_without_propagation_follows_the_thresholds(device):
    cams, labels = _block_cams(device)
    rgb = torch.rand(2, 3, 32, 32, device=device)
    boxes = torch.tensor([[0, 32, 0, 32], [0, 24, 8, 32]], device=device)
    label = refine_cams_with_par(PAR(num_iter=0).to(device), rgb, cams, labels, boxes,
                                 high=0.55, low=0.35)
    expected = cam_to_label(cams, labels, high=0.55, low=0.35, boxes=boxes)
    # Compare away from block borders, where the down/up-sampling blends neighbouring blocks.
    interior = torch.zeros(32, 32, dtype=torch.bool, device=device)
    for k in range(4):
        interior[8 * k + 2:8 * k + 6, :] = True
    interior &= interior.clone().T
    assert_same_labels(label[:, interior], expected[:, interior], device)
    assert set(label.unique().tolist()) >= {0, 255}
    assert (label[1, 24:] == 255).all() and (label[1, :, :8] == 255).all()


def test_refined_label_batch_equals_per_image_reference(device):
    cams, labels = _block_cams(device)
    cams = cams + 0.1 * torch.rand_like(cams)
    rgb = torch.rand(2, 3, 32, 32, device=device)
    boxes = torch.tensor([[0, 32, 0, 32], [4, 32, 0, 28]], device=device)
    par = PAR(dilations=(1, 2, 4), num_iter=3).to(device)
    label = refine_cams_with_par(par, rgb, cams, labels, boxes, high=0.55, low=0.35)
    for b in range(2):
        keys = labels[b].nonzero()[:, 0].tolist()
        small = F.interpolate(cams[b:b + 1, keys], size=(16, 16), mode="bilinear",
                              align_corners=False)
        per_bkg = []
        for bkg in (0.55, 0.35):
            stack = torch.cat([torch.full((1, 1, 16, 16), bkg, device=device), small],
                              dim=1).softmax(dim=1)
            refined = par(F.interpolate(rgb[b:b + 1], size=(16, 16), mode="bilinear",
                                        align_corners=False), stack)
            refined = F.interpolate(refined, size=(32, 32), mode="bilinear", align_corners=False)
            keys_of = torch.tensor([0] + [k + 1 for k in keys], device=device)
            per_bkg.append(keys_of[refined.argmax(dim=1)[0]])
        high, low = per_bkg
        expected = high.clone()
        expected[high == 0] = 255
        expected[(high == 0) & (low == 0)] = 0
        expected[~box_mask(boxes[b:b + 1], 32, 32)[0]] = 255
        assert_same_labels(label[b], expected, device, f"image {b}")


def test_affinity_pseudo_label_uses_only_the_box_crop(device):
    torch.manual_seed(4)
    labels = torch.zeros(2, 20)
    labels[0, [2, 9]] = 1
    labels[1, 0] = 1
    walked_high = torch.rand(2, 21, 32, 32) * F.pad(labels, (1, 0), value=1)[:, :, None, None]
    walked_low = torch.rand(2, 21, 32, 32) * F.pad(labels, (1, 0), value=1)[:, :, None, None]
    rgb = torch.rand(2, 3, 32, 32)
    labels, walked_high, walked_low, rgb = (t.to(device) for t in
                                            (labels, walked_high, walked_low, rgb))
    boxes = torch.tensor([[0, 32, 0, 32], [2, 30, 4, 24]], device=device)
    par = PAR(dilations=(1, 2), num_iter=3).to(device)
    label = refine_propagated_cams(par, rgb, walked_high, walked_low, labels, boxes)
    # The trainer passes the boxes and the class count from the host: the same label.
    assert torch.equal(label, refine_propagated_cams(
        par, rgb, walked_high, walked_low, labels, boxes, box_list=boxes.tolist(),
        max_present=2))

    noisy = rgb.clone()
    noisy[1, :, :2] = torch.rand(3, 2, 32, device=device)  # padding content must not matter
    assert torch.equal(label, refine_propagated_cams(par, noisy, walked_high, walked_low, labels,
                                                     boxes))
    inside = box_mask(boxes, 32, 32)
    assert (label[~inside] == 255).all()
    assert set(label[0].unique().tolist()) <= {0, 3, 10, 255}
    assert set(label[1][inside[1]].unique().tolist()) <= {0, 1, 255}
    # Image 1 by hand: crop, half resolution, PAR, upsample, argmax, high/low combination.
    keys = torch.tensor([0, 1], device=device)
    crop_rgb = F.interpolate(rgb[1:2, :, 2:30, 4:24], size=(14, 10), mode="bilinear",
                             align_corners=False)
    stack = torch.cat([walked_high[1:2, [0, 1], 2:30, 4:24], walked_low[1:2, [0, 1], 2:30, 4:24]],
                      dim=1)
    refined = F.interpolate(par(crop_rgb, stack), size=(28, 20), mode="bilinear",
                            align_corners=False)
    high = keys[refined[:, :2].argmax(dim=1)[0]]
    low = keys[refined[:, 2:].argmax(dim=1)[0]]
    expected = torch.where(high == 0, torch.where(low == 0, 0, 255), high)
    assert_same_labels(label[1, 2:30, 4:24], expected, device, "image 1")


def _per_crop_reference(par, rgb, walked_high, walked_low, labels, boxes, ignore_index=255):
    """The per-image loop refine_propagated_cams used to be (one PAR call per box crop)."""
    batch, _, height, width = walked_high.shape
    index, valid = present_classes(labels)
    label = torch.full((batch, height, width), ignore_index, dtype=torch.long)
    for b, (y0, y1, x0, x1) in enumerate(boxes.tolist()):
        if y1 <= y0 or x1 <= x0:
            continue
        keys = index[b][valid[b]]
        small = (max(1, (y1 - y0) // 2), max(1, (x1 - x0) // 2))
        small_rgb = F.interpolate(rgb[b:b + 1, :, y0:y1, x0:x1], size=small, mode="bilinear",
                                  align_corners=False)
        stack = torch.cat([walked_high[b:b + 1, keys, y0:y1, x0:x1],
                           walked_low[b:b + 1, keys, y0:y1, x0:x1]], dim=1)
        refined = F.interpolate(par(small_rgb, stack), size=(y1 - y0, x1 - x0),
                                mode="bilinear", align_corners=False)
        high, low = (keys[part.max(dim=1).indices] for part in refined.chunk(2, dim=1))
        label[b:b + 1, y0:y1, x0:x1] = _combine_high_low(high, low, ignore_index)
    return label


def test_affinity_pseudo_label_of_a_batch_equals_the_per_crop_loop(device):
    g = torch.Generator().manual_seed(1)
    par = PAR(dilations=(1, 2, 4, 8), num_iter=5)
    batch, classes, size = 4, 6, (58, 47)
    rgb = smooth((batch, 3, *size), g)
    labels = torch.zeros(batch, classes - 1)
    labels[0, 1] = labels[1, [0, 3, 4]] = labels[2, 2] = labels[3, [1, 2]] = 1
    walked_high = smooth((batch, classes, *size), g) * F.pad(labels, (1, 0), value=1)[..., None, None]
    walked_low = walked_high * torch.linspace(0.5, 1.5, classes)[None, :, None, None]
    boxes = torch.tensor([[0, 58, 0, 47], [3, 50, 5, 36], [0, 0, 0, 0], [11, 58, 0, 21]])
    expected = _per_crop_reference(par, rgb, walked_high, walked_low, labels, boxes)
    host = dict(box_list=boxes.tolist(), max_present=3)
    got = refine_propagated_cams(par.to(device), rgb.to(device), walked_high.to(device),
                                 walked_low.to(device), labels.to(device), boxes.to(device),
                                 **host)
    assert_same_labels(got, expected, device, "affinity pseudo label")
    assert (got[2] == 255).all()  # the crop of padding only
