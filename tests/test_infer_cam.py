"""tools/infer_cam.py end to end on a tiny generated set with a random tiny model: the labels keep
to the image's classes, equal what a training iteration makes, are scored over their committed
pixels with the ignored fraction beside; CAM npy files in the format tools/visualize.py reads;
resume."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
from conftest import load_tool
import pytest
import torch
from PIL import Image

from afa import config as C
from afa.config import load_config
from afa.constants import color_palette
from afa.data import denormalize, normalize, read_image, read_label_file, read_mask
from afa.data.synthetic import DEMO_CLASSES, make_demo_dataset
from afa.cam import multi_scale_cam
from afa.inference import mask_ignored
from afa.metrics import ConfusionMatrix
from afa.models import PAR, AFANet
from afa.pseudo_labels import compute_afa_losses

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "demo.yaml"
NUM_CLASSES = 9
KINDS = ("cam_label", "refined", "affinity")


infer_cam = load_tool("infer_cam")
visualize = load_tool("visualize")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One run over the training split with --save-npy; returns paths, model and config."""
    root = tmp_path_factory.mktemp("infer_cam")
    data = root / "data"
    make_demo_dataset(data, num_train=4, num_val=3, size=64, progress=False)
    torch.manual_seed(0)
    model = AFANet("mit_b0", num_classes=NUM_CLASSES, embedding_dim=32).eval()
    torch.save({"model": model.state_dict()}, root / "model.pth")
    overrides = [f"data.root={data}", f"data.list_dir={data}", "model.embedding_dim=32",
                 "device=cpu"]
    argv = ["--config", str(CONFIG), "--checkpoint", str(root / "model.pth"),
            "--split", "train_aug", "--out-dir", str(root / "out"), "--save-npy", *overrides]
    assert infer_cam.main(argv) == 0
    return {"data": data, "out": root / "out", "model": model, "argv": argv,
            "cfg": load_config(CONFIG, overrides),
            "names": (data / "train_aug.txt").read_text().split(),
            "labels": read_label_file(data / "cls_labels.json", NUM_CLASSES)}


def test_labels_keep_to_the_image_classes(run):
    for name in run["names"]:
        height, width = read_image(run["data"] / "JPEGImages" / f"{name}.jpg").shape[:2]
        allowed = {0, *run["labels"][name]}
        for kind in KINDS:
            with Image.open(run["out"] / kind / f"{name}.png") as png:
                assert png.mode == "P"
                assert png.getpalette()[:768] == color_palette(256).ravel().tolist()
                label = np.array(png)
            assert label.shape == (height, width)
            present = set(np.unique(label).tolist())
            assert present <= allowed | {255}, (kind, name, present)
            if kind == "cam_label":
                assert 255 not in present  # the bkg_score threshold has no ignore band


def test_labels_equal_a_training_iteration(run):
    """refined/ and affinity/ are the pseudo labels compute_afa_losses makes for the whole image
    (largest-scale affinity, high/low band)."""
    cfg, model = run["cfg"], run["model"]
    par = PAR(dilations=tuple(cfg.par.dilations), num_iter=cfg.par.num_iter)
    for name in run["names"]:
        x = normalize(read_image(run["data"] / "JPEGImages" / f"{name}.jpg"))[None]
        label = torch.zeros(1, NUM_CLASSES - 1)
        label[0, [c - 1 for c in run["labels"][name]]] = 1
        with torch.no_grad():
            out = model(x)
            ms = multi_scale_cam(model, x, tuple(cfg.cam.scales))
            losses = compute_afa_losses(
                out.cls_logits, out.seg_logits, out.aff_pred, ms.cam, ms.aff,
                (out.grid, ms.aff_grid), denormalize(x),
                label, torch.tensor([[0, x.shape[2], 0, x.shape[3]]]), par=par,
                affinity_target=True, thresholds=C.thresholds(cfg), radius=cfg.cam.radius)
        for kind, expected in (("refined", losses.refined_label),
                               ("affinity", losses.aff_pseudo_label)):
            saved = np.array(Image.open(run["out"] / kind / f"{name}.png"))
            np.testing.assert_array_equal(saved, expected[0].numpy(), err_msg=f"{kind} {name}")


def test_scores_cover_committed_pixels_and_report_the_ignored_fraction(run):
    scores = json.loads((run["out"] / "scores.json").read_text())
    assert scores["num_scored"] == len(run["names"])
    for kind in KINDS:
        matrix = ConfusionMatrix(NUM_CLASSES)
        ignored = valid = 0
        for name in run["names"]:
            gt = read_mask(run["data"] / "SegmentationClassAug" / f"{name}.png")
            pred, target, n_ignored, n_valid = mask_ignored(
                np.array(Image.open(run["out"] / kind / f"{name}.png")), gt)
            matrix.update(pred, target)
            ignored, valid = ignored + n_ignored, valid + n_valid
        assert scores[kind]["miou"] == pytest.approx(matrix.compute().miou), kind
        assert scores[kind]["ignored_fraction"] == pytest.approx(ignored / valid), kind
    assert scores["cam_label"]["ignored_fraction"] == 0
    assert scores["refined"]["ignored_fraction"] > 0  # the high/low band leaves pixels out


def test_cam_npy_is_what_visualize_reads(run):
    for name in run["names"]:
        cams = np.load(run["out"] / "cam" / f"{name}.npy")
        assert cams.dtype == np.float16 and cams.shape == (NUM_CLASSES - 1, 16, 16)
        assert cams.min() >= 0 and cams.max() <= 1
        present = [c - 1 for c in run["labels"][name]]
        absent = [c for c in range(NUM_CLASSES - 1) if c not in present]
        assert not cams[absent].any() and cams[present].max() > 0
        _, titles = visualize.load_cams(run["out"] / "cam", name, DEMO_CLASSES, max_cams=3)
        assert set(titles) == {DEMO_CLASSES[c] for c in run["labels"][name]}


def test_resume_skips_finished_images_and_scores_them_again(run, capsys):
    scores = (run["out"] / "scores.json").read_text()
    for path in run["out"].rglob("*.*"):
        if path.parent.name in KINDS + ("cam",):
            os.utime(path, ns=(0, 0))
    (run["out"] / "scores.json").unlink()
    assert infer_cam.main(run["argv"]) == 0
    assert "0 of 4 images processed" in capsys.readouterr().out
    stamps = {p.stat().st_mtime_ns for kind in KINDS + ("cam",)
              for p in (run["out"] / kind).iterdir()}
    assert stamps == {0}
    assert (run["out"] / "scores.json").read_text() == scores


def test_new_weights_at_the_same_checkpoint_path_are_refused(run, tmp_path, capsys):
    """A checkpoint rewritten in place (best.pth after more training) used to have its old
    labels reused as if they were its own; reuse now follows the file's content, not its path."""
    best = tmp_path / "best.pth"
    torch.save({"model": run["model"].state_dict()}, best)
    argv = list(run["argv"])
    argv[argv.index("--checkpoint") + 1] = str(best)
    argv[argv.index("--out-dir") + 1] = str(tmp_path / "out")
    assert infer_cam.main(argv) == 0
    moved = tmp_path / "elsewhere.pth"
    shutil.copy(best, moved)
    torch.manual_seed(1)
    newer = AFANet("mit_b0", num_classes=NUM_CLASSES, embedding_dim=32).eval()
    torch.save({"model": newer.state_dict()}, best)
    capsys.readouterr()
    assert infer_cam.main(argv) == 2
    err = capsys.readouterr().err
    assert "the checkpoint's content changed" in err and "--overwrite" in err

    # The first weights again, under another name: every label is reused.
    argv[argv.index("--checkpoint") + 1] = str(moved)
    assert infer_cam.main(argv) == 0
    assert "0 of 4 images processed" in capsys.readouterr().out
