"""Score class-index prediction PNGs against ground-truth PNGs: mIoU, per-class IoU, precision
and recall, pixel accuracy.

One confusion matrix over all pixels of all listed images (ground-truth 255 ignored). Which classes
the mean IoU averages over (``--class-rule``):

- ``standard`` (default): every class that occurs in the ground truth or the prediction; a class
  absent from both is left out;
- ``gt-only``: only the classes that occur in the ground truth, the rule of the authors'
  ``utils/evaluate.py`` (``valid = hist.sum(axis=1) > 0``). A class predicted but absent from
  the ground truth then drops out of the mean (its false positives still lower the IoU of the
  classes they cover). On the full VOC val set every class occurs in the ground truth and the two
  agree; on a subset they can differ;
- ``both``: print both, labelled.

The JSON always holds ``miou`` (standard) and ``miou_gt_only`` (the authors' rule). Predictions
and ground truth are palette (or greyscale) PNGs named ``<id>.png`` whose pixel indices are class
ids.

Run::

    python tools/eval_miou.py \\
        --pred-dir work_dirs/voc/pred_val \\
        --gt-dir data/VOCdevkit/VOC2012/SegmentationClassAug \\
        --list data/VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt \\
        --num-classes 21 --json work_dirs/voc/miou_val.json

The class names of the table (``--class-names``): a built-in set (``voc``, ``coco``, ``demo``),
``index`` (the numbers), a text file with one name per line, background first (``classes.txt``
of ``tools/prepare_tags.py``), or an ``--out-dir`` of ``tools/infer_seg.py`` /
``tools/infer_cam.py`` (the classes of its ``config.yaml``). Without it, a ``--pred-dir`` inside
such an ``--out-dir`` (``out/seg/pred``) gives that run's classes; else ``voc`` for 21 classes,
``coco`` for 81, ``demo`` for 9, the numbers otherwise. ``--num-classes`` may then be left out:
it is the number of names; given, it must agree with them. ``--workers`` sets the number of
reader threads.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from afa.constants import CLASS_NAME_SETS
from afa.io import class_names_from, read_label_png, run_dir_class_names
from afa.metrics import (ConfusionMatrix, SegmentationScores, confusion_matrix, format_table,
                         score_columns)

__all__ = ["read_ids", "evaluate_dirs", "gt_only_scores", "main"]

CLASS_RULES = ("standard", "gt-only", "both")
_RULE_LEGENDS = {  # {n}: how many classes the mean runs over
    "standard": "mIoU (standard): over the {n} classes in the ground truth or the prediction",
    "gt-only": "mIoU (gt-only): over the {n} classes in the ground truth only (the authors' rule)",
}


def read_ids(list_file: str | Path) -> list[str]:
    """Image ids of a name list: the first whitespace-separated token of each non-empty line."""
    ids = [line.split()[0] for line in Path(list_file).read_text().splitlines() if line.strip()]
    if not ids:
        raise ValueError(f"{list_file}: the name list is empty")
    return ids


def _image_confusion(pred_path: Path, gt_path: Path, num_classes: int) -> torch.Tensor:
    pred = read_label_png(pred_path)
    gt = read_label_png(gt_path)
    if pred.shape != gt.shape:
        raise ValueError(
            f"{pred_path}: prediction is {pred.shape[1]}x{pred.shape[0]} (WxH) but the ground "
            f"truth {gt_path} is {gt.shape[1]}x{gt.shape[0]}"
        )
    try:
        return confusion_matrix(pred, gt, num_classes)
    except ValueError as err:
        raise ValueError(f"{pred_path} vs {gt_path}: {err}") from err


def evaluate_dirs(
    pred_dir: str | Path,
    gt_dir: str | Path,
    ids: Sequence[str],
    num_classes: int,
    workers: int = 4,
    progress: bool = True,
) -> ConfusionMatrix:
    """Confusion matrix of ``pred_dir/<id>.png`` against ``gt_dir/<id>.png`` over ``ids``.

    Raises ``FileNotFoundError`` naming missing files before reading anything, and ``ValueError``
    for mis-sized predictions or labels outside ``[0, num_classes)``.
    """
    pred_paths = [Path(pred_dir) / f"{image_id}.png" for image_id in ids]
    gt_paths = [Path(gt_dir) / f"{image_id}.png" for image_id in ids]
    for kind, paths in (("prediction", pred_paths), ("ground truth", gt_paths)):
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            shown = ", ".join(missing[:5])
            more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
            raise FileNotFoundError(f"{len(missing)} missing {kind} file(s): {shown}{more}")

    matrix = ConfusionMatrix(num_classes)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = pool.map(
            _image_confusion, pred_paths, gt_paths, [num_classes] * len(pred_paths)
        )
        for counts in tqdm(results, total=len(pred_paths), desc="eval", disable=not progress):
            matrix.add_matrix(counts)
    return matrix


def gt_only_scores(matrix: ConfusionMatrix, scores: SegmentationScores) -> SegmentationScores:
    """``scores`` (of ``matrix``) with the IoU of classes absent from the ground truth set to
    ``nan`` and the mIoU averaged over the others: the authors' rule."""
    in_gt = matrix.matrix.sum(dim=1).cpu().numpy() > 0  # rows are the ground truth
    iou = np.where(in_gt, np.asarray(scores.iou, dtype=np.float64), np.nan)
    miou = float(np.nanmean(iou)) if in_gt.any() else float("nan")
    return dataclasses.replace(scores, iou=iou.tolist(), miou=miou)


def _report(scores: dict[str, SegmentationScores], rule: str) -> str:
    """The per-class table of ``rule`` (standard for ``both``) with one labelled mIoU row per
    rule shown, and a legend saying which classes each averages over."""
    shown = ("standard", "gt-only") if rule == "both" else (rule,)
    table = scores[shown[0]]
    summary = {"pixel acc": [table.pixel_acc], "mean recall": [table.mean_acc]}
    legend = []
    for name in shown:
        summary[f"mIoU ({name})"] = [scores[name].miou]
        legend.append(_RULE_LEGENDS[name].format(n=int(np.isfinite(scores[name].iou).sum())))
    return "\n".join([format_table(score_columns(table), table.class_names, summary), *legend])


def _class_names(choice: str | None, num_classes: int | None,
                 pred_dir: str | Path | None = None) -> list[str]:
    """The table's class names (module docstring), checked against ``num_classes`` when given."""
    names, source = None, None
    if choice == "index":
        if num_classes is None:
            raise ValueError("--class-names index needs --num-classes")
        return [str(i) for i in range(num_classes)]
    if choice is not None:
        names, source = class_names_from(choice), f"--class-names {choice}"
    elif pred_dir is not None:
        names = run_dir_class_names([pred_dir])
        source = f"the run of {pred_dir}"
    if names is None:
        if num_classes is None:
            raise ValueError("give --num-classes, or --class-names (a set, a file of names or an "
                             "inference --out-dir) to count the classes")
        by_size = {len(set_names): key for key, set_names in CLASS_NAME_SETS.items()}
        key = by_size.get(num_classes)
        return list(CLASS_NAME_SETS[key]) if key else [str(i) for i in range(num_classes)]
    if num_classes is not None and len(names) != num_classes:
        raise ValueError(f"{source} has {len(names)} classes but --num-classes is {num_classes}")
    return names


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pred-dir", required=True, help="directory of <id>.png predictions")
    parser.add_argument("--gt-dir", required=True, help="directory of <id>.png ground truth")
    parser.add_argument("--list", required=True, help="name list, one image id per line")
    parser.add_argument("--num-classes", type=int,
                        help="incl. background (default: the number of class names, when they "
                             "come from a file or a run)")
    parser.add_argument("--json", help="write the scores to this JSON file")
    parser.add_argument(
        "--class-names",
        metavar="SET|FILE|RUN_DIR",
        help=f"names for the table: {', '.join(CLASS_NAME_SETS)} or index; a text file, one name "
        "per line, background first (prepare_tags' classes.txt); or an --out-dir of infer_seg / "
        "infer_cam (its config.yaml). Default: the run holding --pred-dir, else voc for 21 "
        "classes, coco for 81, demo (make demo's set) for 9, else indices",
    )
    parser.add_argument(
        "--class-rule",
        choices=CLASS_RULES,
        default="standard",
        help="classes the mIoU averages over: standard (in the ground truth or the prediction), "
             "gt-only (in the ground truth only: the authors' rule; differs on subsets of val), "
             "or both, labelled (default: standard)",
    )
    parser.add_argument("--workers", type=int, default=4, help="PNG reader threads")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the evaluation; returns the JSON dict. Input errors exit with a one-line message."""
    args = parse_args(argv)
    try:
        names = _class_names(args.class_names, args.num_classes, args.pred_dir)
        ids = read_ids(args.list)
        matrix = evaluate_dirs(
            args.pred_dir, args.gt_dir, ids, len(names), args.workers, not args.no_progress
        )
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"eval_miou: error: {err}") from err

    scores = matrix.compute(class_names=names)
    by_rule = {"standard": scores, "gt-only": gt_only_scores(matrix, scores)}
    print(_report(by_rule, args.class_rule))
    result = {
        **scores.to_dict(),
        "miou_gt_only": by_rule["gt-only"].to_dict()["miou"],
        "num_images": len(ids),
        "confusion_matrix": matrix.matrix.tolist(),
        "pred_dir": str(args.pred_dir),
        "gt_dir": str(args.gt_dir),
        "list": str(args.list),
    }
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {out}", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
