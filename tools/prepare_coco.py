"""Convert MS COCO 2014 instance annotations into the VOC-style layout that afa reads.

    python tools/prepare_coco.py --coco-root /data/coco --out MSCOCO
    python tools/prepare_coco.py --coco-root /data/coco --out MSCOCO --splits val --workers 2
    python tools/prepare_coco.py --coco-root /data/coco --out MSCOCO --images copy

Reads ``COCO_ROOT/annotations/instances_{train,val}2014.json`` and ``COCO_ROOT/{train,val}2014/``;
writes

    OUT/JPEGImages/{train,val}/<id>.jpg         symlinks to the originals (--images copy|hardlink)
    OUT/SegmentationClass/{train,val}/<id>.png  class indices: 0 background, 1..80 the categories
                                                in the standard order, 255 crowd regions
    OUT/{train,val}.txt                         ids whose mask holds at least one category
    OUT/cls_labels.json                         {id: classes present in the mask}, merged with an
                                                existing file so splits can be converted separately

``<id>`` is the file name without extension (``COCO_val2014_000000000042``). How overlaps and crowds
are painted is described in ``afa/data/coco.py``. Resumable: finished masks and images are kept
(masks are written atomically) and only re-read for their labels. Images that are missing or whose
size disagrees with the annotation are reported by name; the lists are then not written and the
tool exits 1, unless ``--skip-missing`` leaves them out. Load it as
``VOCStyleDataset(OUT, OUT/train.txt, OUT/cls_labels.json, 81, split="train",
mask_dir="SegmentationClass")``.
"""

import argparse
import json
import os
import shutil
import sys
from collections import defaultdict
from multiprocessing import Pool
from pathlib import Path

from PIL import Image
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from afa.atomic import write_atomic  # noqa: E402
from afa.constants import COCO_CLASSES  # noqa: E402
from afa.data.coco import check_categories, instances_to_mask  # noqa: E402
from afa.data.voc import (  # noqa: E402
    DataError,
    labels_from_mask,
    read_label_file,
    read_mask,
    write_label_file,
    write_mask,
    write_name_list,
)

NUM_CLASSES = len(COCO_CLASSES)


def place_image(src: str, dst: str, how: str) -> None:
    """Put the original image at ``dst`` by symlink, hard link or copy (kept if already there)."""
    if os.path.lexists(dst):
        return
    if how == "symlink":
        write_atomic(dst, lambda tmp: os.symlink(os.path.abspath(src), tmp))
    elif how == "hardlink":
        write_atomic(dst, lambda tmp: os.link(src, tmp))
    else:
        write_atomic(dst, lambda tmp: shutil.copyfile(src, tmp))


def convert_image(job: dict) -> tuple[str, list[int] | None, str | None]:
    """One image: check it, write its mask (unless done) and place it; -> (id, classes, problem)."""
    name = job["name"]
    try:
        with Image.open(job["src"]) as img:  # reads the header only
            size = img.size
    except (OSError, Image.DecompressionBombError) as exc:  # the size alone can refuse it
        return name, None, f"{job['src']}: cannot read image ({exc})"
    if size != (job["width"], job["height"]):
        return name, None, (f"{job['src']}: image size {size} differs from the annotated "
                            f"{(job['width'], job['height'])}")
    try:
        if os.path.isfile(job["mask"]):
            mask = read_mask(job["mask"], NUM_CLASSES)
        else:
            mask = instances_to_mask(job["annotations"], job["height"], job["width"])
            write_mask(job["mask"], mask)
    except DataError as exc:
        return name, None, str(exc)
    place_image(job["src"], job["dst"], job["images"])
    return name, labels_from_mask(mask, NUM_CLASSES), None


def load_split(coco_root: Path, out: Path, split: str, images: str) -> list[dict]:
    """Read one annotation file and turn it into per-image jobs."""
    ann_file = coco_root / "annotations" / f"instances_{split}2014.json"
    image_dir = coco_root / f"{split}2014"
    for path in (ann_file, image_dir):
        if not path.exists():
            raise DataError(f"{path}: not found (expected the COCO 2014 layout: annotations/, "
                            "train2014/, val2014/)")
    print(f"loading {ann_file} ...")
    try:
        data = json.loads(ann_file.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{ann_file}: not valid JSON ({exc})") from exc
    check_categories(data["categories"], str(ann_file))
    per_image = defaultdict(list)
    for ann in data["annotations"]:
        per_image[ann["image_id"]].append(ann)
    (out / "JPEGImages" / split).mkdir(parents=True, exist_ok=True)
    (out / "SegmentationClass" / split).mkdir(parents=True, exist_ok=True)
    jobs = []
    for info in data["images"]:
        name = Path(info["file_name"]).stem
        jobs.append({
            "name": name, "height": info["height"], "width": info["width"],
            "annotations": per_image.get(info["id"], []), "images": images,
            "src": str(image_dir / info["file_name"]),
            "dst": str(out / "JPEGImages" / split / f"{name}.jpg"),
            "mask": str(out / "SegmentationClass" / split / f"{name}.png"),
        })
    return jobs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--coco-root", required=True,
                        help="holds annotations/, train2014/, val2014/")
    parser.add_argument("--out", default="MSCOCO",
                        help="the VOC-style root to write (default MSCOCO)")
    parser.add_argument("--splits", nargs="+", choices=("train", "val"), default=["train", "val"],
                        help="which COCO 2014 splits to convert (default both)")
    parser.add_argument("--images", choices=("symlink", "hardlink", "copy"), default="symlink",
                        help="how JPEGImages/<split>/ gets the images (default symlink)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="processes that draw the masks (default: all cores)")
    parser.add_argument("--skip-missing", action="store_true",
                        help="leave bad images out with a warning instead of failing")
    args = parser.parse_args(argv)

    out = Path(args.out)
    labels, lists, problems = {}, {}, []
    for split in args.splits:
        try:
            jobs = load_split(Path(args.coco_root), out, split, args.images)
        except DataError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        if args.workers <= 1:
            results = [convert_image(job) for job in tqdm(jobs, desc=split, unit="img")]
        else:
            with Pool(args.workers) as pool:
                results = list(tqdm(pool.imap_unordered(convert_image, jobs, chunksize=32),
                                    total=len(jobs), desc=split, unit="img"))
        names = []
        for name, classes, problem in results:
            if problem is not None:
                problems.append(problem)
            elif classes:
                labels[name] = classes
                names.append(name)
        lists[split] = sorted(names)
        print(f"{split}: {len(jobs)} images, {len(names)} with labels, "
              f"{sum(p is not None for _, _, p in results)} bad")

    for problem in problems:
        print(f"{'warning' if args.skip_missing else 'error'}: {problem}", file=sys.stderr)
    if problems and not args.skip_missing:
        print(f"error: {len(problems)} images unusable; lists not written (masks done so far are "
              "kept; --skip-missing leaves the bad images out)", file=sys.stderr)
        return 1
    for split, names in lists.items():
        write_name_list(out / f"{split}.txt", names)
    label_file = out / "cls_labels.json"
    if label_file.is_file():
        labels = {**read_label_file(label_file, NUM_CLASSES), **labels}
    write_label_file(label_file, labels)
    print(f"wrote {', '.join(str(out / f'{s}.txt') for s in lists)} and {label_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
