"""Our inference against the authors' released test protocol, on real VOC photos (voc_photos).

The reference below restates, in plain torch and pydensecrf calls, what the authors'
``scripts/test_msc_flip.py`` (github.com/rulixiang/afa, commit 2c87c7f) does; it does not call
``afa.inference``. Facts it follows, with the line of their script:

- long side to 512: ``ratio = 512 / max(h, w)``, size ``(int(h * ratio), int(w * ratio))``,
  bilinear, ``align_corners=False`` (lines 52-55);
- scale 1 with its flip in one batch, the pair averaged; its logit map sets the grid
  (lines 59-66);
- every other scale: ``F.interpolate(inputs, scale_factor=s, mode='bilinear',
  align_corners=False)`` (line 70), logits of the pair resized to the scale-1 grid, then averaged
  (lines 73-76);
- element-wise maximum of the raw logits over the scales (line 79), upsampled once to the image
  for the argmax (lines 84-85);
- CRF (lines 106-113, 132-138 and ``utils/dcrf.py``): the fused logits upsampled to the image,
  softmax, ``unary_from_softmax`` (clip 1e-5), Gaussian sxy 3 compat 3, bilateral sxy 64 srgb 5
  compat 4 on the uint8 RGB image, 10 mean-field iterations;
- input normalisation ``(img - mean) / std`` computed in float64, stored as float32
  (``datasets/transforms.py`` ``normalize_img``).

A tiny random AFANet is used: its predictions are noisy, full of boundaries, which is where
fusion protocols part. ``tools/infer_seg.py`` is run end to end without CRF; the CRF step is
compared on the same fused logits (that the tool feeds the CRF exactly the softmax of its fused
logits is pinned in tests/test_infer_seg.py). One test shows that the comparison can fail: the
protocol this project used before (each scale resized to ``int(s * side)``, its logits upsampled
to the image, maximum taken there) agrees on fewer pixels. Measured on all 60 photos of the larger
optional photo set (conftest.py): 100% of pixels equal without CRF (largest logit difference
4e-7), the old protocol 98.6% (worst photo 96.7%). The four photos the tests use, one per size
in SIZES, are in the repository's set (the same four ids in both sets).
"""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import VOC_PHOTOS, load_tool
from PIL import Image

from afa.constants import IMAGENET_MEAN, IMAGENET_STD
from afa.crf import dense_crf
from afa.data import normalize, read_image
from afa.models import AFANet

REPO = Path(__file__).resolve().parents[1]
NUM_CLASSES = 21
PAPER_SCALES = (1.0, 0.5, 0.75)
# (width, height): two portraits and two landscapes. All but the common 375x500 have a short
# side (after the resize to 512) whose half or three quarters is not whole, e.g. 332x500 ->
# 339x512 -> 0.75: 254.25, where scale_factor and an explicit size sample differently.
SIZES = [(375, 500), (332, 500), (500, 402), (300, 219)]
MIN_AGREEMENT = 0.999
MIN_AGREEMENT_CRF = 0.995

needs_crf = pytest.mark.skipif(importlib.util.find_spec("pydensecrf") is None,
                               reason="pydensecrf2 is not installed")


def authors_logits(model, image, scales=PAPER_SCALES, long_side=512):
    """(C, H, W) fused logits of ``image`` ((H, W, 3) uint8), the authors' way."""
    mean, std = np.array(IMAGENET_MEAN), np.array(IMAGENET_STD)
    x = torch.from_numpy(((image - mean) / std).astype(np.float32).transpose(2, 0, 1))[None]
    height, width = image.shape[:2]
    ratio = long_side / max(height, width)
    x = F.interpolate(x, size=(int(height * ratio), int(width * ratio)), mode="bilinear",
                      align_corners=False)
    with torch.no_grad():
        pair = model(torch.cat([x, x.flip(-1)])).seg_logits
        grid = pair.shape[-2:]
        per_scale = [(pair[0] + pair[1].flip(-1)) / 2]
        for s in scales:
            if s != 1.0:
                xs = F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False)
                pair = model(torch.cat([xs, xs.flip(-1)])).seg_logits
                pair = F.interpolate(pair, size=grid, mode="bilinear", align_corners=False)
                per_scale.append((pair[0] + pair[1].flip(-1)) / 2)
        fused = torch.stack(per_scale).max(dim=0).values[None]
        return F.interpolate(fused, size=(height, width), mode="bilinear",
                             align_corners=False)[0]


def authors_crf(image, logits):
    """(H, W) CRF prediction from the fused logits, the authors' way."""
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_softmax

    probs = F.softmax(logits[None], dim=1)[0].numpy()
    classes, height, width = probs.shape
    crf = dcrf.DenseCRF2D(width, height, classes)
    crf.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs)))
    crf.addPairwiseGaussian(sxy=3, compat=3)
    crf.addPairwiseBilateral(sxy=64, srgb=5, rgbim=np.array(image, order="C"), compat=4)
    return np.array(crf.inference(10)).reshape(classes, height, width).argmax(0)


def previous_logits(model, x, scales=PAPER_SCALES, long_side=512):
    """This project's protocol before it followed the authors: every scale resized to
    ``int(s * side)``, its flip-averaged logits upsampled to the image, maximum there."""
    height, width = x.shape[-2:]
    ratio = long_side / max(height, width)
    base = F.interpolate(x, size=(int(height * ratio), int(width * ratio)), mode="bilinear",
                         align_corners=False)
    fused = None
    with torch.no_grad():
        for s in scales:
            xs = F.interpolate(base, size=(int(s * base.shape[-2]), int(s * base.shape[-1])),
                               mode="bilinear", align_corners=False)
            pair = F.interpolate(model(torch.cat([xs, xs.flip(-1)])).seg_logits,
                                 size=(height, width), mode="bilinear", align_corners=False)
            logits = (pair[:1] + pair[1:].flip(-1)) / 2
            fused = logits if fused is None else torch.maximum(fused, logits)
    return fused[0]


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """One photo id per size in SIZES, a tiny random model and the authors' predictions."""
    root = VOC_PHOTOS  # the voc_photos fixture, usable at module scope
    by_size = {}
    for path in sorted((root / "JPEGImages").glob("*.jpg")):
        with Image.open(path) as img:
            by_size.setdefault(img.size, path.stem)
    ids = [by_size[size] for size in SIZES]
    torch.manual_seed(0)
    model = AFANet("mit_b0", num_classes=NUM_CLASSES, embedding_dim=32).eval()
    images = {name: read_image(root / "JPEGImages" / f"{name}.jpg") for name in ids}
    reference = {name: authors_logits(model, image) for name, image in images.items()}
    tmp = tmp_path_factory.mktemp("authors_protocol")
    (tmp / "val.txt").write_text("\n".join(ids) + "\n")
    torch.save({"model": model.state_dict()}, tmp / "model.pth")
    return {"root": root, "ids": ids, "images": images, "reference": reference, "tmp": tmp,
            "model": model}


def _agreement(a, b):
    return float((np.asarray(a) == np.asarray(b)).mean())


def test_the_photos_have_the_shapes(photos):
    assert len(photos["ids"]) == len(SIZES)
    for name, (width, height) in zip(photos["ids"], SIZES):
        assert photos["images"][name].shape == (height, width, 3)


def test_infer_seg_predictions_equal_the_authors_protocol(photos):
    infer_seg = load_tool("infer_seg")
    out = photos["tmp"] / "plain"
    argv = ["--config", str(REPO / "configs" / "voc.yaml"),
            "--checkpoint", str(photos["tmp"] / "model.pth"), "--split", "val",
            "--out-dir", str(out), "--protocol", "paper", "--no-overlay",
            f"data.root={photos['root']}", f"data.list_dir={photos['tmp']}",
            "model.backbone=mit_b0", "model.embedding_dim=32", "device=cpu"]
    assert infer_seg.main(argv) == 0
    assert json.loads((out / "run.json").read_text())["protocol"] == "paper"
    agreements = [_agreement(np.array(Image.open(out / "pred" / f"{name}.png")),
                             photos["reference"][name].argmax(0))
                  for name in photos["ids"]]
    assert min(agreements) >= MIN_AGREEMENT, agreements


def test_previous_protocol_fails_the_same_comparison(photos):
    """Guards the test above: the old fusion (and input sizes) would not have passed it."""
    agreements = []
    for name in photos["ids"][1:3]:
        old = previous_logits(photos["model"], normalize(photos["images"][name])[None])
        agreements.append(_agreement(old.argmax(0), photos["reference"][name].argmax(0)))
    assert max(agreements) < MIN_AGREEMENT, agreements


@needs_crf
def test_crf_equals_the_authors_crf(photos):
    for name in photos["ids"][:2]:  # a portrait and an odd size; a CRF takes ~0.5 s
        image, logits = photos["images"][name], photos["reference"][name]
        ours = dense_crf(image, logits.softmax(0).numpy()).argmax(0)
        assert _agreement(ours, authors_crf(image, logits)) >= MIN_AGREEMENT_CRF, name
