"""Reading and writing images, class-index label PNGs, and the class names of a set or a run.

Label maps are stored as palette ("P" mode) PNGs whose pixel *indices* are the class ids
(0 = background, 255 = ignore) and whose palette is the VOC colour map, so the files are both
machine-readable and viewable. Reading returns the indices, never the colours.

The tools that read saved outputs (``tools/eval_miou.py``, ``tools/visualize.py``,
``tools/make_video.py``) name the classes of an index by one of (:func:`class_names_from`):

    voc, coco, demo     a built-in set (``afa.constants.CLASS_NAME_SETS``)
    classes.txt         a text file, one name per line, background first (the file
                        ``tools/prepare_tags.py`` writes for a set of one's own;
                        :func:`read_class_names`)
    out/seg             an ``--out-dir`` of ``tools/infer_seg.py`` or ``tools/infer_cam.py``: the
                        classes of the ``config.yaml`` that run saved (:func:`run_class_names`)
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from PIL import Image

from afa.config import read_class_list
from afa.constants import CLASS_NAME_SETS, color_palette
from afa.data.voc import DataError, read_image  # one reader of images: RGB, errors name the file

__all__ = ["RUN_CONFIG", "class_names_from", "read_class_names", "read_image", "read_label_png",
           "run_class_names", "run_dir_class_names", "write_label_png", "write_rgb_png"]

RUN_CONFIG = "config.yaml"  # what the inference tools write into their --out-dir


def _checked_names(names: list[str], source: str) -> list[str]:
    """``names`` with "background" in front where it is not (as a custom set's class list is
    read for training), refused when nothing follows it or a name repeats."""
    if names[:1] != ["background"]:
        names = ["background", *names]
    if len(names) < 2:
        raise DataError(f"{source}: no class names (one per line, background first)")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise DataError(f"{source}: class names must be distinct; repeated: "
                        f"{', '.join(map(repr, repeated))}")
    return names


def read_class_names(path: str | os.PathLike) -> list[str]:
    """The class names of a text file, one per line (blank lines and surrounding spaces
    ignored), background first; a file that does not start with "background" gets it in front,
    so that class i is the i-th line of a list of objects, as for training."""
    try:
        names = read_class_list(path)  # the reading training uses, checked here
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not a UTF-8 text file of class names ({err.reason})") from None
    return _checked_names(names, str(path))


def run_class_names(directory: str | os.PathLike) -> list[str] | None:
    """The class names of the run whose ``--out-dir`` is ``directory`` (from the
    ``config.yaml`` the inference tools write there), or None when it holds no such file.

    A custom set's config holds its names in ``data.classes``; a built-in one names its set in
    ``data.name``.
    """
    path = Path(directory) / RUN_CONFIG
    if not path.is_file():
        return None
    try:
        saved = OmegaConf.to_container(OmegaConf.load(path))
    except (yaml.YAMLError, OmegaConfBaseException) as err:
        raise DataError(f"{path}: not a config saved by the inference tools "
                        f"({str(err).splitlines()[0]})") from None
    data = saved.get("data") if isinstance(saved, dict) else None
    if not isinstance(data, dict):
        raise DataError(f"{path}: no 'data' section; not a config saved by the inference tools")
    if data.get("classes"):
        return _checked_names([str(n) for n in data["classes"]], f"{path} data.classes")
    name = data.get("name")
    if name not in CLASS_NAME_SETS:
        raise DataError(f"{path}: data.name={name!r} names no built-in class set "
                        f"({', '.join(CLASS_NAME_SETS)}) and data.classes is not set")
    return list(CLASS_NAME_SETS[name])


def run_dir_class_names(dirs: Iterable[str | os.PathLike | None]) -> list[str] | None:
    """The class names of the runs these output folders belong to: each folder's own
    ``config.yaml``, else its parent's (``<out-dir>/pred`` of infer_seg, ``<out-dir>/refined``
    or ``cam`` of infer_cam); None when none of them has one. Runs that name other classes are
    refused: their indices would mean other things."""
    found: dict[Path, list[str]] = {}
    for directory in dirs:
        if directory is None:
            continue
        for candidate in (Path(directory), Path(directory).parent):
            names = run_class_names(candidate)
            if names is not None:
                found[candidate / RUN_CONFIG] = names
                break
    if not found:
        return None
    (first_path, first), *rest = found.items()
    for path, names in rest:
        if names != first:
            raise DataError(f"{first_path} and {path} name different classes "
                            f"({len(first)} and {len(names)}): outputs of runs with other "
                            "configs?")
    return first


def class_names_from(value: str) -> list[str]:
    """The class names a tool's ``--class-names VALUE`` means (module docstring): a built-in
    set's name, a text file of names, or an inference tool's ``--out-dir``."""
    if value in CLASS_NAME_SETS:
        return list(CLASS_NAME_SETS[value])
    path = Path(value)
    if path.is_file():
        return read_class_names(path)
    if path.is_dir():
        names = run_class_names(path)
        if names is None:
            raise DataError(f"{path}: a folder without {RUN_CONFIG}; --class-names takes an "
                            "--out-dir of tools/infer_seg.py or tools/infer_cam.py")
        return names
    raise FileNotFoundError(f"--class-names {value}: neither a built-in set "
                            f"({', '.join(CLASS_NAME_SETS)}) nor an existing file or folder")


def read_label_png(path: str | Path) -> np.ndarray:
    """The class indices of a palette or greyscale label PNG as ``(H, W)`` uint8.

    Raises ``ValueError`` for colour (RGB/RGBA) PNGs, whose colours cannot be read as class ids.
    """
    with Image.open(path) as image:
        if image.mode not in ("P", "L"):
            raise ValueError(
                f"{path}: label PNG has mode {image.mode!r}; expected a palette ('P') or "
                f"greyscale ('L') PNG holding class indices, not a colour rendering"
            )
        return np.array(image, dtype=np.uint8)


def write_label_png(path: str | Path, label: np.ndarray) -> None:
    """Save an ``(H, W)`` integer label map (values 0..255) as a VOC-palette PNG."""
    label = np.asarray(label)
    if label.ndim != 2:
        raise ValueError(f"label map must be (H, W), got shape {label.shape}")
    if label.size and (label.min() < 0 or label.max() > 255):
        raise ValueError(
            f"label values must lie in [0, 255] to fit a palette PNG, got "
            f"[{label.min()}, {label.max()}]"
        )
    image = Image.fromarray(label.astype(np.uint8))  # mode "L"; putpalette makes it "P"
    image.putpalette(color_palette(256).reshape(-1).tolist())
    image.save(path)


def write_rgb_png(path: str | Path, image: np.ndarray) -> None:
    """Save an ``(H, W, 3)`` uint8 RGB array as PNG."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected (H, W, 3) uint8, got shape {image.shape} dtype {image.dtype}")
    Image.fromarray(image).save(path)
