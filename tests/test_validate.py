"""afa.engine.validate: validation in batches of equal-size images scores as one image at a time;
``data.val_batch`` below 1 is refused."""

import pytest
import torch

from afa import config as C
from afa.data import build_datasets, class_names
from afa.engine.validate import validate
from afa.models import PAR, AFANet
from conftest import DEMO_CONFIG, tiny_overrides


def test_batched_validation_scores_equal_one_image_at_a_time(tiny_data, tmp_path):
    cfg = C.load_config(DEMO_CONFIG, tiny_overrides(tiny_data, tmp_path))
    _, val_set = build_datasets(cfg)
    torch.manual_seed(0)
    model = AFANet(**{**C.model_kwargs(cfg), "pretrained": None})
    kwargs = dict(par=PAR(**C.par_kwargs(cfg)), device=torch.device("cpu"),
                  cam_scales=tuple(cfg.cam.scales), thresholds=C.thresholds(cfg),
                  radius=cfg.cam.radius, class_names=class_names(cfg))
    single = validate(model, val_set, batch_size=1, **kwargs)
    batched = validate(model, val_set, batch_size=4, **kwargs)
    assert len(val_set) >= 2
    for kind in ("cam", "refined", "aff_cam", "affinity", "seg"):
        assert batched[kind]["miou"] == pytest.approx(single[kind]["miou"], abs=1e-4), kind
    assert batched["cls_f1"] == pytest.approx(single["cls_f1"])


def test_config_rejects_a_validation_batch_below_one():
    with pytest.raises(C.ConfigError, match="data.val_batch"):
        C.load_config(DEMO_CONFIG, ["data.val_batch=0"])
