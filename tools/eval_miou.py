"""Score class-index prediction PNGs against ground-truth PNGs: pixel acc, mean acc, mIoU.

One confusion matrix over all pixels of all listed images (ground-truth 255 ignored); classes absent
from both prediction and ground truth are left out of the mean. Predictions and ground truth are
palette (or greyscale) PNGs named ``<id>.png`` whose pixel indices are class ids.

Run::

    python tools/eval_miou.py \\
        --pred-dir work_dirs/voc/pred_val \\
        --gt-dir data/VOCdevkit/VOC2012/SegmentationClassAug \\
        --list data/VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt \\
        --num-classes 21 --json work_dirs/voc/miou_val.json

``--class-names`` defaults to ``voc`` for 21 classes and ``coco`` for 81; ``--workers`` sets the
number of reader threads.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from tqdm import tqdm

from afa.constants import COCO_CLASSES, VOC_CLASSES
from afa.io import read_label_png
from afa.metrics import ConfusionMatrix, confusion_matrix, format_scores

__all__ = ["read_ids", "evaluate_dirs", "main"]

CLASS_NAME_SETS = {"voc": VOC_CLASSES, "coco": COCO_CLASSES}


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


def _class_names(choice: str | None, num_classes: int) -> list[str]:
    if choice is None:
        choice = {len(VOC_CLASSES): "voc", len(COCO_CLASSES): "coco"}.get(num_classes, "index")
    if choice == "index":
        return [str(i) for i in range(num_classes)]
    names = CLASS_NAME_SETS[choice]
    if len(names) != num_classes:
        raise ValueError(
            f"--class-names {choice} has {len(names)} classes but --num-classes is {num_classes}"
        )
    return list(names)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pred-dir", required=True, help="directory of <id>.png predictions")
    parser.add_argument("--gt-dir", required=True, help="directory of <id>.png ground truth")
    parser.add_argument("--list", required=True, help="name list, one image id per line")
    parser.add_argument("--num-classes", type=int, required=True, help="incl. background")
    parser.add_argument("--json", help="write the scores to this JSON file")
    parser.add_argument(
        "--class-names",
        choices=[*CLASS_NAME_SETS, "index"],
        help="names for the table (default: voc for 21 classes, coco for 81, else indices)",
    )
    parser.add_argument("--workers", type=int, default=4, help="PNG reader threads")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the evaluation; returns the JSON dict. Input errors exit with a one-line message."""
    args = parse_args(argv)
    try:
        names = _class_names(args.class_names, args.num_classes)
        ids = read_ids(args.list)
        matrix = evaluate_dirs(
            args.pred_dir, args.gt_dir, ids, args.num_classes, args.workers, not args.no_progress
        )
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"eval_miou: error: {err}") from err

    scores = matrix.compute(class_names=names)
    print(format_scores(scores))
    result = {
        **scores.to_dict(),
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
