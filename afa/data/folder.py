"""A folder or glob of images (photos, video frames) as the input of the inference tools.

``tools/infer_seg.py``, ``tools/infer_cam.py`` and ``tools/make_video.py`` take ``--images
SOURCE`` instead of a VOC-style split: :class:`ImageFolder` offers the readers of
:class:`afa.inference.ImageSet` (``names``, ``image``, ``has_mask``) over such a source, so the
tools run the same pipeline on it; there are no masks (nothing is scored) and no image-level
labels.

``SOURCE`` is one of

    frames/                 the ``.jpg``/``.jpeg``/``.png`` files directly in the folder
    photo.jpg               one image
    'shots/*.png'           a glob pattern (quote it so that the shell leaves it alone)
    'trip/**/*.jpg'         a recursive glob: ``**`` matches any number of folders

An image's id (its output files are ``<id>.png``) is its path relative to the part of the pattern
before the first wildcard (the folder itself for a folder), without the suffix: the file stem for
a folder or ``dir/*.jpg``, ``day1/beach`` for ``trip/day1/beach.jpg`` under ``trip/**/*.jpg``. Two
files with one id (``a.jpg`` and ``a.png``) are an error. Hidden files are left out; suffixes are
matched in any case (``.JPG``).

Ids are sorted by name with digit runs compared as numbers (``frame2`` before ``frame10``), so
that the frames of a video keep their order whether or not their numbers are zero-padded.

Images are read as 8-bit RGB whatever their mode and turned upright by their EXIF orientation,
as image viewers show them (:func:`afa.data.read_image`: greyscale in all three channels, 16-bit
images by their high byte ``x >> 8``, alpha dropped, the colours under transparent pixels kept).
An unreadable file, one whose pixels have no known range (floating point), or one larger than
``afa.data.voc.MAX_IMAGE_PIXELS`` (179 megapixels; the environment variable
``AFA_MAX_IMAGE_PIXELS`` lifts it) raises :class:`afa.data.DataError` naming it when it is read;
a source without images raises it at once.
"""

from __future__ import annotations

import glob
import os
import re
from pathlib import Path

import numpy as np

from afa.data.voc import DataError, read_image

__all__ = ["IMAGE_SUFFIXES", "ImageFolder", "natural_key"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_SUFFIXES_TEXT = "/".join(IMAGE_SUFFIXES)
_MAGIC = re.compile(r"[*?[]")


def natural_key(text: str) -> tuple:
    """Sort key comparing digit runs as numbers: ``frame2`` < ``frame10`` (ties: the text)."""
    parts = re.split(r"(\d+)", text)
    return tuple(int(p) if i % 2 else p for i, p in enumerate(parts)), text


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def _glob_base(pattern: str) -> Path:
    """The folders of ``pattern`` before its first wildcard (``a/b/*/c.jpg`` -> ``a/b``)."""
    parts = Path(pattern).parts
    fixed = []
    for part in parts[:-1]:
        if _MAGIC.search(part):
            break
        fixed.append(part)
    return Path(*fixed) if fixed else Path(".")


def _find(source: str) -> tuple[list[Path], Path]:
    """The image files of ``source`` and the folder their ids are relative to."""
    path = Path(source)
    if path.is_dir():
        files = [p for p in path.iterdir() if p.is_file() and _is_image(p)]
        if not files:
            others = sum(1 for p in path.iterdir() if p.is_file())
            raise DataError(f"{source}: no {_SUFFIXES_TEXT} images in this folder"
                            + (f" (it holds {others} other files)" if others else " (it is empty)"))
        return files, path
    if path.is_file():
        if not _is_image(path):
            raise DataError(f"{source}: not a {_SUFFIXES_TEXT} image")
        return [path], path.parent
    if not _MAGIC.search(source):
        raise DataError(f"{source}: no such folder or image file (nor a glob pattern)")
    matches = [Path(p) for p in glob.glob(source, recursive=True)]
    files = [p for p in matches if p.is_file() and _is_image(p)]
    if not files:
        detail = (f"{len(matches)} paths, none of them a {_SUFFIXES_TEXT} file" if matches
                  else "nothing")
        raise DataError(f"{source}: the pattern matches {detail}")
    return files, _glob_base(source)


class ImageFolder:
    """The images of a folder, a glob pattern or one file, by id (see the module docstring).

    Args:
        source: a folder, an image file, or a glob pattern (``**`` recurses).

    Attributes:
        source: ``source`` as given.
        names: the ids, sorted by :func:`natural_key`.
    """

    def __init__(self, source: str | os.PathLike):
        self.source = str(source)
        files, base = _find(self.source)
        paths: dict[str, Path] = {}
        for file in files:
            name = file.relative_to(base).with_suffix("").as_posix()
            if name in paths:
                raise DataError(f"{self.source}: two images have the id {name!r} "
                                f"({paths[name]} and {file}); rename one of them")
            paths[name] = file
        self.names = sorted(paths, key=natural_key)
        self._paths = paths

    def __len__(self) -> int:
        return len(self.names)

    def image_path(self, name: str) -> Path:
        return self._paths[name]

    def image(self, name: str) -> np.ndarray:
        """(H, W, 3) uint8 RGB, upright; :class:`DataError` naming the file when unreadable."""
        return read_image(self._paths[name], exif_transpose=True)

    def has_mask(self, name: str) -> bool:
        return False

    def __repr__(self) -> str:
        return f"ImageFolder({self.source!r}, {len(self.names)} images)"
