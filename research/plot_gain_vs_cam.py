"""The figure logs/bubbles_20261201/gain_vs_cam.png: for every whole `configs/demo_full.yaml` run
(radius 2) kept in logs/, the affinity CAM's lead over the CAM and the segmentation against the
CAM, read from the final validation line of each train.log; the demo's targets (a lead of 2, a
segmentation of 60) as dashed lines.

    python research/plot_gain_vs_cam.py      (from anywhere; reads and writes under logs/)
"""

import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

LOGS = Path(__file__).resolve().parents[1] / "logs"
RUNS = {  # group: train.logs
    "128 px, concentric rings": sorted((LOGS / "demo_full_20261201").glob("radius2_*seed*.log")),
    "160 px, concentric rings": sorted((LOGS / "affinity_probes_20261201").glob("size160_*.log")),
    "bubbles (128 and 160 px)": sorted((LOGS / "bubbles_20261201").glob("*.log")),
    "144 px (make demo-full since 2026-12-02)": sorted(  # make_default.log repeats make_seed0
        p for p in (LOGS / "demo144_20261202").glob("*.log") if p.name != "make_default.log"),
    "144 px, bfloat16": sorted((LOGS / "demo144_bf16_20261202").glob("*.log")),
}
# Each bubbles run repeats a concentric run on the same set with only the ellipses changed.
TWINS = {"data_seed1_seed0.log": "demo_full_20261201/radius2_data_seed1.log",
         "size160_seed0.log": "affinity_probes_20261201/size160_seed0.log",
         "make_seed0.log": "demo_full_20261201/radius2_seed0.log",
         "seed1.log": "demo_full_20261201/radius2_seed1.log"}
ARROW = dict(arrowstyle="->", color="grey", connectionstyle="arc3,rad=0.15")
FINAL = re.compile(r"val iter \d+: cam ([\d.]+) refined [\d.]+ aff_cam ([\d.]+) "
                   r"affinity [\d.]+ seg ([\d.]+)")


def scores(log: Path) -> tuple[float, float, float]:
    """(CAM, affinity CAM - CAM, segmentation) of the run's final validation."""
    cam, aff_cam, seg = map(float, FINAL.findall(log.read_text())[-1])
    return cam, aff_cam - cam, seg


def main() -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.2))
    for (group, logs), marker in zip(RUNS.items(), "osD^v"):
        points = [scores(log) for log in logs if "from_iter" not in log.name]
        for axis, index in ((left, 1), (right, 2)):
            axis.scatter([p[0] for p in points], [p[index] for p in points], marker=marker,
                         s=40, label=group)
    for name, twin in TWINS.items():
        if (LOGS / "bubbles_20261201" / name).is_file():
            (x0, g0, s0), (x1, g1, s1) = scores(LOGS / twin), scores(LOGS / "bubbles_20261201" / name)
            left.annotate("", (x1, g1), (x0, g0), arrowprops=ARROW)
            right.annotate("", (x1, s1), (x0, s0), arrowprops=ARROW)
    left.axhline(2, color="red", lw=0.8, ls="--")
    right.axhline(60, color="red", lw=0.8, ls="--")
    left.set(xlabel="CAM, val mIoU (%)", ylabel="affinity CAM - CAM (points)",
             title="the walk's lead (demo target: 2)")
    right.set(xlabel="CAM, val mIoU (%)", ylabel="segmentation, val mIoU (%)",
              title="the segmentation (demo target: 60)")
    left.legend(fontsize=8)
    fig.suptitle("make demo-full runs (radius 2); arrows: the same set with bubbles", fontsize=10)
    fig.tight_layout()
    out = LOGS / "bubbles_20261201" / "gain_vs_cam.png"
    fig.savefig(out, dpi=90)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
