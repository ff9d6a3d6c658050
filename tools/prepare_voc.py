"""Write the name lists and image-level labels of PASCAL VOC 2012 (+ SBD SegmentationClassAug).

    python tools/prepare_voc.py --root VOCdevkit/VOC2012                  # -> data/voc
    python tools/prepare_voc.py --root VOCdevkit/VOC2012 --out data/voc --workers 2
    python tools/prepare_voc.py --root VOCdevkit/VOC2012 --train-aug-list train_aug.txt
    python tools/prepare_voc.py --root VOCdevkit/VOC2012 --labels-from xml  # Annotations/*.xml

Reads ``ROOT/JPEGImages/<id>.jpg``, ``ROOT/SegmentationClassAug/<id>.png`` (``--mask-dir``) and
``ROOT/ImageSets/Segmentation/{train,val}.txt``; writes

    OUT/train_aug.txt   the ids of --train-aug-list, in its order; without it, every id with a mask
                        in the mask folder that is not in val.txt, sorted
    OUT/train.txt       ImageSets/Segmentation/train.txt (skipped with a warning if absent)
    OUT/val.txt         ImageSets/Segmentation/val.txt
    OUT/cls_labels.json {id: sorted class indices 1..C-1} for every written id, from the classes
                        present in its mask (0 and 255 excluded), or from the XML object names
    OUT/left_out.json   only with --skip-missing when ids were left out (see below); a
                        left_out.json of an earlier run is removed when nothing is left out

train_aug. The default ("every mask not in val.txt") gives the 10,582 ids of the usual train_aug
on the official VOC 2012 + SBD, and leaks no validation image into training only when val.txt is
the official 1,449-id list: with a shortened val.txt the official val ids it lacks (they have
masks) land in train_aug. The tool warns loudly when it can see such a leak: ids of train.txt that
are in val.txt, ids of ImageSets/Segmentation/trainval.txt in neither train.txt nor val.txt, or a
val.txt that is not 1,449 ids long. ``--train-aug-list`` takes train_aug from a given list instead
(e.g. the authors' train_aug.txt: one id per line, or the two-column
``/JPEGImages/<id>.jpg /SegmentationClassAug/<id>.png`` form); if it shares ids with val.txt the
tool stops (status 2), naming how many and the first few.

Checks, for every id of every list, in a pool of --workers processes: the image exists and decodes
(every JPEG is decoded in full, so truncated or corrupt files are found), the mask exists, decodes,
is a class-index PNG (palette or grey, not colours) holding only 0..C-1 and 255, and has the size
of its image; with ``--labels-from xml`` also that the annotation parses and names VOC classes.
Problems are reported one line per id, the first --show-problems (20) of them, then a count by
kind (``image file not found: 1200, cannot decode image: 3, ...``). Lists also must not repeat an
id.

Exit status: 0 written; 1 bad ids (nothing written) or a list left empty; 2 a missing folder or
val.txt, an unreadable or empty --train-aug-list, repeated ids, or --train-aug-list overlapping
val.txt (nothing written).

``--skip-missing`` (for any bad id, not only missing files) writes the lists without the bad ids
instead of failing, prints a prominent WARNING block at the end saying that the written lists are
SUBSETS (``val.txt holds 1440 of 1449 listed ids``), and writes ``OUT/left_out.json``:
``{list name: {"listed": M, "written": N, "left_out": {id: problem}}}`` for each list that lost
ids. ``tools/infer_seg.py`` and ``tools/evaluate.py`` print ``N of M listed ids (K left out by
prepare_voc --skip-missing, see OUT/left_out.json)`` when the list they read is named there.

Time (2 workers, 2 cores, files in the page cache): the 60 photos of voc_mini take 0.3 s plus
2.5 s of start-up (importing torch); 12,060 ids of VOC-sized photos (voc_mini's, repeated) take
30 s, about 5 ms of CPU per id, most of it JPEG decoding.
"""

import argparse
import os
import sys
import xml.etree.ElementTree as ET
from collections import Counter
from multiprocessing import Pool
from pathlib import Path

from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from afa.constants import VOC_CLASSES  # noqa: E402
from afa.data.lists import LEFT_OUT_FILE, write_left_out  # noqa: E402
from afa.data.voc import (  # noqa: E402
    DataError,
    labels_from_mask,
    read_image,
    read_mask,
    read_name_list,
    write_label_file,
    write_name_list,
)

OFFICIAL_VAL_SIZE = 1449

# Kinds of problem, in the order of the checks (and of the count by kind).
IMAGE_MISSING = "image file not found"
IMAGE_BAD = "cannot decode image"
MASK_MISSING = "mask file not found"
MASK_BAD = "cannot decode mask"
MASK_COLOUR = "mask is not class indices"
MASK_VALUES = "mask values outside range"
MASK_SIZE = "mask size differs from image"
XML_MISSING = "annotation file not found"
XML_BAD = "cannot read annotation"
XML_CLASSES = "unknown class names in annotation"
KINDS = (IMAGE_MISSING, IMAGE_BAD, MASK_MISSING, MASK_BAD, MASK_COLOUR, MASK_VALUES, MASK_SIZE,
         XML_MISSING, XML_BAD, XML_CLASSES)


def _mask_kind(message: str) -> str:
    """The kind of a :func:`read_mask` error of an existing file."""
    if "cannot decode" in message:
        return MASK_BAD
    if "has mode" in message:
        return MASK_COLOUR
    return MASK_VALUES  # "mask values ... outside" / "mask values span ..."


def check_id(job: tuple) -> tuple[str, list[int] | None, str | None, str | None]:
    """One id: ``(id, image, mask, num classes, annotation or None)`` ->
    ``(id, classes, None, None)`` or ``(id, None, kind, problem)``.

    Decodes the image and the mask, checks the mask's values and size, and takes the classes from
    the mask, or from the annotation's ``<object>`` names when one is given.
    """
    name, image_path, mask_path, num_classes, xml_path = job
    if not os.path.isfile(image_path):
        return name, None, IMAGE_MISSING, f"{image_path}: {IMAGE_MISSING}"
    try:
        height, width = read_image(image_path).shape[:2]
    except DataError as exc:
        return name, None, IMAGE_BAD, str(exc)
    if not os.path.isfile(mask_path):
        return name, None, MASK_MISSING, f"{mask_path}: {MASK_MISSING}"
    try:
        mask = read_mask(mask_path, num_classes)
    except DataError as exc:
        return name, None, _mask_kind(str(exc)), str(exc)
    if mask.shape != (height, width):
        return name, None, MASK_SIZE, (
            f"{mask_path}: mask size {mask.shape[1]}x{mask.shape[0]} differs from image size "
            f"{width}x{height} ({image_path})")
    if xml_path is None:
        return name, labels_from_mask(mask, num_classes), None, None
    if not os.path.isfile(xml_path):
        return name, None, XML_MISSING, f"{xml_path}: {XML_MISSING}"
    try:
        objects = ET.parse(xml_path).getroot().iter("object")
        names = {obj.findtext("name", "").strip() for obj in objects}
    except (OSError, ET.ParseError) as exc:
        return name, None, XML_BAD, f"{xml_path}: {XML_BAD} ({exc})"
    unknown = sorted(names - set(VOC_CLASSES[1:]))
    if unknown:
        return name, None, XML_CLASSES, f"{xml_path}: unknown class names {unknown}"
    return name, sorted(VOC_CLASSES.index(n) for n in names), None, None


def run_jobs(function, jobs: list, workers: int, desc: str) -> list:
    """Map ``function`` over ``jobs`` with a process pool (or inline for one worker), with a bar."""
    if workers <= 1 or len(jobs) <= 1:
        return [function(job) for job in tqdm(jobs, desc=desc, unit="id")]
    chunksize = max(1, min(64, len(jobs) // (4 * workers)))  # every worker gets work
    with Pool(min(workers, len(jobs))) as pool:
        return list(tqdm(pool.imap_unordered(function, jobs, chunksize=chunksize),
                         total=len(jobs), desc=desc, unit="id"))


def count_by_kind(kinds: dict[str, str]) -> str:
    """``"image file not found: 1200, cannot decode image: 3"`` in the order of the checks."""
    counts = Counter(kinds.values())
    order = [k for k in KINDS if k in counts] + sorted(set(counts) - set(KINDS))
    return ", ".join(f"{kind}: {counts[kind]}" for kind in order)


def _loud(lines: list[str]) -> None:
    """A warning block that stands out in a long log."""
    bar = "=" * 78
    print("\n".join([bar, *lines, bar]), file=sys.stderr)


def _first(names, count: int = 5) -> str:
    names = sorted(names)
    return ", ".join(names[:count]) + (", ..." if len(names) > count else "")


def read_lists(args, sets_dir: Path, mask_dir: Path) -> dict[str, list[str]] | int:
    """The lists to write (val, train if present, train_aug), or an exit status after an error."""
    lists = {"val": read_name_list(sets_dir / "val.txt")}
    if not lists["val"]:
        print(f"error: {sets_dir / 'val.txt'} is empty", file=sys.stderr)
        return 2
    if (sets_dir / "train.txt").is_file():
        lists["train"] = read_name_list(sets_dir / "train.txt")
    else:
        print(f"warning: {sets_dir / 'train.txt'} not found; not writing train.txt",
              file=sys.stderr)
    val = set(lists["val"])
    if args.train_aug_list:
        try:
            lists["train_aug"] = read_name_list(args.train_aug_list)
        except DataError as exc:
            print(f"error: --train-aug-list: {exc}", file=sys.stderr)
            return 2
        if not lists["train_aug"]:
            print(f"error: --train-aug-list {args.train_aug_list} is empty", file=sys.stderr)
            return 2
        overlap = val.intersection(lists["train_aug"])
        if overlap:
            print(f"error: --train-aug-list {args.train_aug_list} holds {len(overlap)} ids of "
                  f"{sets_dir / 'val.txt'} ({_first(overlap)}); training on them would leak "
                  "validation images into training; nothing written", file=sys.stderr)
            return 2
    else:
        lists["train_aug"] = sorted(p.stem for p in mask_dir.glob("*.png") if p.stem not in val)
        if not lists["train_aug"]:
            print(f"error: no masks outside val in {mask_dir}", file=sys.stderr)
            return 2
    for list_name, names in lists.items():
        repeated = [name for name, count in Counter(names).items() if count > 1]
        if repeated:
            print(f"error: {list_name} list repeats {len(repeated)} ids ({_first(repeated)}); "
                  "nothing written", file=sys.stderr)
            return 2
    return lists


def warn_of_leaks(args, lists: dict[str, list[str]], sets_dir: Path) -> None:
    """Loud warnings for val ids that the written training lists would hold, as far as visible."""
    val = set(lists["val"])
    lines = []
    in_train = val.intersection(lists.get("train", ()))
    if in_train:
        lines.append(f"train.txt holds {len(in_train)} ids of val.txt ({_first(in_train)}).")
    trainval_path = sets_dir / "trainval.txt"
    if not args.train_aug_list and trainval_path.is_file():
        unlisted = (set(read_name_list(trainval_path)) - val - set(lists.get("train", ()))
                    ) & set(lists["train_aug"])
        if unlisted:
            lines.append(f"train_aug.txt holds {len(unlisted)} ids of trainval.txt that are in "
                         f"neither train.txt nor val.txt ({_first(unlisted)}): probably "
                         "official val ids missing from this val.txt.")
    if lines:
        _loud(["WARNING: validation images would be TRAINED ON:", *lines,
               "Scores on val.txt would be inflated. Use the official val.txt, or give "
               "--train-aug-list."])
    elif not args.train_aug_list and len(val) != OFFICIAL_VAL_SIZE:
        print(f"warning: val.txt has {len(val)} ids, not the {OFFICIAL_VAL_SIZE:,} of the "
              "official VOC 2012 val: if it is a shortened official list, the official val ids "
              "it lacks have masks and are now in train_aug (--train-aug-list avoids this)",
              file=sys.stderr)


def report_problems(problems: dict[str, tuple[str, str]], total: int, args) -> None:
    """The first ``--show-problems`` problems by id, then how many there are of each kind."""
    level = "warning" if args.skip_missing else "error"
    names = sorted(problems)
    shown = names if args.show_problems <= 0 else names[:args.show_problems]
    for name in shown:
        print(f"{level}: {problems[name][1]}", file=sys.stderr)
    if len(shown) < len(names):
        print(f"{level}: ... and {len(names) - len(shown)} more problems "
              f"(--show-problems 0 lists them all)", file=sys.stderr)
    kinds = {name: kind for name, (kind, _) in problems.items()}
    print(f"{level}: {len(problems)} of {total} ids unusable ({count_by_kind(kinds)})",
          file=sys.stderr)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", required=True,
                        help="the VOC2012 folder (holding JPEGImages, the mask folder and "
                             "ImageSets/Segmentation)")
    parser.add_argument("--out", default="data/voc",
                        help="folder the lists, cls_labels.json and left_out.json go to "
                             "(default data/voc)")
    parser.add_argument("--mask-dir", default="SegmentationClassAug",
                        help="folder of the class-index mask PNGs under --root "
                             "(default SegmentationClassAug, the VOC+SBD masks)")
    parser.add_argument("--num-classes", type=int, default=len(VOC_CLASSES),
                        help="classes including the background (default 21); mask values must "
                             "lie in 0..C-1 or be 255")
    parser.add_argument("--labels-from", choices=("mask", "xml"), default="mask",
                        help="image-level labels from the classes in each mask (default) or from "
                             "the object names of ROOT/Annotations/<id>.xml")
    parser.add_argument("--train-aug-list", metavar="PATH",
                        help="take train_aug from this list (one id per line, or the two-column "
                             "/JPEGImages/<id>.jpg /SegmentationClassAug/<id>.png form) instead "
                             "of every mask not in val.txt; sharing an id with val.txt is an "
                             "error")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="processes that decode and check the files (default: all CPUs; "
                             "1 runs them in this process)")
    parser.add_argument("--skip-missing", action="store_true",
                        help="leave bad ids (missing, corrupt, wrong size, bad values) out of the "
                             "written lists instead of failing; prints a SUBSET warning and "
                             "records them in OUT/left_out.json")
    parser.add_argument("--show-problems", type=int, default=20, metavar="N",
                        help="print the first N problems one per line (default 20; 0 prints "
                             "all); a count by kind follows")
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

    lists = read_lists(args, sets_dir, mask_dir)
    if isinstance(lists, int):
        return lists
    warn_of_leaks(args, lists, sets_dir)

    # One job per id: decode image and mask, check them, take the labels.
    ids = sorted({name for names in lists.values() for name in names})
    annotations = root / "Annotations"
    jobs = [(name, str(image_dir / f"{name}.jpg"), str(mask_dir / f"{name}.png"),
             args.num_classes,
             str(annotations / f"{name}.xml") if args.labels_from == "xml" else None)
            for name in ids]
    labels, problems = {}, {}
    for name, classes, kind, problem in run_jobs(check_id, jobs, args.workers, "check"):
        if problem is None:
            labels[name] = classes
        else:
            problems[name] = (kind, problem)

    if problems:
        report_problems(problems, len(ids), args)
        if not args.skip_missing:
            print("error: nothing written (--skip-missing writes the lists without the bad ids)",
                  file=sys.stderr)
            return 1
    kept = {key: [name for name in names if name not in problems] for key, names in lists.items()}
    for list_name, names in kept.items():
        if not names:
            print(f"error: no usable ids in {list_name}; nothing written", file=sys.stderr)
            return 1

    out = Path(args.out)
    left_out = {}
    for list_name, names in kept.items():
        write_name_list(out / f"{list_name}.txt", names)
        dropped = {name: problems[name][1] for name in lists[list_name] if name in problems}
        print(f"{out / list_name}.txt: {len(names)} ids"
              + (f" ({len(dropped)} of {len(lists[list_name])} left out)" if dropped else ""))
        if dropped:
            left_out[list_name] = {"listed": len(lists[list_name]), "written": len(names),
                                   "left_out": dropped}
    write_label_file(out / "cls_labels.json", labels)
    print(f"{out / 'cls_labels.json'}: labels of {len(labels)} ids (from {args.labels_from})")

    record = out / LEFT_OUT_FILE
    if left_out:
        write_left_out(record, left_out)
        print(f"{record}: the {len(problems)} left-out ids and their problems")
        _loud(["WARNING: the written lists are SUBSETS of the listed ids (--skip-missing):",
               *(f"  {key}.txt holds {entry['written']} of {entry['listed']} listed ids"
                 for key, entry in left_out.items()),
               "Scores on a subset are not comparable with scores on the full split.",
               f"The left-out ids and their problems are in {record}."])
    elif record.is_file():
        record.unlink()
        print(f"{record}: removed (left by an earlier run; nothing is left out now)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
