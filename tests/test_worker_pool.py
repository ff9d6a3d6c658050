"""afa.worker_pool: the regularized loss's filter processes ignore stop signals, so nothing but
their own parent's death may end them. A trainer killed with SIGKILL (the out-of-memory killer,
``kill -9``) used to leave them running for ever, reparented to PID 1, about 540 MB each. Here a
small helper process and then a real training run are killed, and their workers must follow."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import conftest
from conftest import DEMO_CONFIG

REPO = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.cpu_only,
    pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="reads /proc (Linux)"),
]


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, parent pid, start time) of ``pid`` from /proc, None when it has gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = text.rsplit(")", 1)[1].split()  # after "pid (command)", which may hold spaces
    return fields[0], int(fields[1]), int(fields[19])


def _alive(process: tuple[int, int]) -> bool:
    """Whether ``(pid, start time)`` still runs: a zombie (dead, not yet reaped by whoever
    adopted it) is dead, and a new process that reuses the pid is another process."""
    stat = _stat(process[0])
    return stat is not None and stat[0] not in ("Z", "X") and stat[2] == process[1]


def _children(parent: int) -> list[tuple[int, int, str]]:
    """(pid, start time, command line) of the live processes whose parent is ``parent``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        stat = _stat(int(entry.name))
        if stat is None or stat[1] != parent or stat[0] in ("Z", "X"):
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        found.append((int(entry.name), stat[2], command))
    return found


def _wait_until_dead(processes: list[tuple[int, int]], seconds: float) -> list[int]:
    """The pids of ``processes`` still alive after up to ``seconds``."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        if not any(_alive(p) for p in processes):
            return []
        time.sleep(0.05)
    return [p[0] for p in processes if _alive(p)]


def _kill_leftovers(processes: list[tuple[int, int]]) -> None:
    """A failing test must not leave its orphans behind: kill those it started, by pid."""
    for process in processes:
        if _alive(process):
            os.kill(process[0], signal.SIGKILL)


# A parent that starts a pool of one worker, prints the worker's pid once the worker has run a
# task (its initializer has run), and then waits to be killed.
_HELPER = textwrap.dedent("""
    import os, sys, time
    from afa.worker_pool import make_pool
    pool = make_pool(1, use_prctl={use_prctl})
    print(pool.submit(os.getpid).result(), flush=True)
    time.sleep(120)
""")


@pytest.mark.parametrize("use_prctl", [True, False], ids=["prctl", "watcher"])
def test_a_worker_dies_when_its_parent_is_killed(use_prctl):
    helper = subprocess.Popen([sys.executable, "-c", _HELPER.format(use_prctl=use_prctl)],
                              stdout=subprocess.PIPE, text=True, cwd=REPO)
    worker = None
    try:
        pid = int(helper.stdout.readline())
        state, parent, start = _stat(pid)
        assert parent == helper.pid
        worker = (pid, start)
        # The worker leaves stop signals to its parent...
        os.kill(pid, signal.SIGTERM)
        time.sleep(0.3)
        assert _alive(worker)
        # ...and ends with it.
        helper.kill()
        helper.wait()
        assert not _wait_until_dead([worker], 5.0), "the worker outlived its killed parent"
    finally:
        helper.kill()
        helper.wait()
        if worker is not None:
            _kill_leftovers([worker])


def test_die_with_parent_ends_a_process_whose_parent_has_already_gone():
    """The kernel's parent-death signal covers only a parent alive when it is asked for: a worker
    whose parent died while it started (before its initializer ran) ends at once."""
    code = ("import os, sys\nfrom afa.worker_pool import die_with_parent\n"
            "die_with_parent(os.getppid() + 1000000)\nsys.exit(7)")
    for use_prctl in (True, False):
        run = subprocess.run([sys.executable, "-c", code.replace(
            "+ 1000000)", f"+ 1000000, use_prctl={use_prctl})")], cwd=REPO, timeout=60)
        assert run.returncode == 1


def test_filter_workers_die_when_the_trainer_is_killed(tiny_data, tmp_path):
    """``kill -9`` of a trainer with the regularized loss in worker processes: the workers,
    which ignore SIGTERM, must not outlive it."""
    work = tmp_path / "work"
    overrides = conftest.tiny_overrides(tiny_data, work, **{
        "device": "cpu", "loss.reg_loss": "true", "loss.reg_workers": 2, "train.cam_iters": 1,
        "train.max_iters": 500, "train.eval_iters": 1000, "train.ckpt_iters": 1000,
        "train.image_log_iters": 0})
    command = [sys.executable, str(REPO / "tools" / "train.py"), "--config", str(DEMO_CONFIG),
               *overrides]
    trainer = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"))
    children = []
    try:
        # Iteration 3 logged: the filter processes have returned results of the steps from
        # cam_iters on, so they are set up and waiting for work, as in a long run.
        metrics, deadline = work / "metrics.jsonl", time.time() + 300
        while trainer.poll() is None and time.time() < deadline:
            if metrics.is_file() and '"iter": 3,' in metrics.read_text():
                break
            time.sleep(0.05)
        assert trainer.poll() is None, trainer.stderr.read()[-3000:]
        children = _children(trainer.pid)
        workers = [c for c in children if "multiprocessing" in c[2]
                   and "resource_tracker" not in c[2]]
        assert len(workers) == 2, children
        trainer.kill()
        trainer.wait()
        left = _wait_until_dead([(pid, start) for pid, start, _ in children], 10.0)
        assert not left, f"processes {left} outlived the killed trainer: " + "; ".join(
            command for pid, _, command in children if pid in left)
    finally:
        trainer.kill()
        trainer.wait()
        trainer.stderr.close()
        _kill_leftovers([(pid, start) for pid, start, _ in children])


# A tool running the dense CRF over a lazy input, stuck waiting for its next image: its CRF
# workers idle on the pool's queue when the tool is killed.
_CRF_HELPER = textwrap.dedent("""
    import os, time
    import numpy as np
    from afa.crf import dense_crf_many

    def pairs():
        image = np.zeros((8, 8, 3), np.uint8)
        probs = np.full((2, 8, 8), 0.5, np.float32)
        yield image, probs
        yield image, probs
        time.sleep(120)

    if __name__ == "__main__":
        for _ in dense_crf_many(pairs(), workers=2, max_pending=1):
            print("done", flush=True)
""")


def _semaphores() -> set[str]:
    """The named semaphores of Python's multiprocessing on this machine (Linux: /dev/shm)."""
    shm = Path("/dev/shm")
    return {p.name for p in shm.glob("sem.mp-*")} if shm.is_dir() else set()


def test_crf_workers_die_when_their_tool_is_killed(tmp_path):
    """And nothing of the killed tool's pool stays behind: its resource tracker, which outlives
    it, removes the pool's semaphores (and says so on the tool's stderr, kept here in a file
    rather than at the end of the test run's output)."""
    script = tmp_path / "crf_tool.py"
    script.write_text(_CRF_HELPER)
    before, stderr_file = _semaphores(), tmp_path / "stderr.txt"
    with open(stderr_file, "w") as stderr:
        tool = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                                stderr=stderr, text=True, cwd=REPO)
    workers, tracker = [], []
    try:
        # the pool is up and has worked
        assert tool.stdout.readline().strip() == "done", stderr_file.read_text()[-3000:]
        children = _children(tool.pid)
        workers = [(pid, start) for pid, start, command in children
                   if "multiprocessing" in command and "resource_tracker" not in command]
        tracker = [(pid, start) for pid, start, command in children
                   if "resource_tracker" in command]
        assert workers
        tool.kill()
        tool.wait()
        assert not _wait_until_dead(workers, 5.0), "CRF workers outlived their killed tool"
        assert not _wait_until_dead(tracker, 10.0), "the resource tracker did not end"
        deadline = time.time() + 10.0
        while _semaphores() - before and time.time() < deadline:
            time.sleep(0.05)
        assert not (_semaphores() - before), "the killed tool's semaphores were left behind"
    finally:
        tool.kill()
        tool.wait()
        tool.stdout.close()
        _kill_leftovers(workers + tracker)
