"""Shared test helpers: tiny inputs, fixed seeds, and the optional ../shared data."""

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
VOC_MINI = SHARED / "data" / "voc_mini" / "VOC2012"
REFERENCE = SHARED / "reference"

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
