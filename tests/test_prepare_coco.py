"""tools/prepare_coco.py on a tiny synthetic COCO: overlaps, crowds, lists, labels, resuming."""

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from conftest import load_tool
from afa.constants import COCO_CLASSES
from afa.data import VOCStyleDataset, read_mask
from afa.data.coco import COCO_CATEGORY_IDS

prepare_coco = load_tool("prepare_coco")

PERSON, DOG, TOOTHBRUSH = 1, 17, 80  # class indices of COCO ids 1, 18, 90


def _rect(x0, y0, x1, y1):
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def make_coco(root: Path) -> Path:
    categories = [{"id": i, "name": n} for i, n in zip(COCO_CATEGORY_IDS, COCO_CLASSES[1:])]
    val = {
        "categories": categories,
        "images": [
            {"id": 1, "file_name": "COCO_val2014_000000000001.jpg", "height": 20, "width": 30},
            {"id": 2, "file_name": "COCO_val2014_000000000002.jpg", "height": 16, "width": 16},
        ],
        "annotations": [
            # A large person and a smaller dog overlapping it: the dog stays on top.
            {"id": 10, "image_id": 1, "category_id": 1, "iscrowd": 0, "area": 234.0,
             "segmentation": _rect(2, 2, 20, 15)},
            {"id": 11, "image_id": 1, "category_id": 18, "iscrowd": 0, "area": 140.0,
             "segmentation": _rect(12, 8, 26, 18)},
            # A crowd over columns 24..29 (uncompressed column-major RLE): ignore, under the dog.
            {"id": 12, "image_id": 1, "category_id": 1, "iscrowd": 1, "area": 120.0,
             "segmentation": {"size": [20, 30], "counts": [24 * 20, 6 * 20]}},
            {"id": 13, "image_id": 2, "category_id": 90, "iscrowd": 0, "area": 64.0,
             "segmentation": _rect(4, 4, 12, 12)},
        ],
    }
    train = {  # one image whose only annotation is a crowd: no label, so not listed
        "categories": categories,
        "images": [{"id": 5, "file_name": "COCO_train2014_000000000005.jpg", "height": 10,
                    "width": 10}],
        "annotations": [{"id": 20, "image_id": 5, "category_id": 18, "iscrowd": 1, "area": 100.0,
                         "segmentation": {"size": [10, 10], "counts": [0, 100]}}],
    }
    (root / "annotations").mkdir(parents=True)
    for split, data in (("val", val), ("train", train)):
        (root / "annotations" / f"instances_{split}2014.json").write_text(json.dumps(data))
        (root / f"{split}2014").mkdir()
        for info in data["images"]:
            image = Image.new("L", (info["width"], info["height"]), 128)  # greyscale, as in COCO
            image.save(root / f"{split}2014" / info["file_name"])
    return root


def test_conversion_lists_labels_and_resume(tmp_path):
    coco, out = make_coco(tmp_path / "coco"), tmp_path / "MSCOCO"
    argv = ["--coco-root", str(coco), "--out", str(out), "--workers", "1"]
    assert prepare_coco.main(argv) == 0

    first = read_mask(out / "SegmentationClass/val/COCO_val2014_000000000001.png", 81)
    assert first.shape == (20, 30)
    assert first[5, 5] == PERSON and first[12, 16] == DOG  # overlap: the smaller dog on top
    assert first[16, 25] == DOG and first[5, 27] == 255   # the dog over the crowd; crowd ignored
    assert first[1, 1] == 0 and first[18, 5] == 0
    assert set(np.unique(first)) == {0, PERSON, DOG, 255}
    second = read_mask(out / "SegmentationClass/val/COCO_val2014_000000000002.png", 81)
    assert second[8, 8] == TOOTHBRUSH and second[0, 0] == 0

    assert (out / "val.txt").read_text().split() == [
        "COCO_val2014_000000000001", "COCO_val2014_000000000002"]
    assert (out / "train.txt").read_text() == ""
    assert json.loads((out / "cls_labels.json").read_text()) == {
        "COCO_val2014_000000000001": [PERSON, DOG], "COCO_val2014_000000000002": [TOOTHBRUSH]}
    image = out / "JPEGImages/val/COCO_val2014_000000000001.jpg"
    assert image.is_symlink() and image.resolve() == (coco / "val2014" / image.name).resolve()

    # The converted set loads, greyscale images as RGB.
    ds = VOCStyleDataset(out, out / "val.txt", out / "cls_labels.json", 81, split="val",
                         mask_dir="SegmentationClass", mode="seg")
    assert ds[0]["image"].shape == (3, 20, 30) and ds[0]["mask"][5, 27] == 255

    # Resuming keeps finished masks (an edited mask survives) and uses the process pool.
    mask_path = out / "SegmentationClass/val/COCO_val2014_000000000002.png"
    before = os.stat(mask_path).st_mtime_ns
    assert prepare_coco.main(argv[:-1] + ["2"]) == 0
    assert os.stat(mask_path).st_mtime_ns == before


def test_missing_image_and_size_mismatch_are_named(tmp_path, capsys):
    coco, out = make_coco(tmp_path / "coco"), tmp_path / "MSCOCO"
    (coco / "val2014" / "COCO_val2014_000000000002.jpg").unlink()
    Image.new("RGB", (7, 7)).save(coco / "val2014" / "COCO_val2014_000000000001.jpg")
    argv = ["--coco-root", str(coco), "--out", str(out), "--workers", "1", "--splits", "val"]
    assert prepare_coco.main(argv) == 1
    err = capsys.readouterr().err
    assert "COCO_val2014_000000000002.jpg: cannot read image" in err
    assert "COCO_val2014_000000000001.jpg: image size (7, 7) differs" in err
    assert not (out / "val.txt").exists()
    assert prepare_coco.main(argv + ["--skip-missing"]) == 0
    assert (out / "val.txt").read_text() == ""


def test_missing_annotations_exit_2(tmp_path, capsys):
    assert prepare_coco.main(["--coco-root", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "instances_train2014.json: not found" in capsys.readouterr().err
