"""Turn a folder of your own images and a file of their tags into a set afa trains on.

    python tools/prepare_tags.py --images photos/ --tags tags.csv --out data/mine
    python tools/prepare_tags.py --images photos/ --tags tags.json --classes classes.txt \\
        --masks masks/ --val-fraction 0.2 --seed 0 --out data/mine
    python tools/train.py --config configs/custom.yaml data.root=data/mine data.list_dir=data/mine

The tags: a CSV file with the columns ``image`` and ``tags`` (the tags of an image separated by
``;`` or ``|``), or a JSON object ``{"image": ["cat", "dog"], ...}``. An image is named by its
path below ``--images``, with or without its extension. Every image of the folder needs at least
one tag (``--skip-untagged`` leaves untagged ones out instead).

The classes: ``--classes FILE`` (one name per line; "background" is put first if the file does
not start with it), else every tag that occurs, sorted, after "background". A tag outside the
list, or a listed class no image has, is an error.

Masks (optional, for validation): ``--masks DIR`` with a class-index PNG per image (named like
the image, ``.png``; 0 background, i the i-th class of the list, 255 ignore), for some or all
images. Validation then scores the mIoU over the images that have one; without any it reports
the classifier's AP and F1 and the pseudo labels' coverage.

The split: ``--val-list FILE`` (image names, one per line), else ``--val-fraction`` of the images
(at least one), drawn with ``--seed``: images that have a mask first, since only they can be
scored.

Every image is decoded once (a progress bar on a terminal), so an unreadable file is found here,
named, and not in the middle of training. Nothing is written unless every check passes; then
``--out`` gets the layout ``configs/custom.yaml`` reads:

    JPEGImages/<id>.jpg          a link to each image (``--copy``: a copy); any format: the
                                 reader goes by the file's content, not its suffix
    SegmentationClass/<id>.png   a link to each mask
    train.txt, val.txt           the ids of the split
    cls_labels.json              {id: [class indices]}
    classes.txt                  the class names, background first (stored in every checkpoint)
    prepare.json                 what was made from what, and the counts per class

An id is the image's path below ``--images`` without its suffix, ``/`` and spaces replaced by
``__`` and ``_``. ``--out`` must be new, empty or made by this tool before.

Exit status: 0 done; 2 a problem with the input (every one found is listed, then nothing is
written).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import re
import shutil
import sys
from collections import Counter
from pathlib import Path

from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from afa.atomic import write_atomic  # noqa: E402
from afa.config import CLASS_LIST_FILE, read_class_list  # noqa: E402
from afa.constants import IGNORE_INDEX  # noqa: E402
from afa.data import DataError, read_image  # noqa: E402
from afa.data.voc import read_mask  # noqa: E402

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
MARK = "prepare_tags"  # prepare.json's "tool": an --out this tool may write into again
MAX_SHOWN = 20  # problems listed before "... and N more"


class Problems(Exception):
    """Everything wrong with the input; the message lists it."""


def image_files(folder: Path) -> dict[str, Path]:
    """``{id: path}`` of the images below ``folder`` (see the module doc for ids)."""
    found, clashes = {}, []
    for path in sorted(folder.rglob("*")):
        if path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file():
            continue
        rel = path.relative_to(folder).with_suffix("").as_posix()
        name = rel.replace("/", "__").replace(" ", "_")
        if name in found:
            clashes.append(f"{found[name]} and {path} both become id {name!r}")
        found[name] = path
    if clashes:
        raise Problems("\n".join(clashes))
    return found


def _split_tags(text: str) -> list[str]:
    return [t.strip() for t in re.split(r"[;|]", text) if t.strip()]


def read_tags(path: Path) -> dict[str, list[str]]:
    """``{image name as written: [tags]}`` from a CSV or JSON tags file."""
    if not path.is_file():
        raise Problems(f"{path}: tags file not found")
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise Problems(f"{path}: not JSON ({err})") from None
        if not isinstance(data, dict) or not all(
                isinstance(v, list) and all(isinstance(t, str) for t in v) for v in data.values()):
            raise Problems(f'{path}: expected {{"image": ["tag", ...], ...}}')
        return {str(k): [t.strip() for t in v if t.strip()] for k, v in data.items()}
    rows = list(csv.DictReader(text.splitlines()))
    if not rows or not {"image", "tags"} <= set(rows[0]):
        raise Problems(f"{path}: expected a CSV file with the columns 'image' and 'tags'")
    tags, repeated = {}, []
    for row in rows:
        name = (row["image"] or "").strip()
        if name in tags:
            repeated.append(name)
        tags[name] = _split_tags(row["tags"] or "")
    if repeated:
        raise Problems(f"{path}: images listed twice: {', '.join(repeated[:5])}")
    return tags


def match_tags(tags: dict[str, list[str]], images: dict[str, Path], folder: Path, source: Path,
               skip_untagged: bool) -> tuple[dict[str, list[str]], list[str]]:
    """``{id: [tags]}`` for the images, and the problems: tags of no image, images without tags."""
    by_key = {}
    for name, path in images.items():
        rel = path.relative_to(folder).as_posix()
        for key in (rel, str(Path(rel).with_suffix("")), name):
            by_key.setdefault(key, name)
    matched, problems = {}, []
    for key, image_tags in tags.items():
        name = by_key.get(key) or by_key.get(key.lstrip("./"))
        if name is None:
            problems.append(f"{source}: {key!r} names no image in {folder}")
        elif name in matched:
            problems.append(f"{source}: {key!r} tags image {name!r} a second time")
        else:
            matched[name] = image_tags
    for name in sorted(images):
        if not matched.get(name):
            if skip_untagged:
                matched.pop(name, None)
                continue
            problems.append(f"{images[name]}: no tags (tag it in {source.name}, or pass "
                            "--skip-untagged to leave it out)")
    return matched, problems


def class_list(tagged: dict[str, list[str]], classes_file: Path | None) -> tuple[list[str],
                                                                                 list[str]]:
    """The class names (background first) and the problems with the tags against them."""
    used = Counter(t for tags in tagged.values() for t in set(tags))
    if "background" in used:
        return [], ["'background' is not a tag: it is every pixel no tag covers"]
    if classes_file is None:
        return ["background", *sorted(used)], []
    if not classes_file.is_file():
        return [], [f"{classes_file}: class list not found"]
    names = read_class_list(classes_file)
    problems = [f"{classes_file}: {name!r} is listed twice" for name, n in Counter(names).items()
                if n > 1]
    unknown = sorted(set(used) - set(names))
    if unknown:
        problems.append(f"tags not in {classes_file}: {', '.join(unknown)}")
    empty = [n for n in names[1:] if n not in used]
    if empty:
        problems.append(f"classes of {classes_file} that no image has: {', '.join(empty)}")
    return names, problems


def find_masks(folder: Path | None, images: dict[str, Path], image_folder: Path) -> dict[str, Path]:
    """``{id: mask path}`` of the images that have a mask in ``folder``."""
    if folder is None:
        return {}
    if not folder.is_dir():
        raise Problems(f"{folder}: mask folder not found")
    masks = {}
    for name, path in images.items():
        candidate = folder / path.relative_to(image_folder).with_suffix(".png")
        if candidate.is_file():
            masks[name] = candidate
    return masks


def check_files(tagged: dict[str, list[str]], images: dict[str, Path], masks: dict[str, Path],
                num_classes: int) -> list[str]:
    """Decode every image and mask; the problems, one line each."""
    problems = []
    for name in tqdm(sorted(tagged), desc="decoding", disable=not sys.stderr.isatty()):
        try:
            height, width = read_image(images[name]).shape[:2]
            if name in masks:
                mask = read_mask(masks[name], num_classes, IGNORE_INDEX)
                if mask.shape != (height, width):
                    problems.append(f"{masks[name]}: mask size {mask.shape[::-1]} differs from "
                                    f"its image's {(width, height)} ({images[name]})")
        except DataError as err:
            problems.append(str(err))
    return problems


def split(names: list[str], masks: dict[str, Path], val_list: Path | None, fraction: float,
          seed: int) -> tuple[list[str], list[str]]:
    """The train and val ids (see the module doc)."""
    if val_list is not None:
        if not val_list.is_file():
            raise Problems(f"{val_list}: val list not found")
        wanted = [line.strip() for line in val_list.read_text().splitlines() if line.strip()]
        ids = {Path(w).with_suffix("").as_posix().replace("/", "__").replace(" ", "_")
               for w in wanted}
        unknown = sorted(ids - set(names))
        if unknown:
            raise Problems(f"{val_list}: names no tagged image: {', '.join(unknown[:5])}")
        val = sorted(ids)
    else:
        rng = random.Random(seed)
        masked = sorted(n for n in names if n in masks)
        plain = sorted(n for n in names if n not in masks)
        rng.shuffle(masked)
        rng.shuffle(plain)
        count = max(1, round(fraction * len(names)))
        val = sorted((masked + plain)[:count])
    train = sorted(set(names) - set(val))
    if not train:
        raise Problems("no image is left for training: lower --val-fraction or shorten "
                       "--val-list")
    return train, val


def _check_out(out: Path) -> None:
    """``out`` may be new, empty, or this tool's earlier output (nothing else is overwritten)."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    record = out / "prepare.json"
    try:
        ours = json.loads(record.read_text()).get("tool") == MARK
    except (OSError, ValueError, AttributeError):
        ours = False
    if not ours:
        raise Problems(f"{out} exists and was not made by prepare_tags.py: choose a new --out "
                       "(nothing in it was touched)")
    # Its image and mask folders are replaced: they must hold only what this tool put there.
    ids = set()
    for listed in ("train.txt", "val.txt"):
        if (out / listed).is_file():
            ids.update(line.strip() for line in (out / listed).read_text().splitlines())
    for sub, suffix in (("JPEGImages", ".jpg"), ("SegmentationClass", ".png")):
        folder = out / sub
        for entry in sorted(folder.iterdir()) if folder.is_dir() else ():
            if entry.suffix != suffix or entry.stem not in ids or entry.is_dir():
                raise Problems(f"{entry} was not written by prepare_tags.py: move it out of {out} "
                               "or choose a new --out (nothing in it was touched)")


def write(out: Path, images: dict[str, Path], masks: dict[str, Path], tagged: dict[str, list],
          names: list[str], train: list[str], val: list[str], copy: bool, record: dict) -> None:
    for sub in ("JPEGImages", "SegmentationClass"):  # this tool's own earlier output
        shutil.rmtree(out / sub, ignore_errors=True)
    place = shutil.copyfile if copy else (lambda src, dst: os.symlink(os.path.abspath(src), dst))
    for folder, files, suffix in (("JPEGImages", images, ".jpg"),
                                  ("SegmentationClass", masks, ".png")):
        (out / folder).mkdir(parents=True, exist_ok=True)
        for name in train + val:
            if name in files:
                place(files[name], out / folder / f"{name}{suffix}")
    index = {n: i for i, n in enumerate(names)}
    labels = {n: sorted({index[t] for t in tagged[n]}) for n in train + val}
    texts = {"train.txt": "".join(f"{n}\n" for n in train),
             "val.txt": "".join(f"{n}\n" for n in val),
             "cls_labels.json": json.dumps(labels, indent=0) + "\n",
             CLASS_LIST_FILE: "".join(f"{n}\n" for n in names),
             "prepare.json": json.dumps(record, indent=2) + "\n"}
    for name, text in texts.items():
        write_atomic(out / name, lambda tmp, text=text: tmp.write_text(text, encoding="utf-8"))


def prepare(args: argparse.Namespace) -> dict:
    """Check everything, then write ``args.out``; returns the record (counts per class)."""
    folder, out = Path(args.images), Path(args.out)
    if not folder.is_dir():
        raise Problems(f"{folder}: image folder not found")
    _check_out(out)
    images = image_files(folder)
    if not images:
        raise Problems(f"{folder}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    tagged, problems = match_tags(read_tags(Path(args.tags)), images, folder, Path(args.tags),
                                  args.skip_untagged)
    names, more = class_list(tagged, Path(args.classes) if args.classes else None)
    problems += more
    masks = find_masks(Path(args.masks) if args.masks else None, images, folder)
    if not problems:
        problems += check_files(tagged, images, masks, len(names))
    if problems:
        shown = problems[:MAX_SHOWN]
        more = len(problems) - len(shown)
        raise Problems("\n".join(shown) + (f"\n... and {more} more" if more else ""))
    train, val = split(sorted(tagged), masks, Path(args.val_list) if args.val_list else None,
                       args.val_fraction, args.seed)
    counts = {split_name: {c: sum(c in tagged[n] for n in ids) for c in names[1:]}
              for split_name, ids in (("train", train), ("val", val))}
    record = {"tool": MARK, "images": str(folder.resolve()), "tags": str(Path(args.tags).resolve()),
              "masks": str(Path(args.masks).resolve()) if args.masks else None,
              "classes": names, "train": len(train), "val": len(val),
              "val_with_mask": sum(n in masks for n in val), "seed": args.seed,
              "images_per_class": counts}
    write(out, images, masks, tagged, names, train, val, args.copy, record)
    return record


def parse_args(argv=None) -> argparse.Namespace:
    doc = __doc__.split("\n\n")
    parser = argparse.ArgumentParser(description=doc[0], epilog="\n\n".join(doc[1:]),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", required=True, help="the folder of your images")
    parser.add_argument("--tags", required=True, help="CSV (image,tags) or JSON {image: [tags]}")
    parser.add_argument("--out", required=True, help="where the prepared set goes")
    parser.add_argument("--classes", help="class names, one per line (default: from the tags)")
    parser.add_argument("--masks", help="folder of class-index PNG masks for some images")
    parser.add_argument("--val-list", help="image names of the validation split, one per line")
    parser.add_argument("--val-fraction", type=float, default=0.2,
                        help="share of the images for validation without --val-list (0.2)")
    parser.add_argument("--seed", type=int, default=0, help="of the split without --val-list")
    parser.add_argument("--copy", action="store_true", help="copy the files instead of linking")
    parser.add_argument("--skip-untagged", action="store_true",
                        help="leave images without tags out instead of stopping")
    args = parser.parse_args(argv)
    if not 0 < args.val_fraction < 1:
        parser.error(f"--val-fraction must be between 0 and 1, got {args.val_fraction}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        record = prepare(args)
    except Problems as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    width = max(len(c) for c in record["classes"])
    print(f"{args.out}: {record['train']} train and {record['val']} val images "
          f"({record['val_with_mask']} of them with a mask), {len(record['classes']) - 1} "
          "classes; images per class:")
    for name in record["classes"][1:]:
        print(f"  {name:<{width}}  train {record['images_per_class']['train'][name]:5d}  "
              f"val {record['images_per_class']['val'][name]:5d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
