"""Draw a training run's metrics.jsonl as one PNG: losses, learning rate, validation scores.

    python tools/plot_metrics.py --work-dir work_dirs/voc        # -> work_dirs/voc/metrics.png
    python tools/plot_metrics.py --work-dir work_dirs/voc --reference voc
    python tools/plot_metrics.py --metrics run/metrics.jsonl --out curves.png

``metrics.jsonl`` is what the trainer writes into its work dir (afa/engine/logger.py, RunLogger):
one JSON object per line, ``{"iter": k, "time": t, "train/total": ..., "train/cls_loss": ...,
"train/lr": ...}`` every train.log_iters iterations and ``{"iter": k, "val/cam": ..., "val/seg":
..., "val/cls_f1": ...}`` at every validation. The figure has three panels over the iterations:

1. the training losses (``train/total`` and every ``train/*_loss``; means over each log interval;
   log scale, so a loss that is still 0, such as the segmentation loss before train.cam_iters,
   starts where it becomes positive). A loss that is 0 in every record (the regularized loss when
   it is off) is not drawn and is named in the legend's title. A loss whose values are negative
   (the regularized loss when it is on: a negative energy) is drawn sign-flipped, as ``-reg_loss``;
2. the learning rate ``train/lr``;
3. the validation mIoU of each label map (``val/cam``, ``val/refined``, ``val/aff_cam``,
   ``val/affinity``, ``val/seg``) and the classification F1, all in %, with the best seg mIoU
   marked. These are the trainer's single-scale scores (tools/evaluate.py), not the multi-scale +
   CRF score of the paper's tables.

``--reference voc`` adds the authors' published VOC validation curve to panel 3 (CAM, affinity
CAM and segmentation mIoU at each of their validations, dotted, in the same colours;
docs/data/authors_voc_log.json, from the training log their repository publishes, listed in
docs/RESULTS.md). They were measured with the trainer's validation protocol on configs/voc.yaml's
schedule, so a VOC run's val curves compare with them point for point: at 4,000 iterations the
authors had CAM 58.33, affinity CAM 61.27, segmentation 54.82. The curve is drawn up to its first
validation at or after the run's last iteration (all of it once the run has passed 20,000), so
that a run in progress keeps the width of the figure.

Lines that are not JSON records with an ``iter`` (a line cut short by a killed run) are skipped
with a note; a later record of the same iteration replaces an earlier one. Needs matplotlib.
Exit status: 0 done; 2 missing file, no records, an unknown ``--reference``, or matplotlib not
installed (named).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import NamedTuple

WIDTH_PX, HEIGHT_PX, DPI = 1100, 1200, 100
REPO = Path(__file__).resolve().parents[1]
# --reference NAME: a published validation curve ({"label", "source", "validations": [{"iter",
# kind: value in %}]}); docs/RESULTS.md gives the sources.
REFERENCES = {"voc": REPO / "docs" / "data" / "authors_voc_log.json"}
REFERENCE_KINDS = ("cam", "aff_cam", "seg")  # the scores the authors' log has
VAL_KINDS = ("cam", "refined", "aff_cam", "affinity", "seg")  # afa.engine.validate.KINDS
COLOURS = {"total": "black", "cls_loss": "tab:blue", "seg_loss": "tab:red",
           "aff_loss": "tab:green", "reg_loss": "tab:purple", "cam": "tab:blue",
           "refined": "tab:cyan", "aff_cam": "tab:green", "affinity": "tab:olive",
           "seg": "tab:red", "cls_f1": "grey"}


class MetricsError(ValueError):
    """A metrics file that cannot be drawn: missing, or without records; an unknown reference."""


class Reference(NamedTuple):
    label: str  # legend text, e.g. "authors' VOC log"
    series: dict[str, dict[int, float]]  # kind ("cam", "aff_cam", "seg") -> {iteration: %}


def read_reference(name: str) -> Reference:
    """The published curve ``name`` (a key of ``REFERENCES``), values in %."""
    if name not in REFERENCES:
        raise MetricsError(f"unknown reference '{name}' (known: {', '.join(sorted(REFERENCES))})")
    data = json.loads(REFERENCES[name].read_text(encoding="utf-8"))
    series = {kind: {int(v["iter"]): float(v[kind]) for v in data["validations"] if kind in v}
              for kind in REFERENCE_KINDS}
    return Reference(data["label"], series)


def reference_horizon(reference: Reference, last_iter: int) -> int:
    """The last reference iteration to draw: its first validation at or after ``last_iter``
    (the run's last iteration), or its last one."""
    iters = sorted({i for points in reference.series.values() for i in points})
    return next((i for i in iters if i >= last_iter), iters[-1] if iters else 0)


def read_metrics(path: Path) -> tuple[dict[str, dict[int, float]], int]:
    """``{key: {iteration: value}}`` of every numeric field but ``iter``/``time``, and the
    number of lines skipped as unreadable."""
    if not path.is_file():
        raise MetricsError(f"No metrics file: '{path}' (the trainer writes metrics.jsonl into "
                           "its work dir)")
    series: dict[str, dict[int, float]] = {}
    skipped = records = 0
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            iteration = int(record["iter"])
        except (ValueError, KeyError, TypeError):
            skipped += 1
            continue
        records += 1
        for key, value in record.items():
            if key not in ("iter", "time") and isinstance(value, (int, float)):
                series.setdefault(key, {})[iteration] = float(value)
    if not records:
        raise MetricsError(f"No records in '{path}'" + (
            f" ({skipped} unreadable line(s))" if skipped else " (the file is empty)"))
    return series, skipped


def _line(ax, points: dict[int, float], scale: float = 1.0, **style) -> None:
    iters = sorted(points)
    if len(iters) < 30:  # a short run: mark the points, a single one draws no line
        style.setdefault("marker", ".")
    ax.plot(iters, [scale * points[i] for i in iters], **style)


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", color="grey",
            fontsize=12)


def plot_metrics(series: dict[str, dict[int, float]], out: Path, title: str,
                 reference: Reference | None = None):
    """Draw the three panels of ``series`` (from :func:`read_metrics`) into the PNG ``out``, with
    the published curve ``reference`` (:func:`read_reference`) on the validation panel; returns
    the matplotlib ``Figure``."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import FormatStrFormatter, MaxNLocator
    except ImportError:
        raise MetricsError("matplotlib is not installed: pip install matplotlib") from None

    fig = Figure(figsize=(WIDTH_PX / DPI, HEIGHT_PX / DPI), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    loss_ax, lr_ax, val_ax = fig.subplots(3, 1, sharex=True,
                                          gridspec_kw={"height_ratios": [3, 1.4, 3]})
    fig.suptitle(title, fontsize=13)

    losses = [k for k in series if k.startswith("train/")
              and (k == "train/total" or k.endswith("_loss"))]
    drawn = [k for k in losses if any(v != 0 for v in series[k].values())]
    for key in sorted(drawn, key=lambda k: (k != "train/total", k)):
        name = key.removeprefix("train/")
        # Log scale: 0 means not used yet. A loss that is negative when used (the regularized
        # loss, a negative energy) is drawn sign-flipped and named so.
        sign = 1.0 if any(v > 0 for v in series[key].values()) else -1.0
        shown = {i: sign * v for i, v in series[key].items() if sign * v > 0}
        _line(loss_ax, shown, color=COLOURS.get(name), label=name if sign > 0 else f"-{name}",
              linewidth=2.0 if name == "total" else 1.2)
    if drawn:
        loss_ax.set_yscale("log")
        for axis in (loss_ax.yaxis.set_major_formatter, loss_ax.yaxis.set_minor_formatter):
            axis(FormatStrFormatter("%g"))  # 0.2, not 2 x 10^-1
        zero = sorted(k.removeprefix("train/") for k in set(losses) - set(drawn))
        loss_ax.legend(loc="best", fontsize=10, ncols=2, title=(
            f"0 in every record, not drawn: {', '.join(zero)}" if zero else None),
            title_fontsize=9)
    else:
        _empty(loss_ax, "no training losses logged")
    loss_ax.set_ylabel("loss (log scale)")
    loss_ax.set_title("training losses (mean over each log interval)", loc="left", fontsize=11)

    if "train/lr" in series:
        _line(lr_ax, series["train/lr"], color="tab:orange")
        lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    else:
        _empty(lr_ax, "no learning rate logged")
    lr_ax.set_ylabel("learning rate")
    lr_ax.set_title("learning rate (base group; the heads and decoder use a multiple)",
                    loc="left", fontsize=11)

    kinds = [k for k in VAL_KINDS if f"val/{k}" in series]
    kinds += sorted(k.removeprefix("val/") for k in series if k.startswith("val/")
                    and k.removeprefix("val/") not in VAL_KINDS + ("cls_f1", "skipped_images"))
    for kind in kinds:
        _line(val_ax, series[f"val/{kind}"], 100, color=COLOURS.get(kind), marker="o",
              markersize=4, label=f"{kind} mIoU", linewidth=2.0 if kind == "seg" else 1.2)
    if "val/cls_f1" in series:
        _line(val_ax, series["val/cls_f1"], 100, color=COLOURS["cls_f1"], linestyle="--",
              marker=".", label="classification F1")
    drawn_reference: list[float] = []
    if reference is not None:
        last_iter = max((i for points in series.values() for i in points), default=0)
        horizon = reference_horizon(reference, last_iter)
        for kind in REFERENCE_KINDS:
            points = {i: v for i, v in reference.series.get(kind, {}).items() if i <= horizon}
            if points:
                _line(val_ax, points, color=COLOURS.get(kind), linestyle=":", marker="x",
                      markersize=6, linewidth=1.5, label=f"{kind}, {reference.label}")
                drawn_reference += points.values()
    if "val/seg" in series:
        best_iter, best = max(series["val/seg"].items(), key=lambda item: (item[1], -item[0]))
        val_ax.plot([best_iter], [100 * best], marker="*", markersize=16, color="tab:red",
                    linestyle="none", label=f"best seg {100 * best:.1f} at {best_iter}")
        val_ax.annotate(f"{100 * best:.1f}", (best_iter, 100 * best), textcoords="offset points",
                        xytext=(0, 9), ha="center", color="tab:red", fontsize=10)
    if kinds or "val/cls_f1" in series or drawn_reference:
        val_ax.legend(loc="best", fontsize=10 if not drawn_reference else 9, ncols=2)
        top = max([100 * v for k in series if k.startswith("val/") and k != "val/skipped_images"
                   for v in series[k].values()] + drawn_reference)
        val_ax.set_ylim(0, max(10.0, 10 * math.ceil(top / 10 + 0.05)))
    else:
        _empty(val_ax, "no validation yet")
        val_ax.set_ylim(0, 100)
    val_ax.set_ylabel("%")
    val_ax.set_title("validation (single scale, no CRF), in %" + (
        f"; dotted: {reference.label}" if reference is not None else ""), loc="left", fontsize=11)
    val_ax.set_xlabel("iteration")
    val_ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in (loss_ax, lr_ax, val_ax):
        ax.grid(True, alpha=0.3)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI)
    return fig


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--work-dir", type=Path, metavar="DIR",
                        help="a training run's work dir: reads DIR/metrics.jsonl")
    source.add_argument("--metrics", type=Path, metavar="FILE",
                        help="a metrics.jsonl file anywhere")
    parser.add_argument("--out", type=Path, metavar="PNG",
                        help=f"the PNG to write ({WIDTH_PX}x{HEIGHT_PX} px; default: "
                             "metrics.png beside the metrics file)")
    parser.add_argument("--reference", metavar="NAME",
                        help="also draw a published validation curve: "
                             f"{', '.join(sorted(REFERENCES))} (the authors' VOC training log: "
                             "CAM, affinity CAM and segmentation mIoU every 2,000 iterations)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    path = args.metrics if args.metrics else args.work_dir / "metrics.jsonl"
    out = args.out or path.with_name("metrics.png")
    try:
        reference = read_reference(args.reference) if args.reference else None
        series, skipped = read_metrics(path)
        train_iters = series.get("train/total", {})
        val_iters = series.get("val/seg", {})
        run = path.resolve().parent.name
        title = (f"{run}: {_count(len(train_iters), 'training record')} to iteration "
                 f"{max(train_iters, default=0)}, {_count(len(val_iters), 'validation')}")
        plot_metrics(series, out, title, reference)
    except MetricsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if skipped:
        print(f"note: skipped {skipped} unreadable line(s) of {path}", file=sys.stderr)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
