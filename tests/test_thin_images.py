"""An image too thin for the encoder at some scale (a 20x300 strip) does not stop a folder: the
inference tools enlarge it for the network and bring its outputs back to its own size, and
tools/make_video.py draws it with the others. The enlargement itself (sizes, geometry, and no
change to any image that fits), and a scored split holding such an image."""

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import VOC_PHOTOS, load_tool
from PIL import Image

from afa.data import normalize, read_image
from afa.data.synthetic import DEMO_CLASSES, make_demo_dataset
from afa.inference import (min_side_size, predict_seg_logits, seg_input_sizes,
                           seg_work_size)
from afa.metrics import ConfusionMatrix
from afa.models import AFANet

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "demo.yaml"
NUM_CLASSES = len(DEMO_CLASSES)
LONG_SIDE = 128
SCALES = (1.0, 0.5, 0.75)
MIN_SIDE = 29  # AFA's encoder (tests/test_image_folder.py checks the number)
PHOTO = "2007_000063"  # a real 500x375 photo

infer_seg = load_tool("infer_seg")
infer_cam = load_tool("infer_cam")
make_video = load_tool("make_video")


# --------------------------------------------------------------------------------------------
# The sizes
# --------------------------------------------------------------------------------------------


def test_a_strip_is_enlarged_from_its_long_side_size_and_a_fitting_image_is_not():
    # 20x300 at long side 512 is 34x512; at scale 0.5 that is 17 px high: enlarged to 58 rows.
    assert seg_work_size(20, 300, SCALES, 512, MIN_SIDE) == (58, 874)
    assert seg_work_size(300, 20, SCALES, 512, MIN_SIDE) == (874, 58)
    for size in [(375, 500), (103, 103), (53, 77), (58, 512)]:
        assert seg_work_size(*size, SCALES, 512, MIN_SIDE) is None, size


@pytest.mark.parametrize("scales", [(1.0, 0.5, 0.75), (0.5, 0.75, 1.0, 1.25, 1.5), (0.3,),
                                    (1.0, 0.7)])
@pytest.mark.parametrize("size", [(20, 300), (1, 5000), (57, 57), (29, 2000), (300, 7)])
def test_every_input_of_the_enlarged_size_fits_and_the_aspect_is_kept(scales, size):
    work = min_side_size(*size, scales, MIN_SIDE)
    assert min(min(s) for s in seg_input_sizes(*work, scales, None)) >= MIN_SIDE
    if work != size:
        # The least enlargement that suffices: one pixel less on the short side is too thin.
        short = min(work)
        assert math.floor(min(scales) * (short - 1)) < MIN_SIDE
        assert max(work) == max(short, -(-max(size) * short // min(size)))


# --------------------------------------------------------------------------------------------
# The geometry of the enlarged prediction
# --------------------------------------------------------------------------------------------


class _ColourModel(nn.Module):
    """Logits = the input's channels average-pooled to stride 4, so the argmax of the prediction
    is the strongest channel of the image wherever it is; refuses inputs the encoder would."""

    def forward(self, x):
        if min(x.shape[-2:]) < MIN_SIDE:
            raise RuntimeError(f"input {tuple(x.shape[-2:])} is below {MIN_SIDE} px")
        return SimpleNamespace(seg_logits=F.avg_pool2d(x, 4, ceil_mode=True))


def test_the_enlarged_prediction_lies_where_the_image_is():
    """Left half channel 0, right half channel 2, and a channel-1 stripe in the top quarter of a
    20x300 strip: the prediction at the strip's size puts each where it was (not shifted,
    flipped or transposed)."""
    x = torch.zeros(1, 3, 20, 300)
    x[:, 0, :, :150] = 1.0
    x[:, 2, :, 150:] = 1.0
    x[:, 1, :5, 40:80] = 2.0
    model = _ColourModel()
    with pytest.raises(RuntimeError, match="below 29 px"):  # the authors' way stops here
        predict_seg_logits(model, x, SCALES, True, 512)
    pred = predict_seg_logits(model, x, SCALES, True, 512, min_side=MIN_SIDE)[0].argmax(0)
    assert pred.shape == (20, 300)
    assert (pred[8:, :140] == 0).all() and (pred[:, 160:] == 2).all()
    assert (pred[:3, 45:75] == 1).all() and (pred[10:, 45:75] == 0).all()


def test_a_fitting_image_gives_the_authors_logits_to_the_bit():
    torch.manual_seed(0)
    model = AFANet("mit_b0", num_classes=4, embedding_dim=16).eval()
    x = torch.randn(1, 3, 53, 77)
    torch.testing.assert_close(predict_seg_logits(model, x, SCALES, True, 96, min_side=MIN_SIDE),
                               predict_seg_logits(model, x, SCALES, True, 96), rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# The tools on a folder holding a strip
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny model and a folder: a real photo, a 20x300 strip, a 300x20 tower, a 60x80 image."""
    root = tmp_path_factory.mktemp("thin_images")
    torch.manual_seed(0)
    model = AFANet("mit_b0", num_classes=NUM_CLASSES, embedding_dim=32).eval()
    torch.save({"model": model.state_dict()}, root / "model.pth")
    images = root / "images"
    images.mkdir()
    (images / f"{PHOTO}.jpg").write_bytes((VOC_PHOTOS / "JPEGImages" / f"{PHOTO}.jpg").read_bytes())
    rng = np.random.default_rng(0)
    sizes = {"strip": (20, 300), "tower": (300, 20), "plain": (60, 80)}
    for name, size in sizes.items():
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(
            images / f"{name}.png")
    sizes[PHOTO] = (375, 500)
    return SimpleNamespace(root=root, model=model, ckpt=root / "model.pth", images=images,
                           sizes=sizes)


def _argv(folder, out, *extra):
    return ["--config", str(CONFIG), "--checkpoint", str(folder.ckpt), "--images",
            str(folder.images), "--out-dir", str(out), *extra, "model.embedding_dim=32",
            "device=cpu", f"infer.long_side={LONG_SIDE}"]


@pytest.fixture(scope="module")
def outputs(folder):
    seg, cam = folder.root / "seg", folder.root / "cam"
    assert infer_seg.main(_argv(folder, seg)) == 0
    assert infer_cam.main(_argv(folder, cam, "--max-side", str(LONG_SIDE))) == 0
    return SimpleNamespace(seg=seg, cam=cam)


def test_infer_seg_predicts_every_image_of_the_folder_at_its_own_size(folder, tmp_path, capsys):
    out = tmp_path / "seg"
    assert infer_seg.main(_argv(folder, out)) == 0
    stdout = capsys.readouterr().out
    assert "4 of 4 images predicted" in stdout
    notes = [line for line in stdout.splitlines() if line.startswith("note:")]
    # 20x300 at long side 128 is 8x128; 58 rows make 29 at scale 0.5.
    assert notes == [
        f"note: {folder.images / name}: a {w}x{h} image is enlarged to {ww}x{wh} for the "
        "network, whose inputs must be at least 29 px on each side at every scale; its outputs "
        "are at its own size"
        for name, (w, h), (ww, wh) in (("strip.png", (300, 20), (928, 58)),
                                       ("tower.png", (20, 300), (58, 928)))]
    for name, size in folder.sizes.items():
        with Image.open(out / "pred" / f"{name}.png") as png:
            assert png.mode == "P" and png.size[::-1] == size, name
            pred = np.array(png)
        with Image.open(out / "overlay" / f"{name}.png") as overlay:
            assert overlay.size[::-1] == size, name
        image = read_image(next(folder.images.glob(f"{name}.*")))
        logits = predict_seg_logits(folder.model, normalize(image)[None], SCALES, True,
                                    LONG_SIDE, min_side=MIN_SIDE)
        np.testing.assert_array_equal(pred, logits[0].argmax(0).numpy())


def test_infer_cam_labels_every_image_and_names_the_enlarged_ones(folder, outputs, capsys):
    for name, size in folder.sizes.items():
        for kind in ("cam_label", "refined", "affinity"):
            with Image.open(outputs.cam / kind / f"{name}.png") as png:
                assert png.mode == "P" and png.size[::-1] == size, (name, kind)
        heats = list((outputs.cam / "heat").glob(f"{name}_*.png"))
        assert heats and all(Image.open(heat).size[::-1] == size for heat in heats), name
    assert set(json.loads((outputs.cam / "classes.json").read_text())) == set(folder.sizes)
    # The strip is enlarged for the CAMs, and says so (the run of the fixture, again).
    assert infer_cam.main(_argv(folder, outputs.cam, "--max-side", str(LONG_SIDE),
                                "--overwrite")) == 0
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert len(notes) == 2 and "strip.png: a 300x20 image is enlarged to" in notes[0]


def test_make_video_draws_every_frame_of_the_folder(folder, outputs, tmp_path, capsys):
    gif = tmp_path / "folder.gif"
    assert make_video.main(["--images", str(folder.images), "--seg-dir", str(outputs.seg),
                            "--cam-dir", str(outputs.cam), "--out", str(gif)]) == 0
    with Image.open(gif) as animation:
        assert animation.n_frames == len(folder.sizes)
    assert f"{len(folder.sizes)} frames of" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------
# A scored split
# --------------------------------------------------------------------------------------------


def test_a_split_holding_a_strip_scores_its_prediction_at_the_mask_size(folder, tmp_path):
    data = tmp_path / "data"
    make_demo_dataset(data, num_train=1, num_val=2, size=64, progress=False)
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (20, 300, 3), dtype=np.uint8)).save(
        data / "JPEGImages" / "strip.jpg", quality=95)
    mask = np.zeros((20, 300), np.uint8)
    mask[:, 100:200] = 3
    mask[:2] = 255
    Image.fromarray(mask).save(data / "SegmentationClassAug" / "strip.png")
    names = (data / "val.txt").read_text().split() + ["strip"]
    (data / "val.txt").write_text("\n".join(names) + "\n")
    out = tmp_path / "out"
    argv = ["--config", str(CONFIG), "--checkpoint", str(folder.ckpt), "--split", "val",
            "--out-dir", str(out), f"data.root={data}", f"data.list_dir={data}",
            "model.embedding_dim=32", "device=cpu", f"infer.long_side={LONG_SIDE}"]
    assert infer_seg.main(argv) == 0
    matrix = ConfusionMatrix(NUM_CLASSES)
    for name in names:
        pred = np.array(Image.open(out / "pred" / f"{name}.png"))
        gt = np.array(Image.open(data / "SegmentationClassAug" / f"{name}.png"))
        assert pred.shape == gt.shape, name
        matrix.update(pred, gt)
    scores = json.loads((out / "scores.json").read_text())
    assert scores["num_scored"] == len(names) == 3
    assert scores["seg"]["miou"] == pytest.approx(matrix.compute().miou)
