"""A folder of images or video frames through the inference tools (``--images``) and
tools/make_video.py: ids and order, odd sizes and modes, the outputs and their sizes and palette,
classes taken from the classifier, resume, torchrun sharding, the GIF, and bad input; real
photos by a glob. A tiny random model throughout."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn
from conftest import load_tool
from PIL import Image

from afa.constants import color_palette
from afa.data import DataError, normalize
from afa.data.folder import ImageFolder
from afa.data.synthetic import DEMO_CLASSES, make_demo_frames, render_frames
from afa.inference import classes_from_logits, predict_seg_logits, seg_input_sizes
from afa.models import AFANet
from afa.viz import label_legend

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "demo.yaml"
NUM_CLASSES = len(DEMO_CLASSES)
LONG_SIDE = 96
SCALES = (1.0, 0.5, 0.75)
PALETTE = color_palette(256).ravel().tolist()
FRAMES, FRAME_H, FRAME_W = 5, 70, 90  # not multiples of 16

infer_seg = load_tool("infer_seg")
infer_cam = load_tool("infer_cam")
make_video = load_tool("make_video")


def _save(path, array, mode=None, **kwargs):
    image = Image.fromarray(array)
    if mode:
        image = image.convert(mode)
    image.save(path, **kwargs)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny model, demo frames, and photos of odd sizes and modes (upright sizes recorded)."""
    root = tmp_path_factory.mktemp("image_folder")
    torch.manual_seed(0)
    model = AFANet("mit_b0", num_classes=NUM_CLASSES, embedding_dim=32).eval()
    torch.save({"model": model.state_dict()}, root / "model.pth")
    frames = root / "frames"
    make_demo_frames(frames, FRAMES, FRAME_H, FRAME_W, seed=1)
    photos = root / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    pixels = lambda h, w: rng.integers(0, 256, (h, w, 3), dtype=np.uint8)  # noqa: E731
    _save(photos / "land.jpg", pixels(53, 77), quality=90)  # (H, W) = (53, 77)
    _save(photos / "portrait_grey.png", pixels(100, 66), "L")
    _save(photos / "rgba.png", pixels(57, 81), "RGBA")
    _save(photos / "palette.png", pixels(64, 64), "P")
    _save(photos / "tiny.png", pixels(36, 40))  # below what the CAM's 0.5 scale needs
    _save(photos / "big.jpg", pixels(100, 130), quality=90)  # above the tests' --max-side
    (photos / "notes.txt").write_text("not an image")
    sizes = {p.stem: Image.open(p).size[::-1] for p in photos.iterdir() if p.suffix != ".txt"}
    return SimpleNamespace(root=root, model=model, ckpt=root / "model.pth", frames=frames,
                           photos=photos, sizes=sizes)


def _overrides(**extra):
    values = {"model.embedding_dim": 32, "device": "cpu",
              "infer.long_side": LONG_SIDE, **extra}
    return [f"{k}={v}" for k, v in values.items()]


def _seg_argv(setup, images, out, *extra):
    return ["--config", str(CONFIG), "--checkpoint", str(setup.ckpt), "--images", str(images),
            "--out-dir", str(out), *extra, *_overrides()]


def _cam_argv(setup, images, out, *extra):
    return ["--config", str(CONFIG), "--checkpoint", str(setup.ckpt), "--images", str(images),
            "--out-dir", str(out), *extra, *_overrides()]


@pytest.fixture(scope="module")
def frame_outputs(setup):
    """infer_seg and infer_cam on the frames, once (make_video reads them)."""
    seg, cam = setup.root / "frames_seg", setup.root / "frames_cam"
    assert infer_seg.main(_seg_argv(setup, setup.frames, seg)) == 0
    assert infer_cam.main(_cam_argv(setup, setup.frames, cam)) == 0
    return SimpleNamespace(seg=seg, cam=cam)


# --------------------------------------------------------------------------------------------
# The source of images
# --------------------------------------------------------------------------------------------


def test_folder_ids_order_modes_and_orientation(setup, tmp_path):
    folder = ImageFolder(setup.photos)
    assert folder.names == ["big", "land", "palette", "portrait_grey", "rgba", "tiny"]  # no .txt
    for name in folder.names:
        image = folder.image(name)
        assert image.dtype == np.uint8 and image.shape == (*setup.sizes[name], 3), name
        assert not folder.has_mask(name)
    rgba = np.asarray(Image.open(setup.photos / "rgba.png"))
    np.testing.assert_array_equal(folder.image("rgba"), rgba[..., :3])  # alpha dropped

    # Numbers compare as numbers; hidden files are left out; the suffix's case does not matter.
    frames = tmp_path / "numbered"
    frames.mkdir()
    for name in ("f10.png", "f2.PNG", "f1.jpg", ".f3.png"):
        _save(frames / name, np.zeros((32, 32, 3), np.uint8))
    assert ImageFolder(frames).names == ["f1", "f2", "f10"]

    # A photo whose EXIF says "rotate 90" is read upright, as viewers show it.
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.zeros((40, 60, 3), np.uint8)).save(tmp_path / "phone.jpg", exif=exif)
    assert ImageFolder(tmp_path / "phone.jpg").image("phone").shape == (60, 40, 3)


def test_globs_give_relative_ids_and_duplicates_are_refused(tmp_path):
    for sub in ("day1", "day2"):
        (tmp_path / "trip" / sub).mkdir(parents=True)
        _save(tmp_path / "trip" / sub / "beach.jpg", np.zeros((32, 32, 3), np.uint8))
    _save(tmp_path / "trip" / "top.png", np.zeros((32, 32, 3), np.uint8))
    assert ImageFolder(f"{tmp_path}/trip/**/*.jpg").names == ["day1/beach", "day2/beach"]
    assert ImageFolder(f"{tmp_path}/trip/**/*").names == ["day1/beach", "day2/beach", "top"]
    assert ImageFolder(f"{tmp_path}/trip/*.png").names == ["top"]
    assert ImageFolder(tmp_path / "trip").names == ["top"]  # a folder: its own files only

    _save(tmp_path / "trip" / "top.jpg", np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(DataError, match=r"two images have the id 'top' \(.*top\.(jpg|png) and "):
        ImageFolder(tmp_path / "trip")


def test_empty_folders_and_patterns_without_images_are_named(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=f"{empty}: no .jpg/.jpeg/.png images in this folder "
                                        r"\(it is empty\)"):
        ImageFolder(empty)
    (empty / "a.txt").write_text("x")
    with pytest.raises(DataError, match=r"holds 1 other files"):
        ImageFolder(empty)
    with pytest.raises(DataError, match=r"the pattern matches nothing"):
        ImageFolder(f"{tmp_path}/*.jpg")
    with pytest.raises(DataError, match=r"matches 1 paths, none of them"):
        ImageFolder(f"{empty}/*")
    with pytest.raises(DataError, match="no such folder or image file"):
        ImageFolder(tmp_path / "absent")


def test_demo_frames_repeat_and_move(tmp_path):
    first = render_frames(np.random.default_rng(3), 4, FRAME_H, FRAME_W)
    again = render_frames(np.random.default_rng(3), 4, FRAME_H, FRAME_W)
    for (image, mask), (image2, mask2) in zip(first, again):
        assert image.shape == (FRAME_H, FRAME_W, 3) and mask.shape == (FRAME_H, FRAME_W)
        np.testing.assert_array_equal(image, image2)
        np.testing.assert_array_equal(mask, mask2)
    centres = [np.argwhere((m > 0) & (m < 255)).mean(0) for _, m in first]
    assert np.abs(centres[-1] - centres[0]).max() > 10  # the objects glide
    still = [(image, mask == 0) for image, mask in first]
    common = still[0][1] & still[-1][1]  # background in both: the same pixels
    np.testing.assert_array_equal(still[0][0][common], still[-1][0][common])

    out = tmp_path / "frames"
    argv = ["--frames", "3", "--size", "40", "--width", "50", "--out", str(out)]
    assert load_tool("make_demo_data").main(argv) == 0
    assert [p.name for p in sorted(out.iterdir())] == [f"frame_00{i}.png" for i in range(3)]
    assert Image.open(out / "frame_002.png").size == (50, 40)


def test_legend_names_the_classes_present_in_their_colours():
    label = np.zeros((20, 30), np.uint8)
    label[:5, :5], label[10:, 10:], label[0, -1] = 1, 5, 255
    strip = label_legend(label, DEMO_CLASSES, 300)
    assert strip.shape == (22, 300, 3) and strip.dtype == np.uint8
    colours = {tuple(c) for c in strip.reshape(-1, 3).tolist()}
    palette = color_palette(256)
    assert tuple(palette[1]) in colours and tuple(palette[5]) in colours
    assert tuple(palette[2]) not in colours and tuple(palette[255]) not in colours
    narrow = label_legend(label, DEMO_CLASSES, 60)  # one entry per row
    assert narrow.shape == (44, 60, 3)
    # 25 of 600 pixels are class 1: left out above a fraction of 1/24 (make_video's option).
    assert label_legend(label, DEMO_CLASSES, 60, min_fraction=0.05).shape == (22, 60, 3)


def test_classes_from_logits():
    logits = torch.tensor([-1.0, 2.0, 0.5, -3.0])
    assert classes_from_logits(logits) == [2, 3]  # positive ones, largest first, 1-based
    assert classes_from_logits(-logits.abs() - 1) == [3]  # none positive: the largest alone
    assert classes_from_logits(logits, top_k=3) == [2, 3, 1]


class _Recorder(nn.Module):
    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x):
        self.seen.append(tuple(x.shape[-2:]))
        return SimpleNamespace(seg_logits=x.new_zeros(x.shape[0], 2, x.shape[2] // 4,
                                                      x.shape[3] // 4))


@pytest.mark.parametrize("size", [(375, 500), (103, 103), (53, 77), (1000, 90)])
def test_seg_input_sizes_are_what_the_model_sees(size):
    model = _Recorder()
    predict_seg_logits(model, torch.zeros(1, 3, *size), SCALES, flip=False, long_side=512)
    assert seg_input_sizes(*size, SCALES, 512) == model.seen


def test_min_input_side_is_the_encoder_limit():
    encoder = AFANet("mit_b0", num_classes=3, embedding_dim=8).encoder.eval()
    side = encoder.min_input_side
    assert side == 29  # AFA's strides (4, 2, 2, 1) with reductions (8, 4, 2, 1)
    with torch.no_grad():
        encoder(torch.zeros(1, 3, side, 64), return_attn=False)
        with pytest.raises(RuntimeError):
            encoder(torch.zeros(1, 3, side - 1, 64), return_attn=False)


# --------------------------------------------------------------------------------------------
# infer_seg --images
# --------------------------------------------------------------------------------------------


def test_infer_seg_segments_a_folder_of_any_photo_and_resumes(setup, tmp_path, capsys):
    out = tmp_path / "seg"
    assert infer_seg.main(_seg_argv(setup, setup.photos, out)) == 0
    assert "6 of 6 images predicted" in capsys.readouterr().out
    folder = ImageFolder(setup.photos)
    for name in folder.names:
        with Image.open(out / "pred" / f"{name}.png") as png:
            assert png.mode == "P" and png.getpalette()[:768] == PALETTE
            assert png.size[::-1] == setup.sizes[name], name
            pred = np.array(png)
        with Image.open(out / "overlay" / f"{name}.png") as overlay:
            assert overlay.mode == "RGB" and overlay.size[::-1] == setup.sizes[name]
        logits = predict_seg_logits(setup.model, normalize(folder.image(name))[None], SCALES,
                                    True, LONG_SIDE)
        np.testing.assert_array_equal(pred, logits[0].argmax(0).numpy())
    assert not (out / "scores.json").exists()  # no masks, no scores
    assert json.loads((out / "run.json").read_text())["images"] == os.path.abspath(setup.photos)

    for path in out.rglob("*.png"):
        os.utime(path, ns=(0, 0))
    assert infer_seg.main(_seg_argv(setup, setup.photos, out)) == 0
    assert "0 of 6 images predicted, 6 reused" in capsys.readouterr().out
    assert {p.stat().st_mtime_ns for p in out.rglob("*.png")} == {0}


def test_split_and_images_exclude_each_other(setup, tmp_path, capsys):
    for tool in (infer_seg, infer_cam):
        with pytest.raises(SystemExit) as exit_info:
            tool.parse_args(["--config", "c", "--checkpoint", "k", "--out-dir", "o",
                             "--split", "val", "--images", str(setup.photos)])
        assert exit_info.value.code == 2
        assert "not allowed with argument" in capsys.readouterr().err


def test_torchrun_shards_a_folder_like_one_process(setup, frame_outputs, tmp_path):
    sharded = tmp_path / "sharded"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "tools" / "infer_seg.py"),
           *_seg_argv(setup, setup.frames, sharded, "--no-overlay")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in ImageFolder(setup.frames).names:
        np.testing.assert_array_equal(
            np.array(Image.open(frame_outputs.seg / "pred" / f"{name}.png")),
            np.array(Image.open(sharded / "pred" / f"{name}.png")))


def test_an_image_too_narrow_for_the_network_is_enlarged_and_named(setup, tmp_path, capsys):
    """It used to stop the run (exit 2); now it is predicted at a size the encoder takes and
    its prediction comes back at its own size (tests/test_thin_images.py: the details)."""
    thin = tmp_path / "thin"
    thin.mkdir()
    _save(thin / "strip.png", np.zeros((30, 600, 3), np.uint8))
    assert infer_seg.main(_seg_argv(setup, thin, tmp_path / "out")) == 0
    out = capsys.readouterr().out
    assert f"note: {thin / 'strip.png'}: a 600x30 image is enlarged to 1392x58" in out
    assert Image.open(tmp_path / "out" / "pred" / "strip.png").size == (600, 30)


# --------------------------------------------------------------------------------------------
# infer_cam --images
# --------------------------------------------------------------------------------------------


def _count_classification_forwards(monkeypatch) -> list:
    """Record every ``AFANet.forward(..., cls_only=True)`` call from now on."""
    calls, forward = [], AFANet.forward

    def counting(self, x, cls_only=False):
        if cls_only:
            calls.append(tuple(x.shape))
        return forward(self, x, cls_only)

    monkeypatch.setattr(AFANet, "forward", counting)
    return calls


def test_infer_cam_takes_the_classes_from_the_classifier(setup, tmp_path, capsys, monkeypatch):
    out = tmp_path / "cam"
    calls = _count_classification_forwards(monkeypatch)
    assert infer_cam.main(_cam_argv(setup, setup.photos, out, "--max-side", "96",
                                    "--save-npy")) == 0
    assert calls == []  # the classes come from the multi-scale CAM's scale-1 forward
    summary = json.loads((out / "classes.json").read_text())
    assert list(summary) == ImageFolder(setup.photos).names
    for name, (height, width) in setup.sizes.items():
        record = json.loads((out / "classes" / f"{name}.json").read_text())
        logits = np.array([record["logits"][c] for c in DEMO_CLASSES[1:]])
        positive = [DEMO_CLASSES[c + 1] for c in np.argsort(-logits, kind="stable")
                    if logits[c] > 0]
        assert record["classes"] == (positive or [DEMO_CLASSES[int(logits.argmax()) + 1]])
        assert summary[name] == record["classes"]
        assert record["rule"] == "logit > 0 (else the largest)"
        allowed = {0, 255, *record["class_indices"]}
        for kind in infer_cam.KINDS:
            with Image.open(out / kind / f"{name}.png") as png:
                assert png.mode == "P" and png.size == (width, height), (kind, name)
                assert set(np.unique(np.array(png)).tolist()) <= allowed
        for cls in record["classes"]:
            with Image.open(out / "heat" / f"{name}_{cls}.png") as heat:
                assert heat.mode == "RGB" and heat.size == (width, height)
        assert len(list((out / "heat").glob(f"{name}_*.png"))) == len(record["classes"])
        cams = np.load(out / "cam" / f"{name}.npy")
        assert cams.shape == (NUM_CLASSES - 1, round(height / 4), round(width / 4))
    assert "classes chosen (images):" in capsys.readouterr().out

    # The logits recorded are the classifier's on the image as the tool saw it: 100 x 130
    # shrunk to --max-side 96; 36 x 40 enlarged so that the CAM's 0.5 scale suits the encoder.
    for name, size in (("big", (73, 96)), ("tiny", (58, 65))):
        image = ImageFolder(setup.photos).image(name)
        x = torch.nn.functional.interpolate(normalize(image)[None], size=size, mode="bilinear",
                                            align_corners=False)
        with torch.no_grad():
            logits = setup.model(x, cls_only=True).cls_logits[0]
        record = json.loads((out / "classes" / f"{name}.json").read_text())
        assert [record["logits"][c] for c in DEMO_CLASSES[1:]] == pytest.approx(
            logits.tolist(), abs=1e-3)


def test_infer_cam_without_a_scale_1_runs_the_classifier_itself(setup, tmp_path, monkeypatch):
    """CAM scales without 1.0 give no scale-1 logits: one classification forward per image, on
    the image as the tool saw it; the same classes as with the scale-1 copy."""
    calls = _count_classification_forwards(monkeypatch)
    out = tmp_path / "no1"
    argv = _cam_argv(setup, setup.photos, out, "--max-side", "96", "cam.scales=[0.5,1.5]")
    assert infer_cam.main(argv) == 0
    names = ImageFolder(setup.photos).names
    assert len(calls) == len(names)
    reference = tmp_path / "with1"
    assert infer_cam.main(_cam_argv(setup, setup.photos, reference, "--max-side", "96")) == 0
    for name in names:
        without, with_scale1 = (json.loads((d / "classes" / f"{name}.json").read_text())
                                for d in (out, reference))
        assert without["classes"] == with_scale1["classes"], name
        assert [without["logits"][c] for c in DEMO_CLASSES[1:]] == pytest.approx(
            [with_scale1["logits"][c] for c in DEMO_CLASSES[1:]], abs=1e-3)


def test_infer_cam_top_k_and_named_classes(setup, frame_outputs, tmp_path, capsys):
    out = tmp_path / "top2"
    assert infer_cam.main(_cam_argv(setup, setup.frames, out, "--top-k", "2")) == 0
    for name in ImageFolder(setup.frames).names:
        record = json.loads((out / "classes" / f"{name}.json").read_text())
        logits = record["logits"]
        ranked = sorted(logits, key=lambda c: -logits[c])
        assert record["classes"] == ranked[:2] and record["rule"] == "top-2"

    out = tmp_path / "named"
    assert infer_cam.main(_cam_argv(setup, setup.frames, out, "--classes", "ring,disc")) == 0
    for name in ImageFolder(setup.frames).names:
        record = json.loads((out / "classes" / f"{name}.json").read_text())
        assert sorted(record["classes"]) == ["disc", "ring"]
        assert record["logits"][record["classes"][0]] >= record["logits"][record["classes"][1]]
        assert {p.name for p in (out / "heat").glob(f"{name}_*.png")} == {
            f"{name}_disc.png", f"{name}_ring.png"}

    assert infer_cam.main(_cam_argv(setup, setup.frames, tmp_path / "bad",
                                    "--classes", "ring,dog")) == 2
    err = capsys.readouterr().err
    assert "--classes: unknown class 'dog'" in err and "disc, square" in err
    with pytest.raises(SystemExit):
        infer_cam.parse_args(["--config", "c", "--checkpoint", "k", "--out-dir", "o",
                              "--split", "val", "--top-k", "2"])
    with pytest.raises(SystemExit):
        infer_cam.parse_args(["--config", "c", "--checkpoint", "k", "--out-dir", "o",
                              "--images", "x", "--top-k", "2", "--classes", "disc"])


# --------------------------------------------------------------------------------------------
# make_video
# --------------------------------------------------------------------------------------------


def test_make_video_writes_one_gif_frame_per_image(setup, frame_outputs, tmp_path, capsys):
    gif = tmp_path / "frames.gif"
    argv = ["--images", str(setup.frames), "--seg-dir", str(frame_outputs.seg),
            "--cam-dir", str(frame_outputs.cam), "--out", str(gif), "--fps", "5",
            "--max-width", "200"]
    assert make_video.main(argv) == 0
    with Image.open(gif) as animation:
        assert animation.n_frames == FRAMES
        assert animation.info["loop"] == 0 and animation.info["duration"] == 200
        width, height = animation.size
    assert width <= 200 and width % 2 == 0 and height % 2 == 0
    assert f"{FRAMES} frames of {width}x{height}" in capsys.readouterr().out

    # Composition: three titled panels of equal width, the legend below.
    frame = make_video.compose_frame(
        np.zeros((FRAME_H, FRAME_W, 3), np.uint8), names=DEMO_CLASSES, max_width=200,
        heat=np.zeros((FRAME_H, FRAME_W, 3), np.uint8), cam_class="ring",
        pred=np.full((FRAME_H, FRAME_W), 5, np.uint8))
    panel = (200 - 2 * make_video.PAD) // 3
    assert frame.shape[1] == 3 * panel + 2 * make_video.PAD
    seg_only = make_video.compose_frame(
        np.zeros((FRAME_H, FRAME_W, 3), np.uint8), names=DEMO_CLASSES, max_width=1000,
        pred=np.zeros((FRAME_H, FRAME_W), np.uint8))
    assert seg_only.shape[1] == 2 * FRAME_W + make_video.PAD  # small frames are not enlarged


def test_frames_of_other_shapes_sit_whole_in_the_middle_of_the_canvas(tmp_path):
    """A portrait and a landscape frame: each is drawn whole (both panels, every pixel) in the
    middle of the canvas, white around it, with its legend as wide as the canvas; a long title
    is shortened with "..." rather than cut off."""
    images, seg = tmp_path / "images", tmp_path / "seg"
    images.mkdir()
    (seg / "pred").mkdir(parents=True)
    (seg / "config.yaml").write_text("data:\n  name: demo\n")
    colours = {"a_portrait": (255, 0, 0), "b_landscape": (0, 0, 255)}
    shapes = {"a_portrait": (120, 40), "b_landscape": (40, 120)}
    for name, (h, w) in shapes.items():
        _save(images / f"{name}.png", np.full((h, w, 3), colours[name], np.uint8))
        pred = np.zeros((h, w), np.uint8)  # background: the overlay leaves the image bare
        pred[-4:, -4:] = 4
        Image.fromarray(pred).save(seg / "pred" / f"{name}.png")
    folder = ImageFolder(images)
    frames = make_video.render_frames(folder, seg_dir=seg, cam_dir=None, max_width=400)
    height, width = frames[0].shape[:2]
    assert all(f.shape == (height, width, 3) for f in frames) and width % 2 == height % 2 == 0
    for name, frame in zip(folder.names, frames):
        h, w = shapes[name]
        own = np.all(frame == colours[name], axis=2)
        rows, cols = np.flatnonzero(own.any(axis=1)), np.flatnonzero(own.any(axis=0))
        # Both panels whole: image and bare overlay, but the 4x4 star in the overlay's corner.
        assert own.sum() == 2 * h * w - 16, name
        assert rows.max() - rows.min() + 1 == h and cols.max() - cols.min() + 1 == 2 * w + 4
        # In the middle: as much white left of the panels as right of them.
        assert abs(cols.min() - (width - 1 - cols.max())) <= 1, name
        assert (frame[rows.min():rows.max() + 1, : cols.min()] == 255).all()
        assert (frame[rows.min():rows.max() + 1, cols.max() + 1:] == 255).all()
        # The frame as drawn alone at the canvas width, placed in the middle of the canvas.
        alone = make_video.compose_frame(folder.image(name), names=DEMO_CLASSES, max_width=400,
                                         pred=np.array(Image.open(seg / "pred" / f"{name}.png")),
                                         width=width)
        top = (height - alone.shape[0]) // 2
        np.testing.assert_array_equal(frame[top : top + alone.shape[0]], alone)
        assert (frame[:top] == 255).all() and (frame[top + alone.shape[0]:] == 255).all()
        legend = alone[-22:]  # across the whole canvas: the star's swatch in its colour
        assert tuple(color_palette(256)[4]) in {tuple(c) for c in legend.reshape(-1, 3).tolist()}

    # A title longer than its panel: shortened, its last letters inside the panel.
    frame = make_video.compose_frame(np.zeros((60, 40, 3), np.uint8), names=DEMO_CLASSES,
                                     max_width=400, heat=np.zeros((60, 40, 3), np.uint8),
                                     cam_class="a class with a very long name")
    title = frame[:22, 44:84]  # the CAM panel's title strip
    ink = np.flatnonzero((title.min(axis=2) < 128).any(axis=0))
    assert ink.size and ink.max() < 40 - 3


def test_make_video_mp4_needs_imageio_ffmpeg(setup, frame_outputs, tmp_path, capsys,
                                              monkeypatch):
    argv = ["--images", str(setup.frames), "--seg-dir", str(frame_outputs.seg),
            "--out", str(tmp_path / "a.gif"), "--mp4", str(tmp_path / "a.mp4")]
    monkeypatch.setattr(make_video, "ffmpeg_available", lambda: False)
    assert make_video.main(argv) == 2
    assert "pip install imageio-ffmpeg" in capsys.readouterr().err
    assert not (tmp_path / "a.gif").exists()
    monkeypatch.undo()
    if not make_video.ffmpeg_available():
        pytest.skip("imageio-ffmpeg is not installed")
    import imageio.v2 as imageio

    assert make_video.main(argv) == 0
    with imageio.get_reader(tmp_path / "a.mp4", format="FFMPEG") as reader:
        assert reader.count_frames() == FRAMES


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


def test_an_unreadable_frame_is_named_with_exit_status_2(setup, frame_outputs, tmp_path,
                                                         capsys):
    frames = tmp_path / "frames"
    shutil.copytree(setup.frames, frames)
    bad = frames / "frame_002.png"
    bad.write_bytes(b"not a png")
    assert infer_seg.main(_seg_argv(setup, frames, tmp_path / "seg", "--no-overlay")) == 2
    assert f"{bad}: cannot decode image" in capsys.readouterr().err
    assert infer_cam.main(_cam_argv(setup, frames, tmp_path / "cam")) == 2
    assert f"{bad}: cannot decode image" in capsys.readouterr().err
    argv = ["--images", str(frames), "--seg-dir", str(frame_outputs.seg),
            "--out", str(tmp_path / "a.gif")]
    assert make_video.main(argv) == 2
    assert f"{bad}: cannot decode image" in capsys.readouterr().err

    # An image the inference did not see: its missing output is named.
    shutil.copy(setup.frames / "frame_002.png", bad)
    _save(frames / "frame_005.png", np.zeros((FRAME_H, FRAME_W, 3), np.uint8))
    assert make_video.main(argv) == 2
    assert f"{frame_outputs.seg / 'pred' / 'frame_005.png'}: missing" in capsys.readouterr().err


def test_an_empty_folder_is_named_with_exit_status_2(setup, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert infer_seg.main(_seg_argv(setup, empty, tmp_path / "seg")) == 2
    assert f"error: {empty}: no .jpg/.jpeg/.png images" in capsys.readouterr().err
    assert infer_cam.main(_cam_argv(setup, f"{empty}/*.jpg", tmp_path / "cam")) == 2
    assert f"error: {empty}/*.jpg: the pattern matches nothing" in capsys.readouterr().err
    assert make_video.main(["--images", str(empty), "--seg-dir", str(tmp_path),
                            "--out", str(tmp_path / "a.gif")]) == 2
    assert f"{empty}: no .jpg/.jpeg/.png images" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# Real photos
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("voc_set, glob, expected", [
    # Five sizes, two of them portraits.
    ("voc_photos", "2009_*.jpg",
     ["2009_000488", "2009_001008", "2009_003904", "2009_004193", "2009_005158"]),
    # Four photos, one a portrait.
    ("voc_mini", "2009_00[34]*.jpg", ["2009_003063", "2009_003350", "2009_003904", "2009_004193"]),
], indirect=["voc_set"], ids=["voc_photos", "voc_mini"])
def test_real_photos_by_a_glob(voc_set, glob, expected, tmp_path):
    pattern = f"{voc_set}/JPEGImages/{glob}"
    names = ImageFolder(pattern).names
    assert names == expected
    torch.manual_seed(0)
    model = AFANet("mit_b0", num_classes=21, embedding_dim=32).eval()
    torch.save({"model": model.state_dict()}, tmp_path / "voc.pth")
    common = ["--config", str(REPO / "configs" / "voc.yaml"), "--checkpoint",
              str(tmp_path / "voc.pth"), "--images", pattern]
    overrides = ["model.backbone=mit_b0", "model.embedding_dim=32", "device=cpu",
                 "infer.long_side=128", "cam.scales=[1.0,0.5]"]
    assert infer_seg.main([*common, "--out-dir", str(tmp_path / "seg"), *overrides]) == 0
    assert infer_cam.main([*common, "--out-dir", str(tmp_path / "cam"), "--max-side", "128",
                           "--top-k", "1", *overrides]) == 0
    assert list(json.loads((tmp_path / "cam" / "classes.json").read_text())) == names
    for name in names:
        with Image.open(voc_set / "JPEGImages" / f"{name}.jpg") as photo:
            size = photo.size
        for path in (tmp_path / "seg" / "pred" / f"{name}.png",
                     tmp_path / "cam" / "affinity" / f"{name}.png"):
            with Image.open(path) as png:
                assert png.mode == "P" and png.size == size, path
        (heat,) = (tmp_path / "cam" / "heat").glob(f"{name}_*.png")
        assert Image.open(heat).size == size
    gif = tmp_path / "photos.gif"
    assert make_video.main(["--images", pattern, "--seg-dir", str(tmp_path / "seg"),
                            "--cam-dir", str(tmp_path / "cam"), "--out", str(gif),
                            "--max-width", "320"]) == 0
    with Image.open(gif) as animation:  # photos of different sizes: padded to one
        assert animation.n_frames == len(names) and animation.size[0] <= 320


def test_a_16_bit_greyscale_photo_keeps_its_values(tmp_path):
    """A 16-bit greyscale PNG used to come out 99.6 % white (PIL clips at 255): now x >> 8."""
    depth = (np.arange(48 * 64, dtype=np.uint32) * 21).reshape(48, 64).astype(np.uint16)
    Image.fromarray(depth).save(tmp_path / "depth.png")
    image = ImageFolder(tmp_path).image("depth")
    np.testing.assert_array_equal(image, np.repeat((depth >> 8).astype(np.uint8)[..., None], 3, 2))


def test_an_image_over_the_pixel_limit_is_named_with_exit_status_2(setup, tmp_path, capsys):
    """A 14000 x 14000 PNG (24 KB on disk) used to stop the tools with PIL's
    DecompressionBombError traceback; now one line names it, its size and the way out."""
    photos = tmp_path / "photos"
    photos.mkdir()
    _save(photos / "a_small.png", np.zeros((40, 40, 3), np.uint8))
    huge = photos / "huge.png"
    Image.new("1", (14000, 14000)).save(huge)
    expected = (f"error (rank 0): {huge}: 14000x14000 image (196 megapixels) is larger than the "
                "limit of 178956970 pixels")
    for tool, argv in ((infer_seg, _seg_argv(setup, photos, tmp_path / "seg", "--no-overlay")),
                       (infer_cam, _cam_argv(setup, photos, tmp_path / "cam"))):
        assert tool.main(argv) == 2
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if "error" in line]  # not the progress bar
        assert len(errors) == 1 and "Traceback" not in err, err
        assert errors[0].startswith(expected) and "AFA_MAX_IMAGE_PIXELS=196000000" in errors[0]
