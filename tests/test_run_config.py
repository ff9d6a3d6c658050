"""afa.engine.run_config: a checkpoint's saved config decides the network a tool builds."""

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from afa import config as C
from afa.config import ConfigError, load_config
from afa.engine.run_config import (CheckpointError, model_config_from_checkpoint,
                                   read_checkpoint)
from afa.models import AFANet

REPO = Path(__file__).resolve().parents[1]
VOC_CONFIG = REPO / "configs" / "voc.yaml"
DEMO_CONFIG = REPO / "configs" / "demo.yaml"
NUM_CLASSES = 9


def _our_checkpoint(**model) -> dict:
    """What the trainer saves, for a tiny demo run: weights and the run's merged config."""
    settings = {"backbone": "mit_b0", "embedding_dim": 32, "stride": [4, 2, 2, 1],
                "pooling": "gmp", **model}
    cfg = load_config(DEMO_CONFIG, [f"model.{k}={v}".replace(" ", "")
                                    for k, v in settings.items()])
    net = AFANet(**C.model_kwargs(cfg))
    return {"model": net.state_dict(), "iteration": 2,
            "config": OmegaConf.to_container(cfg, resolve=True)}


def _voc_cfg(*overrides):
    """configs/voc.yaml (MiT-B1, decoder width 256) on data with the demo's 9 classes."""
    return load_config(VOC_CONFIG, ["data.name=demo", *overrides])


def test_the_network_settings_of_the_saved_config_win_and_are_named():
    state = _our_checkpoint(pooling="gap", stride=[4, 2, 2, 2])
    cfg = _voc_cfg()
    result = model_config_from_checkpoint(cfg, state)
    assert result.changed == {"model.backbone": ("mit_b1", "mit_b0"),
                              "model.embedding_dim": (256, 32),
                              "model.stride": ([4, 2, 2, 1], [4, 2, 2, 2]),
                              "model.pooling": ("gmp", "gap")}
    assert result.note == (
        "the given checkpoint: network settings taken from its saved config (they differ from "
        "--config): model.backbone=mit_b0 (config: mit_b1), model.embedding_dim=32 (config: "
        "256), model.stride=[4,2,2,2] (config: [4,2,2,1]), model.pooling=gap (config: gmp)")
    new = result.cfg
    assert OmegaConf.is_readonly(new) and new.model.pretrained is None
    assert cfg.model.backbone == "mit_b1" and cfg.model.pretrained == "pretrained/mit_b1.pth"
    assert new.data == cfg.data and new.cam == cfg.cam  # nothing but the network changes
    net = AFANet(**C.model_kwargs(new))  # no ImageNet weights looked for
    net.load_weights(state)
    assert net.pooling == "gap"


def test_a_path_works_like_the_loaded_dict(tmp_path):
    torch.save(_our_checkpoint(), tmp_path / "ckpt.pth")
    cfg, changed, note = model_config_from_checkpoint(_voc_cfg(), tmp_path / "ckpt.pth")
    assert set(changed) == {"model.backbone", "model.embedding_dim"}
    assert note.startswith(f"checkpoint '{tmp_path / 'ckpt.pth'}': network settings taken")


def test_a_checkpoint_that_agrees_with_the_config_changes_nothing_but_pretrained():
    state = _our_checkpoint(backbone="mit_b1", embedding_dim=256)
    result = model_config_from_checkpoint(_voc_cfg(), state)
    assert result.changed == {} and result.note is None
    assert result.cfg.model.pretrained is None


def test_the_authors_checkpoints_carry_no_config_and_change_nothing():
    net = AFANet("mit_b0", num_classes=NUM_CLASSES, embedding_dim=32)
    authors = {f"module.{k}": v for k, v in net.state_dict().items()}  # a DDP state dict
    cfg = _voc_cfg("model.backbone=mit_b0", "model.embedding_dim=32")
    result = model_config_from_checkpoint(cfg, authors, ["model.backbone=mit_b0"])
    assert result.changed == {} and result.note is None
    assert result.cfg.model.backbone == "mit_b0" and result.cfg.model.pretrained is None
    AFANet(**C.model_kwargs(result.cfg)).load_weights(authors)


def test_an_override_that_contradicts_the_checkpoint_is_an_error():
    state = _our_checkpoint()
    cfg = _voc_cfg("model.backbone=mit_b1")
    with pytest.raises(ConfigError, match=r"model.backbone=mit_b1 was given on the command line, "
                       r"but the given checkpoint was trained with model.backbone=mit_b0"):
        model_config_from_checkpoint(cfg, state, ["model.backbone=mit_b1", "device=cpu"])
    # The same value as the checkpoint's is fine, and so is a contradicting key the user did
    # not type (it came from the config file).
    cfg = _voc_cfg("model.backbone=mit_b0")
    result = model_config_from_checkpoint(cfg, state, ["model.backbone=mit_b0"])
    assert list(result.changed) == ["model.embedding_dim"]


def test_another_number_of_classes_is_an_error_not_adopted():
    state = _our_checkpoint()
    with pytest.raises(ConfigError, match=r"trained on data.name=demo \(9 classes\), but the "
                       r"config's data is data.name=voc \(21 classes\)"):
        model_config_from_checkpoint(load_config(VOC_CONFIG), state)


def test_missing_and_unreadable_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="Checkpoint not found"):
        model_config_from_checkpoint(_voc_cfg(), tmp_path / "nope.pth")
    bad = tmp_path / "bad.pth"
    bad.write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match=f"Cannot read checkpoint '{bad}'"):
        read_checkpoint(bad)
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="holds a list"):
        read_checkpoint(tmp_path / "list.pth")
