"""tools/evaluate.py on a tiny generated set with a random or a one-iteration model: it runs, it
announces a validation list that ``prepare_voc.py --skip-missing`` shortened, it builds the
network of our checkpoint's saved config, and ``--limit`` / ``data.val_max_images`` score the
first images."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import load_tool, tiny_config
from afa.engine.trainer import train
from afa.data.synthetic import make_demo_dataset
from afa.models import AFANet

REPO = Path(__file__).resolve().parents[1]
NUM_CLASSES = 9

evaluate = load_tool("evaluate")


def test_a_val_list_that_prepare_voc_shortened_is_announced(tmp_path, capsys):
    data = tmp_path / "data"
    make_demo_dataset(data, num_train=1, num_val=2, size=32, progress=False)
    model = AFANet("mit_b0", num_classes=NUM_CLASSES, embedding_dim=32)
    torch.save({"model": model.state_dict()}, tmp_path / "ckpt.pth")
    lists = tmp_path / "lists"
    lists.mkdir()
    for name in ("train_aug.txt", "val.txt", "cls_labels.json"):
        shutil.copy(data / name, lists / name)
    record = lists / "left_out.json"
    record.write_text(json.dumps({"val": {"listed": 3, "written": 2, "left_out": {
        "gone": "JPEGImages/gone.jpg: image file not found"}}}))
    argv = ["--config", str(REPO / "configs" / "demo.yaml"), "--checkpoint",
            str(tmp_path / "ckpt.pth"), "--json", str(tmp_path / "scores.json"),
            f"data.root={data}", f"data.list_dir={lists}",
            "model.embedding_dim=32", "data.crop_size=32", "cam.scales=[1.0]", "device=cpu"]
    assert evaluate.main(argv) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == (f"{lists / 'val.txt'}: 2 of 3 listed ids (1 left out by "
                                   f"prepare_voc --skip-missing, see {record})")
    assert (tmp_path / "scores.json").is_file()
    record.unlink()
    assert evaluate.main(argv) == 0
    assert "listed ids" not in capsys.readouterr().out


@pytest.fixture(scope="module")
def trained_checkpoint(tiny_data, tmp_path_factory):
    """The checkpoint of a one-iteration run of the real trainer: MiT-B0, decoder width 32."""
    work = tmp_path_factory.mktemp("evaluate_run")
    train(tiny_config(tiny_data, work, **{"train.max_iters": 1, "train.eval_iters": 100,
                                          "train.ckpt_iters": 100}))
    return work / "checkpoints" / "iter_000001.pth"


def _voc_argv(data, checkpoint, *extra):
    """configs/voc.yaml (MiT-B1, width 256) pointed at the tiny demo set."""
    return ["--config", str(REPO / "configs" / "voc.yaml"), "--checkpoint", str(checkpoint),
            *extra, f"data.root={data}", f"data.list_dir={data}", "data.name=demo",
            "device=cpu", "cam.scales=[1.0]"]


def _count_scored(monkeypatch) -> list[int]:
    sizes = []

    def counting(model, dataset, **kwargs):
        sizes.append(len(dataset))
        return real_validate(model, dataset, **kwargs)

    real_validate = evaluate.validate
    monkeypatch.setattr(evaluate, "validate", counting)
    return sizes


def test_our_checkpoint_brings_its_network_to_another_config(tiny_data, trained_checkpoint,
                                                             tmp_path, capsys, monkeypatch):
    sizes = _count_scored(monkeypatch)
    out_json = tmp_path / "scores.json"
    assert evaluate.main(_voc_argv(tiny_data, trained_checkpoint, "--json", str(out_json))) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == (
        f"checkpoint '{trained_checkpoint}': network settings taken from its saved config (they "
        "differ from --config): model.backbone=mit_b0 (config: mit_b1), "
        "model.embedding_dim=32 (config: 256)")
    assert lines[1] == "val, 3 images, single-scale (no flip, no CRF); IoU and F1 in %"
    assert lines[2].split() == ["class", "(in", "%)", "cam", "refined", "aff_cam", "affinity", "seg"]
    assert sizes == [3]
    record = json.loads(out_json.read_text())
    assert record["num_images"] == record["split_images"] == 3 and record["split"] == "val"
    assert record["checkpoint"] == str(trained_checkpoint.resolve())
    assert 0 <= record["seg"]["miou"] <= 1


def test_an_override_against_the_checkpoint_is_refused(tiny_data, trained_checkpoint, capsys):
    argv = _voc_argv(tiny_data, trained_checkpoint, "model.embedding_dim=256")
    assert evaluate.main(argv) == 2
    err = capsys.readouterr().err
    assert "model.embedding_dim=256 was given on the command line" in err
    assert "model.embedding_dim=32 (its saved config)" in err


def test_limit_and_val_max_images_score_the_first_images(tiny_data, trained_checkpoint,
                                                          tmp_path, capsys, monkeypatch):
    sizes = _count_scored(monkeypatch)
    out_json = tmp_path / "scores.json"
    argv = _voc_argv(tiny_data, trained_checkpoint, "--limit", "2", "--json", str(out_json))
    assert evaluate.main(argv) == 0
    out = capsys.readouterr().out
    assert ("scoring the first 2 of 3 images of val (--limit / data.val_max_images): not the "
            "split's scores") in out
    assert "val, 2 images, single-scale" in out
    record = json.loads(out_json.read_text())
    assert (record["num_images"], record["split_images"]) == (2, 3)
    assert evaluate.main(_voc_argv(tiny_data, trained_checkpoint, "data.val_max_images=1")) == 0
    assert evaluate.main(_voc_argv(tiny_data, trained_checkpoint, "--limit", "9")) == 0
    assert sizes == [2, 1, 3]
    assert "scoring the first 3 of 3" in capsys.readouterr().out
    assert evaluate.main(_voc_argv(tiny_data, trained_checkpoint, "--limit", "2",
                                   "data.val_max_images=1")) == 2
    assert "--limit 2 and data.val_max_images=1 disagree" in capsys.readouterr().err
    assert evaluate.main(_voc_argv(tiny_data, trained_checkpoint, "--limit", "0")) == 2
    assert sizes == [2, 1, 3]


def test_help_explains_every_flag_and_the_single_scale_score(capsys):
    with pytest.raises(SystemExit) as stop:
        evaluate.main(["--help"])
    assert stop.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--config", "--checkpoint", "--split", "--limit N", "--json OUT.json",
                 "key=value"):
        assert flag in text
    assert "SINGLE-SCALE, no flip, no CRF" in text and "tools/infer_seg.py" in text
    assert "IoU in %" in text and "data.val_max_images" in text


def test_a_missing_checkpoint_is_named(tiny_data, tmp_path, capsys):
    assert evaluate.main(_voc_argv(tiny_data, tmp_path / "none.pth")) == 2
    assert f"Checkpoint not found: '{tmp_path / 'none.pth'}'" in capsys.readouterr().err


class _Images:
    """Validation samples of the given (H, W) sizes, image labels [1, 0], all-background masks."""

    def __init__(self, sizes):
        self.sizes = sizes

    def __len__(self):
        return len(self.sizes)

    def __getitem__(self, index):
        height, width = self.sizes[index]
        return {"name": f"img_{index}", "image": torch.randn(3, height, width),
                "label": torch.tensor([1.0, 0.0]),
                "mask": torch.zeros(height, width, dtype=torch.long)}


def test_an_image_too_small_for_the_encoder_is_named_or_left_out():
    """A 40 x 90 image at CAM scale 0.5 is 20 px high, below the 29 px MiT accepts: the error
    names the image and the size it needs (it was a raw convolution error); with skip_bad it is
    left out and counted, and the 75 x 101 one beside it is scored."""
    from afa.data import DataError
    from afa.engine.validate import validate
    from afa.models import PAR

    model = AFANet("mit_b0", num_classes=3, embedding_dim=32)
    kwargs = dict(par=PAR(), device=torch.device("cpu"), radius=8,
                  class_names=["background", "a", "b"])
    images = _Images([(75, 101), (40, 90)])
    with pytest.raises(DataError) as err:
        validate(model, images, cam_scales=(1.0, 0.5), **kwargs)
    assert str(err.value) == (
        "img_1: 40x90 px is too small for the encoder: at scale 0.5 its short side becomes "
        "20 px, below the 29 px it accepts (scales [1.0, 0.5] need a short side of at least "
        "58 px)")
    scores = validate(model, images, cam_scales=(1.0, 0.5), skip_bad=True, **kwargs)
    assert scores["skipped_images"] == 1
    assert scores["cam"]["num_pixels"] == 75 * 101
    # Scales above 1 still run the scale-1 forward: a 20 px side is too short for it.
    with pytest.raises(DataError, match="at scale 1 its short side becomes 20 px"):
        validate(model, _Images([(20, 64)]), cam_scales=(1.0, 1.5), **kwargs)
    assert validate(model, _Images([(40, 90)]), cam_scales=(1.0,), **kwargs)["cls_f1"] >= 0
