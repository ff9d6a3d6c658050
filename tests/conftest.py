"""Shared test helpers: the device, tiny inputs, fixed seeds, tool loading, and real photos.

The device. Tests of the network, the pseudo labels, the losses and the trainer run on the device
that ``TORCH_DEVICE`` names (default ``cpu``, what CI runs), as timm's tests do::

    TORCH_DEVICE=cuda make test                              # the suite, GPU where it matters
    TORCH_DEVICE=cuda .venv/bin/pytest -q -m device tests    # only the tests on the device

(``CUDA_VISIBLE_DEVICES`` picks the GPU.) Such a test takes the ``device`` fixture, which marks
it ``device``. On CUDA, TF32 is off, so float32 means float32 as on the CPU; tolerances measured
on the CPU are widened by ``device_tol`` where a GPU kernel sums in another order (cuDNN
convolutions, fused attention). Tests marked ``cpu_only`` (gloo DDP through torchrun, the
pydensecrf CRF, signals and bit-exact resume) run on the CPU whatever ``TORCH_DEVICE`` says.
``TORCH_DEVICE=cuda`` without a usable GPU stops pytest before any test runs (exit status 4),
rather than testing the CPU in its place. ``benchmarks/gpu_check.sh`` runs the device tests and
the GPU benchmarks in one go.

Real photos. ``voc_photos`` is ``tests/data/voc_photos``: 18 PASCAL VOC 2012 photos with their
masks, in the VOC layout, part of the repository (its README says which and why), so the tests of
real shapes run in every clone. ``voc_mini`` is an optional larger set of the same kind (60 photos
in ``shared/data/voc_mini/VOC2012`` beside the repository; ``AFA_SHARED_DATA`` names another
folder in place of ``shared``, and one that does not exist turns the set off): tests that use it
skip without it. ``voc_set`` runs a test on each of the two.
"""

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# Real VOC photos with masks: a small set in the repository, and an optional larger one beside it.
VOC_PHOTOS = REPO / "tests" / "data" / "voc_photos"
SHARED = Path(os.environ.get("AFA_SHARED_DATA") or REPO.parent / "shared")
VOC_MINI = SHARED / "data" / "voc_mini" / "VOC2012"
# State-dict names and shapes of the official MiT ImageNet weights and of the authors' AFA
# checkpoint, kept in the repository so that the layout tests run in any clone.
REFERENCE = REPO / "tests" / "reference"
DEMO_CONFIG = REPO / "configs" / "demo.yaml"


def _requested_device() -> tuple[torch.device, str | None]:
    """The device of ``TORCH_DEVICE``, and why it cannot be used (None when it can)."""
    name = os.environ.get("TORCH_DEVICE", "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        return torch.device("cpu"), (f"TORCH_DEVICE={name!r} is not a torch device (cpu, "
                                     "cuda, cuda:1)")
    if device.type not in ("cpu", "cuda"):
        return device, f"TORCH_DEVICE={name!r}: the tests support cpu and cuda only"
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return device, (
                f"TORCH_DEVICE={name} but CUDA is not available here (torch {torch.__version__}, "
                f"built for CUDA {torch.version.cuda}, {torch.cuda.device_count()} GPUs visible). "
                "Not falling back to the CPU; unset TORCH_DEVICE to test on the CPU")
        if (device.index or 0) >= torch.cuda.device_count():
            return device, (f"TORCH_DEVICE={name} but only {torch.cuda.device_count()} GPUs "
                            "are visible")
    return device, None


DEVICE, _DEVICE_ERROR = _requested_device()


def pytest_configure(config):
    if _DEVICE_ERROR is not None:
        raise pytest.UsageError(_DEVICE_ERROR)
    config.addinivalue_line("markers", "device: takes the device fixture (runs on TORCH_DEVICE)")
    config.addinivalue_line("markers", "cpu_only: runs on the CPU whatever TORCH_DEVICE says "
                                       "(gloo DDP, pydensecrf, signals and bit-exact resume)")
    config.addinivalue_line("markers", "slurm: needs a running SLURM cluster (make test-slurm); "
                                       "skipped unless AFA_SLURM_TESTS=1")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """TF32 off before every test and its fixtures (module-scoped ones included): tolerances are
    float32 ones, TF32 keeps 10 mantissa bits, and a trainer run switches it on (train.tf32)."""
    if DEVICE.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False


def pytest_report_header(config):
    if DEVICE.type == "cuda":
        return (f"TORCH_DEVICE: {DEVICE} ({torch.cuda.get_device_name(DEVICE)}, torch "
                f"{torch.__version__}, TF32 off)")
    return f"TORCH_DEVICE: {DEVICE}"


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "device" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.device)


@pytest.fixture(scope="session")
def device() -> torch.device:
    """The device under test: ``TORCH_DEVICE`` (default cpu)."""
    return DEVICE


def device_tol(device: torch.device, rtol: float, atol: float, factor: float = 10.0) -> dict:
    """``assert_close`` tolerances measured on the CPU, times ``factor`` on another device.

    GPU kernels (cuDNN convolutions, fused attention, atomics in reductions) add float32 numbers
    in another order than the CPU's; with TF32 off the differences stay at float32 rounding.
    """
    scale = 1.0 if device.type == "cpu" else factor
    return {"rtol": rtol * scale, "atol": atol * scale}


def assert_same_labels(actual: torch.Tensor, expected: torch.Tensor, device: torch.device,
                       name: str = "label", fraction: float = 1e-3) -> None:
    """Label maps equal entry for entry on the CPU; on another device up to ``fraction`` of the
    entries may differ, where float32 rounding in another order moves a score across a threshold
    or an argmax tie (the pseudo labels threshold CAMs and PAR outputs)."""
    assert actual.shape == expected.shape, (f"{name}: shape {tuple(actual.shape)}, expected "
                                            f"{tuple(expected.shape)}")
    differ = int((actual.cpu() != expected.cpu()).sum())
    allowed = 0 if device.type == "cpu" else int(fraction * expected.numel())
    assert differ <= allowed, (f"{name}: {differ} of {expected.numel()} entries differ "
                               f"({allowed} allowed on {device})")


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
    torch.manual_seed(0)  # seeds CUDA too
    yield


@pytest.fixture
def reference_dir():
    """``tests/reference``: part of the repository, so never skipped."""
    return REFERENCE


@pytest.fixture(scope="session")
def voc_photos() -> Path:
    """``tests/data/voc_photos``: 18 VOC 2012 photos and masks, part of the repository, so never
    skipped. Tests must not modify it."""
    assert (VOC_PHOTOS / "JPEGImages").is_dir(), f"{VOC_PHOTOS} is missing from the checkout"
    return VOC_PHOTOS


@pytest.fixture(scope="session")
def voc_mini() -> Path:
    """The optional larger set of the same kind (60 photos); skips when it is absent."""
    if not VOC_MINI.is_dir():
        pytest.skip(f"the larger photo set is absent ({VOC_MINI}; AFA_SHARED_DATA names "
                    "another place)")
    return VOC_MINI


@pytest.fixture(scope="session", params=["voc_photos", "voc_mini"])
def voc_set(request) -> Path:
    """Each photo set in turn: the one in the repository, then the larger optional one."""
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A tiny generated demo set (12 train, 3 val images of 64 px); tests must not modify it."""
    from afa.data.synthetic import make_demo_dataset

    root = tmp_path_factory.mktemp("tiny_demo")
    make_demo_dataset(root, seed=0, num_train=12, num_val=3, size=64, progress=False)
    return root


def tiny_overrides(data: Path, work_dir: Path, **extra) -> list[str]:
    """Overrides of configs/demo.yaml for a seconds-long training run on ``tiny_data``.

    The run's device is ``TORCH_DEVICE``'s type (a trainer picks ``cuda:LOCAL_RANK`` itself);
    ``device="cpu"`` pins a run to the CPU. TF32 is off, as in every test.
    """
    values = {
        "work_dir": work_dir, "device": DEVICE.type, "train.tf32": "false", "seed": 3,
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
