"""afa.inference: the multi-scale + flip fusion against hand computations with a known stand-in
model, and the helpers the inference tools share (inputs, resume guard, pseudo-label scoring).
The comparison with the authors' protocol on real photos is tests/test_authors_protocol.py."""

import hashlib
import json
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from afa.atomic import write_atomic
from afa.data import DataError
from afa.data.synthetic import make_demo_dataset
from afa.inference import (FileFingerprint, ImageSet, OutputFiles, check_run_settings,
                           file_sha256, likely_classes, mask_ignored, predict_seg_logits,
                           resize_long_side, save_npy_atomic, seg_logits)
from afa.models import AFANet

STRIDE = 4


class LinearSeg(nn.Module):
    """A stand-in whose logits are known: ``W @ avgpool4(x) + ramp * column``.

    The column term ``(j + 0.5) / w`` depends on the position, not on the content, so the flipped
    input does not give the flipped output: the flip pair really has to be averaged. Records the
    inputs it sees (``seen``: their shapes).
    """

    def __init__(self, weight: torch.Tensor, ramp: torch.Tensor):
        super().__init__()
        self.weight, self.ramp = weight, ramp
        self.seen, self.inputs = [], []

    def forward(self, x):
        self.seen.append(tuple(x.shape))
        self.inputs.append(x)
        pooled = F.avg_pool2d(x, STRIDE)  # (B, 3, h, w)
        width = pooled.shape[-1]
        column = (torch.arange(width, dtype=x.dtype) + 0.5) / width  # (w,)
        logits = torch.einsum("ck,bkhw->bchw", self.weight, pooled)
        return SimpleNamespace(seg_logits=logits + self.ramp[:, None, None] * column)


def _model(num_classes=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return LinearSeg(torch.randn(num_classes, 3, generator=gen),
                     torch.randn(num_classes, generator=gen) * 3)


def _by_hand(model, image, scales, flip, long_side):
    """docs/method.md, 'Inference' (the authors' script) written out plainly: one forward per
    scale and per flip; every scale's logits resized to the grid of the first scale listed, flip pair averaged,
    maximum over scales there, then one upsampling to the image."""
    height, width = image.shape[-2:]
    ratio = long_side / max(height, width)
    base = F.interpolate(image, size=(int(height * ratio), int(width * ratio)), mode="bilinear",
                         align_corners=False)
    grid, per_scale = None, []
    for scale in scales:
        x = F.interpolate(base, scale_factor=scale, mode="bilinear", align_corners=False)
        logits = model(x).seg_logits
        grid = grid or logits.shape[-2:]

        def to_grid(t):
            return F.interpolate(t, size=grid, mode="bilinear", align_corners=False)

        logits = to_grid(logits)
        if flip:
            logits = 0.5 * (logits + to_grid(model(torch.flip(x, dims=[3])).seg_logits).flip(3))
        per_scale.append(logits)
    fused = torch.stack(per_scale).max(dim=0).values
    return F.interpolate(fused, size=(height, width), mode="bilinear", align_corners=False)


def test_resize_long_side_keeps_aspect_and_enlarges():
    image = torch.rand(1, 3, 40, 60)
    assert resize_long_side(image, 48).shape[-2:] == (32, 48)
    assert resize_long_side(image, 120).shape[-2:] == (80, 120)
    assert resize_long_side(image, None) is image
    # The authors compute the ratio first: 103 * (512 / 103) is 511.99..., so 511, not 512.
    assert resize_long_side(torch.rand(1, 3, 103, 103), 512).shape[-2:] == (511, 511)


def test_fusion_equals_hand_computation_and_sees_the_right_sizes():
    model = _model()
    image = torch.randn(1, 3, 40, 60)
    scales = (1.0, 0.5, 0.75)
    fused = predict_seg_logits(model, image, scales=scales, flip=True, long_side=48)
    # Long side 60 -> 48 gives 32x48; each scale runs with its flip in one batch of two.
    assert model.seen == [(2, 3, 32, 48), (2, 3, 16, 24), (2, 3, 24, 36)]
    model.seen.clear()
    assert fused.shape == (1, 5, 40, 60)
    torch.testing.assert_close(fused, _by_hand(model, image, scales, True, 48), atol=1e-5,
                               rtol=1e-5)
    no_flip = predict_seg_logits(model, image, scales=scales, flip=False, long_side=48)
    torch.testing.assert_close(no_flip, _by_hand(model, image, scales, False, 48), atol=1e-5,
                               rtol=1e-5)
    assert (fused - no_flip).abs().max() > 0.1  # the flip matters for this model
    # A batch is the same as its images one by one.
    batch = torch.randn(2, 3, 40, 60)
    together = predict_seg_logits(model, batch, scales=scales, long_side=48)
    apart = torch.cat([predict_seg_logits(model, b[None], scales=scales, long_side=48)
                       for b in batch])
    torch.testing.assert_close(together, apart, atol=1e-5, rtol=1e-5)


def test_scales_sample_like_scale_factor_and_fuse_on_the_scale_one_grid():
    """Where ``s * side`` is not whole, ``scale_factor=s`` samples at ``(i + 0.5) / s - 0.5``
    (the authors' call), not at the positions of an explicit ``int(s * side)`` size."""
    model = _model()
    image = torch.randn(1, 3, 34, 50)  # long side 50: 34 x 50, and 0.75 * 34 = 25.5
    fused = predict_seg_logits(model, image, scales=(0.75, 1.0), flip=False, long_side=50)
    assert model.seen == [(1, 3, 34, 50), (1, 3, 25, 37)]  # scale 1 (the grid) runs first
    expected = F.interpolate(image, scale_factor=0.75, mode="bilinear", align_corners=False)
    torch.testing.assert_close(model.inputs[1], expected, rtol=0, atol=0)
    by_size = F.interpolate(image, size=(25, 37), mode="bilinear", align_corners=False)
    assert (model.inputs[1] - by_size).abs().max() > 0.05
    torch.testing.assert_close(fused, _by_hand(model, image, (1.0, 0.75), False, 50),
                               atol=1e-5, rtol=1e-5)
    # Without 1.0 among the scales the grid is the largest scale's.
    no_one = predict_seg_logits(model, image, scales=(0.5, 1.5), flip=True, long_side=50)
    torch.testing.assert_close(no_one, _by_hand(model, image, (1.5, 0.5), True, 50), atol=1e-5,
                               rtol=1e-5)


def test_seg_logits_of_afanet_skips_attention_maps_and_affinity(monkeypatch):
    torch.manual_seed(0)
    model = AFANet("mit_b0", num_classes=5, embedding_dim=16).eval()
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        full = model(x).seg_logits
    calls = []
    encoder_forward = model.encoder.forward
    monkeypatch.setattr(model.encoder, "forward",
                        lambda x, return_attn=True: calls.append(return_attn)
                        or encoder_forward(x, return_attn=return_attn))
    monkeypatch.setattr(model, "_affinity", lambda *a: pytest.fail("affinity computed"))
    with torch.no_grad():
        fast = seg_logits(model, x)
    assert calls == [False]
    torch.testing.assert_close(fast, full, atol=1e-5, rtol=1e-4)


def test_fusion_closed_form_on_a_flat_image():
    """A flat image makes the content term constant (W c); the column ramp then tells apart
    averaging the flip pair (ramp / 2 everywhere) from not flipping (the ramp across the image,
    the same at every scale, so the maximum over scales is that ramp)."""
    model = _model(num_classes=3, seed=1)
    colour = torch.tensor([0.3, -1.2, 0.8])
    image = colour[None, :, None, None].expand(1, 3, 48, 64).contiguous()
    content = model.weight @ colour  # (C,)
    flipped = predict_seg_logits(model, image, scales=(1.0, 0.5, 0.75), flip=True, long_side=64)
    expected = (content + model.ramp / 2)[None, :, None, None].expand_as(flipped)
    torch.testing.assert_close(flipped, expected, atol=1e-5, rtol=1e-5)

    plain = predict_seg_logits(model, image, scales=(1.0, 0.5), flip=False, long_side=64)
    column = (torch.arange(64) + 0.5) / 64
    expected = content[:, None, None] + model.ramp[:, None, None] * column  # (C, H, W)
    # Bilinear upsampling reproduces a linear ramp exactly away from the clamped borders; the
    # half-scale map has 8 columns at stride 4 of 32, each covering 8 image columns.
    inner = slice(8, 56)
    torch.testing.assert_close(plain[0, :, :, inner], expected[:, :, inner].expand(3, 48, -1),
                               atol=1e-5, rtol=1e-5)


def test_likely_classes_keeps_confident_and_winning_classes():
    probs = np.zeros((4, 2, 2), dtype=np.float32)
    probs[0] = 0.6
    probs[1] = 0.395
    probs[2] = 0.005
    probs[3, 0, 0] = 0.001  # never likely, never the argmax
    probs[:, 1, 1] = [0.3, 0.3, 0.004, 0.396]  # class 3 wins one pixel with a low probability
    assert likely_classes(probs, 0.01).tolist() == [0, 1, 3]
    assert likely_classes(probs, 0.0).tolist() == [0, 1, 2, 3]


def test_mask_ignored_scores_committed_pixels_and_counts_the_rest():
    pred = np.array([[1, 255, 0], [255, 2, 2]])
    gt = np.array([[1, 1, 255], [0, 2, 1]])
    pred_out, gt_out, ignored, valid = mask_ignored(pred, gt)
    assert gt_out.tolist() == [[1, 255, 255], [255, 2, 1]]
    assert (pred_out != 255).all()
    assert (ignored, valid) == (2, 5)  # two ignored pixels among the five valid GT pixels
    with pytest.raises(ValueError, match="shape"):
        mask_ignored(pred, gt[:, :2])


def test_run_settings_guard(tmp_path):
    settings = {"scales": (1.0, 0.5), "crf": None, "checkpoint": "/a.pth"}
    check_run_settings(tmp_path, settings, overwrite=False)  # nothing there yet
    stored = '{"scales": [1.0, 0.5], "crf": null, "checkpoint": "/a.pth"}'
    (tmp_path / "run.json").write_text(stored)
    check_run_settings(tmp_path, settings, overwrite=False)  # tuples compare like stored lists
    other = dict(settings, crf={"iterations": 10})
    with pytest.raises(ValueError, match="crf: None -> .*--overwrite"):
        check_run_settings(tmp_path, other, overwrite=False)
    check_run_settings(tmp_path, other, overwrite=True)


def test_atomic_writes_leave_no_temporary_files(tmp_path):
    save_npy_atomic(tmp_path / "a" / "x.npy", np.arange(3, dtype=np.float16))
    assert np.load(tmp_path / "a" / "x.npy").tolist() == [0, 1, 2]

    def failing(path):
        path.write_text("partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(tmp_path / "a" / "y.txt", failing)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["x.npy"]
    # A failed rewrite keeps the complete old file; a link is written atomically too.
    with pytest.raises(OSError, match="disk full"):
        write_atomic(tmp_path / "a" / "x.npy", failing)
    assert np.load(tmp_path / "a" / "x.npy").tolist() == [0, 1, 2]
    stale = tmp_path / "a" / f".link.tmp{os.getpid()}"  # as a killed process may leave it
    stale.symlink_to("nowhere")
    write_atomic(tmp_path / "a" / "link", lambda tmp: tmp.symlink_to("x.npy"))
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["link", "x.npy"]
    assert (tmp_path / "a" / "link").is_symlink()


def test_image_set_labels_from_label_file_or_mask(tmp_path):
    labels = make_demo_dataset(tmp_path, num_train=2, num_val=2, size=32, progress=False)
    with_file = ImageSet(tmp_path, tmp_path / "val.txt", 9, label_file=tmp_path / "cls_labels.json")
    from_mask = ImageSet(tmp_path, tmp_path / "val.txt", 9, label_file=None)
    for name in with_file.names:
        assert with_file.classes(name) == labels[name] == from_mask.classes(name)
        assert with_file.image(name).shape == (32, 32, 3)
        assert with_file.mask(name, (32, 32)).shape == (32, 32)
    name = with_file.names[0]
    with pytest.raises(DataError, match=r"mask size \(32, 32\) differs from image size \(40, 32\)"):
        with_file.mask(name, (32, 40))
    with_file.mask_path(name).unlink()
    assert not with_file.has_mask(name)
    with pytest.raises(DataError, match=f"no image-level labels for '{name}'"):
        from_mask.classes(name)
    with_file.image_path(name).unlink()
    with pytest.raises(DataError, match=f"{name}.jpg: image file not found"):
        with_file.image(name)


def test_output_files_done_needs_every_kind(tmp_path):
    files = OutputFiles(tmp_path, {"pred": ".png", "logits": ".npy"})
    files.make_dirs()
    files.path("pred", "a").write_bytes(b"")
    assert not files.done("a")
    files.path("logits", "a").write_bytes(b"")
    assert files.done("a")


def test_run_settings_compare_the_checkpoint_content_not_its_path(tmp_path):
    settings = {"checkpoint": "/runs/a/best.pth", "checkpoint_sha256": "ab" * 32, "crf": None}
    (tmp_path / "run.json").write_text(json.dumps(settings))
    # The same weights moved elsewhere: their outputs are still theirs.
    check_run_settings(tmp_path, dict(settings, checkpoint="/b/renamed.pth"), overwrite=False)
    # Other weights at the same path: refused, saying why in one line.
    with pytest.raises(ValueError, match=r"the checkpoint's content changed.*--overwrite") as info:
        check_run_settings(tmp_path, dict(settings, checkpoint_sha256="cd" * 32), overwrite=False)
    assert "\n" not in str(info.value)
    # A directory written before the content was recorded cannot vouch for its weights.
    del settings["checkpoint_sha256"]
    (tmp_path / "run.json").write_text(json.dumps(settings))
    with pytest.raises(ValueError, match="did not record the checkpoint's content"):
        check_run_settings(tmp_path, dict(settings, checkpoint_sha256="cd" * 32), overwrite=False)


def test_file_fingerprint_hashes_in_chunks_and_sees_a_replaced_file(tmp_path):
    path = tmp_path / "best.pth"
    data = os.urandom(3 * 1024 + 17)
    path.write_bytes(data)
    assert file_sha256(path, chunk_size=1024) == hashlib.sha256(data).hexdigest()
    fingerprint = FileFingerprint(path)
    assert fingerprint.sha256 == hashlib.sha256(data).hexdigest()
    fingerprint.check_unchanged()
    # A trainer saving a new best.pth (atomically: a new file renamed over it) meanwhile.
    new = tmp_path / "tmp.pth"
    new.write_bytes(data[::-1])
    os.replace(new, path)
    with pytest.raises(ValueError, match="changed while"):
        fingerprint.check_unchanged()
