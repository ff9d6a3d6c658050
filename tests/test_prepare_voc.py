"""tools/prepare_voc.py: lists and labels on a tiny tree with known answers, and on voc_mini."""

import json
from pathlib import Path

import numpy as np
from PIL import Image

from conftest import load_tool
from afa.data import write_mask

prepare_voc = load_tool("prepare_voc")

# id -> classes in its mask; "e" has a mask but no image.
CLASSES = {"a": [1, 15], "b": [3], "c": [20], "d": [5, 6, 7], "e": [2]}


def make_voc(root: Path, train=("a",), val=("c", "d")) -> Path:
    for folder in ("JPEGImages", "SegmentationClassAug", "ImageSets/Segmentation", "Annotations"):
        (root / folder).mkdir(parents=True)
    for index, (name, classes) in enumerate(CLASSES.items()):
        mask = np.zeros((12, 16), np.uint8)
        for k, cls in enumerate(classes):
            mask[k * 3:k * 3 + 2, index:index + 5] = cls
        mask[-1, :] = 255  # ignore never counts as a class
        write_mask(root / "SegmentationClassAug" / f"{name}.png", mask)
        if name != "e":
            Image.new("RGB", (16, 12)).save(root / "JPEGImages" / f"{name}.jpg")
    if train is not None:
        (root / "ImageSets/Segmentation/train.txt").write_text("\n".join(train) + "\n")
    (root / "ImageSets/Segmentation/val.txt").write_text("\n".join(val) + "\n")
    return root


def _read(out: Path):
    lists = {p.stem: p.read_text().split() for p in out.glob("*.txt")}
    return lists, json.loads((out / "cls_labels.json").read_text())


def test_missing_image_fails_by_name_and_writes_nothing(tmp_path, capsys):
    root = make_voc(tmp_path / "VOC2012")
    out = tmp_path / "out"
    assert prepare_voc.main(["--root", str(root), "--out", str(out), "--workers", "1"]) == 1
    err = capsys.readouterr().err
    assert "e.jpg: image file not found" in err and "1 of 5 ids unusable" in err
    assert not out.exists()


def test_known_answers_with_skip_missing(tmp_path, capsys):
    root = make_voc(tmp_path / "VOC2012")
    out = tmp_path / "out"
    argv = ["--root", str(root), "--out", str(out), "--workers", "1", "--skip-missing"]
    assert prepare_voc.main(argv) == 0
    assert "warning: " in capsys.readouterr().err
    lists, labels = _read(out)
    assert lists == {"train_aug": ["a", "b"], "train": ["a"], "val": ["c", "d"]}
    assert labels == {name: CLASSES[name] for name in "abcd"}
    assert (out / "cls_labels.json").read_text().startswith('{\n"a": [1, 15],\n')


def test_missing_train_list_is_skipped_with_a_warning(tmp_path, capsys):
    root = make_voc(tmp_path / "VOC2012", train=None)
    (root / "JPEGImages" / "e.jpg").write_bytes((root / "JPEGImages" / "a.jpg").read_bytes())
    out = tmp_path / "out"
    assert prepare_voc.main(["--root", str(root), "--out", str(out), "--workers", "2"]) == 0
    assert "train.txt not found" in capsys.readouterr().err
    lists, labels = _read(out)
    assert lists == {"train_aug": ["a", "b", "e"], "val": ["c", "d"]}
    assert labels == CLASSES


def test_bad_mask_values_are_reported(tmp_path, capsys):
    root = make_voc(tmp_path / "VOC2012")
    (root / "JPEGImages" / "e.jpg").write_bytes((root / "JPEGImages" / "a.jpg").read_bytes())
    write_mask(root / "SegmentationClassAug" / "b.png", np.full((12, 16), 40, np.uint8))
    argv = ["--root", str(root), "--out", str(tmp_path / "o"), "--workers", "1"]
    assert prepare_voc.main(argv) == 1
    assert "b.png: mask values [40] outside 0..20" in capsys.readouterr().err


def test_labels_from_xml(tmp_path):
    root = make_voc(tmp_path / "VOC2012")
    for name in "abcd":
        objects = "".join(f"<object><name>{n}</name></object>" for n in ("dog", "person", "dog"))
        (root / "Annotations" / f"{name}.xml").write_text(f"<annotation>{objects}</annotation>")
    out = tmp_path / "out"
    argv = ["--root", str(root), "--out", str(out), "--workers", "1", "--skip-missing",
            "--labels-from", "xml"]
    assert prepare_voc.main(argv) == 0
    assert _read(out)[1] == {name: [12, 15] for name in "abcd"}


def test_unusable_layout_exits_2(tmp_path, capsys):
    root = make_voc(tmp_path / "VOC2012")
    (root / "ImageSets/Segmentation/val.txt").unlink()
    assert prepare_voc.main(["--root", str(root), "--out", str(tmp_path / "o")]) == 2
    assert "val.txt not found" in capsys.readouterr().err
    argv = ["--root", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]
    assert prepare_voc.main(argv) == 2


def test_voc_mini_labels_are_the_classes_in_each_mask(voc_mini, tmp_path):
    out = tmp_path / "voc"
    assert prepare_voc.main(["--root", str(voc_mini), "--out", str(out), "--workers", "2"]) == 0
    lists, labels = _read(out)
    sets = voc_mini / "ImageSets" / "Segmentation"
    assert lists["val"] == sets.joinpath("val.txt").read_text().split()
    assert lists["train_aug"] == sorted(sets.joinpath("train_aug.txt").read_text().split())
    assert "train" not in lists  # voc_mini ships no train.txt
    assert set(labels) == set(lists["val"]) | set(lists["train_aug"])
    for name, classes in labels.items():
        with Image.open(voc_mini / "SegmentationClassAug" / f"{name}.png") as png:
            values = np.unique(np.asarray(png))
        assert classes == [int(v) for v in values if 0 < v < 255], name
