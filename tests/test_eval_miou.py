"""tools/eval_miou.py on tiny PNG directories with a hand-computed confusion matrix."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from conftest import load_tool
import pytest

from afa.io import write_label_png

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tools" / "eval_miou.py"

# The same two images as tests/test_metrics.py: classes 0..2 present, 3..20 absent everywhere.
GT = {
    "img_a": np.array([[0, 0, 1, 1], [0, 255, 1, 2]]),
    "img_b": np.array([[2, 2, 255], [0, 1, 2], [1, 1, 1]]),
}
PRED = {
    "img_a": np.array([[0, 1, 1, 1], [0, 2, 2, 2]]),
    "img_b": np.array([[2, 0, 0], [0, 1, 1], [1, 1, 1]]),
}
EXPECTED_TOP_LEFT = [[3, 1, 0], [0, 6, 1], [1, 1, 2]]  # rows = GT, columns = prediction
EXPECTED_IOU = {"background": 3 / 5, "aeroplane": 6 / 9, "bicycle": 2 / 5}


eval_miou = load_tool("eval_miou")


@pytest.fixture
def dirs(tmp_path):
    pred_dir, gt_dir = tmp_path / "pred", tmp_path / "gt"
    pred_dir.mkdir()
    gt_dir.mkdir()
    for name in GT:
        write_label_png(gt_dir / f"{name}.png", GT[name])
        write_label_png(pred_dir / f"{name}.png", PRED[name])
    list_file = tmp_path / "val.txt"
    list_file.write_text("img_a\nimg_b\n")
    return pred_dir, gt_dir, list_file


def _args(pred_dir, gt_dir, list_file, *extra):
    return ["--pred-dir", str(pred_dir), "--gt-dir", str(gt_dir), "--list", str(list_file),
            "--num-classes", "21", "--no-progress", *extra]


def test_scores_and_json(dirs, tmp_path, capsys):
    json_path = tmp_path / "out" / "miou.json"
    result = eval_miou.main(_args(*dirs, "--json", str(json_path), "--workers", "2"))
    saved = json.loads(json_path.read_text())
    assert saved == json.loads(json.dumps(result))
    matrix = np.array(saved["confusion_matrix"])
    assert matrix.shape == (21, 21)
    np.testing.assert_array_equal(matrix[:3, :3], EXPECTED_TOP_LEFT)
    assert matrix.sum() == 15  # the two ignore pixels are not counted
    for name, iou in EXPECTED_IOU.items():
        assert saved["iou_per_class"][name] == pytest.approx(iou)
    assert saved["iou_per_class"]["bird"] is None  # absent from both: excluded, not 0
    assert saved["miou"] == pytest.approx(sum(EXPECTED_IOU.values()) / 3)
    assert saved["pixel_acc"] == pytest.approx(11 / 15)
    assert saved["mean_acc"] == pytest.approx((3 / 4 + 6 / 7 + 2 / 4) / 3)
    assert saved["num_images"] == 2
    table = capsys.readouterr().out
    assert "aeroplane" in table and "tvmonitor" in table and "55.56" in table


def test_missing_prediction_is_named(dirs):
    pred_dir, gt_dir, list_file = dirs
    (pred_dir / "img_b.png").unlink()
    with pytest.raises(SystemExit, match=r"missing prediction.*img_b\.png"):
        eval_miou.main(_args(pred_dir, gt_dir, list_file))


def test_size_mismatch_names_file_and_sizes(dirs):
    pred_dir, gt_dir, list_file = dirs
    write_label_png(pred_dir / "img_a.png", np.zeros((2, 5), np.uint8))
    with pytest.raises(SystemExit, match=r"img_a\.png.*5x2.*4x2"):
        eval_miou.main(_args(pred_dir, gt_dir, list_file))


def test_out_of_range_label_is_named(dirs):
    pred_dir, gt_dir, list_file = dirs
    write_label_png(pred_dir / "img_b.png", np.full((3, 3), 21, np.uint8))
    with pytest.raises(SystemExit, match=r"img_b\.png.*\[21\]"):
        eval_miou.main(_args(pred_dir, gt_dir, list_file))


def test_command_line(dirs, tmp_path):
    json_path = tmp_path / "cli.json"
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run(
        [sys.executable, str(SCRIPT), *_args(*dirs, "--json", str(json_path))],
        capture_output=True, text=True, env=env, check=True,
    )
    assert "mIoU" in done.stdout
    assert json.loads(json_path.read_text())["miou"] == pytest.approx(
        sum(EXPECTED_IOU.values()) / 3
    )


def test_class_rules_differ_on_a_subset(tmp_path, capsys):
    """A class predicted but absent from the ground truth (as on a subset of val): the standard
    rule counts it with IoU 0, the authors' rule leaves it out of the mean."""
    pred_dir, gt_dir = tmp_path / "pred", tmp_path / "gt"
    pred_dir.mkdir()
    gt_dir.mkdir()
    write_label_png(gt_dir / "a.png", np.array([[0, 0, 1, 1], [0, 0, 1, 255]]))
    write_label_png(pred_dir / "a.png", np.array([[0, 5, 1, 1], [0, 0, 1, 5]]))
    list_file = tmp_path / "sub.txt"
    list_file.write_text("a\n")
    # background 3/4, aeroplane 3/3, class 5 (bottle): 0 / 1 (the ignore pixel is not counted).
    standard = (3 / 4 + 1 + 0) / 3
    gt_only = (3 / 4 + 1) / 2
    json_path = tmp_path / "scores.json"
    result = eval_miou.main(_args(pred_dir, gt_dir, list_file, "--class-rule", "both",
                                  "--json", str(json_path)))
    assert result["miou"] == pytest.approx(standard)
    assert result["miou_gt_only"] == pytest.approx(gt_only)
    assert json.loads(json_path.read_text())["miou_gt_only"] == pytest.approx(gt_only)
    out = capsys.readouterr().out
    rows = _rows(out)
    assert rows["mIoU (standard)"] == [f"{100 * standard:.2f}"]
    assert rows["mIoU (gt-only)"] == [f"{100 * gt_only:.2f}"]
    # Predicted, not in the ground truth: IoU 0, precision 0, no recall.
    assert rows["bottle"] == ["0.00", "0.00", "-"]
    assert "over the 3 classes in the ground truth or the prediction" in out
    assert "over the 2 classes in the ground truth only (the authors' rule)" in out

    eval_miou.main(_args(pred_dir, gt_dir, list_file, "--class-rule", "gt-only"))
    rows = _rows(capsys.readouterr().out)
    assert rows["mIoU (gt-only)"] == [f"{100 * gt_only:.2f}"] and "mIoU (standard)" not in rows
    assert rows["bottle"] == ["-", "0.00", "-"]  # no IoU under this rule; its precision stays
    eval_miou.main(_args(pred_dir, gt_dir, list_file))  # default: standard only
    rows = _rows(capsys.readouterr().out)
    assert "mIoU (standard)" in rows and "mIoU (gt-only)" not in rows


def _rows(table: str) -> dict[str, list[str]]:
    """``{row name: its cells}`` of a printed table (names may hold spaces, cells do not)."""
    rows = {}
    for line in table.splitlines():
        fields = line.split()
        cells = [f for f in fields if f == "-" or f.replace(".", "").isdigit()]
        name = " ".join(fields[:len(fields) - len(cells)])
        if name and cells and not line.startswith("-"):
            rows[name] = cells
    return rows


def test_class_rules_agree_when_every_predicted_class_is_in_the_ground_truth(dirs):
    result = eval_miou.main(_args(*dirs))
    assert result["miou_gt_only"] == pytest.approx(result["miou"])


def test_a_nine_class_set_is_named_as_the_demo_and_shows_precision_and_recall(dirs, capsys):
    """9 classes: make demo's names by default; each row gives IoU, precision and recall, which
    tell a partial prediction (precise, low recall) from one that spills (the reverse)."""
    pred_dir, gt_dir, list_file = dirs
    args = _args(pred_dir, gt_dir, list_file)
    args[args.index("--num-classes") + 1] = "9"
    eval_miou.main(args)
    rows = _rows(capsys.readouterr().out)
    # The same confusion as above: class 1 is the demo's disc, class 2 its square.
    assert rows["disc"] == ["66.67", "75.00", "85.71"]  # IoU 6/9, precision 6/8, recall 6/7
    assert rows["square"] == ["40.00", "66.67", "50.00"]  # 2/5, 2/3, 2/4
    assert rows["ellipse"] == ["-", "-", "-"]


# --------------------------------------------------------------------------------------------
# Class names of one's own: a file, or the run that wrote the predictions
# --------------------------------------------------------------------------------------------

CUSTOM = ["background", "road", "car", "tree"]


def _custom_dirs(tmp_path):
    """A 4-class run: ``out/pred`` beside the ``out/config.yaml`` that infer_seg saves (only its
    data section matters here), and the ground truth of classes 0..2."""
    out, gt_dir = tmp_path / "out", tmp_path / "gt"
    (out / "pred").mkdir(parents=True)
    gt_dir.mkdir()
    (out / "config.yaml").write_text(
        "data:\n  name: custom\n  classes: [background, road, car, tree]\n")
    for name in GT:
        write_label_png(gt_dir / f"{name}.png", GT[name])
        # Class 2 predicted as 3: every class of the 4 has a row.
        write_label_png(out / "pred" / f"{name}.png", np.where(PRED[name] == 2, 3, PRED[name]))
    list_file = tmp_path / "val.txt"
    list_file.write_text("img_a\nimg_b\n")
    return out, gt_dir, list_file


def _custom_args(pred_dir, gt_dir, list_file, *extra):
    return ["--pred-dir", str(pred_dir), "--gt-dir", str(gt_dir), "--list", str(list_file),
            "--no-progress", *extra]


def test_class_names_from_a_file_count_the_classes(tmp_path, capsys):
    out, gt_dir, list_file = _custom_dirs(tmp_path)
    names_file = tmp_path / "classes.txt"
    names_file.write_text("background\nroad\n\n  car \ntree\n")
    # Another folder than the run's, so that the file is what names them.
    other = tmp_path / "pred_copy"
    other.mkdir()
    for path in (out / "pred").iterdir():
        other.joinpath(path.name).write_bytes(path.read_bytes())
    result = eval_miou.main(_custom_args(other, gt_dir, list_file, "--class-names",
                                         str(names_file)))
    assert result["class_names"] == CUSTOM and len(result["confusion_matrix"]) == 4
    rows = _rows(capsys.readouterr().out)
    assert rows["road"][0] == "66.67"  # the same confusion as above: 6/9
    assert set(CUSTOM) <= set(rows)

    # A list of objects alone: background is put first, as for training.
    names_file.write_text("road\ncar\ntree\n")
    result = eval_miou.main(_custom_args(other, gt_dir, list_file, "--class-names",
                                         str(names_file), "--num-classes", "4"))
    assert result["class_names"] == CUSTOM


def test_class_names_from_the_run_that_wrote_the_predictions(tmp_path, capsys):
    out, gt_dir, list_file = _custom_dirs(tmp_path)
    result = eval_miou.main(_custom_args(out / "pred", gt_dir, list_file))
    assert result["class_names"] == CUSTOM
    assert "tree" in _rows(capsys.readouterr().out)
    # The run's folder named explicitly does the same.
    result = eval_miou.main(_custom_args(out / "pred", gt_dir, list_file, "--class-names",
                                         str(out)))
    assert result["class_names"] == CUSTOM


@pytest.mark.parametrize("make, extra, message", [
    (lambda p: p.write_text("road\nroad\n"), (), "class names must be distinct; repeated: 'road'"),
    (lambda p: p.write_text("\n\n"), (), "no class names"),
    (lambda p: p.write_text("road\ncar\ntree\n"), ("--num-classes", "21"),
     "has 4 classes but --num-classes is 21"),
    (lambda p: p.mkdir(), (), "a folder without config.yaml"),
    (lambda p: None, (), "neither a built-in set (voc, coco, demo) nor an existing file"),
], ids=["repeated", "empty", "count", "folder", "missing"])
def test_bad_class_names_are_one_line_errors(tmp_path, make, extra, message):
    out, gt_dir, list_file = _custom_dirs(tmp_path)
    names = tmp_path / "names"
    make(names)
    with pytest.raises(SystemExit) as exit_info:
        eval_miou.main(_custom_args(out / "pred", gt_dir, list_file, "--class-names",
                                    str(names), *extra))
    text = str(exit_info.value)
    assert text.startswith("eval_miou: error: ") and message in text and "\n" not in text


def test_without_names_or_a_count_the_tool_asks_for_one(dirs):
    with pytest.raises(SystemExit, match="give --num-classes, or --class-names"):
        eval_miou.main(_custom_args(*dirs))
