"""Side-by-side pictures of saved outputs: image | CAMs | pseudo label | prediction | ground truth.

Reads, for every id of a name list, ``<image-dir>/<id>.jpg`` (or ``.png``/``.jpeg``) and whichever
of these directories are given: ``--cam-dir`` (``<id>.npy``, float ``(C, h, w)`` CAMs in [0, 1];
with ``C = num_classes - 1`` channel ``c`` is class ``c + 1``, with ``C = num_classes`` it is class
``c``), ``--pseudo-dir``, ``--pred-dir`` and ``--gt-dir`` (``<id>.png`` class-index PNGs). Writes
one PNG per id, ``<out-dir>/<id>.png``: the panels side by side, each titled, and below them a
legend naming, beside a swatch of its colour, every class the label maps show (background and
ignore included).

The class names (``--class-names``): a built-in set (``voc``, ``coco``, ``demo``), a text file
with one name per line, background first (``classes.txt`` of ``tools/prepare_tags.py``), or an
``--out-dir`` of ``tools/infer_seg.py`` / ``tools/infer_cam.py`` (the classes of its
``config.yaml``). Without it, the run that wrote ``--cam-dir``, ``--pseudo-dir`` or ``--pred-dir``
(``out/cam/cam``, ``out/cam/refined``, ``out/seg/pred``) names them, else ``voc``.

Run::

    python tools/visualize.py \\
        --list data/VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt \\
        --image-dir data/VOCdevkit/VOC2012/JPEGImages \\
        --pred-dir work_dirs/voc/pred_val \\
        --gt-dir data/VOCdevkit/VOC2012/SegmentationClassAug \\
        --out-dir work_dirs/voc/vis_val --limit 50
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from afa.constants import CLASS_NAME_SETS
from afa.io import (class_names_from, read_image, read_label_png, run_dir_class_names,
                    write_rgb_png)
from afa.viz import visualize_sample

__all__ = ["load_cams", "render", "resolve_class_names", "main"]

IMAGE_SUFFIXES = (".jpg", ".png", ".jpeg")


def _find_image(image_dir: Path, image_id: str) -> Path:
    for suffix in IMAGE_SUFFIXES:
        path = image_dir / f"{image_id}{suffix}"
        if path.is_file():
            return path
    raise FileNotFoundError(f"no image {image_dir / image_id}{{{','.join(IMAGE_SUFFIXES)}}}")


def _label(directory: Path | None, image_id: str) -> np.ndarray | None:
    if directory is None:
        return None
    path = directory / f"{image_id}.png"
    if not path.is_file():
        raise FileNotFoundError(f"missing label PNG {path}")
    return read_label_png(path)


def load_cams(
    cam_dir: Path | None, image_id: str, class_names: Sequence[str], max_cams: int
) -> tuple[list[np.ndarray] | None, list[str] | None]:
    """The ``max_cams`` CAMs with the highest peaks (all-zero maps skipped), with class names."""
    if cam_dir is None:
        return None, None
    path = cam_dir / f"{image_id}.npy"
    if not path.is_file():
        raise FileNotFoundError(f"missing CAM file {path}")
    cams = np.load(path)
    num_classes = len(class_names)
    if cams.ndim != 3 or cams.shape[0] not in (num_classes - 1, num_classes):
        raise ValueError(
            f"{path}: expected (C, h, w) CAMs with C = {num_classes - 1} or {num_classes}, "
            f"got shape {cams.shape}"
        )
    first_class = 1 if cams.shape[0] == num_classes - 1 else 0
    peaks = cams.reshape(cams.shape[0], -1).max(axis=1)
    order = [c for c in np.argsort(-peaks, kind="stable")[:max_cams] if peaks[c] > 0]
    return [cams[c] for c in order], [class_names[c + first_class] for c in order]


def render(
    image_id: str,
    image_dir: Path,
    *,
    class_names: Sequence[str],
    cam_dir: Path | None = None,
    pseudo_dir: Path | None = None,
    pred_dir: Path | None = None,
    gt_dir: Path | None = None,
    max_cams: int = 3,
) -> np.ndarray:
    """The ``(H, W, 3)`` uint8 picture of one id (see the module docstring for the inputs),
    with the legend of the classes its label maps show below."""
    cams, cam_titles = load_cams(cam_dir, image_id, class_names, max_cams)
    return visualize_sample(
        read_image(_find_image(image_dir, image_id)),
        cams=cams,
        cam_titles=cam_titles,
        pseudo_label=_label(pseudo_dir, image_id),
        pred=_label(pred_dir, image_id),
        gt=_label(gt_dir, image_id),
        class_names=class_names,
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--list", required=True, help="name list, one image id per line")
    parser.add_argument("--image-dir", required=True, type=Path,
                        help="folder of the <id>.jpg images")
    parser.add_argument("--out-dir", required=True, type=Path,
                        help="where the <id>.png grids go")
    parser.add_argument("--cam-dir", type=Path, help="<id>.npy CAMs (C, h, w)")
    parser.add_argument("--pseudo-dir", type=Path, help="<id>.png pseudo labels")
    parser.add_argument("--pred-dir", type=Path, help="<id>.png predictions")
    parser.add_argument("--gt-dir", type=Path, help="<id>.png ground truth")
    parser.add_argument("--class-names", metavar="SET|FILE|RUN_DIR",
                        help=f"class names: {', '.join(CLASS_NAME_SETS)}; a text file, one name "
                             "per line, background first (prepare_tags' classes.txt); or an "
                             "--out-dir of infer_seg / infer_cam (its config.yaml). Default: the "
                             "run that wrote the given folders, else voc")
    parser.add_argument("--max-cams", type=int, default=3, help="CAMs shown per image")
    parser.add_argument("--limit", type=int, help="only the first LIMIT ids")
    args = parser.parse_args(argv)
    if not any((args.cam_dir, args.pseudo_dir, args.pred_dir, args.gt_dir)):
        parser.error("give at least one of --cam-dir, --pseudo-dir, --pred-dir, --gt-dir")
    return args


def resolve_class_names(args: argparse.Namespace) -> list[str]:
    """The names ``--class-names`` gives, else those of the run that wrote the output folders,
    else VOC's."""
    if args.class_names is not None:
        return class_names_from(args.class_names)
    names = run_dir_class_names([args.cam_dir, args.pseudo_dir, args.pred_dir])
    return names if names is not None else list(CLASS_NAME_SETS["voc"])


def main(argv: Sequence[str] | None = None) -> list[Path]:
    """Write the pictures; returns their paths. Missing or malformed inputs exit with a message."""
    args = parse_args(argv)
    ids = [line.split()[0] for line in Path(args.list).read_text().splitlines() if line.strip()]
    ids = ids[: args.limit]
    written = []
    try:
        names = resolve_class_names(args)
        args.out_dir.mkdir(parents=True, exist_ok=True)
        for image_id in tqdm(ids, desc="visualize"):
            picture = render(
                image_id,
                args.image_dir,
                class_names=names,
                cam_dir=args.cam_dir,
                pseudo_dir=args.pseudo_dir,
                pred_dir=args.pred_dir,
                gt_dir=args.gt_dir,
                max_cams=args.max_cams,
            )
            out = args.out_dir / f"{image_id}.png"
            write_rgb_png(out, picture)
            written.append(out)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"visualize: error: {err}") from err
    return written


if __name__ == "__main__":
    main()
