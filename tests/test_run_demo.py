"""launch/run_demo.sh, which runs tools/run_demo.py (``make demo``, ``make demo-full``), end to
end on a tiny set: it generates the data, trains, writes results.json from the run's own
validation, keeps a finished run's minutes when run again, scores with tools/evaluate.py when the
validation is missing, makes the set again when it is not the one the flags make, and leaves
alone, with exit status 2, a folder that holds anything the generator did not write."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import tiny_overrides
import pytest

REPO = Path(__file__).resolve().parents[1]
KINDS = ("cam", "refined", "aff_cam", "affinity", "seg")


def _run(tmp_path: Path, config: str = "configs/demo.yaml", check: bool = True,
         args: tuple[str, ...] = (), **env_changes: str) -> subprocess.CompletedProcess:
    env = {**os.environ,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "DEMO_CONFIG": config, "DEMO_DATA": str(tmp_path / "data"), "DEMO_NUM_TRAIN": "12",
           "DEMO_DATA_ARGS": "--num-val 3", "DEMO_WORK_DIR": str(tmp_path / "work"),
           "OMP_NUM_THREADS": "1", **env_changes}
    skip = ("work_dir=", "data.root=", "data.list_dir=")
    overrides = [o for o in tiny_overrides(tmp_path, tmp_path) if not o.startswith(skip)]
    done = subprocess.run(["bash", "launch/run_demo.sh", *overrides, *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    if check:
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def test_run_demo_refuses_a_size_that_contradicts_the_config(tmp_path):
    """The images are made data.crop_size pixels square; a --size of its own is an error, before
    any data is made."""
    done = _run(tmp_path, check=False, DEMO_DATA_ARGS="--num-val 3 --size 96")
    assert done.returncode == 2
    assert "data.crop_size" in done.stderr
    assert not (tmp_path / "data").exists()


def test_run_demo_refuses_two_places_for_the_set(tmp_path):
    """DEMO_DATA replaces data.root; an argument naming another place would make the set in one
    and train on the other, so the two together are an error, before any data is made."""
    other = tmp_path / "other"
    done = _run(tmp_path, check=False, args=(f"data.root={other}", f"data.list_dir={other}"))
    assert done.returncode == 2
    assert "DEMO_DATA" in done.stderr and "data.root=" in done.stderr
    assert not (tmp_path / "data").exists() and not other.exists()


def test_run_demo_makes_the_set_where_and_as_large_as_the_config_says(tmp_path):
    """Without DEMO_DATA the set goes to the config's data.root, at data.crop_size pixels (how
    `make demo-full DEMO_ARGS="data.root=data/demo160 data.list_dir=data/demo160
    data.crop_size=160"` gets a 160-px set instead of 160-px crops of the 128-px one)."""
    root = tmp_path / "from_config"
    _run(tmp_path, DEMO_DATA="", args=(f"data.root={root}", f"data.list_dir={root}",
                                       "data.crop_size=80"))
    meta = json.loads((root / "meta.json").read_text())
    assert (meta["size"], meta["num_train"]) == (80, 12)
    assert not (tmp_path / "data").exists()
    assert f"root: {root}" in (tmp_path / "work" / "config.yaml").read_text()


def test_run_demo_generates_trains_scores_and_is_rerunnable(tmp_path):
    data, work = tmp_path / "data", tmp_path / "work"
    first = _run(tmp_path, "configs/demo_full.yaml")
    meta = json.loads((data / "meta.json").read_text())
    assert (meta["num_train"], meta["num_val"], meta["size"]) == (12, 3, 64)  # data.crop_size
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

    # A set from another generator version is made again, and so is one of another image size.
    # This one's meta.json is in the form written before it carried the generator's mark, and an
    # image it held beyond the flags' count goes with it.
    meta["version"] = -1
    del meta["generator"]
    (data / "meta.json").write_text(json.dumps(meta))
    shutil.copy(data / "JPEGImages" / "train_00000.jpg", data / "JPEGImages" / "train_00012.jpg")
    _run(tmp_path, "configs/demo_full.yaml")
    assert json.loads((data / "meta.json").read_text())["version"] != -1
    assert not (data / "JPEGImages" / "train_00012.jpg").exists()
    meta = json.loads((data / "meta.json").read_text())
    meta["size"] = 32
    (data / "meta.json").write_text(json.dumps(meta))
    _run(tmp_path, "configs/demo_full.yaml")
    assert json.loads((data / "meta.json").read_text())["size"] == 64

    # A set from another generator seed, asked for in DEMO_DATA_ARGS, is made again (it was
    # reused, and trained on, when only the version, size and image count were compared).
    _run(tmp_path, "configs/demo_full.yaml", DEMO_DATA_ARGS="--num-val 3 --seed 1")
    assert json.loads((data / "meta.json").read_text())["seed"] == 1
    # A flag the generator rejects stops the script before the set is removed.
    stamp = (data / "meta.json").stat().st_mtime_ns
    bad = _run(tmp_path, "configs/demo_full.yaml", check=False,
               DEMO_DATA_ARGS="--num-val 3 --no-such-flag")
    assert bad.returncode == 2 and "--no-such-flag" in bad.stderr
    assert (data / "meta.json").stat().st_mtime_ns == stamp


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _own_files(folder: Path) -> None:
    folder.mkdir()
    (folder / "thesis.txt").write_text("chapter 1\n")


def _voc_lists(folder: Path) -> None:
    """What tools/prepare_voc.py leaves in a list folder: the demo set's own file names."""
    folder.mkdir()
    (folder / "train_aug.txt").write_text("2007_000032\n")
    (folder / "val.txt").write_text("2007_000033\n")
    (folder / "cls_labels.json").write_text('{"2007_000032": [1]}\n')


def _demo_set_and_notes(folder: Path) -> None:
    """A set the generator made (of other flags: it would be made again), with a file added."""
    from afa.data.synthetic import make_demo_dataset

    make_demo_dataset(folder, seed=1, num_train=2, num_val=1, size=32, progress=False)
    (folder / "notes.txt").write_text("which run used this set\n")


@pytest.mark.parametrize("place, fill, named", [
    ("data.root", _own_files, "thesis.txt"),
    ("DEMO_DATA", _own_files, "thesis.txt"),
    ("data.root", _voc_lists, "meta.json"),
    ("DEMO_DATA", _demo_set_and_notes, "notes.txt"),
])
def test_run_demo_leaves_a_folder_it_did_not_make_alone(tmp_path, place, fill, named):
    """`make demo DEMO_ARGS="data.root=$HOME/thesis_data"` removed the folder and made the set in
    its place (exit 0); only a set the generator wrote, and nothing else beside it, may be made
    again. Anything else stops the run before the trainer, with one line naming the folder, what
    is in the way and the way out."""
    folder = tmp_path / "thesis_data"
    fill(folder)
    before = _files(folder)
    if place == "DEMO_DATA":
        done = _run(tmp_path, check=False, DEMO_DATA=str(folder))
    else:
        done = _run(tmp_path, check=False, DEMO_DATA="",
                    args=(f"data.root={folder}", f"data.list_dir={folder}"))
    assert done.returncode == 2, done.stdout[-3000:] + done.stderr[-3000:]
    assert _files(folder) == before
    message = done.stderr.strip()
    assert "\n" not in message, message
    assert f"{place} {folder}" in message and named in message
    assert f"pick another {place}" in message and "remove the folder yourself" in message
    assert not (tmp_path / "work").exists()


def test_run_demo_refuses_generator_flags_that_choose_the_place(tmp_path):
    """--out in DEMO_DATA_ARGS would make the set in one place and train on another (argparse
    takes --o for it too)."""
    elsewhere = tmp_path / "elsewhere"
    for flag in ("--out", "--o"):
        done = _run(tmp_path, check=False, DEMO_DATA_ARGS=f"--num-val 3 {flag} {elsewhere}")
        assert done.returncode == 2 and "must not set --out" in done.stderr
    assert not elsewhere.exists() and not (tmp_path / "data").exists()


def test_the_two_demos_keep_their_sets_apart():
    """`make demo` (128 px) and `make demo-full` (144 px) each make the set their config names, at
    its data.crop_size; were one data.root asked for at two sizes, each target would remove and
    make again the other's 12,000 images (tools/run_demo.py checks the size in meta.json)."""
    from afa.config import load_config

    demo = load_config(REPO / "configs" / "demo.yaml").data
    full = load_config(REPO / "configs" / "demo_full.yaml").data
    if demo.crop_size != full.crop_size:
        assert demo.root != full.root and demo.list_dir != full.list_dir
