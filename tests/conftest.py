"""Shared test helpers: the device, tiny inputs, fixed seeds, tool loading, real photos, and the
``slow`` marker.

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

Quick runs. Tests that take 3 s or more (training runs in subprocesses, torchrun and signal tests,
the demo end to end, every tool on every photo size) and the larger photo set's variants are
marked ``slow`` by the table ``SLOW`` below::

    make test-quick        # pytest -m "not slow": 441 of 491 tests, 2.6 min on 2 busy cores
    make test              # everything: 11.3 min on the same 2 busy cores
"""

import fnmatch
import importlib.util
import os
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

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
    config.addinivalue_line("markers", "slow: took 3 s or more (the SLOW table in "
                                       "tests/conftest.py); make test-quick leaves these out")


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


# The tests marked ``slow``: ``file: (patterns)``, a pattern ``NAME`` or ``NAME[PARAMS]`` with
# fnmatch wildcards, over the test function's name and its parameters' id (``*``: the whole file;
# ``*[voc_mini]``: the larger photo set's variants). Picked from one full run with --durations=0
# on 2 CPU cores shared with other work (11.3 minutes; the seconds below are from it): every test
# of 3 s or more, and the larger photo set. The 50 slow tests took 560 s of it, the 441 others
# 113 s together.
SLOW: dict[str, tuple[str, ...]] = {
    # Tool runs on 4 photos against the authors' protocol: 21 s with the module's set-up.
    "test_authors_protocol.py": ("*",),
    # Benchmark scripts in subprocesses: 4-6 s each.
    "test_benchmarks.py": ("test_device_agreement_*", "test_summary_of_real_outputs"),
    # Dense CRF over 8-10 photos: 6-16 s; a process pool of 2 against serial: 8 s.
    "test_crf.py": ("test_crf_repairs_misplaced_boundaries*",
                    "test_pool_streams_in_order_like_serial"),
    # The tool in two subprocesses, one on a pseudo-terminal: 6 s.
    "test_demo_data.py": ("test_progress_bars_only_on_a_terminal",),
    "test_eval_miou.py": ("test_command_line",),  # a subprocess: 3 s
    # tools/train.py in subprocesses against a local Hugging Face cache: 3-15 s.
    "test_hf_hub.py": ("test_train_tool_*",),
    # ONNX and TorchScript exports checked on photos, and the export benchmark: 3-7 s.
    "test_export.py": ("test_onnx_runtime_and_torchscript_give_forward_seg_on_real_photos",
                       "test_benchmark_script_reports_sizes_and_speeds"),
    # tools/train.py in a subprocess: 3 s.
    "test_config.py": ("test_unknown_key_wrong_type_and_missing_root_are_named",),
    # A subprocess faulting a large tensor in: 9 s.
    "test_host_memory.py": (
        "test_a_repeated_large_tensor_reuses_its_memory_instead_of_faulting_it_in",),
    # torchrun with 2 processes: 9 s.
    "test_image_folder.py": ("test_torchrun_shards_a_folder_like_one_process", "*[voc_mini]"),
    "test_infer_seg.py": ("test_torchrun_*",),  # torchrun with 2 processes: 6-7 s each
    # A filter process killed mid-run: 7 s.
    "test_losses.py": ("test_a_killed_filter_process_costs_neither_the_step_nor_the_exit",),
    "test_prepare_voc.py": ("*[voc_mini]",),
    # The demo end to end (make, train, score, rerun): 46 s; the set made as configured: 8 s.
    "test_run_demo.py": ("test_run_demo_generates_trains_scores_and_is_rerunnable",
                         "test_run_demo_makes_the_set_where_and_as_large_as_the_config_says"),
    # Two trainer processes racing for a work dir: 53 s; failing checkpoint writes: 9-13 s.
    "test_safe_checkpoints.py": (
        "test_a_second_run_in_one_work_dir_is_refused_until_the_first_dies",
        "test_a_failed_checkpoint_write_is_one_line_and_keeps_the_previous"),
    # gloo DDP through torchrun: 13 s each; trainer runs in bfloat16 and float32: 3 s.
    "test_trainer.py": ("test_accumulation_equals_more_processes",
                        "test_two_processes_gloo_agree_and_validate_like_one",
                        "test_amp_auto_is_bf16_only_where_the_device_computes_it"),
    # Signals to trainer process groups: 9-15 s; a corrupt image mid-run: 16 s; resume on another
    # number of processes: 12 s; a stop during validation: 3-4 s.
    "test_trainer_faults.py": ("test_signal_to_the_process_group_*",
                               "test_corrupt_training_image_mid_run",
                               "test_resume_on_another_number_of_processes",
                               "test_stop_during_validation_takes_effect_at_the_next_image*"),
    # Every tool on every photo size of each set: 66 s on the 18 photos, 102 s on the 60.
    "test_voc_mini_end_to_end.py": ("*",),
    # Processes killed under a worker pool: 4-10 s.
    "test_worker_pool.py": ("test_filter_workers_die_when_the_trainer_is_killed",
                            "test_crf_workers_die_when_their_tool_is_killed"),
}


def _slow_patterns(path: Path) -> tuple[str, ...]:
    return SLOW.get(path.name, ()) if path.parent == REPO / "tests" else ()


def _is_slow(item) -> bool:
    for pattern in _slow_patterns(Path(item.path)):
        name, _, params = pattern.partition("[")
        if not fnmatch.fnmatchcase(getattr(item, "originalname", item.name), name):
            continue
        callspec = getattr(item, "callspec", None)
        if not params or (callspec and fnmatch.fnmatchcase(callspec.id, params[:-1])):
            return True
    return False


@pytest.hookimpl(tryfirst=True)  # before -m "not slow" deselects
def pytest_collection_modifyitems(config, items):
    modules = {}
    for item in items:
        if "device" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.device)
        if _is_slow(item):
            item.add_marker(pytest.mark.slow)
        if getattr(item, "module", None) is not None:
            modules[Path(item.path)] = item.module
    # A renamed test would silently join the quick run: name the patterns that match no test
    # function of their (collected) file.
    stale = []
    for path, module in sorted(modules.items()):
        tests = [name for name in vars(module) if name.startswith("test")]
        stale += [f"{path.name}: {p}" for p in _slow_patterns(path)
                  if not any(fnmatch.fnmatchcase(t, p.partition("[")[0]) for t in tests)]
    if stale:
        warnings.warn(pytest.PytestWarning("SLOW in tests/conftest.py names no test: "
                                           + "; ".join(stale)))


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


def smooth(shape, generator):
    """Blobby values in [0, 1] (upsampled noise): PAR and the CAMs see structure, not static."""
    small = torch.rand(*shape[:-2], max(2, shape[-2] // 6), max(2, shape[-1] // 6),
                       generator=generator)
    return F.interpolate(small, size=shape[-2:], mode="bilinear", align_corners=False)


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
