"""Shared test helpers: tiny inputs, fixed seeds, tool loading, and the optional ../shared data."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
VOC_MINI = SHARED / "data" / "voc_mini" / "VOC2012"
# State-dict names and shapes of the official MiT ImageNet weights and of the authors' AFA
# checkpoint, copied from ../shared/reference so that the layout tests run in any clone.
REFERENCE = REPO / "tests" / "reference"
DEMO_CONFIG = REPO / "configs" / "demo.yaml"


def load_tool(name: str):
    """Import ``tools/<name>.py`` once per session as module ``<name>``.

    Registering it in ``sys.modules`` under one name lets process pools pickle its functions, and
    reusing the module keeps every test file on the same copy.
    """
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


# Tiny tensors gain nothing from intra-op threads, and on a busy 2-core machine OpenMP threads
# spin-waiting for each other make a forward pass up to 100x slower.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture
def reference_dir():
    """``tests/reference``: part of the repository, so never skipped."""
    return REFERENCE


@pytest.fixture
def voc_mini():
    if not VOC_MINI.is_dir():
        pytest.skip(f"{VOC_MINI} is absent")
    return VOC_MINI


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A tiny generated demo set (12 train, 3 val images of 64 px); tests must not modify it."""
    from afa.data.synthetic import make_demo_dataset

    root = tmp_path_factory.mktemp("tiny_demo")
    make_demo_dataset(root, seed=0, num_train=12, num_val=3, size=64, progress=False)
    return root


def tiny_overrides(data: Path, work_dir: Path, **extra) -> list[str]:
    """Overrides of configs/demo.yaml for a seconds-long training run on ``tiny_data``."""
    values = {
        "work_dir": work_dir, "device": "cpu", "seed": 3,
        "data.root": data, "data.list_dir": data, "data.crop_size": 64, "data.num_workers": 0,
        "model.backbone": "mit_b0", "model.embedding_dim": 32,
        "train.max_iters": 4, "train.global_batch": 2, "train.batch_per_gpu": "null",
        "train.cam_iters": 1, "train.aff_switch_iter": 2, "train.eval_iters": 4,
        "train.ckpt_iters": 2, "train.log_iters": 1, "train.keep_last": 2,
        "train.image_log_iters": 2, "optim.warmup_iters": 2,
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def tiny_config(data, work_dir, **extra):
    from afa.config import load_config

    return load_config(DEMO_CONFIG, tiny_overrides(data, work_dir, **extra))
