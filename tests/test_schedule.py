"""afa.engine.schedule: the phase of every iteration, computed once from the config."""

import pytest

from afa.config import load_config, upgrade_saved_config
from afa.engine.optim import lr_at
from afa.engine.schedule import Schedule
from conftest import DEMO_CONFIG, REPO

VOC = REPO / "configs" / "voc.yaml"
FULL = REPO / "configs" / "demo_full.yaml"


def test_the_papers_phases():
    schedule = Schedule.from_config(load_config(VOC))
    first, joint, late = (schedule.phase(i) for i in (1999, 2000, 6000))
    assert (first.joint, joint.joint, late.joint) == (False, True, True)
    assert (first.affinity_target, joint.affinity_target, late.affinity_target) == (
        False, False, True)
    for phase in (first, joint, late):
        # The paper runs the whole network and every CAM forward, in both phases.
        assert phase.full_forward and phase.cams and not phase.reuse_forward
        assert phase.strides == (4, 2, 2, 1)
    assert first.lr == lr_at(1999, 6e-5, 20000, 1500) and late.iteration == 6000


def test_the_lean_classification_phase_of_the_demo():
    schedule = Schedule.from_config(load_config(DEMO_CONFIG))
    cls, joint = schedule.phase(2799), schedule.phase(2800)
    assert not cls.full_forward and not cls.cams and cls.reuse_forward
    assert joint.full_forward and joint.cams and joint.reuse_forward and joint.joint


def test_demo_full_strides_and_learning_rate_per_phase():
    cfg = load_config(FULL)
    schedule = Schedule.from_config(cfg)
    cls, joint = schedule.phase(cfg.train.cam_iters - 1), schedule.phase(cfg.train.cam_iters)
    assert cls.strides == (4, 2, 2, 1) and joint.strides == (4, 2, 1, 1)
    # The joint phase restarts at optim.joint_lr without warm-up and decays to 0 at max_iters.
    assert joint.lr == pytest.approx(cfg.optim.joint_lr)
    assert schedule.phase(cfg.train.max_iters).lr == 0.0
    assert cls.lr == lr_at(cfg.train.cam_iters - 1, cfg.optim.lr, cfg.train.cam_iters,
                           cfg.optim.warmup_iters)


def test_a_config_saved_by_an_earlier_version_reads_in_todays_keys():
    saved = {"data": {"name": "demo", "num_classes": 9},
             "cam": {"bkg_score": 0.4, "high": 0.6, "low": 0.3, "ignore_index": 255,
                     "reuse_train_forward": True, "update_decoder_bn": False},
             "train": {"cls_phase_full_forward": False},
             "optim": {"betas": [0.9, 0.999], "power": 1.0, "warmup_ratio": 1e-6},
             "par": {"w1": 0.3, "w2": 0.5, "w3": 0.01}}
    new = upgrade_saved_config(saved)
    assert new["cam"] == {"thresholds": {"background": 0.4, "high": 0.6, "low": 0.3}}
    assert new["train"] == {"lean_forwards": True, "eval_subset": None}
    assert new["data"] == {"name": "demo", "classes": None}
    assert new["optim"] == {}
    assert new["par"] == {"w2": 0.5}  # not the fixed value: kept, so a resume names it
    mixed = upgrade_saved_config({"cam": {"reuse_train_forward": True,
                                          "update_decoder_bn": True}})
    assert mixed["cam"] == {"reuse_train_forward": True, "update_decoder_bn": True}


def test_a_run_saved_before_the_filter_backends_and_eval_subset_resumes_with_todays_config(
        tmp_path):
    """Keys added since: absent from an old checkpoint's config, they read as what the old run
    did (every image validated); the filter's backend and processes may change on resume."""
    from omegaconf import OmegaConf

    from afa.engine.work_dir import config_differences

    voc = REPO / "configs" / "voc.yaml"
    saved = OmegaConf.to_container(load_config(voc), resolve=True)
    del saved["loss"]["reg_backend"], saved["train"]["eval_subset"]
    assert config_differences(saved, load_config(voc)) == []
    changed = load_config(voc, ["loss.reg_backend=torch", "loss.reg_workers=2"])
    assert config_differences(saved, changed) == []
    subset = load_config(voc, ["train.eval_subset=100"])
    assert config_differences(saved, subset) == [("train.eval_subset", None, 100)]
