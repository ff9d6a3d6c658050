"""Config values: unknown keys, wrong types and out-of-range settings are one-line errors where
the config is loaded, and settings that run but probably mislead are warned about in train.log;
the phase keys and the default weights of each backbone."""

import subprocess
import sys

import pytest

from afa.config import ConfigError, config_warnings, load_config
from afa.engine.trainer import train
from conftest import DEMO_CONFIG, REPO, load_tool, tiny_config

train_tool = load_tool("train")
VOC = REPO / "configs" / "voc.yaml"


@pytest.mark.parametrize("override, message", [
    ("optim.lr=-1", "'optim.lr' must be > 0, got -1.0"),
    ("data.crop_size=0", "'data.crop_size' must be >= 16, got 0"),
    ("train.global_batch=0", "'train.global_batch' must be >= 1, got 0"),
    ("train.max_iters=0", "'train.max_iters' must be >= 1, got 0"),
    ("train.max_iters=-5", "'train.max_iters' must be >= 1, got -5"),
    ("data.num_classes=5", "Bad config key 'data.num_classes' in the command line: it is now "
                           "derived from data.name (drop it)"),
    ("cam.bkg_score=0.4", "Bad config key 'cam.bkg_score' in the command line: it is now "
                          "cam.thresholds.background"),
    ("cam.scales=[]", "'cam.scales' must hold at least 1 positive values, got []"),
    ("data.scale_range=[2.0,0.5]", "'data.scale_range' must be [low, high] with low <= high"),
    ("cam.thresholds.low=0.6", "'cam.thresholds.low' (0.6) must not exceed "
                               "'cam.thresholds.high' (0.55)"),
    ("par.num_iter=-1", "'par.num_iter' must be >= 0, got -1"),
])
def test_a_value_no_run_can_use_is_one_line_and_exit_2(override, message, tmp_path, capsys):
    with pytest.raises(ConfigError) as caught:
        load_config(VOC, [override])
    assert message in str(caught.value)
    assert train_tool.main(["--config", str(VOC), "--work-dir", str(tmp_path), override]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]
    assert not any(tmp_path.iterdir())  # refused before anything is written


def test_the_shipped_configs_pass_without_warnings():
    for name in ("voc", "coco", "demo", "demo_full"):
        assert config_warnings(load_config(REPO / "configs" / f"{name}.yaml")) == []


def test_a_warm_up_longer_than_the_run_is_warned_about(tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, tmp_path, **{"train.max_iters": 2, "optim.warmup_iters": 5,
                                              "train.eval_iters": 100})
    train(cfg)
    log = (tmp_path / "train.log").read_text()
    peak = cfg.optim.lr * (1e-6 + (1 - 1e-6) * 1 / 5)  # lr_at(1): the last step's rate
    assert (f"WARNING optim.warmup_iters=5 is not below train.max_iters=2: the learning rate "
            f"stays in warm-up for the whole schedule and peaks at {peak:.3g} instead of "
            f"optim.lr={cfg.optim.lr:g}") in log


def test_the_paper_schedule_cut_short_names_the_peak():
    (warning, cam_only) = config_warnings(load_config(VOC, ["train.max_iters=300"]))
    assert "optim.warmup_iters=1500 is not below train.max_iters=300" in warning
    assert "peaks at 1.2e-05 instead of optim.lr=6e-05" in warning
    assert "train.cam_iters=2000 is not below train.max_iters=300" in cam_only


def test_phase_keys_are_checked():
    with pytest.raises(ConfigError, match="'train.cls_phase_stride' must be four strides"):
        load_config(DEMO_CONFIG, ["train.cls_phase_stride=[4,2,2]"])
    with pytest.raises(ConfigError, match="'optim.joint_lr'.*0 < train.cam_iters"):
        load_config(DEMO_CONFIG, ["optim.joint_lr=1e-3", "train.cam_iters=0"])
    cfg = load_config(REPO / "configs" / "demo_full.yaml")
    assert cfg.train.cls_phase_stride == [4, 2, 2, 1] and cfg.model.stride == [4, 2, 1, 1]


def test_unknown_key_wrong_type_and_missing_root_are_named(tiny_data, tmp_path):
    with pytest.raises(ConfigError, match="train.max_iter'"):
        load_config(DEMO_CONFIG, ["train.max_iter=3"])
    with pytest.raises(ConfigError, match="train.max_iters"):
        load_config(DEMO_CONFIG, ["train.max_iters=many"])
    missing = tmp_path / "no_such_root"
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "train.py"), "--config", str(DEMO_CONFIG),
         f"data.root={missing}", f"data.list_dir={tiny_data}", f"work_dir={tmp_path / 'w'}"],
        capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 2
    assert str(missing) in proc.stderr


@pytest.mark.cpu_only
def test_default_weights_follow_the_backbone_and_unknown_backbones_are_refused():
    voc = REPO / "configs" / "voc.yaml"
    assert load_config(voc).model.pretrained == "pretrained/mit_b1.pth"
    assert load_config(voc, ["model.backbone=mit_b0"]).model.pretrained == "pretrained/mit_b0.pth"
    with pytest.raises(ConfigError, match="'model.backbone' must be one of .*mit_b6"):
        load_config(voc, ["model.backbone=mit_b6"])
