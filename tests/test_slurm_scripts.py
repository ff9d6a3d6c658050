"""launch/slurm_voc.sh and slurm_coco.sh without SLURM: stand-ins for srun and scontrol on PATH.

Each run copies the batch script to a "spool" directory and starts it from another working
directory, as SLURM does, so nothing may depend on "$0" or the caller's cwd. The srun stand-in
records its arguments, environment and working directory and exits with FAKE_SRUN_STATUS (the
trainer's status: 138 after SIGUSR1, 0 when done, 2 for a config error ...); the scontrol stand-in
answers `show hostnames` and records `requeue`.
"""

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = {"slurm_voc.sh": "configs/voc.yaml", "slurm_coco.sh": "configs/coco.yaml"}
HELPER = REPO / "launch" / "_slurm_train.sh"
JOB_ID = "4242"
NODELIST = "gpu-[07-08]"
HOSTS = ["gpu-07", "gpu-08"]

# Waits, if FAKE_SRUN_SLEEP is set, up to that many seconds for SIGUSR1 and then exits 138 like the
# trainer. The trap comes before the call is recorded, so a test that sees the record may signal.
SRUN = r"""#!/usr/bin/env bash
trap 'echo USR1 >> "$FAKE_DIR/srun.signals"; exit 138' USR1
printf '%s\0' "$@" > "$FAKE_DIR/srun.argv"
env -0 > "$FAKE_DIR/srun.env"
pwd > "$FAKE_DIR/srun.cwd"
echo call >> "$FAKE_DIR/srun.calls"
for ((i = 0; i < ${FAKE_SRUN_SLEEP:-0} * 10; i++)); do sleep 0.1; done
exit "${FAKE_SRUN_STATUS:-0}"
"""

SCONTROL = r"""#!/usr/bin/env bash
echo "$*" >> "$FAKE_DIR/scontrol.calls"
if [[ $1 == show && $2 == hostnames ]]; then
    printf '%s\n' __HOSTS__
    exit 0
fi
exit "${FAKE_SCONTROL_STATUS:-0}"
"""


class Job:
    """One fake SLURM environment under tmp_path; run() starts a batch script in it."""

    def __init__(self, tmp_path: Path):
        self.dir = tmp_path / "fake"
        bin_dir = self.dir / "bin"
        bin_dir.mkdir(parents=True)
        for name, text in (("srun", SRUN),
                           ("scontrol", SCONTROL.replace("__HOSTS__", " ".join(HOSTS)))):
            (bin_dir / name).write_text(text)
            (bin_dir / name).chmod(0o755)
        self.spool = tmp_path / "spool"
        self.spool.mkdir()
        self.cwd = tmp_path / "elsewhere"  # neither the repository nor the spool directory
        self.cwd.mkdir()
        keep = {k: v for k, v in os.environ.items()
                if not k.startswith(("SLURM_", "SRUN_", "MASTER_"))
                and k not in ("AFA_ROOT", "CONFIG", "PYTHON")}
        self.env = {**keep, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
                    "FAKE_DIR": str(self.dir), "SLURM_JOB_ID": JOB_ID,
                    "SLURM_JOB_NODELIST": NODELIST, "SLURM_SUBMIT_DIR": str(REPO),
                    "SLURM_CPUS_PER_TASK": "8", "SLURM_NNODES": "2", "SLURM_NTASKS": "4"}

    def command(self, script: str, args=()) -> list:
        copy = self.spool / "slurm_script"  # SLURM's name for its copy of the batch script
        shutil.copy(REPO / "launch" / script, copy)
        return ["bash", str(copy), *args]

    def run(self, script: str, args=(), status=0, **env) -> subprocess.CompletedProcess:
        env.setdefault("FAKE_SRUN_STATUS", str(status))
        return subprocess.run(self.command(script, args), cwd=env.pop("cwd", self.cwd),
                              env={**self.env, **env}, capture_output=True, text=True, timeout=60)

    def lines(self, name: str) -> list:
        path = self.dir / name
        return path.read_text().splitlines() if path.exists() else []

    def requeues(self) -> list:
        return [call for call in self.lines("scontrol.calls") if call.startswith("requeue")]

    def srun_argv(self) -> list:
        return (self.dir / "srun.argv").read_bytes().decode().split("\0")[:-1]

    def srun_env(self) -> dict:
        items = (self.dir / "srun.env").read_bytes().decode().split("\0")[:-1]
        return dict(item.split("=", 1) for item in items)


@pytest.fixture
def job(tmp_path):
    return Job(tmp_path)


def _train_command(argv: list) -> list:
    """srun's arguments from the program on, i.e. without srun's own options."""
    return argv[argv.index("python"):]


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_time_limit_signal_status_requeues_once(job, script):
    result = job.run(script, status=138)
    assert job.requeues() == [f"requeue {JOB_ID}"], result.stderr
    # requeued as planned, so not FAILED in accounting
    assert result.returncode == 0, result.stderr
    assert len(job.lines("srun.calls")) == 1


@pytest.mark.parametrize("script", sorted(SCRIPTS))
@pytest.mark.parametrize("status", [0, 1, 2, 143])
def test_other_statuses_end_the_job_with_that_status(job, script, status):
    # 0: finished, 1: crash, 2: config/data error, 143: SIGTERM (scancel, pre-emption, srun
    # --kill-on-bad-exit after another task failed): none may requeue
    result = job.run(script, status=status)
    assert result.returncode == status, result.stderr
    assert job.requeues() == []
    assert job.lines("srun.cwd") == [str(REPO)]  # started from another directory, runs in the repo


def test_failed_requeue_keeps_the_trainer_status(job):
    result = job.run("slurm_voc.sh", status=138, FAKE_SCONTROL_STATUS="1")
    assert job.requeues() == [f"requeue {JOB_ID}"]
    assert result.returncode == 138
    assert "resubmit" in result.stderr


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_srun_command_and_environment(job, script):
    args = ["train.max_iters=1000", "work_dir=work dirs/with space"]
    result = job.run(script, args)
    assert result.returncode == 0, result.stderr
    argv = job.srun_argv()
    assert _train_command(argv) == ["python", "tools/train.py", "--config", SCRIPTS[script],
                                    "--resume", "auto", *args]
    assert "--kill-on-bad-exit=1" in argv[:argv.index("python")]
    assert not any("batch_per_gpu" in a for a in argv)  # the trainer derives it from the world size
    env = job.srun_env()
    assert env["SRUN_CPUS_PER_TASK"] == "8"
    assert env["MASTER_ADDR"] == HOSTS[0]
    assert env["MASTER_PORT"] == str(20000 + int(JOB_ID) % 10000)
    assert job.lines("scontrol.calls") == [f"show hostnames {NODELIST}"]
    assert job.lines("srun.cwd") == [str(REPO)]


def test_config_python_and_port_from_the_environment(job):
    result = job.run("slurm_coco.sh", ["train.max_iters=10"], CONFIG="configs/demo.yaml",
                     PYTHON="python3", MASTER_PORT="29999")
    assert result.returncode == 0, result.stderr
    assert job.srun_argv()[-7:] == ["python3", "tools/train.py", "--config", "configs/demo.yaml",
                                    "--resume", "auto", "train.max_iters=10"]
    assert job.srun_env()["MASTER_PORT"] == "29999"


def test_repository_is_the_working_dir_else_the_submit_dir(job, tmp_path):
    # sbatch --chdir=/path/to/afa from another directory: the job starts in the repository
    result = job.run("slurm_voc.sh", cwd=REPO, SLURM_SUBMIT_DIR=str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert job.lines("srun.cwd") == [str(REPO)]
    # neither the working directory nor the submit directory is the repository
    result = job.run("slurm_voc.sh", SLURM_SUBMIT_DIR=str(tmp_path))
    assert result.returncode == 2
    assert "AFA_ROOT" in result.stderr
    assert len(job.lines("srun.calls")) == 1  # only the first run started srun


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_wrong_afa_root_exits_2_and_names_it(job, tmp_path, script):
    result = job.run(script, AFA_ROOT=str(tmp_path))
    assert result.returncode == 2
    assert f"AFA_ROOT={tmp_path}" in result.stderr
    assert job.lines("srun.calls") == []


def test_outside_slurm_exits_2(job):
    env = {k: v for k, v in job.env.items() if not k.startswith("SLURM_JOB")}
    result = subprocess.run(job.command("slurm_voc.sh"), cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2
    assert "sbatch" in result.stderr
    assert job.lines("srun.calls") == []


def test_signal_to_batch_shell_is_forwarded_and_requeues(job):
    """--signal=B:USR1 or scancel --batch: the batch shell forwards SIGUSR1 to srun, requeues."""
    proc = subprocess.Popen(job.command("slurm_voc.sh"), cwd=job.cwd, start_new_session=True,
                            env={**job.env, "FAKE_SRUN_SLEEP": "10", "FAKE_SRUN_STATUS": "0"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 10
        while not job.lines("srun.calls"):
            assert time.monotonic() < deadline and proc.poll() is None, "srun never started"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGUSR1)  # the batch script exec's the helper: same process
        out, err = proc.communicate(timeout=8)  # the stand-in would exit 0 only after 10 s
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert job.lines("srun.signals") == ["USR1"], err
    assert job.requeues() == [f"requeue {JOB_ID}"], err
    assert proc.returncode == 0, err


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_scripts_parse_and_sbatch_header(script):
    path = REPO / "launch" / script
    for file in (path, HELPER):
        check = subprocess.run(["bash", "-n", str(file)], capture_output=True, text=True)
        assert check.returncode == 0, check.stderr
    lines = path.read_text().splitlines()
    assert lines[0] == "#!/usr/bin/env bash"
    # sbatch reads #SBATCH lines only up to the first command
    first_command = next(i for i, line in enumerate(lines) if line and not line.startswith("#"))
    header = [line.split()[1] for line in lines[:first_command] if line.startswith("#SBATCH")]
    assert "--requeue" in header
    assert "--open-mode=append" in header
    signal_opts = [opt for opt in header if opt.startswith("--signal=")]
    # plain USR1, not B:USR1: the trainer tasks must receive it
    assert len(signal_opts) == 1 and signal_opts[0].startswith("--signal=USR1@"), signal_opts
    assert not any(opt.startswith("--chdir") for opt in header)  # it cannot expand variables
    assert any(opt.startswith("--output=logs/") for opt in header)
    assert (REPO / "logs").is_dir()
