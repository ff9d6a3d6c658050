"""The Markdown summary of a ``benchmarks/gpu_check.sh`` run, for docs/BENCHMARKS.md.

    python benchmarks/gpu_check_summary.py work_dirs/gpu_check/DATE --gpu "NVIDIA H200" --commit C

Reads the run folder that gpu_check.sh writes: ``steps.tsv`` (one line per run: name, kind,
status, seconds, setting), ``<name>.log`` and ``<name>.json`` (the last output line of the run,
when it is a JSON object) and ``torch.txt``. Prints one table with a row per run (the device
tests, every training-step configuration, inference, each device-agreement run) and, when the
training-step runs timed their stages, a second table with the per-stage times. A run whose JSON
is missing or of another layout gets a row saying so; the summary itself does not fail on it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

STEP_NAMES = {"tests": "a. device tests", "infer": "c. inference", "filter": "f. reg-loss filter",
              "validate": "g. validation"}


def _load(out: Path, name: str) -> dict | None:
    try:
        return json.loads((out / f"{name}.json").read_text())
    except (OSError, ValueError):
        return None


def _tests(out: Path, name: str) -> str:
    try:
        lines = (out / f"{name}.log").read_text().splitlines()
    except OSError:
        return "no log"
    found = [line.strip("= ") for line in lines
             if " passed" in line or " failed" in line or " error" in line]
    return found[-1] if found else "no pytest summary line"


def _train(r: dict) -> str:
    memory = (f"{r['peak_mb'] / 1024:.2f} GiB peak CUDA" if r["peak_kind"] == "cuda_allocated"
              else f"{r['peak_mb']:.0f} MB peak RSS")
    return f"{r['median_s']:.3f} s/iter (min {r['min_s']:.3f}), {memory}"


def _infer(r: dict) -> str:
    pool = next((k for k in r if k.startswith("seg_crf_pool")), None)
    text = (f"{r['seg_images_per_s']:.2f} img/s without CRF; CRF alone "
            f"{r['crf_only_images_per_s']:.2f}; with CRF {r['seg_crf_serial_images_per_s']:.2f} "
            "serial")
    if pool:
        workers = pool[len("seg_crf_pool"):].split("_")[0]
        text += f", {r[pool]:.2f} with {workers} CRF processes"
    return f"{text} ({r['backbone']}, {r['images']} images {', '.join(r['sizes'])})"


def _filter(r: dict) -> str:
    shape = f"{r['batch']} x {r['classes']} x {r['size']} x {r['size']}"
    runs = "; ".join(f"{x['backend']} ({x['where']}) {x['median_ms']:.1f} ms"
                     + ("" if x["equal"] else f", {x['max_relative_difference']:.1e} off")
                     for x in r["runs"])
    return f"{shape}, median of each: {runs}"


def _agreement(r: dict) -> str:
    labels = r["labels"]
    name, worst = max(r["losses"].items(), key=lambda kv: kv[1]["rel_diff"])
    return (f"equal pixels: refined {labels['refined_label']['agreement']:.5f}, affinity "
            f"{labels['aff_pseudo_label']['agreement']:.5f}, CAM label "
            f"{labels['cam_label']['agreement']:.5f}; largest loss difference {name} "
            f"{worst['rel_diff']:.2g} relative; gradient {r['grad_rel_diff']:.2g} relative; "
            f"max CAM difference {r['cam_max_abs_diff']:.2g}")


def summarize(out: Path, gpu: str, commit: str, quick: bool = False) -> str:
    steps = [line.split("\t") for line in (out / "steps.tsv").read_text().splitlines() if line]
    torch_line = (out / "torch.txt").read_text().strip() if (out / "torch.txt").is_file() else ""
    lines = [f"GPU: {gpu}; {torch_line or 'torch ?'}; commit {commit}"
             f"{'; QUICK=1 (fewer configurations and iterations)' if quick else ''}", "",
             "| step | setting | result | status | s |", "| --- | --- | --- | --- | ---: |"]
    stage_rows = []
    for name, _kind, status, seconds, setting in steps:
        r = _load(out, name)
        try:
            if name == "tests":
                result = _tests(out, name)
            elif r is None:
                result = "no result (see the log)"
            elif name.startswith("train_"):
                result = _train(r)
                if r.get("stages_s"):
                    stage_rows.append((setting, r["stages_s"], r["stages_sum_s"]))
            elif name == "infer":
                result = _infer(r)
            elif name == "filter":
                result = _filter(r)
            elif name == "validate":
                result = (f"{r['sec_per_image']:.3f} s per image ({r['source']}, "
                          f"{r['backbone']}, {r['amp']}, {r['images']} images)")
            elif name.startswith("agree_"):
                result = _agreement(r)
            else:
                result = ""
        except (KeyError, TypeError, ValueError) as err:  # another JSON layout: say so, go on
            result = f"unreadable result ({type(err).__name__}: {err})"
        step = STEP_NAMES.get(name, "b. train step" if name.startswith("train_")
                              else "d. device vs CPU" if name.startswith("agree_") else name)
        lines.append(f"| {step} | {setting} | {result} | {status} | {seconds} |")
    if stage_rows:
        stages = list(stage_rows[0][1])
        lines += ["", "Training-step stages (s; medians of separately timed iterations):", "",
                  "| setting | " + " | ".join(stages) + " | sum |",
                  "| --- |" + " ---: |" * (len(stages) + 1)]
        for setting, times, total in stage_rows:
            lines.append(f"| {setting} | " + " | ".join(f"{times.get(s, 0):.3f}" for s in stages)
                         + f" | {total:.3f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", type=Path, help="the run folder of gpu_check.sh")
    p.add_argument("--gpu", default="?", help="the GPU's name (nvidia-smi)")
    p.add_argument("--commit", default="?")
    p.add_argument("--quick", default="0", help="1: the run was QUICK=1")
    args = p.parse_args()
    print(summarize(args.out, args.gpu, args.commit, args.quick == "1"))


if __name__ == "__main__":
    main()
