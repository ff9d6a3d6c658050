"""afa.engine.trainer as users run it and break it: stop signals to the whole process group with
loader and filter workers, stops during validation, bad files found mid-run, reused work dirs,
resuming with another config or process count, non-finite values, weights of another variant and
the record of a run. Each test reproduces a way the trainer used to lose work or hide a mistake.
"""

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import conftest
from conftest import DEMO_CONFIG
from PIL import Image

import afa.engine.trainer as trainer_module
from afa.config import ConfigError
from afa.data import DataError, read_name_list
from afa.engine.checkpoint import non_finite_tensors
from afa.engine.data_order import ResumableSampler
from afa.engine.trainer import TrainingInterrupted, train
from afa.models import mix_transformer

# Signals to process groups, subprocesses with loader workers and bit-exact resume: CPU runs,
# whatever TORCH_DEVICE says (CUDA's bilinear-upsampling backward adds with atomics, in no fixed
# order, so two CUDA runs differ in the last bits).
pytestmark = pytest.mark.cpu_only


def tiny_overrides(data, work_dir, **extra):
    return conftest.tiny_overrides(data, work_dir, **{"device": "cpu", **extra})


def tiny_config(data, work_dir, **extra):
    return conftest.tiny_config(data, work_dir, **{"device": "cpu", **extra})


REPO = Path(__file__).resolve().parents[1]
TRAIN = [sys.executable, str(REPO / "tools" / "train.py"), "--config", str(DEMO_CONFIG)]
ENV = dict(os.environ, OMP_NUM_THREADS="1")  # the same arithmetic as the in-process runs


def _final_model(work_dir: Path, iteration: int) -> dict:
    return torch.load(work_dir / "checkpoints" / f"iter_{iteration:06d}.pth",
                      weights_only=True)["model"]


def _assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _records(work_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (work_dir / "metrics.jsonl").read_text().splitlines()]


def _copy_data(tiny_data: Path, tmp_path: Path) -> Path:
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    return data


# ------------------------------------------------------------------------------------------------
# Stop signals sent to the whole process group, with DataLoader workers
# ------------------------------------------------------------------------------------------------


ROBUST = {"train.max_iters": 6, "train.eval_iters": 100, "train.ckpt_iters": 100,
          "train.image_log_iters": 0}


@pytest.fixture(scope="module")
def uninterrupted(tiny_data, tmp_path_factory):
    """The 6-iteration run the interrupted ones must land on (no loader workers: the data order
    and augmentations do not depend on them)."""
    work = tmp_path_factory.mktemp("uninterrupted")
    train(tiny_config(tiny_data, work, **ROBUST))
    return _final_model(work, 6)


def _signal_group_after(command: list[str], work: Path, iteration: int, signum: int,
                        delay: float = 0.0) -> tuple[int, str]:
    """Run ``command`` in its own process group, send ``signum`` to the whole group ``delay``
    seconds after ``iteration`` is logged, and return (exit status, stderr). A run that has not
    exited 120 s after the signal fails the test instead of hanging it."""
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=REPO, env=ENV, start_new_session=True)
    metrics, deadline = work / "metrics.jsonl", time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        if metrics.is_file() and f'"iter": {iteration},' in metrics.read_text():
            time.sleep(delay)
            os.killpg(proc.pid, signum)
            break
        time.sleep(0.01)
    try:
        _, stderr = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, stderr = proc.communicate()
        pytest.fail(f"the run did not exit within 120 s of the signal: {stderr[-3000:]}")
    return proc.returncode, stderr


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_to_the_process_group_with_loader_workers(tiny_data, tmp_path, uninterrupted,
                                                         signum):
    """Ctrl-C in a terminal and SLURM's SIGTERM reach every process of the group, loader workers
    included. The run saves, exits 128 + N with a message, and resumes onto the uninterrupted
    run. (Before: "DataLoader worker ... is killed by signal", no checkpoint.)"""
    work = tmp_path / "work"
    command = TRAIN + tiny_overrides(tiny_data, work, **ROBUST, **{"data.num_workers": 2})
    returncode, stderr = _signal_group_after(command, work, 1, signum)
    assert returncode == 128 + signum, stderr[-3000:]
    assert "DataLoader worker" not in stderr
    assert f"stopped by {signal.Signals(signum).name} at iteration" in stderr
    assert "checkpoint saved" in stderr
    saved = sorted((work / "checkpoints").glob("iter_*.pth"))
    assert len(saved) == 1 and 1 <= int(saved[0].stem[5:]) < 6
    # A redirected log is never glued to progress-bar fragments.
    assert "\r" not in stderr and "train:" not in stderr

    resumed = subprocess.run(TRAIN + ["--resume", "auto"] + tiny_overrides(
        tiny_data, work, **ROBUST, **{"data.num_workers": 2}), capture_output=True, text=True,
        cwd=REPO, env=ENV, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_same_weights(_final_model(work, 6), uninterrupted)
    # Iterations logged after the checkpoint by the stopped run are not logged twice.
    assert [r["iter"] for r in _records(work) if "train/total" in r] == [1, 2, 3, 4, 5, 6]


def test_signal_to_the_process_group_with_regularized_loss_workers(tiny_data, tmp_path):
    """On a GPU the regularized loss's filter runs in worker processes (loss.reg_workers); a
    SIGTERM to the whole group must not kill them under the trainer before it has saved."""
    work = tmp_path / "work"
    extra = {**ROBUST, "data.num_workers": 1, "loss.reg_loss": "true", "loss.reg_workers": 1,
             "train.cam_iters": 0}
    returncode, stderr = _signal_group_after(TRAIN + tiny_overrides(tiny_data, work, **extra),
                                             work, 2, signal.SIGTERM)
    assert returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "stopped by SIGTERM at iteration" in stderr and "checkpoint saved" in stderr
    assert "Traceback" not in stderr and "BrokenProcessPool" not in stderr
    saved = sorted((work / "checkpoints").glob("iter_*.pth"))
    assert len(saved) == 1 and 2 <= int(saved[0].stem[5:]) < 6
    assert [r["train/reg_loss"] for r in _records(work) if "train/reg_loss" in r][0] != 0


def test_signal_to_the_process_group_while_the_filter_processes_start(tiny_data, tmp_path):
    """The filter processes are spawned at the first step of the joint phase and take seconds to
    start; a SIGTERM to the group in that time used to kill them before their initializer
    ignored it: BrokenProcessPool, and then the run never exited (the pool's clean-up waited
    for the processes that had started, which ignore SIGTERM). Seen on the first GPU run."""
    work = tmp_path / "work"
    extra = {**ROBUST, "data.num_workers": 1, "loss.reg_loss": "true", "loss.reg_workers": 2,
             "train.cam_iters": 2}
    # 0.3 s after iteration 2 is logged, the next step has submitted its filters: the filter
    # processes are starting.
    returncode, stderr = _signal_group_after(TRAIN + tiny_overrides(tiny_data, work, **extra),
                                             work, 2, signal.SIGTERM, delay=0.3)
    assert returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "stopped by SIGTERM at iteration" in stderr and "checkpoint saved" in stderr
    assert "Traceback" not in stderr and "BrokenProcessPool" not in stderr
    assert "filter process of the regularized loss died" not in stderr


class _SignalOnRead(torch.utils.data.Dataset):
    """Wraps the validation set: sends ``count`` SIGINTs to this process while reading image
    ``at`` of the first validation pass, and counts the images read."""

    def __init__(self, dataset, at: int, count: int):
        self.dataset, self.at, self.count, self.reads, self.sent = dataset, at, count, 0, False

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        self.reads += 1
        if self.reads == self.at + 1 and not self.sent:
            self.sent = True
            for _ in range(self.count):
                os.kill(os.getpid(), signal.SIGINT)
        return self.dataset[index]


def _signal_during_validation(monkeypatch, count: int) -> list:
    wrapped = []

    def build(cfg):
        train_set, val_set = build_datasets(cfg)
        wrapped.append(_SignalOnRead(val_set, at=0, count=count))
        wrapped[-1].skipped = val_set.skipped
        return train_set, wrapped[-1]

    build_datasets = trainer_module.build_datasets
    monkeypatch.setattr(trainer_module, "build_datasets", build)
    return wrapped


# The second case validates iteration 2 = cam_iters, whose weights come from classification
# steps at stride 16 (train.cls_phase_stride): the redone validation must run at that stride too,
# not at model.stride, which the resumed model is built with.
@pytest.mark.parametrize("phases", [{}, {
    "train.cam_iters": 2, "train.aff_switch_iter": 3, "model.stride": "[4,2,1,1]",
    "train.cls_phase_stride": "[4,2,2,1]"}], ids=["one_stride", "cls_phase_stride"])
def test_stop_during_validation_takes_effect_at_the_next_image(tiny_data, tmp_path, monkeypatch,
                                                               phases):
    """The checkpoint of iteration k is written before its validation; a stop signal during the
    validation ends it at the next image, and the resumed run redoes it. (Before: the whole
    validation ran first, which on VOC can outlast SLURM's warning.)"""
    common = {"train.max_iters": 4, "train.eval_iters": 2, "train.ckpt_iters": 100,
              "train.image_log_iters": 0, **phases}
    reference = tmp_path / "reference"
    train(tiny_config(tiny_data, reference, **common))

    work = tmp_path / "work"
    wrapped = _signal_during_validation(monkeypatch, count=1)
    with pytest.raises(TrainingInterrupted, match="during the validation of iteration 2"):
        train(tiny_config(tiny_data, work, **common))
    assert wrapped[0].reads == 1  # stopped before scoring a second image
    state = torch.load(work / "checkpoints" / "iter_000002.pth", weights_only=True)
    assert state["iteration"] == 2 and state["validated"] is False
    assert not [r for r in _records(work) if "val/seg" in r]

    monkeypatch.undo()
    train(tiny_config(tiny_data, work, **common), resume="auto")
    assert [r["iter"] for r in _records(work) if "val/seg" in r] == [2, 4]
    # The redone validation of iteration 2 and the last one score as in the uninterrupted run.
    def val_scores(work_dir):
        return [{k: v for k, v in r.items() if k != "time"} for r in _records(work_dir)
                if "val/seg" in r]

    assert val_scores(work) == val_scores(reference)
    assert (json.loads((work / "val_scores.json").read_text())
            == json.loads((reference / "val_scores.json").read_text()))
    _assert_same_weights(_final_model(work, 4), _final_model(reference, 4))
    assert "Redoing the validation of iteration 2" in (work / "train.log").read_text()


def test_second_signal_exits_at_once(tiny_data, tmp_path, monkeypatch):
    _signal_during_validation(monkeypatch, count=2)
    cfg = tiny_config(tiny_data, tmp_path, **{"train.max_iters": 2, "train.eval_iters": 2})
    with pytest.raises(TrainingInterrupted, match="second stop signal.*last checkpoint is "
                                                   "iteration 2") as stop:
        train(cfg)
    assert stop.value.forced and stop.value.signum == signal.SIGINT


@pytest.mark.slow
def test_the_requeue_signal_after_a_finished_run_ends_it_normally(tiny_data, tmp_path):
    """SLURM's SIGUSR1 landing while a finished run winds down: exit 0, not 138 (which
    launch/slurm_*.sh would answer with a needless requeue). A stand-in for the wind-down: the
    signal sent to the whole process group (loader workers on) right after train() returns, in
    the process that trained."""
    overrides = conftest.tiny_overrides(tiny_data, tmp_path, device="cpu",
                                        **{"train.max_iters": 2, "train.eval_iters": 2,
                                           "data.num_workers": 2})
    script = (
        "import os, signal, sys, time\n"
        "from afa.config import load_config\n"
        "from afa.engine.trainer import train\n"
        f"train(load_config({str(DEMO_CONFIG)!r}, {overrides!r}))\n"
        "os.killpg(0, signal.SIGUSR1)\n"
        "time.sleep(0.2)\n"
        "print('wound down')\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=conftest.REPO, text=True,
                          capture_output=True, timeout=300, start_new_session=True)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    assert proc.stdout.strip().endswith("wound down")


# ------------------------------------------------------------------------------------------------
# Bad data found mid-run
# ------------------------------------------------------------------------------------------------


def test_corrupt_training_image_mid_run(tiny_data, tmp_path):
    """A corrupt JPEG met at iteration 3 (read by a loader worker): the run saves the checkpoint
    of iteration 2, exits 2 naming the file; with data.skip_bad it continues and lists it."""
    data = _copy_data(tiny_data, tmp_path)
    names = read_name_list(data / "train_aug.txt")
    order = iter(ResumableSampler(len(names), 2, 2, seed=3))
    positions = [next(order)[0] for _ in range(6)]
    bad = data / "JPEGImages" / f"{names[positions[4]]}.jpg"  # first of iteration 3
    bad.write_bytes(b"\xff\xd8\xff not really a JPEG")
    work = tmp_path / "work"
    extra = {**ROBUST, "data.num_workers": 2}
    proc = subprocess.run(TRAIN + tiny_overrides(data, work, **extra), capture_output=True,
                          text=True, cwd=REPO, env=ENV, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"{bad}: cannot decode image" in proc.stderr
    assert "the checkpoint of iteration 2 is saved" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert [p.name for p in (work / "checkpoints").glob("iter_*.pth")] == ["iter_000002.pth"]

    resumed = subprocess.run(
        TRAIN + ["--resume", "auto", "--allow-config-change", "data.skip_bad"]
        + tiny_overrides(data, work, **extra, **{"data.skip_bad": "true"}),
        capture_output=True, text=True, cwd=REPO, env=ENV, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = (work / "train.log").read_text()
    assert f"skipped a bad training sample (data.skip_bad): {bad}: cannot decode image" in log
    assert max(r.get("train/skipped_files", 0) for r in _records(work)) == 1


def test_mis_sized_validation_mask(tiny_data, tmp_path):
    """Validation meets a mask of the wrong size: the checkpoint of the iteration is already
    saved, the error names the mask; data.skip_bad leaves the image out of the scores."""
    data = _copy_data(tiny_data, tmp_path)
    name = read_name_list(data / "val.txt")[1]
    mask = data / "SegmentationClassAug" / f"{name}.png"
    Image.fromarray(np.zeros((40, 30), np.uint8)).save(mask)
    work = tmp_path / "work"
    common = {"train.max_iters": 2, "train.eval_iters": 2, "train.ckpt_iters": 100}
    with pytest.raises(DataError, match=re.escape(str(mask)) + r": mask size .* differs(.|\n)*"
                                        r"checkpoint of iteration 2 is saved"):
        train(tiny_config(data, work, **common))
    assert torch.load(work / "checkpoints" / "iter_000002.pth",
                      weights_only=True)["validated"] is False

    result = train(tiny_config(data, work, **common, **{"data.skip_bad": "true"}),
                   resume="auto", allow_config_change=["data.skip_bad"])
    assert result.scores["skipped_images"] == 1
    assert f"validation: left out a bad image: {mask}" in (work / "train.log").read_text()


# ------------------------------------------------------------------------------------------------
# Work dirs and resuming
# ------------------------------------------------------------------------------------------------


def test_a_fresh_run_refuses_a_used_work_dir(tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, tmp_path, **{"train.max_iters": 2, "train.eval_iters": 100})
    train(cfg)
    with pytest.raises(ConfigError, match=r"holds another run \(checkpoints/.*iter_000002.pth, "
                                          r"metrics.jsonl, tb/\).*--resume auto.*--overwrite"):
        train(cfg)
    train(cfg, overwrite=True)
    assert [r["iter"] for r in _records(tmp_path) if "train/total" in r] == [1, 2]
    assert len(list((tmp_path / "tb").iterdir())) == 1
    with pytest.raises(ConfigError, match="contradict"):
        train(cfg, resume="auto", overwrite=True)


def test_resume_with_another_config_lists_the_differences(tiny_data, tmp_path):
    common = {"train.eval_iters": 100}
    train(tiny_config(tiny_data, tmp_path, **common, **{"train.max_iters": 2}))
    longer = tiny_config(tiny_data, tmp_path, **common, **{"train.max_iters": 4,
                                                            "loss.w_aff": 0.2})
    with pytest.raises(ConfigError) as refused:
        train(longer, resume="auto")
    message = str(refused.value)
    assert "train.max_iters: 2 in the checkpoint, 4 now" in message
    assert "loss.w_aff: 0.1 in the checkpoint, 0.2 now" in message
    assert "--allow-config-change loss.w_aff train.max_iters" in message
    assert "another --work-dir" in message
    with pytest.raises(ConfigError, match="loss.w_aff"):
        train(longer, resume="auto", allow_config_change=["train.max_iters"])
    # Where the data stream is read from changes no number: no permission needed.
    moved = tiny_config(tiny_data, tmp_path, **common, **{
        "train.max_iters": 4, "loss.w_aff": 0.2, "data.num_workers": 1})
    train(moved, resume="auto", allow_config_change=["train", "loss.w_aff"])
    assert "Resuming with config changes" in (tmp_path / "train.log").read_text()


def test_tools_train_parses_allowed_keys_before_overrides():
    train_tool = __import__("conftest").load_tool("train")
    args = train_tool.parse_args(["--config", "c.yaml", "--resume", "auto",
                                  "--allow-config-change", "train.max_iters",
                                  "train.max_iters=30", "seed=1"])
    assert args.allow_config_change == ["train.max_iters"]
    assert args.overrides == ["train.max_iters=30", "seed=1"]


def test_resume_on_another_number_of_processes(tiny_data, tmp_path):
    """A one-process checkpoint continues under torchrun with two processes (the global batch
    split anew, RNG states of another process count not restored) and lands on the run that
    never changed (up to DDP's reduction order)."""
    from test_trainer import _torchrun

    # One image per process and micro-batch in both runs: the same BatchNorm batches.
    common = {"train.eval_iters": 100, "train.ckpt_iters": 2, "train.keep_last": 0,
              "train.batch_per_gpu": 1}
    reference = tmp_path / "reference"
    train(tiny_config(tiny_data, reference, **common))  # accumulates 2 x 1; saves 2 and 4
    work = tmp_path / "work"
    shutil.copytree(reference, work)
    for name in ("iter_000004.pth", "best.pth"):
        (work / "checkpoints" / name).unlink()
    output = _torchrun(2, tiny_data, work, resume="auto", **common)
    assert "RNG states not restored" in (work / "train.log").read_text()
    assert "2 processes x 1 per batch x 1 accumulation" in output
    resumed = torch.load(work / "rank0_model.pth")
    for key, value in _final_model(reference, 4).items():
        if "running_" in key or "num_batches" in key:
            continue  # DDP broadcasts rank 0's BatchNorm buffers; accumulation updates them twice
        if key.startswith("decoder.linear_c") and key.endswith(".bias"):
            continue  # cancelled by the BatchNorm after it: its gradient is rounding noise
        torch.testing.assert_close(resumed[key], value, rtol=1e-4, atol=1e-6, msg=key)


# ------------------------------------------------------------------------------------------------
# Non-finite values
# ------------------------------------------------------------------------------------------------


def _patch_step(monkeypatch, at_iteration: int, change):
    original = trainer_module.train_step

    def step(model, batch, phase, *args, **kwargs):
        if phase.iteration == at_iteration:
            batch, after = change(model, batch)
            out = original(model, batch, phase, *args, **kwargs)
            return after(out) if after else out
        return original(model, batch, phase, *args, **kwargs)

    monkeypatch.setattr(trainer_module, "train_step", step)


def _nan_gradient_finite_loss(model, batch):
    """d/dp sqrt(0 * p) = 0.5 / sqrt(0) * 0 = NaN, while the value added to the loss is 0."""
    weight = next(model.parameters())

    def after(out):
        total = out.terms.total + torch.sqrt(0 * weight).sum()
        return out._replace(terms=dataclasses.replace(out.terms, total=total))
    return batch, after


def test_non_finite_gradient_stops_after_a_finite_checkpoint(tiny_data, tmp_path, monkeypatch):
    _patch_step(monkeypatch, 1, _nan_gradient_finite_loss)
    cfg = tiny_config(tiny_data, tmp_path, **{"train.eval_iters": 100})
    # The bad step is dropped on the device and found at the next report (log_iters is 1
    # here): the checkpoint after it holds the state of iteration 0's update alone.
    with pytest.raises(FloatingPointError, match=r"loss or gradient at iteration 1: "
                                                 r"cls_loss=[0-9.]+.*dropped.*checkpoint of "
                                                 r"iteration 2"):
        train(cfg)
    state = torch.load(tmp_path / "checkpoints" / "iter_000002.pth", weights_only=True)
    assert int(state["optimizer"]["state"][0]["step"]) == 1  # the dropped step did not count
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_skipped_step_restores_batchnorm_statistics(tiny_data, tmp_path, monkeypatch):
    """A NaN forward poisons BatchNorm running statistics; a skipped step must take them back,
    and no checkpoint may hold a NaN."""
    _patch_step(monkeypatch, 1, lambda model, batch: (
        {**batch, "image": torch.full_like(batch["image"], float("nan"))}, None))
    cfg = tiny_config(tiny_data, tmp_path, **{"train.nonfinite": "skip", "train.max_iters": 2,
                                              "train.image_log_iters": 0,
                                              "train.eval_iters": 100})
    result = train(cfg)
    assert non_finite_tensors(result.model) == []
    state = torch.load(tmp_path / "checkpoints" / "iter_000002.pth", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert [r["train/skipped_steps"] for r in _records(tmp_path)
            if "train/skipped_steps" in r] == [0, 1]


def test_checkpoint_of_non_finite_weights_is_refused(tiny_data, tmp_path, monkeypatch):
    def poison(model, batch):
        with torch.no_grad():
            next(model.parameters()).fill_(float("nan"))  # as a bad optimizer step would
        return batch, None

    _patch_step(monkeypatch, 1, poison)
    cfg = tiny_config(tiny_data, tmp_path, **{"train.eval_iters": 100})
    with pytest.raises(FloatingPointError, match="Not writing the checkpoint .* non-finite"):
        train(cfg)
    assert not list((tmp_path / "checkpoints").glob("iter_*.pth"))


# ------------------------------------------------------------------------------------------------
# Weights and the record of a run
# ------------------------------------------------------------------------------------------------


def test_weights_of_another_variant_are_one_line_from_tools_train(tiny_data, tmp_path):
    weights = tmp_path / "mit_b0.pth"
    torch.save(mix_transformer.mit_b0().state_dict(), weights)
    proc = subprocess.run(TRAIN + tiny_overrides(tiny_data, tmp_path / "w", **{
        "model.backbone": "mit_b1", "model.pretrained": weights}), capture_output=True,
        text=True, cwd=REPO, env=ENV, timeout=300)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and "holds mit_b0 weights" in lines[-1]
    assert "Traceback" not in proc.stderr


def test_train_log_records_the_run(tiny_data, tmp_path):
    weights = tmp_path / "weights.pth"
    torch.save(mix_transformer.mit_b0().state_dict(), weights)
    cfg = tiny_config(tiny_data, tmp_path / "w", **{"model.pretrained": weights,
                                                    "train.max_iters": 2, "train.eval_iters": 2})
    train(cfg)
    log = (tmp_path / "w" / "train.log").read_text()
    sha = __import__("hashlib").sha256(weights.read_bytes()).hexdigest()[:12]
    assert f"Loaded mit_b0 weights from {weights} (sha256 {sha})" in log
    assert "command: " in log and "git commit" in log
    assert f"torch {torch.__version__}" in log and "pydensecrf2 " in log
    assert "best.pth updated: seg mIoU" in log


def test_from_scratch_with_the_papers_multipliers_warns(tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, tmp_path, **{"train.max_iters": 1, "train.eval_iters": 100,
                                              "optim.lr_mults.backbone_norm": 0.0,
                                              "optim.lr_mults.heads": 10.0})
    train(cfg)
    assert "Training from scratch with frozen backbone norms" in (tmp_path / "train.log").read_text()
