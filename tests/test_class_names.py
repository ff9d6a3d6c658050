"""Class names of one's own for the tools that read saved outputs: a text file (prepare_tags'
classes.txt), or the config.yaml of the inference run that wrote the outputs; a 4-class list
through afa.io, tools/visualize.py and tools/make_video.py (tools/eval_miou.py: its own tests)."""

import json

import numpy as np
import pytest
from conftest import load_tool
from PIL import Image

from afa.constants import VOC_CLASSES
from afa.data import DataError
from afa.io import (class_names_from, read_class_names, run_class_names, run_dir_class_names,
                    write_label_png)

CUSTOM = ["background", "road", "car", "tree"]
CUSTOM_YAML = "data:\n  name: custom\n  classes: [background, road, car, tree]\n  root: x\n"

visualize = load_tool("visualize")
make_video = load_tool("make_video")


def _run_dir(path, text=CUSTOM_YAML):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.yaml").write_text(text)
    return path


def test_a_file_of_names_with_or_without_background(tmp_path):
    path = tmp_path / "classes.txt"
    path.write_text("background\nroad\ncar\ntree\n")
    assert read_class_names(path) == CUSTOM
    path.write_text(" road \n\ncar\ntree")  # spaces and blank lines ignored
    assert read_class_names(path) == CUSTOM
    assert class_names_from(str(path)) == CUSTOM
    path.write_bytes(b"\xff\xfe road")
    with pytest.raises(DataError, match="not a UTF-8 text file"):
        read_class_names(path)


def test_the_names_of_a_run_custom_or_built_in(tmp_path):
    assert run_class_names(_run_dir(tmp_path / "custom")) == CUSTOM
    voc = _run_dir(tmp_path / "voc", "data:\n  name: voc\n  classes: null\n")
    assert run_class_names(voc) == list(VOC_CLASSES)
    assert class_names_from(str(voc)) == list(VOC_CLASSES)
    assert class_names_from("demo")[1] == "disc"
    assert run_class_names(tmp_path) is None  # no config.yaml: not a run
    bad = _run_dir(tmp_path / "bad", "data:\n  name: mine\n")
    with pytest.raises(DataError, match="data.name='mine' names no built-in class set"):
        run_class_names(bad)


def test_output_folders_find_their_run_and_runs_must_agree(tmp_path):
    seg = _run_dir(tmp_path / "seg")
    (seg / "pred").mkdir()
    cam = _run_dir(tmp_path / "cam")
    (cam / "refined").mkdir()
    assert run_dir_class_names([seg / "pred", None, cam / "refined"]) == CUSTOM
    assert run_dir_class_names([tmp_path / "elsewhere"]) is None
    other = _run_dir(tmp_path / "other", "data:\n  name: voc\n")
    with pytest.raises(DataError, match="name different classes"):
        run_dir_class_names([seg / "pred", other])


# --------------------------------------------------------------------------------------------
# tools/visualize.py
# --------------------------------------------------------------------------------------------


@pytest.fixture
def outputs(tmp_path):
    """An image, a 4-class run's CAMs (infer_cam: out/cam/cam/<id>.npy) and predictions
    (infer_seg: out/seg/pred/<id>.png)."""
    image = np.random.default_rng(0).integers(0, 256, (32, 48, 3), dtype=np.uint8)
    (tmp_path / "img").mkdir()
    Image.fromarray(image).save(tmp_path / "img" / "a.png")
    cam_run = _run_dir(tmp_path / "cam")
    (cam_run / "cam").mkdir()
    cams = np.zeros((3, 8, 12), np.float32)
    cams[2, 2, 2] = 0.9  # tree
    cams[0, 1, 1] = 0.4  # road
    np.save(cam_run / "cam" / "a.npy", cams)
    seg_run = _run_dir(tmp_path / "seg")
    (seg_run / "pred").mkdir()
    pred = np.zeros((32, 48), np.uint8)
    pred[4:20, 4:20] = 3
    write_label_png(seg_run / "pred" / "a.png", pred)
    (tmp_path / "list.txt").write_text("a\n")
    return tmp_path


def _visualize_args(root, *extra):
    return ["--list", str(root / "list.txt"), "--image-dir", str(root / "img"),
            "--cam-dir", str(root / "cam" / "cam"), "--pred-dir", str(root / "seg" / "pred"),
            "--out-dir", str(root / "out"), *extra]


def test_visualize_takes_the_run_names_a_file_or_a_set(outputs, monkeypatch):
    titles = []
    load_cams = visualize.load_cams

    def recording(*args, **kwargs):
        cams, names = load_cams(*args, **kwargs)
        titles.append(names)
        return cams, names

    monkeypatch.setattr(visualize, "load_cams", recording)
    args = visualize.parse_args(_visualize_args(outputs))
    assert visualize.resolve_class_names(args) == CUSTOM
    (written,) = visualize.main(_visualize_args(outputs))
    assert written.is_file() and titles[-1] == ["tree", "road"]

    names = outputs / "classes.txt"
    names.write_text("road\ncar\nforest\n")
    visualize.main(_visualize_args(outputs, "--class-names", str(names)))
    assert titles[-1] == ["forest", "road"]
    # A built-in set of another size than the CAMs: the file is named, in one line.
    with pytest.raises(SystemExit, match=r"visualize: error: .*a\.npy: expected \(C, h, w\) "
                                         r"CAMs with C = 20 or 21"):
        visualize.main(_visualize_args(outputs, "--class-names", "voc"))
    # Without a run beside the folders: VOC's, as before.
    (outputs / "cam" / "config.yaml").unlink()
    (outputs / "seg" / "config.yaml").unlink()
    assert visualize.resolve_class_names(visualize.parse_args(_visualize_args(outputs))) == \
        list(VOC_CLASSES)


# --------------------------------------------------------------------------------------------
# tools/make_video.py
# --------------------------------------------------------------------------------------------


def test_make_video_names_a_custom_run_s_classes(outputs, tmp_path, monkeypatch, capsys):
    """The legend of the GIF names the 4-class run's classes (make_video used to look the names
    up by data.name alone, which knows no custom set)."""
    seen = []
    label_entries = make_video.label_entries

    def recording(*args, **kwargs):
        entries = label_entries(*args, **kwargs)
        seen.append([name for name, _ in entries])
        return entries

    monkeypatch.setattr(make_video, "label_entries", recording)
    gif = tmp_path / "a.gif"
    assert make_video.main(["--images", str(outputs / "img"), "--seg-dir",
                            str(outputs / "seg"), "--out", str(gif)]) == 0
    assert seen == [["tree"]] and Image.open(gif).n_frames == 1
    # Two runs that name other classes are refused in one line.
    (outputs / "cam" / "config.yaml").write_text("data:\n  name: voc\n")
    (outputs / "cam" / "classes").mkdir()
    (outputs / "cam" / "classes" / "a.json").write_text(json.dumps({"classes": ["road"]}))
    assert make_video.main(["--images", str(outputs / "img"), "--seg-dir",
                            str(outputs / "seg"), "--cam-dir", str(outputs / "cam"),
                            "--out", str(gif)]) == 2
    (line,) = [n for n in capsys.readouterr().err.splitlines() if "error" in n]  # no bars
    assert line.startswith("make_video: error: ") and "name different classes" in line
