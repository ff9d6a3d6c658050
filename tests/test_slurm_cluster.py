"""launch/slurm_voc.sh and slurm_coco.sh under a real SLURM: a one-node cluster's sbatch, srun,
scontrol and scancel.

tests/test_slurm_scripts.py runs the scripts against stand-ins; these tests submit them with the
real sbatch and check what only a real SLURM shows: that the time-limit signal
reaches the trainer, that `scontrol requeue` puts the job back and its next run resumes onto the
same weights as an uninterrupted run, that scancel with and without --signal=USR1 requeues or
stops, that every run appends to one log, and that two tasks of one job train together over gloo.

They need a running cluster whose node has at least 2 CPUs and are skipped unless
AFA_SLURM_TESTS=1 (then a cluster that does not answer is an error, not a skip):

    make test-slurm     # starts one (root; launch/slurm_local_cluster.sh), runs these, stops it
    sudo bash launch/slurm_local_cluster.sh start     # or by hand, then
    export SLURM_CONF=/tmp/afa-slurm/etc/slurm.conf
    AFA_SLURM_TESTS=1 .venv/bin/pytest -q -m slurm tests/test_slurm_cluster.py

The jobs are the scripts as users submit them (slurm_voc.sh, and slurm_coco.sh for the two-task
job; from the repository root, CONFIG=configs/demo.yaml, config overrides as arguments), with
#SBATCH options overridden on the command line where a CPU node needs it: --gpus-per-node=0, one
CPU per task, a short --time and --output in the test's directory. The model is the tests' tiny
MiT-b0 on 64-px generated images (conftest.tiny_overrides), one thread per process.

Timing. SLURM sends the --signal warning at its next time-limit check, which runs every 30 s, and
may do so up to 30 s before the requested time (slurmctld's send_job_warn_signal). With --time=1
and --signal=USR1@10 the signal is due 20 s after the job's start and arrives 20 to 51 s after
it. Before 20 s it could reach a trainer that has not yet installed its handler (7-8 s after the
start on 2 busy cores), which SIGUSR1 would kill; after 51 s the trainer must still be training,
so the run is sized, from a measured 40-iteration run, to train for TRAIN_SECONDS. Its second run
would be signalled as early, so the test extends the requeued job's time limit (scontrol update)
to let it finish: the job would requeue itself as often as needed, but each run more would cost
the test ~30 s. The requeued job waits cred_expire + 1 s before it runs again (6 s with the
cluster's AuthInfo=cred_expire=5; SLURM's default is 120 s).

Measured on 2 AMD EPYC cores shared with other work: the file takes 2 min 10 s to 2 min 55 s
(the time-limit job and its uninterrupted run 70-110 s, the scancel test 25-35 s, the two-task
job 8-10 s); `make test-slurm` adds about 2 s to start the cluster and 6 s to stop it, plus the
apt-get install on a machine without SLURM.
"""

import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import conftest

REPO = Path(__file__).resolve().parents[1]
# Seconds of training for the time-limit test: the signal arrives at most 51 s after the job's
# start, and the trainer starts training 4-8 s after it.
TRAIN_SECONDS = 55

pytestmark = [
    pytest.mark.slurm,
    pytest.mark.cpu_only,
    pytest.mark.skipif(os.environ.get("AFA_SLURM_TESTS") != "1",
                       reason="needs a SLURM cluster: `make test-slurm` starts one and runs "
                              "these with AFA_SLURM_TESTS=1"),
]


def _environment() -> dict:
    """The submitting shell's environment, without the variables of a job that pytest itself may
    run in (they would describe that job to the scripts), one thread per trainer process."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")) or k == "SLURM_CONF"}
    env.update(CONFIG="configs/demo.yaml", PYTHON=sys.executable, OMP_NUM_THREADS="1")
    return env


ENV = _environment()


def _run(*command, timeout=60) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module", autouse=True)
def cluster():
    """The cluster answers; jobs left by a failed test are cancelled at the end."""
    try:
        info = _run("sinfo", "--noheader", "--Node", "--format=%N %c %T")
    except FileNotFoundError:
        pytest.fail("AFA_SLURM_TESTS=1 but sinfo is not installed; `make test-slurm` installs "
                    "SLURM and starts a one-node cluster")
    fields = info.stdout.split()
    if info.returncode != 0 or len(fields) < 3:
        pytest.fail(f"AFA_SLURM_TESTS=1 but the cluster does not answer (sinfo: "
                    f"{info.stderr.strip() or info.stdout.strip()}); start one with "
                    "launch/slurm_local_cluster.sh and export the SLURM_CONF it prints")
    submitted = []
    yield submitted
    for job in submitted:
        _run("scancel", str(job))


class Job:
    """A job submitted with the real sbatch: a launch/slurm_*.sh script (slurm_voc.sh unless
    ``script`` says otherwise) and its command-line options."""

    def __init__(self, submitted: list, tmp_path: Path, name: str, overrides: list,
                 *options: str, script: str = "slurm_voc.sh"):
        pattern = tmp_path / f"{name}-%j.out"
        result = _run("sbatch", "--parsable", f"--job-name=afa-test-{name}", "--gpus-per-node=0",
                      "--cpus-per-task=1", f"--output={pattern}", *options,
                      f"launch/{script}", *overrides)
        assert result.returncode == 0, result.stderr
        self.id = result.stdout.strip().split(";")[0]
        submitted.append(self.id)
        self.out = tmp_path / f"{name}-{self.id}.out"
        self.dir = tmp_path

    def log(self) -> str:
        return self.out.read_text() if self.out.is_file() else ""

    def info(self) -> dict:
        """`scontrol show job` as a dict (empty once SLURM has forgotten the job)."""
        shown = _run("scontrol", "--oneliner", "show", "job", self.id)
        return dict(re.findall(r"(\w+)=(\S*)", shown.stdout)) if shown.returncode == 0 else {}

    def state(self) -> str:
        return self.info().get("JobState", "")

    def wait_for(self, what: str, condition, timeout: float) -> None:
        """Poll ``condition()`` until true; fail with the job's state and log tail otherwise."""
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                pytest.fail(f"job {self.id}: no {what} within {timeout:.0f} s; state "
                            f"{self.info()}; log:\n{self.log()[-4000:]}")
            time.sleep(0.5)

    def wait_until_ended(self, timeout: float) -> str:
        done = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")
        self.wait_for("end", lambda: self.state() in done, timeout)
        return self.state()

    def runs(self) -> list[str]:
        """The run numbers that the batch script announced, in the order they ran."""
        return re.findall(rf"job {self.id}, run (\d+), nodes", self.log())


def _overrides(data: Path, work_dir: Path, iterations: int, **extra) -> list[str]:
    return conftest.tiny_overrides(data, work_dir, **{
        "device": "cpu", "train.max_iters": iterations, "train.cam_iters": iterations // 4,
        "train.aff_switch_iter": iterations // 2, "train.eval_iters": iterations,
        "train.ckpt_iters": iterations, "train.image_log_iters": 0, **extra})


def _records(work_dir: Path) -> list[dict]:
    path = work_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return [json.loads(line) for line in lines if line.strip().endswith("}")]


def _last_iteration(work_dir: Path) -> int:
    return max((r["iter"] for r in _records(work_dir) if "train/total" in r), default=0)


def _weights(work_dir: Path, iteration: int) -> dict:
    path = work_dir / "checkpoints" / f"iter_{iteration:06d}.pth"
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def _train(data: Path, work_dir: Path, iterations: int) -> subprocess.Popen:
    """The same training as a plain process, outside SLURM."""
    return subprocess.Popen([sys.executable, "tools/train.py", "--config", "configs/demo.yaml",
                             *_overrides(data, work_dir, iterations)], cwd=REPO, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _iterations_for(seconds: float, data: Path, tmp_path: Path) -> int:
    """Iterations of ``_overrides`` that train for about ``seconds`` on this machine, measured
    on a 40-iteration run (its iterations only, not the start or the validation)."""
    work = tmp_path / "timing"
    proc = _train(data, work, 40)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    times = {r["iter"]: r["time"] for r in _records(work) if "train/total" in r}
    per_iteration = (times[40] - times[1]) / 39
    return 4 * math.ceil(seconds / per_iteration / 4)


@pytest.fixture(scope="module")
def requeued_job(cluster, tiny_data, tmp_path_factory):
    """A job stopped by its time-limit signal and requeued, and the uninterrupted run of its
    config, trained at the same time outside SLURM (the job uses one of the node's CPUs)."""
    tmp = tmp_path_factory.mktemp("time_limit")
    iterations = _iterations_for(TRAIN_SECONDS, tiny_data, tmp)
    job = Job(cluster, tmp, "time-limit", _overrides(tiny_data, tmp / "slurm", iterations),
              "--ntasks-per-node=1", "--time=1", "--signal=USR1@10")
    reference = _train(tiny_data, tmp / "plain", iterations)
    try:
        job.wait_for("requeue", lambda: job.info().get("Restarts") == "1", 120)
        # Run 2 would get its warning as early as run 1 did (see the module's docstring).
        update = _run("scontrol", "update", f"JobId={job.id}", "TimeLimit=10")
        assert update.returncode == 0, update.stderr
        state = job.wait_until_ended(300)
        _, err = reference.communicate(timeout=300)
    finally:
        if reference.poll() is None:
            reference.kill()
            reference.wait()
    assert reference.returncode == 0, err[-3000:]
    return job, iterations, state


def test_time_limit_signal_requeues_and_the_next_run_resumes_onto_the_same_weights(
        requeued_job):
    job, iterations, state = requeued_job
    log = job.log()
    assert state == "COMPLETED", log[-4000:]
    assert job.runs() == ["1", "2"], log[-4000:]
    stopped = re.findall(r"stopped by SIGUSR1 at iteration (\d+); checkpoint saved", log)
    assert len(stopped) == 1, log[-4000:]
    stop = int(stopped[0])
    assert 0 < stop < iterations
    assert "srun exited with status 138" in log
    assert f"requeueing job {job.id}" in log
    assert re.search(rf"Resumed from \S*iter_{stop:06d}\.pth at iteration {stop}\b", log), log
    assert "srun exited with status 0; the job is not requeued" in log
    assert job.info().get("Restarts") == "1"
    resumed, plain = _weights(job.dir / "slurm", iterations), _weights(job.dir / "plain",
                                                                        iterations)
    assert resumed.keys() == plain.keys()
    for key in plain:
        assert torch.equal(resumed[key], plain[key]), key


def test_every_run_of_a_requeued_job_appends_to_one_log(requeued_job):
    job, _, _ = requeued_job
    assert sorted(p.name for p in job.dir.glob("*.out")) == [job.out.name]
    log = job.log()
    # run 1's trainer output, its requeue, then run 2's start and trainer output, in order
    marks = [f"job {job.id}, run 1,", "Training mit_b0", "stopped by SIGUSR1",
             f"requeueing job {job.id}", f"job {job.id}, run 2,", "Resumed from",
             "srun exited with status 0"]
    positions = [log.find(mark) for mark in marks]
    assert -1 not in positions and positions == sorted(positions), list(zip(marks, positions))


def test_scancel_usr1_requeues_and_plain_scancel_stops_for_good(cluster, tiny_data, tmp_path):
    work = tmp_path / "work"
    # Many iterations: the run only ever ends by a signal.
    job = Job(cluster, tmp_path, "scancel", _overrides(tiny_data, work, 100000),
              "--ntasks-per-node=1", "--time=5")
    job.wait_for("training", lambda: _last_iteration(work) >= 2, 120)
    result = _run("scancel", "--signal=USR1", job.id)
    assert result.returncode == 0, result.stderr
    job.wait_for("requeue", lambda: job.info().get("Restarts") == "1", 60)
    stopped = re.findall(r"stopped by SIGUSR1 at iteration (\d+); checkpoint saved", job.log())
    assert len(stopped) == 1, job.log()[-4000:]
    stop = int(stopped[0])
    # run 2 resumes and trains on
    job.wait_for("second run", lambda: _last_iteration(work) > stop + 2, 120)
    assert re.search(rf"Resumed from \S*iter_{stop:06d}\.pth at iteration {stop}\b", job.log())

    result = _run("scancel", job.id)
    assert result.returncode == 0, result.stderr
    assert job.wait_until_ended(60) == "CANCELLED"
    # A requeue would have happened before the job's processes were gone; wait for that, then
    # longer than a requeued job waits to run again (6 s) plus a scheduler pass.
    job.wait_for("end of the processes", lambda: not _run(
        "squeue", "--noheader", f"--jobs={job.id}").stdout.strip(), 60)
    time.sleep(9)
    info = job.info()
    assert info.get("JobState") == "CANCELLED" and info.get("Restarts") == "1", info
    assert job.runs() == ["1", "2"], job.log()[-4000:]
    assert job.log().count("requeueing job") == 1
    # scancel's SIGTERM reached the trainer, which saved its last iteration: resubmitting the
    # job would go on from there.
    saved = [int(p.stem[5:]) for p in (work / "checkpoints").glob("iter_*.pth")]
    assert max(saved) > stop + 2, saved


def test_two_tasks_on_one_node_train_together_over_gloo(cluster, tiny_data, tmp_path):
    node, cpus = _run("sinfo", "--noheader", "--Node", "--format=%N %c").stdout.split()[:2]
    if int(cpus) < 2:
        pytest.fail(f"node {node} has {cpus} CPU: a job of two 1-CPU tasks would never start")
    work = tmp_path / "work"
    # slurm_coco.sh: the other script under the real sbatch (its 4 tasks per node overridden)
    job = Job(cluster, tmp_path, "two-tasks",
              _overrides(tiny_data, work, 4, **{"train.global_batch": 4}),
              "--ntasks-per-node=2", "--time=5", script="slurm_coco.sh")
    assert job.wait_until_ended(180) == "COMPLETED", job.log()[-4000:]
    log = job.log()
    assert "2 processes x 2 per batch x 1 accumulation = global batch 4" in log
    assert "srun exited with status 0; the job is not requeued" in log
    assert job.runs() == ["1"], log[-4000:]
    assert (work / "checkpoints" / "iter_000004.pth").is_file()
