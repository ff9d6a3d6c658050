"""tools/show_affinity.py: the affinity picture of a checkpoint on an image."""

import numpy as np
import pytest
import torch
from PIL import Image

from afa.models import AFANet
from conftest import REPO, load_tool

show_affinity = load_tool("show_affinity")


def test_picture_has_a_panel_per_pixel(tmp_path):
    model = AFANet("mit_b0", num_classes=9, embedding_dim=32)
    torch.save({"model": model.state_dict()}, tmp_path / "ckpt.pth")
    image = np.random.default_rng(0).integers(0, 255, (70, 90, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "img.jpg")
    out = tmp_path / "aff.png"
    argv = ["--config", str(REPO / "configs" / "demo.yaml"), "--checkpoint",
            str(tmp_path / "ckpt.pth"), "--image", str(tmp_path / "img.jpg"),
            "--pixels", "10,20", "60,80", "--out", str(out), "model.embedding_dim=32",
            "infer.long_side=64"]
    assert show_affinity.main(argv) == 0
    picture = np.asarray(Image.open(out))
    # image + 2 affinity maps + segmentation, 90 px wide each, 4 px apart
    assert picture.shape[1] == 4 * 90 + 3 * 4 and picture.shape[2] == 3


def test_pixel_outside_the_image_is_an_error(tmp_path, capsys):
    model = AFANet("mit_b0", num_classes=9, embedding_dim=32)
    torch.save(model.state_dict(), tmp_path / "ckpt.pth")
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "img.png")
    argv = ["--config", str(REPO / "configs" / "demo.yaml"), "--checkpoint",
            str(tmp_path / "ckpt.pth"), "--image", str(tmp_path / "img.png"), "--pixels", "50,5",
            "--out", str(tmp_path / "o.png"), "model.embedding_dim=32"]
    assert show_affinity.main(argv) == 2
    assert "outside" in capsys.readouterr().err


def test_an_image_too_thin_for_the_encoder_is_an_error(tmp_path, capsys):
    """30 x 600 px resized to a long side of 128 is 6 px high, below MiT's 29: the error says so
    (it was a raw convolution error)."""
    model = AFANet("mit_b0", num_classes=9, embedding_dim=32)
    torch.save(model.state_dict(), tmp_path / "ckpt.pth")
    Image.fromarray(np.zeros((30, 600, 3), np.uint8)).save(tmp_path / "img.png")
    argv = ["--config", str(REPO / "configs" / "demo.yaml"), "--checkpoint",
            str(tmp_path / "ckpt.pth"), "--image", str(tmp_path / "img.png"), "--pixels", "5,5",
            "--out", str(tmp_path / "o.png"), "model.embedding_dim=32", "infer.long_side=128"]
    assert show_affinity.main(argv) == 2
    err = capsys.readouterr().err
    assert ("error: the image (30x600 px, long side resized to 128): 6x128 px is too small for "
            "the encoder: at scale 1 its short side becomes 6 px, below the 29 px it accepts "
            "(scales [1.0] need a short side of at least 29 px)") in err
    assert not (tmp_path / "o.png").exists()


def test_checkpoint_brings_its_network_and_overrides_stand_anywhere(tmp_path, capsys):
    """Our checkpoint's saved config decides the network (demo.yaml says width 128, the
    checkpoint 32); a key=value right after --pixels is an override, not a pixel."""
    from omegaconf import OmegaConf

    from afa.config import load_config

    config = REPO / "configs" / "demo.yaml"
    model = AFANet("mit_b0", num_classes=9, embedding_dim=32)
    saved = OmegaConf.to_container(load_config(config, ["model.embedding_dim=32"]), resolve=True)
    torch.save({"model": model.state_dict(), "config": saved}, tmp_path / "ckpt.pth")
    Image.fromarray(np.zeros((50, 70, 3), np.uint8)).save(tmp_path / "img.png")
    argv = ["--config", str(config), "--checkpoint", str(tmp_path / "ckpt.pth"), "--image",
            str(tmp_path / "img.png"), "--pixels", "5,5", "40,60", "infer.long_side=64",
            "--out", str(tmp_path / "o.png")]
    assert show_affinity.main(argv) == 0
    assert "model.embedding_dim=32" in capsys.readouterr().out
    assert np.asarray(Image.open(tmp_path / "o.png")).shape[1] == 4 * 70 + 3 * 4


def test_help_gives_the_description_once(capsys):
    with pytest.raises(SystemExit) as stop:
        show_affinity.main(["--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert out.count("Show what AFA learned from attention") == 1
    assert "python tools/show_affinity.py --config" in out  # the usage example stays
