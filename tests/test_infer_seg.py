"""tools/infer_seg.py end to end on a tiny generated set with a random tiny model: the files and
their palette, agreement with a direct computation, resume and --overwrite, the CRF pool, the
authors' checkpoint layout, and torchrun sharding."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from conftest import load_tool
import pytest
import torch
from PIL import Image

from afa.constants import color_palette
from afa.crf import dense_crf
from afa.data import normalize, read_image, read_mask
from afa.data.synthetic import make_demo_dataset
from afa.inference import predict_seg_logits
from afa.metrics import ConfusionMatrix
from afa.models import AFANet

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tools" / "infer_seg.py"
NUM_CLASSES = 9
LONG_SIDE = 64
SCALES = (1.0, 0.5, 0.75)

needs_crf = pytest.mark.skipif(importlib.util.find_spec("pydensecrf") is None,
                               reason="pydensecrf2 is not installed")


infer_seg = load_tool("infer_seg")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("infer_seg")
    data = root / "data"
    make_demo_dataset(data, num_train=4, num_val=3, size=64, progress=False)
    torch.manual_seed(0)
    model = AFANet("mit_b0", num_classes=NUM_CLASSES, embedding_dim=32).eval()
    torch.save({"model": model.state_dict(), "iteration": 7}, root / "ours.pth")
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}},
               root / "authors.pth")
    return {"root": root, "data": data, "model": model}


def _argv(setup, out_dir, *extra, checkpoint="ours.pth"):
    data = setup["data"]
    return ["--config", str(REPO / "configs" / "demo.yaml"),
            "--checkpoint", str(setup["root"] / checkpoint), "--split", "val",
            "--out-dir", str(out_dir), *extra,
            f"data.root={data}", f"data.list_dir={data}", "model.embedding_dim=32",
            f"infer.long_side={LONG_SIDE}", "device=cpu"]


def _val_names(setup):
    return (setup["data"] / "val.txt").read_text().split()


def _direct_logits(setup, name):
    image = read_image(setup["data"] / "JPEGImages" / f"{name}.jpg")
    logits = predict_seg_logits(setup["model"], normalize(image)[None], SCALES, True, LONG_SIDE)
    return image, logits[0]


def _mtimes(out_dir, kind="pred"):
    return {p.name: p.stat().st_mtime_ns for p in sorted((out_dir / kind).iterdir())}


def _age(out_dir):
    """Backdate every output so that a rewrite is visible whatever the file-system clock."""
    for path in out_dir.rglob("*.png"):
        os.utime(path, ns=(0, 0))


def test_files_palette_sizes_scores_resume_and_overwrite(setup, tmp_path, capsys):
    out = tmp_path / "out"
    assert infer_seg.main(_argv(setup, out)) == 0
    names = _val_names(setup)
    matrix = ConfusionMatrix(NUM_CLASSES)
    for name in names:
        image, logits = _direct_logits(setup, name)
        with Image.open(out / "pred" / f"{name}.png") as png:
            assert png.mode == "P"
            assert png.getpalette()[:768] == color_palette(256).ravel().tolist()
            assert png.size == (image.shape[1], image.shape[0])
            pred = np.array(png)
        np.testing.assert_array_equal(pred, logits.argmax(0).numpy())
        with Image.open(out / "overlay" / f"{name}.png") as overlay:
            assert overlay.mode == "RGB" and overlay.size == png.size
        matrix.update(pred, read_mask(setup["data"] / "SegmentationClassAug" / f"{name}.png"))
    scores = json.loads((out / "scores.json").read_text())
    assert scores["num_scored"] == len(names)
    assert scores["seg"]["miou"] == pytest.approx(matrix.compute().miou)
    assert "mIoU" in capsys.readouterr().out
    assert json.loads((out / "run.json").read_text())["scales"] == list(SCALES)
    assert (out / "config.yaml").is_file()

    # Resume: nothing is recomputed, the saved predictions are scored again.
    _age(out)
    (out / "scores.json").unlink()
    assert infer_seg.main(_argv(setup, out)) == 0
    assert set(_mtimes(out).values()) == {0} and set(_mtimes(out, "overlay").values()) == {0}
    assert "0 of 3 images predicted" in capsys.readouterr().out
    assert json.loads((out / "scores.json").read_text()) == scores

    # A missing output (here the overlay) makes just that image run again.
    (out / "overlay" / f"{names[1]}.png").unlink()
    assert infer_seg.main(_argv(setup, out)) == 0
    assert [n for n, t in _mtimes(out).items() if t != 0] == [f"{names[1]}.png"]

    _age(out)
    assert infer_seg.main(_argv(setup, out, "--overwrite")) == 0
    assert 0 not in _mtimes(out).values() and 0 not in _mtimes(out, "overlay").values()
    assert json.loads((out / "scores.json").read_text()) == scores

    # Other settings into the same directory are refused, naming what differs.
    assert infer_seg.main(_argv(setup, out, "--scales", "1,0.5")) == 2
    assert "scales: [1.0, 0.5, 0.75] -> [1.0, 0.5]" in capsys.readouterr().err


def test_authors_checkpoint_layout_gives_the_same_predictions(setup, tmp_path):
    assert infer_seg.main(_argv(setup, tmp_path / "ours", "--no-overlay")) == 0
    assert infer_seg.main(_argv(setup, tmp_path / "authors", "--no-overlay",
                                checkpoint="authors.pth")) == 0
    assert not (tmp_path / "ours" / "overlay").exists()
    for name in _val_names(setup):
        a = np.array(Image.open(tmp_path / "ours" / "pred" / f"{name}.png"))
        b = np.array(Image.open(tmp_path / "authors" / "pred" / f"{name}.png"))
        np.testing.assert_array_equal(a, b)


def test_missing_checkpoint_is_named(setup, tmp_path, capsys):
    assert infer_seg.main(_argv(setup, tmp_path / "out", checkpoint="nope.pth")) == 2
    assert "nope.pth" in capsys.readouterr().err


def test_corrupt_image_stops_the_run_and_is_named(setup, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(setup["data"], data)
    bad = data / "JPEGImages" / f"{_val_names(setup)[1]}.jpg"
    bad.write_bytes(b"not a jpeg")
    argv = _argv(dict(setup, data=data), tmp_path / "out")
    assert infer_seg.main(argv) == 2
    err = capsys.readouterr().err
    assert "error (rank 0)" in err and bad.name in err


@needs_crf
def test_crf_pool_streams_the_crf_of_the_fused_probabilities(setup, tmp_path):
    out = tmp_path / "crf"
    argv = _argv(setup, out, "--crf", "--crf-workers", "1", "--save-logits")
    assert infer_seg.main(argv) == 0
    assert json.loads((out / "run.json").read_text())["crf"]["iterations"] == 10
    for name in _val_names(setup):
        image, logits = _direct_logits(setup, name)
        saved = np.load(out / "logits" / f"{name}.npy")
        assert saved.dtype == np.float16 and saved.shape == (NUM_CLASSES, *image.shape[:2])
        np.testing.assert_allclose(saved, logits.numpy(), atol=2e-2, rtol=1e-2)
        expected = dense_crf(image, logits.softmax(0).numpy()).argmax(0)
        pred = np.array(Image.open(out / "pred" / f"{name}.png"))
        np.testing.assert_array_equal(pred, expected)
    assert (out / "scores.json").is_file()
    # The in-process variant with the class filter runs as well and covers every image.
    filtered = tmp_path / "filtered"
    assert infer_seg.main(_argv(setup, filtered, "--crf", "--crf-workers", "0",
                                "--crf-min-prob", "0.01", "--no-overlay")) == 0
    assert len(list((filtered / "pred").iterdir())) == len(_val_names(setup))


def test_torchrun_shards_and_sums_like_one_process(setup, tmp_path):
    single = tmp_path / "single"
    assert infer_seg.main(_argv(setup, single, "--no-overlay")) == 0
    sharded = tmp_path / "sharded"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(SCRIPT), *_argv(setup, sharded, "--no-overlay")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in _val_names(setup):
        np.testing.assert_array_equal(np.array(Image.open(single / "pred" / f"{name}.png")),
                                      np.array(Image.open(sharded / "pred" / f"{name}.png")))
    a = json.loads((single / "scores.json").read_text())
    b = json.loads((sharded / "scores.json").read_text())
    assert a == b


def test_torchrun_corrupt_image_on_one_rank_stops_every_rank_cleanly(setup, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(setup["data"], data)
    bad = data / "JPEGImages" / f"{_val_names(setup)[1]}.jpg"  # in rank 1's share
    bad.write_bytes(b"not a jpeg")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(SCRIPT), *_argv(dict(setup, data=data), tmp_path / "out")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert proc.returncode != 0
    assert "error (rank 1)" in proc.stderr and bad.name in proc.stderr
    # Rank 0 leaves with exit code 2 as well, not with a broken collective.
    assert "Connection closed by peer" not in proc.stderr
    assert "exitcode  : 1" not in proc.stderr, proc.stderr[-3000:]


def test_a_list_that_prepare_voc_shortened_is_announced(setup, tmp_path, capsys):
    lists = tmp_path / "lists"
    lists.mkdir()
    for name in ("val.txt", "cls_labels.json"):
        shutil.copy(setup["data"] / name, lists / name)
    record = lists / "left_out.json"
    record.write_text(json.dumps({"val": {"listed": 5, "written": 3, "left_out": {
        "gone1": "JPEGImages/gone1.jpg: image file not found",
        "gone2": "JPEGImages/gone2.jpg: cannot decode image"}}}))
    out = tmp_path / "out"
    assert infer_seg.main(_argv(setup, out, "--no-overlay") + [f"data.list_dir={lists}"]) == 0
    note = (f"{lists / 'val.txt'}: 3 of 5 listed ids (2 left out by prepare_voc --skip-missing, "
            f"see {record})")
    assert capsys.readouterr().out.splitlines()[0] == note
    assert json.loads((out / "scores.json").read_text())["subset_note"] == note
    # A record that does not name this list says nothing about it.
    record.write_text(json.dumps({"train_aug": {"listed": 5, "written": 4, "left_out": {}}}))
    assert infer_seg.main(_argv(setup, out, "--no-overlay") + [f"data.list_dir={lists}"]) == 0
    assert "listed ids" not in capsys.readouterr().out
    assert "subset_note" not in json.loads((out / "scores.json").read_text())


def test_protocol_presets_set_infer_values_and_explicit_overrides_win(setup, tmp_path, capsys):
    from afa.config import load_config

    voc = REPO / "configs" / "voc.yaml"
    assert infer_seg.protocol_of(load_config(voc)) == "paper"  # the config defaults
    for name, values in infer_seg.PROTOCOLS.items():
        cfg = load_config(voc, infer_seg._dotlist(values))
        assert infer_seg.protocol_of(cfg) == name
        assert list(cfg.infer.scales) == values["infer.scales"]
    assert infer_seg.protocol_of(load_config(voc, ["infer.flip=false"])) == "custom"

    # The preset's scales arrive; the test's infer.long_side=64 override still wins, so the run
    # is recorded as custom, with a note naming what differs.
    out = tmp_path / "maintainers"
    assert infer_seg.main(_argv(setup, out, "--protocol", "maintainers", "--no-overlay")) == 0
    printed = capsys.readouterr().out
    assert ("note: overrides change infer.long_side of --protocol maintainers: recorded as "
            "protocol 'custom'") in printed
    run = json.loads((out / "run.json").read_text())
    assert run["scales"] == [0.5, 0.75, 1.0, 1.25, 1.5] and run["long_side"] == LONG_SIDE
    assert run["protocol"] == "custom"
    scores = json.loads((out / "scores.json").read_text())
    assert {k: scores[k] for k in ("protocol", "scales", "long_side", "flip", "crf")} == {
        "protocol": "custom", "scales": run["scales"], "long_side": LONG_SIDE, "flip": True,
        "crf": None}

    out = tmp_path / "paper_one_scale"
    assert infer_seg.main(_argv(setup, out, "--protocol", "paper", "--scales", "1",
                                "--no-overlay")) == 0
    assert json.loads((out / "run.json").read_text())["scales"] == [1.0]


def test_help_says_what_each_protocol_sets(capsys):
    with pytest.raises(SystemExit):
        infer_seg.parse_args(["--help"])
    text = capsys.readouterr().out
    assert "paper: infer.scales=[1.0,0.5,0.75]" in text
    assert "maintainers: infer.scales=[0.5,0.75,1.0,1.25,1.5]" in text
    for setting in ("infer.long_side=512", "infer.flip=true"):
        assert setting in text
    assert ("--crf, with either: the authors' dense CRF, iterations=10 gaussian_sxy=3.0 "
            "gaussian_compat=3.0 bilateral_sxy=64.0 bilateral_srgb=5.0 bilateral_compat=4.0"
            in " ".join(text.split()))
    assert "66.0" in text


def test_new_weights_at_the_same_path_are_never_mixed_with_old_outputs(setup, tmp_path, capsys):
    """best.pth overwritten by more training: a rerun used to reuse every old prediction and
    print the old scores ("0 predicted"). Outputs are tied to the checkpoint's content (its
    SHA-256 in run.json), not its path: new weights are refused, a moved identical file resumes."""
    best = tmp_path / "best.pth"
    shutil.copy(setup["root"] / "ours.pth", best)
    out = tmp_path / "out"
    assert infer_seg.main(_argv(setup, out, "--no-overlay", checkpoint=best)) == 0
    old_preds = {n: np.array(Image.open(out / "pred" / f"{n}.png")) for n in _val_names(setup)}
    torch.manual_seed(1)
    newer = AFANet("mit_b0", num_classes=NUM_CLASSES, embedding_dim=32).eval()
    torch.save({"model": newer.state_dict(), "iteration": 9}, best)
    _age(out)
    capsys.readouterr()
    assert infer_seg.main(_argv(setup, out, "--no-overlay", checkpoint=best)) == 2
    err = capsys.readouterr().err
    assert "the checkpoint's content changed" in err and "--overwrite" in err
    assert len(err.strip().splitlines()) == 1
    assert set(_mtimes(out).values()) == {0}  # nothing was written or reused

    assert infer_seg.main(_argv(setup, out, "--no-overlay", "--overwrite", checkpoint=best)) == 0
    changed = 0
    for name in _val_names(setup):
        image = read_image(setup["data"] / "JPEGImages" / f"{name}.jpg")
        expected = predict_seg_logits(newer, normalize(image)[None], SCALES, True, LONG_SIDE)
        pred = np.array(Image.open(out / "pred" / f"{name}.png"))
        np.testing.assert_array_equal(pred, expected[0].argmax(0).numpy())
        changed += int((pred != old_preds[name]).any())
    assert changed  # the new weights do predict otherwise: the refusal mattered

    # The same file under another name: its outputs are reused, and run.json names the new path.
    moved = tmp_path / "elsewhere" / "renamed.pth"
    moved.parent.mkdir()
    shutil.move(best, moved)
    _age(out)
    assert infer_seg.main(_argv(setup, out, "--no-overlay", checkpoint=moved)) == 0
    assert "0 of 3 images predicted" in capsys.readouterr().out
    assert set(_mtimes(out).values()) == {0}
    run = json.loads((out / "run.json").read_text())
    assert run["checkpoint"] == str(moved.resolve()) and len(run["checkpoint_sha256"]) == 64
