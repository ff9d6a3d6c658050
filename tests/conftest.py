"""Shared test helpers: tiny inputs, fixed seeds, tool loading, and the optional ../shared data."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
VOC_MINI = SHARED / "data" / "voc_mini" / "VOC2012"
REFERENCE = SHARED / "reference"



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
    if not REFERENCE.is_dir():
        pytest.skip(f"{REFERENCE} is absent")
    return REFERENCE


@pytest.fixture
def voc_mini():
    if not VOC_MINI.is_dir():
        pytest.skip(f"{VOC_MINI} is absent")
    return VOC_MINI
