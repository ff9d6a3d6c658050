"""The demo, start to finish on a CPU: synthetic data -> train a demo config from scratch -> score
the CAM, the refined CAM, the affinity CAM, the affinity pseudo labels and the segmentation on
the val split.

    python tools/run_demo.py [key=value ...]                                   (make demo)
    DEMO_CONFIG=configs/demo_full.yaml python tools/run_demo.py [key=value ...]  (make demo-full)
    bash launch/run_demo.sh [key=value ...]                                    (the same)

The key=value arguments override the config, as tools/train.py's do, and go to the trainer and
to tools/evaluate.py. Results: ``work_dirs/<config name>/results.json`` (mIoU in [0, 1] and
minutes) and a table on the terminal. Run again, it resumes an interrupted run, or re-scores a
finished one and keeps its minutes.

Relative paths (the config, DEMO_DATA, DEMO_WORK_DIR, data.root) are the repository's, wherever
it is run from. The data set is made in the config's ``data.root`` (after the arguments), its
images ``data.crop_size`` pixels square. Environment variables, for other places and sizes (the
tests use them):

    DEMO_CONFIG     the config (default configs/demo.yaml)
    DEMO_DATA       the set's folder instead of data.root (refused together with a data.root= or
                    data.list_dir= argument)
    DEMO_NUM_TRAIN  training images (default 12000)
    DEMO_DATA_ARGS  more tools/make_demo_data.py flags, e.g. "--num-val 3" or "--seed 1" (not
                    --size: pass data.crop_size=N; not --out, --check or --frames)
    DEMO_WORK_DIR   the work dir (default work_dirs/<config name>)

A set is reused when its meta.json says it is the one these flags make (tools/make_demo_data.py
--check: the generator version, the size, the image counts and every flag in DEMO_DATA_ARGS,
--seed included). Otherwise the folder is filled anew, but only when it is absent, empty or a
set the generator wrote (its meta.json is marked so, and the folder holds nothing else); any
other folder, such as your own files or a VOC list folder named by mistake, is left untouched
and the run stops with one line saying why.

Stopping: Ctrl-C (or a signal to the process group) stops the trainer after a checkpoint; run the
same command again to resume.

Exit status: 0 done; 2 a refusal (--size in DEMO_DATA_ARGS, two places for the set, a folder the
generator did not make) or a flag the generator rejects, before anything is removed; otherwise
that of the first step that failed (the trainer's 128 + N when stopped by signal N).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from afa.config import ConfigError, load_config  # noqa: E402

KINDS = ("cam", "refined", "aff_cam", "affinity", "seg")
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
# Flags of the generator that DEMO_DATA_ARGS may not give: where the set goes and its image side
# are this tool's to choose, so that the trainer reads the set that was made.
_OWN_FLAGS = {"--size": "the images are made data.crop_size pixels square (pass "
                        "data.crop_size=N instead)",
              "--out": "the set goes to data.root or DEMO_DATA (set one of them instead)",
              "--check": "this tool asks that itself",
              "--frames": "the demo trains on a set, not on frames"}


def _fail(message: str, status: int = 2) -> int:
    print(f"run_demo.py: {message}", file=sys.stderr)
    return status


def _own_flag(data_args: list[str]) -> str | None:
    """The first of :data:`_OWN_FLAGS` in ``data_args``, abbreviations included (argparse takes
    --si for --size, --o for --out)."""
    for arg in data_args:
        name = arg.split("=", 1)[0]
        for flag in _OWN_FLAGS:
            if name.startswith("--") and len(name) > 2 and flag.startswith(name):
                return flag
    return None


def _run(cmd: list[str]) -> int:
    """Run one step and return its exit status (128 + N when killed by signal N, as a shell
    reports it).

    A stop signal to the terminal's process group reaches the step itself, and the trainer then
    writes a checkpoint before it exits: this process waits for that rather than dying first,
    and forwards nothing, since a second signal would make the trainer exit at once.
    """
    received = []
    previous = {sig: signal.signal(sig, lambda sig, frame: received.append(sig))
                for sig in STOP_SIGNALS}
    try:
        child = subprocess.Popen(cmd)
        status = child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if status < 0:
        status = 128 - status
    if received and status < 128:  # asked to stop as the step finished: stop all the same
        status = 128 + received[0]
    return status


def _latest_checkpoint(work: Path) -> Path | None:
    found = sorted((work / "checkpoints").glob("iter_*.pth"))  # iter_NNNNNN: sorted by name
    return found[-1] if found else None


def _check_set(flags: list[str]) -> int:
    """``tools/make_demo_data.py FLAGS --check``'s exit status (0 the set is there, 1 it is not,
    2 a flag it rejects, on standard error), asked in this process: the generator's imports take
    seconds (torch), and the ownership check after it needs them too."""
    spec = importlib.util.spec_from_file_location("make_demo_data",
                                                  REPO / "tools" / "make_demo_data.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            return tool.main([*flags, "--check"])
        except SystemExit as stop:  # argparse's error, already printed
            return stop.code if isinstance(stop.code, int) else 2


def _prepare_data(data: str, place: str, make_data: list[str]) -> int:
    """Reuse the set in ``data`` or make it again; 0 when it is ready to train on."""
    held = _check_set(make_data[2:])
    if held == 0:
        return 0
    if held != 1:  # a flag the generator rejects: stop before anything is removed
        return _fail(f"tools/make_demo_data.py rejected its flags ({shlex.join(make_data[2:])}); "
                     "nothing was removed", held)
    from afa.data.synthetic import NotADemoSet, demo_set_contents  # loaded by the check

    try:
        demo_set_contents(data)
    except NotADemoSet as err:
        return _fail(f"{place} {data} {err.reason}, so the demo will neither replace nor write "
                     f"into it: pick another {place}, or remove the folder yourself")
    return _run(make_data)


def _results(work: Path, start: float, trained: bool) -> dict:
    scores = json.loads((work / "eval.json").read_text())
    results = {k: round(scores[k]["miou"], 4) for k in KINDS}
    results["minutes"] = round((time.time() - start) / 60, 2)
    previous = work / "results.json"
    if not trained and previous.is_file():  # a finished run re-scored: keep its own duration
        results["minutes"] = json.loads(previous.read_text()).get("minutes", results["minutes"])
    previous.write_text(json.dumps(results, indent=2) + "\n")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. seed=1 train.amp=auto data.crop_size=128")
    args = parser.parse_args(argv)
    start = time.time()
    os.chdir(REPO)  # relative paths (config, DEMO_DATA, work dir) are the repository's
    env = os.environ
    config = env.get("DEMO_CONFIG") or "configs/demo.yaml"
    work = Path(env.get("DEMO_WORK_DIR") or f"work_dirs/{Path(config).stem}")
    overrides = args.overrides
    try:  # the config's data place and image size after the arguments; a wrong key stops here
        cfg = load_config(config, overrides)
    except ConfigError as err:
        return _fail(str(err))
    data_args = shlex.split(env.get("DEMO_DATA_ARGS") or "")
    flag = _own_flag(data_args)
    if flag:
        return _fail(f"DEMO_DATA_ARGS must not set {flag}: {_OWN_FLAGS[flag]}")
    if env.get("DEMO_DATA"):
        for arg in overrides:
            if arg.startswith(("data.root=", "data.list_dir=")):
                return _fail(f"DEMO_DATA ({env['DEMO_DATA']}) and the argument {arg} both name "
                             "the data set: give one of them")
    data = env.get("DEMO_DATA") or str(cfg.data.root)
    place = "DEMO_DATA" if env.get("DEMO_DATA") else "data.root"
    python = sys.executable
    make_data = [python, "tools/make_demo_data.py", "--out", data,
                 "--num-train", env.get("DEMO_NUM_TRAIN") or "12000",
                 "--size", str(cfg.data.crop_size), *data_args]
    status = _prepare_data(data, place, make_data)
    if status:
        return status

    on_data = [f"data.root={data}", f"data.list_dir={data}"]
    before = _latest_checkpoint(work)
    status = _run([python, "tools/train.py", "--config", config, "--work-dir", str(work),
                   "--resume", "auto", *on_data, *overrides])
    if status:
        return status
    ckpt = _latest_checkpoint(work)
    if ckpt is None:
        return _fail(f"the trainer left no checkpoint in {work / 'checkpoints'}", 1)
    # The trainer validates its last iteration on the val split (val_scores.json); score the final
    # checkpoint with tools/evaluate.py only when that is missing or older (an earlier run's).
    val = work / "val_scores.json"
    iteration = int(ckpt.stem.removeprefix("iter_"))
    if val.is_file() and json.loads(val.read_text())["iteration"] == iteration:
        scores = json.loads(val.read_text())["scores"]
        (work / "eval.json").write_text(json.dumps(scores, indent=2))
    else:
        status = _run([python, "tools/evaluate.py", "--config", config, "--checkpoint",
                       str(ckpt), "--json", str(work / "eval.json"), *on_data, *overrides])
        if status:
            return status

    results = _results(work, start, trained=ckpt != before)
    print("\nDemo results (val mIoU):")
    for kind in KINDS:
        print(f"  {kind:<9} {100 * results[kind]:6.2f}")
    print(f"  took {results['minutes']} minutes; written to {work / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
