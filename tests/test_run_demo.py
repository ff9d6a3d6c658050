"""launch/run_demo.sh (``make demo``, ``make demo-full``) end to end on a tiny set: it generates the
data, trains, writes results.json from the run's own validation, keeps a finished run's minutes
when run again, scores with tools/evaluate.py when the validation is missing, and makes the set
again when it is stale."""

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import tiny_overrides

REPO = Path(__file__).resolve().parents[1]
KINDS = ("cam", "refined", "aff_cam", "affinity", "seg")


def _run(tmp_path: Path, config: str = "configs/demo.yaml") -> subprocess.CompletedProcess:
    env = {**os.environ,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "DEMO_CONFIG": config, "DEMO_DATA": str(tmp_path / "data"), "DEMO_NUM_TRAIN": "12",
           "DEMO_DATA_ARGS": "--num-val 3 --size 64", "DEMO_WORK_DIR": str(tmp_path / "work"),
           "OMP_NUM_THREADS": "1"}
    skip = ("work_dir=", "data.root=", "data.list_dir=")
    overrides = [o for o in tiny_overrides(tmp_path, tmp_path) if not o.startswith(skip)]
    done = subprocess.run(["bash", "launch/run_demo.sh", *overrides], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def test_run_demo_generates_trains_scores_and_is_rerunnable(tmp_path):
    data, work = tmp_path / "data", tmp_path / "work"
    first = _run(tmp_path, "configs/demo_full.yaml")
    meta = json.loads((data / "meta.json").read_text())
    assert (meta["num_train"], meta["num_val"], meta["size"]) == (12, 3, 64)
    assert (work / "checkpoints" / "iter_000004.pth").is_file()
    val = json.loads((work / "val_scores.json").read_text())
    assert val["iteration"] == 4
    results = json.loads((work / "results.json").read_text())
    assert set(results) == {*KINDS, "minutes"}
    for kind in KINDS:
        assert results[kind] == round(val["scores"][kind]["miou"], 4), kind
    assert json.loads((work / "eval.json").read_text()) == val["scores"]
    assert "aff_cam" in first.stdout and f"written to {work / 'results.json'}" in first.stdout
    # The config's data.root (data/demo) was not used: the run trained on DEMO_DATA.
    assert f"root: {data}" in (work / "config.yaml").read_text()

    # Again: nothing to train, nothing to generate; the finished run keeps its own minutes.
    stamp = (data / "meta.json").stat().st_mtime_ns
    checkpoints = {p.name: p.stat().st_mtime_ns for p in (work / "checkpoints").iterdir()}
    results["minutes"] = 123.0
    (work / "results.json").write_text(json.dumps(results))
    (work / "val_scores.json").unlink()  # now scored by tools/evaluate.py
    (work / "eval.json").unlink()
    again = _run(tmp_path, "configs/demo_full.yaml")
    assert (data / "meta.json").stat().st_mtime_ns == stamp
    assert "4 iterations from 4" in again.stdout + again.stderr
    assert {p.name: p.stat().st_mtime_ns for p in (work / "checkpoints").iterdir()} == checkpoints
    rescored = json.loads((work / "results.json").read_text())
    assert rescored == results  # the validation's scores, from evaluate.py this time
    assert json.loads((work / "eval.json").read_text())["num_images"] == 3

    # A set from another generator version is made again.
    meta["version"] = -1
    (data / "meta.json").write_text(json.dumps(meta))
    _run(tmp_path, "configs/demo_full.yaml")
    assert json.loads((data / "meta.json").read_text())["version"] != -1
