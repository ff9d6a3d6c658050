"""tools/prepare_voc.py: lists and labels on a tiny tree with known answers, and on real VOC photos
(each photo set of conftest.py)."""

import json
from pathlib import Path

import numpy as np
from PIL import Image

from conftest import load_tool
from afa.data import write_mask, write_name_list
from afa.data.lists import subset_note

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


def test_real_photo_labels_are_the_classes_in_each_mask(voc_set, tmp_path):
    out = tmp_path / "voc"
    assert prepare_voc.main(["--root", str(voc_set), "--out", str(out), "--workers", "2"]) == 0
    lists, labels = _read(out)
    sets = voc_set / "ImageSets" / "Segmentation"
    assert lists["val"] == sets.joinpath("val.txt").read_text().split()
    assert lists["train_aug"] == sorted(sets.joinpath("train_aug.txt").read_text().split())
    assert "train" not in lists  # neither set ships a train.txt
    assert set(labels) == set(lists["val"]) | set(lists["train_aug"])
    for name, classes in labels.items():
        with Image.open(voc_set / "SegmentationClassAug" / f"{name}.png") as png:
            values = np.unique(np.asarray(png))
        assert classes == [int(v) for v in values if 0 < v < 255], name


# --- every image decoded, sizes compared, problems summarised, subsets recorded -----------------


def _run(root: Path, out: Path, *extra) -> int:
    return prepare_voc.main(["--root", str(root), "--out", str(out), "--workers", "1", *extra])


def _give_e_an_image(root: Path) -> None:
    (root / "JPEGImages" / "e.jpg").write_bytes((root / "JPEGImages" / "a.jpg").read_bytes())


def _add_ids(root: Path, names, size=(16, 12)) -> None:
    """Ids with a background-only mask of 16x12 and an image of ``size``, appended to val.txt."""
    for name in names:
        write_mask(root / "SegmentationClassAug" / f"{name}.png", np.zeros((12, 16), np.uint8))
        Image.new("RGB", size).save(root / "JPEGImages" / f"{name}.jpg")
    val = root / "ImageSets/Segmentation/val.txt"
    val.write_text(val.read_text() + "".join(f"{name}\n" for name in names))


def test_corrupt_jpeg_is_named_and_nothing_is_written(tmp_path, capsys):
    root = make_voc(tmp_path / "VOC2012")
    _give_e_an_image(root)
    (root / "JPEGImages" / "c.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    out = tmp_path / "out"
    assert _run(root, out) == 1
    err = capsys.readouterr().err
    assert f"{root / 'JPEGImages' / 'c.jpg'}: cannot decode image" in err
    assert "1 of 5 ids unusable (cannot decode image: 1)" in err and "nothing written" in err
    assert not out.exists()


def test_mask_of_another_size_than_its_image_is_named(tmp_path, capsys):
    root = make_voc(tmp_path / "VOC2012")
    _give_e_an_image(root)
    Image.new("RGB", (20, 12)).save(root / "JPEGImages" / "d.jpg")
    assert _run(root, tmp_path / "out") == 1
    err = capsys.readouterr().err
    assert "d.png: mask size 16x12 differs from image size 20x12" in err
    assert "(mask size differs from image: 1)" in err
    assert not (tmp_path / "out").exists()


def test_thirty_bad_ids_print_twenty_lines_and_a_count_by_kind(tmp_path, capsys):
    root = make_voc(tmp_path / "VOC2012")  # "e" lacks its image
    names = [f"x{i:02d}" for i in range(30)]
    _add_ids(root, names)
    for name in names[:25]:
        (root / "JPEGImages" / f"{name}.jpg").unlink()
    for name in names[25:28]:
        (root / "JPEGImages" / f"{name}.jpg").write_bytes(b"garbage")
    for name in names[28:]:
        Image.new("RGB", (8, 8)).save(root / "JPEGImages" / f"{name}.jpg")
    assert _run(root, tmp_path / "out") == 1
    lines = capsys.readouterr().err.splitlines()
    assert len([line for line in lines if str(root) in line]) == 20
    assert "error: ... and 11 more problems (--show-problems 0 lists them all)" in lines
    assert ("error: 31 of 35 ids unusable (image file not found: 26, cannot decode image: 3, "
            "mask size differs from image: 2)") in lines
    assert _run(root, tmp_path / "out", "--show-problems", "0") == 1
    assert len([line for line in capsys.readouterr().err.splitlines() if str(root) in line]) == 31


def test_skip_missing_writes_subsets_says_so_and_records_the_left_out_ids(tmp_path, capsys):
    root = make_voc(tmp_path / "VOC2012")  # "e" (train_aug) lacks its image
    (root / "JPEGImages" / "c.jpg").write_bytes(b"garbage")  # "c" is in val
    out = tmp_path / "out"
    assert _run(root, out, "--skip-missing") == 0
    err = capsys.readouterr().err
    lists, labels = _read(out)
    assert lists == {"train_aug": ["a", "b"], "train": ["a"], "val": ["d"]}
    assert set(labels) == {"a", "b", "d"}
    block = err[err.index("WARNING: the written lists are SUBSETS"):]
    assert "val.txt holds 1 of 2 listed ids" in block
    assert "train_aug.txt holds 2 of 3 listed ids" in block
    assert f"left-out ids and their problems are in {out / 'left_out.json'}" in block
    record = json.loads((out / "left_out.json").read_text())
    assert set(record) == {"train_aug", "val"}  # train lost nothing
    assert record["val"]["listed"] == 2 and record["val"]["written"] == 1
    assert list(record["val"]["left_out"]) == ["c"]
    assert "c.jpg: cannot decode image" in record["val"]["left_out"]["c"]
    assert record["train_aug"] == {"listed": 3, "written": 2, "left_out": {
        "e": f"{root / 'JPEGImages' / 'e.jpg'}: image file not found"}}
    note = subset_note(out / "val.txt")
    assert note == (f"{out / 'val.txt'}: 1 of 2 listed ids (1 left out by prepare_voc "
                    f"--skip-missing, see {out / 'left_out.json'})")
    assert subset_note(out / "train.txt") is None


def test_a_rerun_without_problems_removes_the_stale_left_out_record(tmp_path, capsys):
    root = make_voc(tmp_path / "VOC2012")
    out = tmp_path / "out"
    assert _run(root, out, "--skip-missing") == 0
    assert (out / "left_out.json").is_file()
    _give_e_an_image(root)
    assert _run(root, out) == 0
    assert f"{out / 'left_out.json'}: removed" in capsys.readouterr().out
    assert not (out / "left_out.json").exists()
    assert _read(out)[0]["train_aug"] == ["a", "b", "e"]
    assert subset_note(out / "train_aug.txt") is None


def test_subset_note_counts_the_list_as_it_is_now(tmp_path):
    write_name_list(tmp_path / "val.txt", ["a", "b"])
    assert subset_note(tmp_path / "val.txt") is None
    (tmp_path / "left_out.json").write_text(json.dumps(
        {"val": {"listed": 5, "written": 3, "left_out": {"c": "x", "d": "y"}}}))
    assert subset_note(tmp_path / "val.txt").startswith(f"{tmp_path / 'val.txt'}: 2 of 5 listed "
                                                        "ids (2 left out by prepare_voc")
    assert "may be stale" in subset_note(tmp_path / "val.txt")
    (tmp_path / "left_out.json").write_text("{not json")
    assert "unreadable" in subset_note(tmp_path / "val.txt")


def test_train_aug_list_is_used_as_given(tmp_path, capsys):
    root = make_voc(tmp_path / "VOC2012")  # "e" lacks its image but is not in the given list
    given = tmp_path / "train_aug.txt"
    given.write_text("/JPEGImages/b.jpg /SegmentationClassAug/b.png\n\na\n")
    out = tmp_path / "out"
    assert _run(root, out, "--train-aug-list", str(given)) == 0
    lists, labels = _read(out)
    assert lists == {"train_aug": ["b", "a"], "train": ["a"], "val": ["c", "d"]}
    assert set(labels) == set("abcd")


def test_train_aug_list_sharing_ids_with_val_is_an_error(tmp_path, capsys):
    root = make_voc(tmp_path / "VOC2012")
    given = tmp_path / "train_aug.txt"
    given.write_text("a\nd\nb\nc\n")
    out = tmp_path / "out"
    assert _run(root, out, "--train-aug-list", str(given)) == 2
    err = capsys.readouterr().err
    assert f"--train-aug-list {given} holds 2 ids of" in err and "val.txt (c, d)" in err
    assert not out.exists()


def test_default_train_aug_warns_loudly_of_visible_val_leaks(tmp_path, capsys):
    # trainval.txt says "b" belongs to train or val, but neither list holds it: a shortened
    # val.txt, whose missing ids the default derivation would train on; and train holds "c".
    root = make_voc(tmp_path / "VOC2012", train=("a", "c"))
    _give_e_an_image(root)
    (root / "ImageSets/Segmentation/trainval.txt").write_text("a\nb\nc\nd\n")
    assert _run(root, tmp_path / "out") == 0
    err = capsys.readouterr().err
    assert "WARNING: validation images would be TRAINED ON" in err
    assert "train.txt holds 1 ids of val.txt (c)" in err
    assert "train_aug.txt holds 1 ids of trainval.txt that are in neither" in err
