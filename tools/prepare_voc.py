"""Write the name lists and image-level labels of PASCAL VOC 2012 (+ SBD SegmentationClassAug).

    python tools/prepare_voc.py --root VOCdevkit/VOC2012                  # -> data/voc
    python tools/prepare_voc.py --root VOCdevkit/VOC2012 --out data/voc --workers 2
    python tools/prepare_voc.py --root VOCdevkit/VOC2012 --labels-from xml  # Annotations/*.xml

Reads ``ROOT/JPEGImages/<id>.jpg``, ``ROOT/SegmentationClassAug/<id>.png`` (``--mask-dir``) and
``ROOT/ImageSets/Segmentation/{train,val}.txt``; writes

    OUT/train_aug.txt   every id with a mask that is not in val (10,582 on the full set)
    OUT/train.txt       ImageSets/Segmentation/train.txt (skipped with a warning if absent)
    OUT/val.txt         ImageSets/Segmentation/val.txt
    OUT/cls_labels.json {id: sorted class indices 1..C-1} for every listed id, from the classes
                        present in its mask (0 and 255 excluded), or from the XML object names

Every listed id is checked to have its image and mask, and masks to hold only 0..C-1 and 255.
Problems are reported by name and the tool exits with status 1 without writing anything, unless
``--skip-missing`` is given: then the bad ids are left out of the lists with a warning. A missing
folder or val list is fatal (status 2). The full 12,031 masks take about 25 s on 2 cores.
"""

import argparse
import os
import sys
import xml.etree.ElementTree as ET
from multiprocessing import Pool
from pathlib import Path

from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from afa.constants import VOC_CLASSES  # noqa: E402
from afa.data.voc import (  # noqa: E402
    DataError,
    labels_from_mask,
    read_mask,
    read_name_list,
    write_label_file,
    write_name_list,
)


def labels_of_mask(job: tuple[str, str, int]) -> tuple[str, list[int] | None, str | None]:
    """(id, mask path, num classes) -> (id, classes, None) or (id, None, problem)."""
    name, path, num_classes = job
    try:
        return name, labels_from_mask(read_mask(path, num_classes), num_classes), None
    except DataError as exc:
        return name, None, str(exc)


def labels_of_xml(job: tuple[str, str, int]) -> tuple[str, list[int] | None, str | None]:
    """(id, annotation path, num classes) -> classes named by the XML ``<object>`` entries."""
    name, path, _ = job
    try:
        objects = ET.parse(path).getroot().iter("object")
        names = {obj.findtext("name", "").strip() for obj in objects}
    except (OSError, ET.ParseError) as exc:
        return name, None, f"{path}: cannot read annotation ({exc})"
    unknown = sorted(names - set(VOC_CLASSES[1:]))
    if unknown:
        return name, None, f"{path}: unknown class names {unknown}"
    return name, sorted(VOC_CLASSES.index(n) for n in names), None


def run_jobs(function, jobs: list, workers: int, desc: str) -> list:
    """Map ``function`` over ``jobs`` with a process pool (or inline for one worker), with a bar."""
    if workers <= 1:
        return [function(job) for job in tqdm(jobs, desc=desc, unit="file")]
    with Pool(workers) as pool:
        return list(tqdm(pool.imap_unordered(function, jobs, chunksize=64), total=len(jobs),
                         desc=desc, unit="file"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", required=True, help="VOCdevkit/VOC2012")
    parser.add_argument("--out", default="data/voc", help="where the lists go (default data/voc)")
    parser.add_argument("--mask-dir", default="SegmentationClassAug")
    parser.add_argument("--num-classes", type=int, default=len(VOC_CLASSES))
    parser.add_argument("--labels-from", choices=("mask", "xml"), default="mask")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--skip-missing", action="store_true",
                        help="leave bad ids out with a warning instead of failing")
    args = parser.parse_args(argv)

    root = Path(args.root)
    image_dir, mask_dir = root / "JPEGImages", root / args.mask_dir
    sets_dir = root / "ImageSets" / "Segmentation"
    for folder in (root, image_dir, mask_dir, sets_dir):
        if not folder.is_dir():
            print(f"error: {folder} is not a folder; expected the VOC2012 layout "
                  "(JPEGImages, SegmentationClassAug from SBD, ImageSets/Segmentation)",
                  file=sys.stderr)
            return 2
    if not (sets_dir / "val.txt").is_file():
        print(f"error: {sets_dir / 'val.txt'} not found", file=sys.stderr)
        return 2
    if args.labels_from == "xml" and args.num_classes != len(VOC_CLASSES):
        print("error: --labels-from xml needs the 21 VOC classes", file=sys.stderr)
        return 2

    lists = {"val": read_name_list(sets_dir / "val.txt")}
    if (sets_dir / "train.txt").is_file():
        lists["train"] = read_name_list(sets_dir / "train.txt")
    else:
        print(f"warning: {sets_dir / 'train.txt'} not found; not writing train.txt",
              file=sys.stderr)
    val = set(lists["val"])
    lists["train_aug"] = sorted(p.stem for p in mask_dir.glob("*.png") if p.stem not in val)
    if not lists["train_aug"]:
        print(f"error: no masks outside val in {mask_dir}", file=sys.stderr)
        return 2

    # Files every listed id needs.
    problems = {}
    ids = sorted({name for names in lists.values() for name in names})
    for name in ids:
        if not (image_dir / f"{name}.jpg").is_file():
            problems[name] = f"{image_dir / name}.jpg: image file not found"
        elif not (mask_dir / f"{name}.png").is_file():
            problems[name] = f"{mask_dir / name}.png: mask file not found"
        elif args.labels_from == "xml" and not (root / "Annotations" / f"{name}.xml").is_file():
            problems[name] = f"{root / 'Annotations' / name}.xml: annotation file not found"

    # Labels, and a full check of every mask.
    todo = [name for name in ids if name not in problems]
    mask_jobs = [(name, str(mask_dir / f"{name}.png"), args.num_classes) for name in todo]
    labels = {}
    for name, classes, problem in run_jobs(labels_of_mask, mask_jobs, args.workers, "masks"):
        if problem is None:
            labels[name] = classes
        else:
            problems[name] = problem
    if args.labels_from == "xml":
        xml_jobs = [(name, str(root / "Annotations" / f"{name}.xml"), args.num_classes)
                    for name in labels]
        for name, classes, problem in run_jobs(labels_of_xml, xml_jobs, args.workers, "xml"):
            if problem is None:
                labels[name] = classes
            else:
                problems[name] = problem
                del labels[name]

    if problems:
        for name in sorted(problems):
            print(f"{'warning' if args.skip_missing else 'error'}: {problems[name]}",
                  file=sys.stderr)
        if not args.skip_missing:
            print(f"error: {len(problems)} of {len(ids)} ids unusable; nothing written "
                  "(--skip-missing leaves them out)", file=sys.stderr)
            return 1
    kept = {key: [name for name in names if name not in problems] for key, names in lists.items()}
    for list_name, names in kept.items():
        if not names:
            print(f"error: no usable ids in {list_name}; nothing written", file=sys.stderr)
            return 1
    out = Path(args.out)
    for list_name, names in kept.items():
        write_name_list(out / f"{list_name}.txt", names)
        left_out = len(lists[list_name]) - len(names)
        print(f"{out / list_name}.txt: {len(names)} ids"
              + (f" ({left_out} left out)" if left_out else ""))
    write_label_file(out / "cls_labels.json", labels)
    print(f"{out / 'cls_labels.json'}: labels of {len(labels)} ids (from {args.labels_from})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
