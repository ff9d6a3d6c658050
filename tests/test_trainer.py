"""afa.engine.trainer: whole training runs on a tiny generated set. The artefacts of a run,
interrupt and resume, the classification phase, precision settings, non-finite losses on the
device, torchrun/gloo with several processes and gradient accumulation.

Runs of ``tiny_config`` train on ``TORCH_DEVICE`` (tests marked ``device``); the torchrun/gloo
runs and the runs they are compared with stay on the CPU (``cpu_only``). Runs under signals, bad
files, reused work dirs and resumes with another config are in test_trainer_faults.py.
"""

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import DEMO_CONFIG, device_tol, tiny_config, tiny_overrides

from afa import config as C
from afa.config import ConfigError, load_config
from afa.engine import trainer as trainer_module
from afa.engine.checkpoint import CheckpointManager
from afa.data import build_datasets
from afa.engine.trainer import TrainingInterrupted, _batch_per_process, train
from afa.engine.validate import validate
from afa.models import PAR, AFANet

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------
# Runs of one process: what they write, interrupt and resume, the classification phase
# ------------------------------------------------------------------------------------------------


def test_a_few_iterations_write_every_artefact(tiny_data, tmp_path, device):
    cfg = tiny_config(tiny_data, tmp_path, **{"loss.reg_loss": True})
    result = train(cfg)
    log_text = (tmp_path / "train.log").read_text()
    assert f"Training mit_b0 on {device.type}" in log_text
    assert "Host memory: " in log_text  # afa.host_memory, decided once per process
    assert set(result.scores) == {"cls_f1", "cls_ap", "cls_map", "coverage", "masked_images",
                                  "cam", "refined", "aff_cam", "affinity", "seg"}
    assert result.scores["masked_images"] == 3  # tiny_data's val images, every one with a mask
    assert 0.0 <= result.scores["cls_map"] <= 1.0
    assert all(0.0 <= result.scores[k]["miou"] <= 1.0 for k in ("cam", "seg"))
    assert (tmp_path / "config.yaml").is_file() and (tmp_path / "train.log").is_file()
    assert load_config(tmp_path / "config.yaml") == cfg  # the saved config reproduces the run
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_iters = [r["iter"] for r in records if "train/total" in r]
    assert train_iters == [1, 2, 3, 4]
    assert any("val/seg" in r for r in records)
    last_val = json.loads((tmp_path / "val_scores.json").read_text())
    assert last_val == {"iteration": 4, "scores": json.loads(json.dumps(result.scores))}
    assert all(r["train/reg_loss"] == 0 for r in records if "train/reg_loss" in r and r["iter"] <= 1)
    assert any(r.get("train/reg_loss", 0) != 0 for r in records)
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert "iter_000004.pth" in ckpts and "best.pth" in ckpts
    assert not [n for n in ckpts if ".tmp" in n]
    assert len([n for n in ckpts if n.startswith("iter_")]) <= 2  # keep_last
    state = torch.load(tmp_path / "checkpoints" / "iter_000004.pth", map_location="cpu",
                       weights_only=True)
    assert state["iteration"] == 4 and not any(k.startswith("module.") for k in state["model"])
    assert {"model", "optimizer", "scaler", "rng", "data", "config", "best"} <= set(state)
    assert list((tmp_path / "tb").iterdir())


def test_periodic_validations_score_a_fixed_subset_and_the_last_one_everything(tiny_data,
                                                                              tmp_path):
    """train.eval_subset (configs/coco.yaml): iteration 2 scores 2 of the 3 val images, evenly
    spread; the last iteration scores all 3, and the log says which."""
    cfg = tiny_config(tiny_data, tmp_path, device="cpu", **{"train.eval_iters": 2,
                                                            "train.eval_subset": 2})
    train(cfg)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    val = {r["iter"]: r for r in records if "val/cls_f1" in r}
    assert sorted(val) == [2, 4]
    assert val[2]["val/masked_images"] == 2 and val[2]["val/subset_images"] == 2
    assert val[4]["val/masked_images"] == 3 and "val/subset_images" not in val[4]
    log = (tmp_path / "train.log").read_text()
    assert "val iter 2: 2 of the 3 val images, evenly spread (train.eval_subset" in log
    assert "val iter 4: 2 of the 3" not in log
    assert json.loads((tmp_path / "val_scores.json").read_text())["scores"]["masked_images"] == 3


def _params(model):
    """The state dict, copied to the CPU."""
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def _assert_same_run(actual: dict, expected: dict, device: torch.device) -> None:
    """Two runs that must agree: bit for bit on the CPU. On CUDA, the backward of bilinear
    upsampling adds with atomics in no fixed order, so runs agree to rounding only (the
    tolerances of test_accumulation_equals_more_processes)."""
    assert actual.keys() == expected.keys()
    differ = {}  # every key that differs, with its largest difference: one run shows them all
    for key, value in expected.items():
        if device.type == "cpu":
            same = torch.equal(actual[key], value)
        elif key.startswith("decoder.linear_c") and key.endswith(".bias"):
            continue  # exact gradient 0 under the BatchNorm after them, i.e. noise
        else:
            same = torch.allclose(actual[key].double(), value.double(), rtol=1e-4, atol=1e-6)
        if not same:
            differ[key] = float((actual[key].double() - value.double()).abs().max())
    assert not differ, f"{len(differ)} of {len(expected)} tensors differ (largest |diff|): {differ}"


def test_interrupt_and_resume_equals_uninterrupted(tiny_data, tmp_path, device):
    overrides = {"train.max_iters": 4, "train.eval_iters": 100}
    reference = _params(train(tiny_config(tiny_data, tmp_path / "ref", **overrides)).model)

    work = tmp_path / "interrupted"
    cfg = tiny_config(tiny_data, work, **overrides)

    def send_sigterm_after_iteration_1():
        metrics = work / "metrics.jsonl"
        deadline = time.time() + 120
        while time.time() < deadline:
            if metrics.is_file() and '"iter": 1' in metrics.read_text():
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(0.02)

    killer = threading.Thread(target=send_sigterm_after_iteration_1, daemon=True)
    killer.start()
    with pytest.raises(TrainingInterrupted):
        train(cfg)
    killer.join()
    stopped_at = torch.load(CheckpointManager(work / "checkpoints").latest(),
                            map_location="cpu", weights_only=True)["iteration"]
    assert 1 <= stopped_at < 4
    resumed = _params(train(cfg, resume="auto").model)
    _assert_same_run(resumed, reference, device)


def test_classification_phase_without_decoder(tiny_data, tmp_path, device):
    """train.lean_forwards: the same encoder and classifier, idle decoder statistics."""
    common = {"train.max_iters": 3, "train.cam_iters": 3, "train.aff_switch_iter": 3,
              "train.eval_iters": 100, "train.ckpt_iters": 100}
    runs = {lean: _params(train(tiny_config(tiny_data, tmp_path / lean, **common, **{
        "train.lean_forwards": lean})).model) for lean in ("false", "true")}
    full, short = runs["false"], runs["true"]
    torch.manual_seed(3)  # the trainer's seed: its initial weights
    init = AFANet("mit_b0", num_classes=9, embedding_dim=32, drop_path_rate=0.0).state_dict()
    for key in full:
        if "running_" in key or "num_batches" in key:
            # The full forward updates the decoder's BatchNorm statistics; the short one not.
            assert not torch.equal(full[key], init[key]), key
            assert torch.equal(short[key], init[key]), key
        elif key.startswith(("decoder.", "attn_proj.")):
            # Zero gradients either way: AdamW's weight decay alone moves them, identically.
            assert torch.equal(short[key], full[key]), key
        else:  # fused vs explicit attention: the same maths, rounded differently
            torch.testing.assert_close(short[key], full[key], **device_tol(device, 1e-4, 1e-5),
                                       msg=key)
    # init is the trainer's start: the decoder weights moved by weight decay only.
    key = "decoder.linear_pred.weight"
    torch.testing.assert_close(short[key], init[key], rtol=1e-3, atol=0)
    trained = [k for k in full if k.startswith(("encoder.", "classifier."))
               and not torch.equal(full[k], init[k])]
    assert "classifier.weight" in trained and len(trained) > 20


def test_classification_phase_stride_and_joint_restart(tiny_data, tmp_path, monkeypatch):
    """train.cls_phase_stride and optim.joint_lr (configs/demo_full.yaml): the encoder runs at
    stride 16 before cam_iters and at model.stride (8) from it on; each phase has its own poly
    schedule; a run resumed inside the classification phase ends with the same weights."""
    common = {"train.max_iters": 4, "train.cam_iters": 2, "train.aff_switch_iter": 3,
              "train.eval_iters": 4, "train.ckpt_iters": 1, "train.keep_last": 4,
              "model.stride": "[4,2,1,1]", "train.cls_phase_stride": "[4,2,2,1]",
              "optim.joint_lr": 1e-3, "optim.lr": 2e-3, "optim.warmup_iters": 0,
              "train.image_log_iters": 0}
    grids = []
    original = AFANet.forward

    def forward(self, *args, **kwargs):
        grids.append(self.encoder.stride)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(AFANet, "forward", forward)
    result = train(tiny_config(tiny_data, tmp_path / "ref", **common))
    # One training forward per step before cam_iters; from it on the step's forwards (training,
    # CAM scales) and the validation's all run at stride 8.
    assert grids[:2] == [16, 16] and set(grids[2:]) == {8}
    assert result.model.encoder.stride == 8
    records = [json.loads(line) for line in (tmp_path / "ref" / "metrics.jsonl").read_text()
               .splitlines()]
    lrs = [r["train/lr"] for r in records if "train/lr" in r]
    assert lrs == pytest.approx([2e-3, 1e-3, 1e-3, 5e-4])  # 2e-3 (1 - i/2), 1e-3 (1 - (i-2)/2)

    # The model is built at model.stride: step 1 of the resumed run must go back to stride 16.
    work = tmp_path / "resumed"
    (work / "checkpoints").mkdir(parents=True)
    start = work / "checkpoints" / "iter_000001.pth"
    start.write_bytes((tmp_path / "ref" / "checkpoints" / "iter_000001.pth").read_bytes())
    grids.clear()
    resumed = train(tiny_config(tiny_data, work, **common), resume=str(start))
    assert grids[0] == 16 and resumed.model.encoder.stride == 8
    reference = _params(result.model)
    for key, value in _params(resumed.model).items():
        assert torch.equal(value, reference[key]), key


# ------------------------------------------------------------------------------------------------
# Precision
# ------------------------------------------------------------------------------------------------


def test_a_bf16_training_run_on_cpu(tiny_data, tmp_path):
    cfg = C.load_config(DEMO_CONFIG, tiny_overrides(tiny_data, tmp_path, **{
        "device": "cpu", "train.amp": "bf16", "train.max_iters": 2, "train.eval_iters": 2}))
    result = train(cfg)
    assert set(result.scores) >= {"cam", "seg", "aff_cam"}
    assert all(math.isfinite(result.scores[k]["miou"]) for k in ("cam", "seg"))


@pytest.mark.cpu_only
def test_fp16_on_cpu_is_rejected_before_training(tiny_data, tmp_path):
    # fp16 needs the CUDA gradient scaler: on a CPU run it must not silently train in fp32
    # (bf16 runs on CPU: test_a_bf16_training_run_on_cpu above).
    with pytest.raises(ConfigError, match=r"train.amp=fp16 needs a CUDA device.*cpu"):
        train(tiny_config(tiny_data, tmp_path / "amp", **{"train.amp": "fp16", "device": "cpu"}))
    assert not (tmp_path / "amp" / "checkpoints").exists()


@pytest.mark.cpu_only
def test_bf16_on_a_cpu_without_bf16_instructions_warns(tiny_data, tmp_path, monkeypatch):
    """Emulated bf16 is many times slower than fp32 (17x for the demo's step on an AVX2 CPU):
    the run says so in its log instead of leaving the user to wonder."""
    from afa.engine import precision

    monkeypatch.setattr(precision, "_cpu_has_native_bf16", lambda: False)
    assert "set train.amp=none" in precision.precision_warning(torch.device("cpu"), "bf16")
    assert precision.precision_warning(torch.device("cpu"), "none") is None
    train(tiny_config(tiny_data, tmp_path / "w", **{"train.amp": "bf16", "device": "cpu",
                                                      "train.max_iters": 1}))
    log = (tmp_path / "w" / "train.log").read_text()
    assert "WARNING train.amp=bf16 on a CPU without bfloat16 instructions" in log
    monkeypatch.setattr(precision, "_cpu_has_native_bf16", lambda: True)
    assert precision.precision_warning(torch.device("cpu"), "bf16") is None


@pytest.mark.cpu_only
def test_amp_auto_is_bf16_only_where_the_device_computes_it(tiny_data, tmp_path, monkeypatch):
    """train.amp=auto is bf16 on a CPU with bfloat16 instructions, where the 144-px demo's joint
    step runs 1.7-1.8x faster, and float32 on one without, where bf16 would be emulated 17x
    slower (on CUDA: where the GPU supports bf16); the run trains exactly as the explicit setting
    would and says which."""
    from afa.engine import precision

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for native, expected in ((True, "bf16"), (False, "none")):
        monkeypatch.setattr(precision, "_cpu_has_native_bf16", lambda native=native: native)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda native=native: native)
        assert precision.resolve_amp(cpu, "auto") == expected
        assert precision.resolve_amp(cuda, "auto") == expected
        for explicit in ("none", "bf16", "fp16"):
            assert precision.resolve_amp(cpu, explicit) == explicit
    monkeypatch.undo()
    with pytest.raises(ValueError, match="resolve_amp"):
        precision.autocast(cpu, "auto")

    overrides = {"device": "cpu", "train.max_iters": 2, "train.eval_iters": 100}
    weights = {}
    for native, expected in ((True, "bf16"), (False, "none")):
        monkeypatch.setattr(precision, "_cpu_has_native_bf16", lambda native=native: native)
        auto = _params(train(tiny_config(tiny_data, tmp_path / f"auto_{expected}",
                                         **{**overrides, "train.amp": "auto"})).model)
        log = (tmp_path / f"auto_{expected}" / "train.log").read_text()
        assert f"Precision: train.amp=auto is {expected} on this cpu" in log
        assert "WARNING train.amp" not in log
        same = _params(train(tiny_config(tiny_data, tmp_path / f"explicit_{expected}",
                                         **{**overrides, "train.amp": expected})).model)
        _assert_same_run(auto, same, cpu)
        weights[expected] = auto
    assert any(not torch.equal(weights["bf16"][k], weights["none"][k]) for k in weights["none"])


# ------------------------------------------------------------------------------------------------
# Non-finite losses on the device
# ------------------------------------------------------------------------------------------------


@pytest.mark.device
def test_non_finite_loss_stops_with_the_terms_named(tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, tmp_path, **{"loss.w_seg": "nan", "train.cam_iters": 0})
    with pytest.raises(FloatingPointError, match=r"iteration 0: cls_loss=.*seg_loss="):
        train(cfg)


@pytest.mark.device
def test_non_finite_loss_can_skip_steps(tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, tmp_path, **{"loss.w_seg": "nan", "train.nonfinite": "skip",
                                               "train.cam_iters": 0, "train.max_iters": 2,
                                               "train.eval_iters": 2})
    train(cfg)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["train/skipped_steps"] for r in records if "train/skipped_steps" in r] == [1, 2]


def test_skipped_steps_are_reported_at_the_log_interval(tiny_data, tmp_path, monkeypatch):
    """log_iters 2: a NaN at iteration 0 is dropped at once and reported at iteration 2."""
    original = trainer_module.train_step

    def step(model, batch, phase, *args, **kwargs):
        if phase.iteration == 0:
            batch = {**batch, "image": torch.full_like(batch["image"], float("nan"))}
        return original(model, batch, phase, *args, **kwargs)

    monkeypatch.setattr(trainer_module, "train_step", step)
    cfg = C.load_config(DEMO_CONFIG, tiny_overrides(tiny_data, tmp_path, **{
        "train.nonfinite": "skip", "train.max_iters": 2, "train.log_iters": 2,
        "train.eval_iters": 100, "train.ckpt_iters": 100, "train.image_log_iters": 0}))
    train(cfg)
    log = (tmp_path / "train.log").read_text()
    assert "Non-finite loss or gradient at iteration 0" in log
    state = torch.load(tmp_path / "checkpoints" / "iter_000002.pth", weights_only=True)
    assert int(state["optimizer"]["state"][0]["step"]) == 1


# ------------------------------------------------------------------------------------------------
# Several processes: torchrun/gloo, accumulation, the batch of each process
# ------------------------------------------------------------------------------------------------


def _torchrun(nproc, data, work_dir, resume=None, **extra) -> str:
    """Train with ``nproc`` gloo processes on the CPU; returns their output (stdout and stderr)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", str(REPO / "tests" / "_ddp_worker.py"), str(DEMO_CONFIG),
           *(["--resume", resume] if resume else []),
           *tiny_overrides(data, work_dir, **{"device": "cpu", **extra})]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


@pytest.mark.cpu_only
def test_two_processes_gloo_agree_and_validate_like_one(tiny_data, tmp_path):
    # train.batch_per_gpu is null: the global batch of 4 is split into 2 per process.
    output = _torchrun(2, tiny_data, tmp_path, **{"train.global_batch": 4,
                                                  "data.num_workers": 1})
    assert "2 processes x 2 per batch x 1 accumulation" in output
    assert "Grad strides do not match" not in output  # see the next test
    rank0 = torch.load(tmp_path / "rank0_model.pth")
    rank1 = torch.load(tmp_path / "rank1_model.pth")
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    # Sharded validation (2 ranks) equals validating the final checkpoint in one process.
    cfg = tiny_config(tiny_data, tmp_path, device="cpu")
    model = AFANet("mit_b0", num_classes=9, embedding_dim=32)
    model.load_weights(tmp_path / "checkpoints" / "iter_000004.pth")
    _, val_set = build_datasets(cfg)
    single = validate(model, val_set, par=PAR(**C.par_kwargs(cfg)), device=torch.device("cpu"),
                      cam_scales=tuple(cfg.cam.scales), thresholds=C.thresholds(cfg),
                      radius=cfg.cam.radius,
                      class_names=[str(i) for i in range(9)])
    sharded = json.loads((tmp_path / "rank0_scores.json").read_text())
    for kind in ("cam", "refined", "aff_cam", "affinity", "seg"):
        assert sharded[kind]["iou"] == pytest.approx(single[kind]["iou"], nan_ok=True), kind
    assert sharded["cls_f1"] == pytest.approx(single["cls_f1"])


def test_ddp_gradients_differ_from_their_parameters_only_along_size_1_dims(device):
    """Why the trainer silences DDP's "Grad strides do not match bucket view strides": every
    gradient whose strides differ from its parameter's differs only along a size-1 dimension,
    where strides do not change the memory layout. (cuDNN may lay gradients out otherwise than
    the CPU kernels, hence on the device.)"""
    model = AFANet("mit_b0", num_classes=9, embedding_dim=32).to(device)
    out = model(torch.randn(2, 3, 64, 64, device=device))
    (out.cls_logits.sum() + out.seg_logits.sum() + out.aff_pred.sum()).backward()
    differ = {name: (p.shape, p.stride(), p.grad.stride())
              for name, p in model.named_parameters() if p.grad.stride() != p.stride()}
    if device.type == "cpu":
        assert differ, "no mismatch left: the warning filter in the trainer can go"
    for name, (shape, param_strides, grad_strides) in differ.items():
        assert all(size == 1 or a == b for size, a, b in zip(shape, param_strides, grad_strides)), name


@pytest.mark.cpu_only
def test_accumulation_equals_more_processes(tiny_data, tmp_path):
    common = {"train.global_batch": 2, "train.batch_per_gpu": 1, "train.eval_iters": 100,
              "device": "cpu"}
    _torchrun(2, tiny_data, tmp_path / "ddp", **common)
    accumulated = _params(train(tiny_config(tiny_data, tmp_path / "accum", **common)).model)
    ddp = torch.load(tmp_path / "ddp" / "rank0_model.pth")
    for key, value in accumulated.items():
        if "running_" in key or "num_batches" in key:
            continue  # DDP broadcasts rank 0's BatchNorm buffers; accumulation updates them twice
        if key.startswith("decoder.linear_c") and key.endswith(".bias"):
            # A per-channel constant before conv + BatchNorm is cancelled by the BatchNorm: the
            # exact gradient is 0, the computed one is rounding noise that AdamW normalises.
            continue
        torch.testing.assert_close(value, ddp[key], rtol=1e-4, atol=1e-6, msg=key)


@pytest.mark.cpu_only
@pytest.mark.parametrize("world, given, expected", [(1, None, 4), (2, None, 2), (4, None, 1),
                                                     (1, 2, 2), (2, 1, 1)])
def test_batch_per_gpu_is_derived_when_not_given(world, given, expected):
    cfg = load_config(DEMO_CONFIG, ["train.global_batch=4", f"train.batch_per_gpu={given}"
                                    if given else "train.batch_per_gpu=null"])
    assert _batch_per_process(cfg.train, world) == expected


@pytest.mark.cpu_only
def test_batch_per_gpu_that_does_not_fit_is_named():
    cfg = load_config(DEMO_CONFIG, ["train.global_batch=4", "train.batch_per_gpu=null"])
    with pytest.raises(ConfigError, match="cannot be split over 3 processes"):
        _batch_per_process(cfg.train, 3)
    cfg = load_config(DEMO_CONFIG, ["train.global_batch=4", "train.batch_per_gpu=2"])
    with pytest.raises(ConfigError, match="2 x 4.*batch_per_gpu=null"):
        _batch_per_process(cfg.train, 4)  # 2 nodes x 2 tasks x 2 images > global batch 4
