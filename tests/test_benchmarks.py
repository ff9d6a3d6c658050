"""The GPU check's CPU side: benchmarks/device_agreement.py against itself on the CPU (which must
agree exactly), its failure exit, the plumbing of benchmarks/gpu_check.sh and its summary.

The whole ``DEVICE=cpu QUICK=1 bash benchmarks/gpu_check.sh`` takes about a minute on 2 cores
(most of it benchmarks/infer.py at 500x375), too long for the suite: here it runs with
``BUDGET=0``, which skips every run and still writes the summary, and the summary is fed real
outputs of device_agreement.py and train_step.py."""

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO

TINY = ["--backbone", "mit_b0", "--crop", "64", "--batch", "2", "--threads", "1",
        "model.embedding_dim=32"]
ENV = dict(os.environ, OMP_NUM_THREADS="1")
pytestmark = pytest.mark.cpu_only  # what runs on the GPU is gpu_check.sh itself


def _run(*args, env=ENV, timeout=300):
    return subprocess.run(list(args), capture_output=True, text=True, cwd=REPO, env=env,
                          timeout=timeout)


def _last_json(proc) -> dict:
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def agreement():
    """device_agreement.py, CPU against CPU in fp32, with the regularized loss."""
    proc = _run(sys.executable, "benchmarks/device_agreement.py", "--device", "cpu", "--other",
                "cpu", "--reg-loss", *TINY)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_device_agreement_of_the_cpu_with_itself_is_exact(agreement):
    record = _last_json(agreement)
    assert record["passed"] and record["failures"] == []
    assert (record["device"], record["other"], record["precision"]) == ("cpu", "cpu", "fp32")
    assert record["thresholds"] == {"min_agreement": 1.0, "max_loss_rel": 0.0}
    assert set(record["labels"]) == {"cam_label", "refined_label", "aff_pseudo_label",
                                     "seg_target", "aff_label"}
    assert all(v["agreement"] == 1.0 for v in record["labels"].values())
    assert set(record["losses"]) == {"cls_loss", "seg_loss", "aff_loss", "reg_loss", "total"}
    assert all(v["abs_diff"] == 0.0 and v["device"] == v["other"]
               for v in record["losses"].values())
    assert record["losses"]["reg_loss"]["device"] != 0  # the regularized loss did run
    assert record["cam_max_abs_diff"] == record["grad_rel_diff"] == 0.0
    # The labels compared are not trivially all-ignore: smooth images, a sharpened affinity head.
    for name in ("refined_label", "aff_pseudo_label"):
        assert record["labels"][name]["ignore_device"] < 0.9, name
    assert "PASS" in agreement.stdout and "refined_label" in agreement.stdout


def test_device_agreement_exits_1_when_a_threshold_is_missed():
    """bf16 autocast against fp32 on the CPU, with no loss difference allowed."""
    proc = _run(sys.executable, "benchmarks/device_agreement.py", "--device", "cpu", "--other",
                "cpu", "--amp", "bf16", "--max-loss-rel", "0", *TINY)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = _last_json(proc)
    assert not record["passed"] and record["precision"] == "bf16"
    assert any("relative difference" in f for f in record["failures"])
    assert "FAIL: " in proc.stdout


def test_gpu_check_script_parses_and_refuses_bad_devices(tmp_path):
    assert _run("bash", "-n", "benchmarks/gpu_check.sh").returncode == 0
    bad = _run("bash", "benchmarks/gpu_check.sh", env=dict(ENV, DEVICE="gpu",
                                                            OUT=str(tmp_path / "bad")))
    assert bad.returncode == 2 and "DEVICE must be auto, cuda or cpu" in bad.stderr
    if not _cuda_visible():
        proc = _run("bash", "benchmarks/gpu_check.sh", env=dict(ENV, DEVICE="cuda",
                                                                 OUT=str(tmp_path / "cuda")))
        assert proc.returncode == 2 and "sees no GPU" in proc.stderr


def _cuda_visible() -> bool:
    import torch

    return torch.cuda.is_available()


def test_gpu_check_out_of_time_skips_every_run_fails_and_still_summarizes(tmp_path):
    out = tmp_path / "check"
    proc = _run("bash", "benchmarks/gpu_check.sh",
                env=dict(ENV, DEVICE="cpu", QUICK="1", BUDGET="0", OUT=str(out)))
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [line.split("\t") for line in (out / "steps.tsv").read_text().splitlines()]
    assert [r[0] for r in rows] == [  # checks, the filter, inference, then timings
        "tests", "agree_fp32", "filter", "infer", "validate", "train_b2_fp32_regoff",
        "train_b2_fp32_regon", "train_b2_fp32_regpydensecrf"]
    assert all(r[2].startswith("SKIPPED") for r in rows)
    summary = (out / "summary.md").read_text()
    assert "| step | setting | result | status | s |" in summary
    assert summary.count("SKIPPED") == 8
    assert "FAILED: tests agree_fp32" in proc.stdout


def test_summary_of_real_outputs(agreement, tmp_path):
    out = tmp_path / "check"
    out.mkdir()
    train = _run(sys.executable, "benchmarks/train_step.py", "--device", "cpu", "--iters", "1",
                 "--warmup", "1", *TINY)
    assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
    (out / "train_b2_fp32_regoff.json").write_text(train.stdout.strip().splitlines()[-1])
    (out / "agree_fp32.json").write_text(agreement.stdout.strip().splitlines()[-1])
    filt = _run(sys.executable, "benchmarks/bilateral_filter.py", "--batch", "2", "--crop", "48",
                "--classes", "3", "--workers", "0", "--repeats", "1")
    assert filt.returncode == 0, filt.stdout[-3000:] + filt.stderr[-3000:]
    (out / "filter.json").write_text(filt.stdout.strip().splitlines()[-1])
    (out / "tests.log").write_text("....\n15 passed in 1.41s\n")
    # The keys benchmarks/infer.py prints (too slow to run here).
    (out / "infer.json").write_text(json.dumps({
        "device": "cpu", "backbone": "mit_b0", "images": 1, "sizes": ["500x375"],
        "seg_images_per_s": 0.35, "crf_only_images_per_s": 0.36,
        "seg_crf_serial_images_per_s": 0.14, "seg_crf_pool1_images_per_s": 0.11}))
    (out / "steps.tsv").write_text(
        "tests\tmust\tok\t4\tTORCH_DEVICE=cpu pytest -m device\n"
        "agree_fp32\tmust\tok\t3\tfp32, TF32 off, reg loss\n"
        "train_b2_fp32_regoff\tmust\tok\t10\tbatch 2, fp32, reg loss off\n"
        "train_b2_bf16_regoff\tmust\tFAILED (exit 1)\t5\tbatch 2, bf16, reg loss off\n"
        "infer\tmust\tok\t29\t--device cpu\n"
        "filter\tmust\tok\t3\t--device cpu\n")
    proc = _run(sys.executable, "benchmarks/gpu_check_summary.py", str(out), "--gpu", "none",
                "--commit", "abc")
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert text.startswith("GPU: none; torch ?; commit abc")
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert "15 passed in 1.41s" in rows[2]
    assert "equal pixels: refined 1.00000, affinity 1.00000" in rows[3]
    assert "s/iter" in rows[4] and "MB peak RSS" in rows[4]
    assert "no result (see the log)" in rows[5] and "FAILED (exit 1)" in rows[5]
    assert "0.35 img/s without CRF" in rows[6] and "1 CRF processes" in rows[6]
    assert rows[7].startswith("| f. reg-loss filter | ") and "2 x 3 x 24 x 24" in rows[7]
    assert "pydensecrf (in this process)" in rows[7] and "torch (cpu, 2 threads)" in rows[7]
    assert " off" not in rows[7]  # the torch filter equals the reference bit for bit on the CPU
    # The per-stage table: one row for the one run that timed its stages.
    assert "| setting | forward |" in text and "| batch 2, fp32, reg loss off | " in rows[-1]
