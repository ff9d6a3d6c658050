"""Your own images with tags: tools/prepare_tags.py, training with data.name=custom, and the
tools on its checkpoint without a class list of their own.

The 18 VOC photos in tests/data/voc_photos play "your own data": the tags come from their masks,
a few are stored as PNG, greyscale or in a sub-folder, and half of the validation images get a
mask (in the derived class list's order).
"""

import csv
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from afa.config import load_config
from afa.constants import VOC_CLASSES
from afa.data import read_mask
from conftest import REPO, load_tool

PHOTOS = REPO / "tests" / "data" / "voc_photos"
CUSTOM = REPO / "configs" / "custom.yaml"
prepare_tags = load_tool("prepare_tags")
train_tool = load_tool("train")


def _voc_ids(source):
    return sorted(p.stem for p in (source / "JPEGImages").glob("*.jpg"))


def _own_data(source, root):
    """photos/ (JPEG, one PNG, one greyscale, two in a sub-folder), tags.csv, masks/ for half
    the photos (class indices of the sorted tag list), and the class list they imply, made from
    the VOC-style set at ``source``."""
    photos, masks = root / "photos", root / "masks"
    (photos / "trip").mkdir(parents=True)
    masks.mkdir()
    ids = _voc_ids(source)
    present = {}
    for i, name in enumerate(ids):
        voc_mask = read_mask(source / "SegmentationClassAug" / f"{name}.png", 21)
        present[name] = sorted({VOC_CLASSES[c] for c in np.unique(voc_mask) if 0 < c < 255})
        image = source / "JPEGImages" / f"{name}.jpg"
        if i == 0:
            Image.open(image).save(photos / f"{name}.png")  # any format
        elif i == 1:
            Image.open(image).convert("L").save(photos / f"{name}.jpg")  # greyscale
        elif i in (2, 3):
            shutil.copyfile(image, photos / "trip" / f"{name}.jpg")  # nested
        else:
            shutil.copyfile(image, photos / f"{name}.jpg")
    classes = ["background", *sorted({c for tags in present.values() for c in tags})]
    lut = np.full(256, 255, dtype=np.uint8)
    for voc_index, voc_name in enumerate(VOC_CLASSES):
        if voc_name in classes:
            lut[voc_index] = classes.index(voc_name)
    lut[0] = 0
    for name in ids[::2]:  # half of them have a mask
        voc_mask = read_mask(source / "SegmentationClassAug" / f"{name}.png", 21)
        folder = masks / "trip" if name in (ids[2], ids[3]) else masks
        folder.mkdir(exist_ok=True)
        Image.fromarray(lut[voc_mask]).save(folder / f"{name}.png")
    with open(root / "tags.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "tags"])
        for i, name in enumerate(ids):
            image = (f"trip/{name}.jpg" if i in (2, 3) else f"{name}.png" if i == 0
                     else name)  # with or without the suffix
            writer.writerow([image, ";".join(present[name])])
    return {"root": root, "photos": photos, "masks": masks, "tags": root / "tags.csv",
            "classes": classes, "present": present, "ids": ids}


@pytest.fixture(scope="module")
def own(tmp_path_factory):
    """The repository's 18 photos as "your own data" (:func:`_own_data`)."""
    return _own_data(PHOTOS, tmp_path_factory.mktemp("own"))


def _prepare(own, out, *extra):
    return prepare_tags.main(["--images", str(own["photos"]), "--tags", str(own["tags"]),
                              "--out", str(out), *extra])


@pytest.fixture(scope="module")
def prepared(own, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared") / "set"
    assert _prepare(own, out, "--masks", str(own["masks"]), "--val-fraction", "0.4") == 0
    return out


def test_prepare_writes_the_layout_training_reads(own, prepared):
    ids = {name if name not in own["ids"][2:4] else f"trip__{name}" for name in own["ids"]}
    train = (prepared / "train.txt").read_text().split()
    val = (prepared / "val.txt").read_text().split()
    assert set(train) | set(val) == ids and not set(train) & set(val)
    assert len(val) == round(0.4 * len(ids))
    assert (prepared / "classes.txt").read_text().split("\n")[:-1] == own["classes"]
    labels = json.loads((prepared / "cls_labels.json").read_text())
    for name in own["ids"]:
        key = f"trip__{name}" if name in own["ids"][2:4] else name
        assert [own["classes"][i] for i in labels[key]] == own["present"][name]
    # Masked images are drawn into validation first: all 9 fit in its 7 places.
    record = json.loads((prepared / "prepare.json").read_text())
    assert record["val_with_mask"] == len(val)
    for name in val:
        assert (prepared / "SegmentationClass" / f"{name}.png").is_file()
    # The first photo is a PNG behind a .jpg link: the reader goes by content.
    first = prepared / "JPEGImages" / f"{own['ids'][0]}.jpg"
    assert first.is_symlink() and first.resolve().suffix == ".png"
    cfg = load_config(CUSTOM, [f"data.root={prepared}", f"data.list_dir={prepared}"])
    assert list(cfg.data.classes) == own["classes"]


@pytest.mark.parametrize("case", ["unknown tag", "empty class", "untagged", "corrupt", "not ours"])
def test_prepare_refuses_what_it_cannot_use_and_writes_nothing(case, own, tmp_path, capsys):
    photos, tags, extra = own["photos"], own["tags"], []
    out = tmp_path / "out"
    if case in ("unknown tag", "empty class"):
        names = own["classes"][1:]
        listed = names[1:] if case == "unknown tag" else names + ["zebra"]
        (tmp_path / "classes.txt").write_text("\n".join(listed) + "\n")
        extra = ["--classes", str(tmp_path / "classes.txt")]
        expected = (f"tags not in {tmp_path / 'classes.txt'}: {names[0]}"
                    if case == "unknown tag" else "classes of ")
    elif case == "untagged":
        photos = tmp_path / "photos"
        shutil.copytree(own["photos"], photos)
        Image.new("RGB", (40, 30)).save(photos / "stray.jpg")
        expected = f"{photos / 'stray.jpg'}: no tags"
    elif case == "corrupt":
        photos = tmp_path / "photos"
        shutil.copytree(own["photos"], photos)
        broken = photos / f"{own['ids'][5]}.jpg"
        broken.write_bytes(broken.read_bytes()[:300])
        expected = f"{broken}: cannot decode image"
    else:
        out.mkdir()
        (out / "thesis.txt").write_text("mine")
        expected = "was not made by prepare_tags.py"
    code = prepare_tags.main(["--images", str(photos), "--tags", str(tags), "--out", str(out),
                              *extra])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expected in err
    if case == "not ours":
        assert (out / "thesis.txt").read_text() == "mine" and len(list(out.iterdir())) == 1
    else:
        assert not out.exists()


def test_prepare_again_replaces_its_own_output_and_nothing_else(own, tmp_path, capsys):
    out = tmp_path / "set"
    assert _prepare(own, out, "--val-fraction", "0.4") == 0
    first_val = (out / "val.txt").read_text()
    # Again with another split: its own earlier output is replaced.
    assert _prepare(own, out, "--val-fraction", "0.4", "--seed", "7") == 0
    val = (out / "val.txt").read_text().split()
    assert (out / "val.txt").read_text() != first_val
    assert sorted(p.stem for p in (out / "JPEGImages").iterdir()) == sorted(
        (out / "train.txt").read_text().split() + val)
    # A file of the user's in its image folder: refused, and everything stays as it was.
    mine = out / "JPEGImages" / "holiday.jpg"
    mine.write_bytes(b"mine")
    capsys.readouterr()
    assert _prepare(own, out, "--val-fraction", "0.4") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and f"{mine} was not written by prepare_tags.py" in err
    assert mine.read_bytes() == b"mine" and (out / "val.txt").read_text().split() == val


def _train_argv(data, work, *extra):
    return ["--config", str(CUSTOM), "--work-dir", str(work), f"data.root={data}",
            f"data.list_dir={data}", "model.backbone=mit_b0", "model.pretrained=null",
            "model.embedding_dim=32", "model.drop_path_rate=0", "data.crop_size=64",
            "data.scale_range=[1.0,1.0]", "data.num_workers=0", "device=cpu",
            "train.max_iters=2", "train.global_batch=2", "train.cam_iters=1",
            "train.aff_switch_iter=2", "train.eval_iters=2", "train.ckpt_iters=2",
            "train.log_iters=1", "train.image_log_iters=0", "optim.warmup_iters=1",
            "loss.reg_loss=false", "cam.scales=[1.0,0.5]", "par.num_iter=2", *extra]


@pytest.mark.slow
def test_train_evaluate_and_infer_with_the_class_names_of_the_checkpoint(own, prepared,
                                                                         tmp_path, capsys):
    work = tmp_path / "work"
    # Three of the seven validation images: the scores' form is under test, not their values.
    assert train_tool.main(_train_argv(prepared, work, "data.val_max_images=3")) == 0
    scores = json.loads((work / "val_scores.json").read_text())["scores"]
    assert scores["masked_images"] == 3 and scores["seg"]["miou"] is not None
    assert scores["cls_map"] is not None and set(scores["cls_ap"]) == set(own["classes"][1:])
    checkpoint = work / "checkpoints" / "iter_000002.pth"
    saved = torch.load(checkpoint, weights_only=True)["config"]["data"]
    assert saved["classes"] == own["classes"]

    # evaluate: the run's data (from the checkpoint), not configs/custom.yaml's data/custom.
    evaluate = load_tool("evaluate")
    assert evaluate.main(["--config", str(CUSTOM), "--checkpoint", str(checkpoint), "--limit",
                          "2", "device=cpu", "cam.scales=[1.0,0.5]"]) == 0
    out = capsys.readouterr().out
    assert f"data.root={prepared}" in out and "mAP" in out

    # The tools on a folder, with configs/custom.yaml pointing nowhere: the classes come from
    # the checkpoint.
    nowhere = [f"data.list_dir={tmp_path / 'nowhere'}", "infer.long_side=96", "device=cpu"]
    infer_seg, infer_cam = load_tool("infer_seg"), load_tool("infer_cam")
    assert infer_seg.main(["--config", str(CUSTOM), "--checkpoint", str(checkpoint), "--images",
                           str(own["photos"]), "--out-dir", str(tmp_path / "seg"),
                           "--scales", "1.0", *nowhere]) == 0
    # A folder: its own files, not those in trip/.
    assert len(list((tmp_path / "seg" / "pred").glob("*.png"))) == len(own["ids"]) - 2
    assert infer_cam.main(["--config", str(CUSTOM), "--checkpoint", str(checkpoint),
                           "--images", str(own["photos"]), "--out-dir", str(tmp_path / "cam"),
                           "--max-side", "96", *nowhere]) == 0
    chosen = json.loads((tmp_path / "cam" / "classes.json").read_text())  # {id: [names]}
    assert len(chosen) == len(own["ids"]) - 2
    assert all(names and set(names) <= set(own["classes"][1:]) for names in chosen.values())


@pytest.mark.slow
def test_a_set_with_tags_only_trains_and_validates_without_masks(own, tmp_path):
    data = tmp_path / "tags_only"
    assert _prepare(own, data) == 0
    work = tmp_path / "work"
    assert train_tool.main(_train_argv(data, work, "train.image_log_iters=2")) == 0
    scores = json.loads((work / "val_scores.json").read_text())["scores"]
    assert scores["masked_images"] == 0
    assert all(scores[k]["miou"] is None for k in ("cam", "refined", "aff_cam", "affinity",
                                                    "seg"))
    assert 0.0 <= scores["cls_map"] <= 1.0 and 0.0 <= scores["cls_f1"] <= 1.0
    assert set(scores["coverage"]) == {"cam", "refined", "aff_cam", "affinity"}
    log = (work / "train.log").read_text()
    assert "no validation image has a mask" in log and "mAP" in log
    records = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in records if "val/cls_map" in r]
    assert val and "val/seg" not in val[-1]
    assert (work / "checkpoints" / "best.pth").is_file()  # chosen by the classifier's mAP
    # The picture grid of the pseudo labels, in TensorBoard, without any mask.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(work / "tb"), size_guidance={"images": 0}).Reload()
    (grid,) = events.Images("train/pseudo_labels")
    assert grid.step == 2 and grid.width > 3 * grid.height


@pytest.mark.slow
def test_the_larger_photo_set_as_your_own_data(voc_mini, tmp_path, capsys):
    """The optional 60-photo set the same way: preparation with its counts per class, a short
    training from scratch validated on masked photos, and pseudo labels for every photo."""
    mine = _own_data(voc_mini, tmp_path / "mine")
    data = tmp_path / "set"
    assert _prepare(mine, data, "--masks", str(mine["masks"]), "--val-fraction", "0.2") == 0
    printed = capsys.readouterr().out
    for name in mine["classes"][1:]:  # a count for every class
        assert name in printed, name
    val = (data / "val.txt").read_text().split()
    assert len(val) == round(0.2 * len(mine["ids"])) == 12
    work = tmp_path / "work"
    assert train_tool.main(_train_argv(data, work, "data.val_max_images=2")) == 0
    scores = json.loads((work / "val_scores.json").read_text())["scores"]
    assert scores["masked_images"] == 2 and set(scores["cls_ap"]) == set(mine["classes"][1:])
    out = tmp_path / "cam"
    assert load_tool("infer_cam").main([
        "--config", str(CUSTOM), "--checkpoint", str(work / "checkpoints" / "iter_000002.pth"),
        "--images", str(mine["photos"]), "--out-dir", str(out), "--max-side", "64",
        "cam.scales=[1.0]", "device=cpu"]) == 0
    chosen = json.loads((out / "classes.json").read_text())
    assert len(chosen) == len(mine["ids"]) - 2  # the folder's own photos, not trip/'s
    sizes = {p.stem: Image.open(p).size for p in mine["photos"].glob("*.*")}
    for name, classes in chosen.items():
        assert classes and set(classes) <= set(mine["classes"][1:]), name
        with Image.open(out / "refined" / f"{name}.png") as label:
            assert label.size == sizes[name], name
