"""Files a user hands the project are data: checkpoints never run code, a damaged one is named,
a work dir holds one run, and a failed write leaves the previous checkpoint as it was."""

import os
import resource
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from afa.atomic import write_atomic
from afa.engine.checkpoint import CheckpointManager, capture_rng_state, restore_rng_state
from afa.engine.run_config import read_checkpoint
from afa.engine.trainer import train
from afa.models import AFANet
from afa.safe_load import CheckpointError, UnsafeFileError, read_torch_file
from conftest import DEMO_CONFIG, REPO, load_tool, tiny_config, tiny_overrides

train_tool = load_tool("train")


class Trojan:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    """A finished two-iteration run of the real trainer (checkpoints at 1 and 2)."""
    work = tmp_path_factory.mktemp("safe_run")
    train(tiny_config(tiny_data, work, **{"train.max_iters": 2, "train.eval_iters": 100,
                                          "train.ckpt_iters": 1}))
    return work


def _error_line(stderr: str) -> str:
    """The one ``error:`` line a tool ends with (a trainer logs its set-up on stderr before)."""
    lines = stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0] and "Traceback" not in stderr, stderr
    return errors[0]


def _copy_run(trained, tmp_path):
    work = tmp_path / "work"
    shutil.copytree(trained, work, ignore=shutil.ignore_patterns(".afa-run.lock"))
    return work


def test_our_checkpoints_load_as_data_only(trained):
    state = torch.load(trained / "checkpoints" / "iter_000002.pth", weights_only=True)
    assert state["iteration"] == 2 and state["config"]["train"]["max_iters"] == 2
    assert isinstance(state["rng"][0]["numpy"]["key"], torch.Tensor)


def test_the_rng_state_survives_a_weights_only_round_trip(tmp_path):
    np.random.seed(7)
    np.random.rand(3)
    saved = capture_rng_state()
    expected = np.random.rand(5), torch.rand(3)
    torch.save(saved, tmp_path / "rng.pth")
    np.random.rand(11)
    restore_rng_state(torch.load(tmp_path / "rng.pth", weights_only=True))
    again = np.random.rand(5), torch.rand(3)
    assert np.array_equal(expected[0], again[0]) and torch.equal(expected[1], again[1])


def test_a_checkpoint_of_the_older_format_still_loads_and_resumes(trained, tmp_path):
    """Before RNG states were tensors, NumPy's was a tuple with an array: read with the
    restricted unpickler (NumPy arrays allowed, nothing else)."""
    state = read_torch_file(trained / "checkpoints" / "iter_000001.pth")
    numpy_state = state["rng"][0]["numpy"]
    state["rng"][0]["numpy"] = (numpy_state["kind"], numpy_state["key"].numpy().astype(np.uint32),
                                numpy_state["pos"], numpy_state["has_gauss"],
                                numpy_state["cached_gaussian"])
    work = _copy_run(trained, tmp_path)
    (work / "checkpoints" / "iter_000002.pth").unlink()
    torch.save(state, work / "checkpoints" / "iter_000001.pth")
    assert torch.serialization.get_unsafe_globals_in_checkpoint(
        str(work / "checkpoints" / "iter_000001.pth"))  # really the old kind of file
    loaded = read_torch_file(work / "checkpoints" / "iter_000001.pth")
    assert isinstance(loaded["rng"][0]["numpy"][1], np.ndarray)
    assert train_tool.main(["--config", str(DEMO_CONFIG), "--resume", "auto",
                            *_overrides(trained, work)]) == 0
    resumed = torch.load(work / "checkpoints" / "iter_000002.pth", weights_only=True)["model"]
    original = torch.load(trained / "checkpoints" / "iter_000002.pth", weights_only=True)["model"]
    assert all(torch.equal(resumed[k], original[k]) for k in original)


def _overrides(trained, work):
    """The finished run's overrides, with ``work`` as the work dir."""
    state = torch.load(trained / "checkpoints" / "iter_000002.pth", weights_only=True)
    data = state["config"]["data"]["root"]
    return tiny_overrides(Path(data), work, **{"train.max_iters": 2, "train.eval_iters": 100,
                                              "train.ckpt_iters": 1})


@pytest.fixture
def trojan(trained, tmp_path):
    """A real checkpoint with one extra pickled object that would create ``marker``."""
    marker = tmp_path / "PAYLOAD_RAN"
    state = torch.load(trained / "checkpoints" / "iter_000002.pth", weights_only=True)
    state["note"] = Trojan(marker)
    path = tmp_path / "shared_by_link.pth"
    torch.save(state, path)
    return path, marker


def _tool_argvs(trained, checkpoint, tmp_path):
    data = torch.load(trained / "checkpoints" / "iter_000002.pth",
                      weights_only=True)["config"]["data"]["root"]
    common = ["--config", str(DEMO_CONFIG), "--checkpoint", str(checkpoint)]
    cfg = [f"data.root={data}", f"data.list_dir={data}", "device=cpu", "cam.scales=[1.0]",
           "infer.long_side=64"]
    image = tmp_path / "photo.png"
    Image.fromarray(np.zeros((48, 40, 3), np.uint8)).save(image)
    return {
        "evaluate": common + cfg,
        "infer_seg": common + ["--split", "val", "--out-dir", str(tmp_path / "seg")] + cfg,
        "infer_cam": common + ["--split", "val", "--out-dir", str(tmp_path / "cam")] + cfg,
        "show_affinity": common + ["--image", str(image), "--pixels", "5,5", "--out",
                                   str(tmp_path / "aff.png")] + cfg,
        "ablate_affinity": common + cfg,
    }


@pytest.mark.parametrize("tool", ["evaluate", "infer_seg", "infer_cam", "show_affinity",
                                  "ablate_affinity"])
def test_a_checkpoint_that_holds_code_is_refused_by_every_tool(tool, trained, trojan, tmp_path,
                                                               capsys):
    path, marker = trojan
    argv = _tool_argvs(trained, path, tmp_path)[tool]
    assert load_tool(tool).main(argv) == 2
    err = _error_line(capsys.readouterr().err)
    assert "Refusing to load checkpoint" in err and str(path) in err and "posix.system" in err
    assert not marker.exists()


def test_a_checkpoint_that_holds_code_is_refused_by_resume(trained, trojan, tmp_path, capsys):
    path, marker = trojan
    work = _copy_run(trained, tmp_path)
    argv = ["--config", str(DEMO_CONFIG), *_overrides(trained, work),
            "--allow-config-change", "train.max_iters", "train.max_iters=3"]
    assert train_tool.main(["--resume", str(path), *argv]) == 2
    assert "Refusing to load checkpoint" in _error_line(capsys.readouterr().err)
    # The newest checkpoint of the work dir replaced by the same file: never skipped quietly.
    shutil.copyfile(path, work / "checkpoints" / "iter_000002.pth")
    assert train_tool.main(["--resume", "auto", *argv]) == 2
    assert "Refusing to load checkpoint" in _error_line(capsys.readouterr().err)
    assert not marker.exists()


def test_loading_helpers_refuse_code(trojan):
    path, marker = trojan
    with pytest.raises(UnsafeFileError, match="posix.system"):
        read_checkpoint(path)
    with pytest.raises(UnsafeFileError):
        AFANet("mit_b0", num_classes=9, embedding_dim=32).load_weights(path)
    legacy = path.with_name("legacy.pth")  # the pre-zip torch.save format
    torch.save({"x": Trojan(marker)}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(UnsafeFileError, match="posix.system"):
        read_torch_file(legacy)
    mixed = path.with_name("mixed.pth")  # allowed NumPy objects do not let others through
    torch.save({"a": np.zeros(3), "x": Trojan(marker)}, mixed)
    with pytest.raises(UnsafeFileError, match="posix.system"):
        read_torch_file(mixed)
    assert not marker.exists()


def test_a_truncated_checkpoint_is_named_in_one_line(trained, tmp_path, capsys):
    work = _copy_run(trained, tmp_path)
    broken = work / "checkpoints" / "iter_000002.pth"
    broken.write_bytes(broken.read_bytes()[: broken.stat().st_size // 2])
    argv = ["--config", str(DEMO_CONFIG), *_overrides(trained, work)]
    assert train_tool.main(["--resume", str(broken), *argv]) == 2
    assert f"Cannot read checkpoint '{broken}'" in _error_line(capsys.readouterr().err)


def test_a_pickle_cut_short_inside_a_sound_archive_is_named(trained, tmp_path):
    """The zip directory intact, the pickle inside it cut in half: the unpickler fails with
    whatever error its opcode stream breaks on; the reader names the file, nothing else."""
    source = zipfile.ZipFile(trained / "checkpoints" / "iter_000002.pth")
    cut = tmp_path / "cut.pth"
    with zipfile.ZipFile(cut, "w", compression=zipfile.ZIP_STORED) as out:
        for item in source.infolist():
            data = source.read(item.filename)
            if item.filename.endswith("data.pkl"):
                data = data[: len(data) // 2]
            out.writestr(item, data)
    with pytest.raises(CheckpointError, match=f"Cannot read checkpoint '{cut}': truncated"):
        read_torch_file(cut)


def test_resume_auto_skips_a_truncated_newest_checkpoint(trained, tmp_path, capsys):
    work = _copy_run(trained, tmp_path)
    broken = work / "checkpoints" / "iter_000002.pth"
    broken.write_bytes(broken.read_bytes()[:1000])
    assert train_tool.main(["--config", str(DEMO_CONFIG), "--resume", "auto",
                            *_overrides(trained, work)]) == 0
    log = (work / "train.log").read_text()
    assert f"--resume auto: skipped Cannot read checkpoint '{broken}'" in log
    assert "Resumed from" in log and "iter_000001.pth at iteration 1" in log
    resumed = torch.load(broken, weights_only=True)["model"]  # written again, whole
    original = torch.load(trained / "checkpoints" / "iter_000002.pth", weights_only=True)["model"]
    assert all(torch.equal(resumed[k], original[k]) for k in original)


def test_resume_auto_with_no_readable_checkpoint_stops(trained, tmp_path, capsys):
    work = _copy_run(trained, tmp_path)
    for path in (work / "checkpoints").glob("iter_*.pth"):
        path.write_bytes(b"PK\x03\x04 cut short")
    assert train_tool.main(["--config", str(DEMO_CONFIG), "--resume", "auto",
                            *_overrides(trained, work)]) == 2
    err = _error_line(capsys.readouterr().err)
    assert "no readable checkpoint" in err and "2 skipped" in err


def test_a_weights_only_file_is_no_resume_point(trained, tmp_path, capsys):
    weights = tmp_path / "weights.pth"
    torch.save(torch.load(trained / "checkpoints" / "iter_000002.pth",
                          weights_only=True)["model"], weights)
    work = tmp_path / "work"
    assert train_tool.main(["--config", str(DEMO_CONFIG), "--resume", str(weights),
                            *_overrides(trained, work)]) == 2
    assert "holds model weights only" in _error_line(capsys.readouterr().err)


def test_resume_auto_on_a_finished_run_says_so(trained, tmp_path):
    work = _copy_run(trained, tmp_path)
    assert train_tool.main(["--config", str(DEMO_CONFIG), "--resume", "auto",
                            *_overrides(trained, work)]) == 0
    assert "This run is already finished: iter_000002.pth is iteration 2 of " \
           "train.max_iters=2" in (work / "train.log").read_text()


def test_stale_temporaries_of_dead_writers_are_removed(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".iter_000002.pth.tmp{dead.pid}"
    live = tmp_path / f".iter_000002.pth.tmp{os.getppid()}"  # a running process's
    stale.write_bytes(b"x" * 100)
    live.write_bytes(b"y")
    CheckpointManager(tmp_path).save({"iteration": 4}, 4)
    assert not stale.exists() and live.exists()


def test_checkpoints_reach_the_disk_before_the_rename(tmp_path, monkeypatch):
    synced = []
    real = os.fsync

    def recording(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)

    monkeypatch.setattr(os, "fsync", recording)
    CheckpointManager(tmp_path).save({"iteration": 1}, 1)
    assert synced == [str(tmp_path / f".iter_000001.pth.tmp{os.getpid()}"), str(tmp_path)]
    synced.clear()
    write_atomic(tmp_path / "mask.png", lambda tmp: tmp.write_bytes(b"png"))
    assert synced == []  # per-image outputs skip it


def _limit_file_size(limit):
    def apply():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def _mount_tmpfs(path, options):
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                          capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")


@pytest.mark.parametrize("cause", ["file size limit", "full disk"])
def test_a_failed_checkpoint_write_is_one_line_and_keeps_the_previous(cause, trained, tmp_path):
    size = (trained / "checkpoints" / "iter_000002.pth").stat().st_size
    limit = None
    if cause == "full disk":  # a real ENOSPC: the run on a tmpfs with room for one checkpoint
        work = tmp_path / "disk"
        _mount_tmpfs(work, f"size={size + size // 2 + 256 * 1024}")
    else:
        work = tmp_path / "work"
        limit = size // 2
    try:
        shutil.copytree(trained, work, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns(".afa-run.lock", "iter_000001.pth",
                                                      "best.pth"))
        before = (work / "checkpoints" / "iter_000002.pth").read_bytes()
        argv = ["--config", str(DEMO_CONFIG), "--resume", "auto", *_overrides(trained, work),
                "--allow-config-change", "train.max_iters", "train.max_iters=3"]
        done = subprocess.run([sys.executable, "tools/train.py", *argv], cwd=REPO, text=True,
                              capture_output=True, timeout=300,
                              preexec_fn=_limit_file_size(limit) if limit else None)
        assert done.returncode == 2, done.stderr
        err = _error_line(done.stderr)
        cause_text = "File too large" if limit else "No space left on device"
        assert err == (f"error: Cannot write checkpoint '{work / 'checkpoints' / 'iter_000003.pth'}"
                       f"': {cause_text}; the previous checkpoint iter_000002.pth is intact")
        assert "run ended: CheckpointError: Cannot write checkpoint" in \
            (work / "train.log").read_text()
        assert (work / "checkpoints" / "iter_000002.pth").read_bytes() == before
        assert not [p.name for p in (work / "checkpoints").iterdir() if ".tmp" in p.name]
    finally:
        if not limit:
            subprocess.run(["umount", str(work)], check=False)


def test_a_read_only_work_dir_is_one_line(tiny_data, tmp_path):
    work = tmp_path / "readonly"
    if os.geteuid() == 0:  # root writes through permissions: a read-only mount instead
        _mount_tmpfs(work, "ro,size=64k")
    else:
        work.mkdir()
        work.chmod(0o555)
    try:
        done = subprocess.run([sys.executable, "tools/train.py", "--config", str(DEMO_CONFIG),
                               *tiny_overrides(tiny_data, work)], cwd=REPO, text=True,
                              capture_output=True, timeout=300)
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", str(work)], check=False)
    assert done.returncode == 2
    line = _error_line(done.stderr)
    assert line.startswith(f"error: cannot write or read '{work}")
    assert line.endswith(("Read-only file system", "Permission denied"))


def _start_trainer(tiny_data, work, *extra):
    overrides = tiny_overrides(tiny_data, work, **{"train.max_iters": 400, "train.eval_iters": 1000,
                                                   "train.ckpt_iters": 1000})
    return subprocess.Popen([sys.executable, "tools/train.py", "--config", str(DEMO_CONFIG),
                             *overrides, *extra], cwd=REPO, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


def _wait_for(condition, seconds=120.0):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def test_a_second_run_in_one_work_dir_is_refused_until_the_first_dies(tiny_data, tmp_path):
    work = tmp_path / "work"
    first = _start_trainer(tiny_data, work)
    try:
        _wait_for(lambda: (work / "train.log").is_file()
                  and "Training mit_b0" in (work / "train.log").read_text())
        for extra in ((), ("--resume", "auto"), ("--overwrite",)):
            second = _start_trainer(tiny_data, work, *extra)
            _, err = second.communicate(timeout=120)
            assert second.returncode == 2, err
            line = _error_line(err)
            assert line.startswith(f"error: {work} is in use by another training run (pid "
                                   f"{first.pid} on "), line
        # Under torchrun rank 0 holds the lock; every rank leaves with the refusal, none hangs.
        ranks = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
             "tools/train.py", "--config", str(DEMO_CONFIG), "--resume", "auto",
             *tiny_overrides(tiny_data, work, device="cpu")], cwd=REPO, text=True,
            capture_output=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
        assert ranks.returncode != 0
        assert ranks.stderr.count(f"error: {work} is in use by another training run (pid "
                                  f"{first.pid} on ") == 1, ranks.stderr
        assert ranks.stderr.count("error: ") == 2  # the other rank names rank 0's message
        assert first.poll() is None  # the first run went on
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
        # The kernel drops the lock with the process: the next run starts at once.
        third = _start_trainer(tiny_data, work, "--overwrite", "train.max_iters=1")
        _, err = third.communicate(timeout=300)
        assert third.returncode == 0, err
        assert (work / "checkpoints" / "iter_000001.pth").is_file()
    finally:
        first.kill()
        first.wait()
