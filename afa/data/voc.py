"""The VOC-style dataset: PASCAL VOC 2012 (+SBD), COCO converted to VOC layout, and the demo set.

Layout read (``split=None``, VOC and the demo set)::

    root/JPEGImages/<id>.jpg        root/<mask_dir>/<id>.png        (mask_dir: SegmentationClassAug)

and with ``split="train"`` (COCO after ``tools/prepare_coco.py``)::

    root/JPEGImages/train/<id>.jpg  root/<mask_dir>/train/<id>.png  (mask_dir: SegmentationClass)

Which ids to use comes from a *name list* (one id per line) and image-level labels from a *label
file* (JSON ``{id: sorted list of class indices in 1..C-1}``); ``tools/prepare_voc.py``,
``tools/prepare_coco.py`` and ``tools/make_demo_data.py`` write both. Masks are PNGs of class
indices (palette index values, not colours): 0 background, 1..C-1 objects, 255 ignore.

Three modes of :class:`VOCStyleDataset`, each returning a dict (batched by the default collate):

- ``mode="cls"`` (classification training, masks never read):
  ``name`` str, ``image`` (3, h, w) float32 normalised, ``label`` (C-1,) float32 multi-hot,
  ``box`` (4,) int64.
- ``mode="seg"`` (segmentation evaluation): the same keys plus ``mask`` (h, w) int64. ``label``
  comes from the label file when one is given, otherwise from the classes present in the mask.
- ``mode="infer"`` (the inference tools; ``afa.inference.ImageSet`` is this mode): only the images
  are required. An id's ``mask`` is there when its mask file exists, its ``label`` when the label
  file lists it or the mask exists (the VOC ``test`` split has neither). The tools mostly use the
  per-id readers :meth:`~VOCStyleDataset.image`, :meth:`~VOCStyleDataset.mask`,
  :meth:`~VOCStyleDataset.has_mask` and :meth:`~VOCStyleDataset.classes`, which every mode shares.

``box = (y0, y1, x0, x1)``: ``image[:, y0:y1, x0:x1]`` is image content, the rest is zero padding
added by the random crop (the whole image when there is no crop). Pseudo labels are set to ignore
outside it.

Bad input raises :class:`DataError` naming the file and the problem. With ``skip_bad=True`` the
dataset instead warns, leaves bad ids out (recorded in ``dataset.skipped``), and at load time in
``cls`` mode replaces an undecodable sample by the next one (counted in ``dataset.load_failures``
and named in the sample's ``skipped`` entry); in ``seg`` mode a bad sample still raises, for the
caller to leave out (validation must not score a replacement twice).

Randomness: ``dataset[i]`` draws the sample's augmentation generator from torch's RNG, which the
DataLoader seeds per worker from its ``generator``; :func:`make_loader` wires this up so that a run
is repeatable (and :func:`seed_worker` also seeds ``numpy``/``random`` for any other code in a
worker). ``dataset.load(i, rng)`` takes the generator explicitly, for samplers that derive a seed
per sample (resumable data order).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import threading
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset, Sampler

from afa.atomic import write_atomic
from afa.constants import IGNORE_INDEX, color_palette
from afa.data.transforms import Augment, normalize

__all__ = [
    "DataError",
    "MAX_IMAGE_PIXELS",
    "MAX_IMAGE_PIXELS_ENV",
    "read_image",
    "read_mask",
    "write_mask",
    "labels_from_mask",
    "read_name_list",
    "write_name_list",
    "read_label_file",
    "write_label_file",
    "VOCStyleDataset",
    "seed_worker",
    "make_generator",
    "make_loader",
]

# Mask PNG modes that store class indices directly (palette, 8-bit grey, 16/32-bit grey).
_INDEX_MODES = ("P", "L", "I", "I;16")
_PALETTE = color_palette(256).ravel().tolist()


class DataError(ValueError):
    """A dataset file is missing, unreadable or inconsistent; the message names the file."""


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


# The largest image read_image decodes, in pixels: PIL's own refusal threshold (twice its
# Image.MAX_IMAGE_PIXELS default of 89,478,485), so that every image PIL read before is still
# read. A larger size in a header is refused before decoding, naming the file, its size and the
# environment variable that lifts the limit: a few kilobytes of PNG can claim gigapixels, and
# inference then holds (classes x H x W) float32 logits as well.
MAX_IMAGE_PIXELS = 178_956_970
MAX_IMAGE_PIXELS_ENV = "AFA_MAX_IMAGE_PIXELS"  # a pixel count; 0 reads images of any size

# PIL's own check reads a module global when a file is opened; it is switched off for the open
# (read_image checks the size itself), and the lock keeps two threads of this process from
# restoring it under each other.
_PIL_LIMIT_LOCK = threading.Lock()


def _max_image_pixels(path) -> int | None:
    """The pixel limit in force (None: none), from :data:`MAX_IMAGE_PIXELS_ENV` if set."""
    text = os.environ.get(MAX_IMAGE_PIXELS_ENV, "").strip()
    if not text:
        return MAX_IMAGE_PIXELS
    try:
        limit = int(text.replace("_", ""))
    except ValueError:
        limit = -1
    if limit < 0:
        raise DataError(f"{path}: {MAX_IMAGE_PIXELS_ENV}={text!r} is not a pixel count (a whole "
                        "number; 0 for no limit)")
    return limit or None


@contextlib.contextmanager
def _pil_size_check_off():
    with _PIL_LIMIT_LOCK:
        saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _grey16_to_rgb(values: np.ndarray) -> np.ndarray:
    """16-bit intensities -> (H, W, 3) uint8: the high byte (``x >> 8``), which is what PIL
    keeps of 16-bit colour PNGs, so a grey and a colour 16-bit image read alike."""
    grey = (values.astype(np.uint32) >> 8).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=2)


def _to_rgb(img: Image.Image, file_format: str | None, path) -> np.ndarray:
    """(H, W, 3) uint8 RGB of a decoded image of any mode, or DataError where there is no
    right answer (see :func:`read_image`); ``file_format``: PIL's name of the file's format."""
    mode = img.mode
    if mode.startswith("I;16"):  # 16-bit greyscale (PNG, TIFF): PIL's convert clips it at 255
        return _grey16_to_rgb(np.asarray(img))
    if mode == "I":  # 32-bit integers: how PIL before 10 opens a 16-bit greyscale PNG
        values = np.asarray(img)
        if file_format != "PNG":
            raise DataError(f"{path}: {file_format or 'image'} of 32-bit integer pixels (mode "
                            "I), whose range cannot be known; save it as an 8- or 16-bit image")
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise DataError(f"{path}: mode I pixel values span {values.min()}..{values.max()}, "
                            "beyond the 16 bits of a PNG")
        return _grey16_to_rgb(values)
    if mode == "F":
        raise DataError(f"{path}: floating-point pixels (mode F) have no fixed range to map to "
                        "0..255; save it as an 8- or 16-bit image")
    if mode in ("P", "PA") or "transparency" in img.info:
        # Through RGBA: PIL warns when it drops a palette's transparency on the way to RGB.
        return np.ascontiguousarray(np.asarray(img.convert("RGBA"))[..., :3])
    return np.asarray(img.convert("RGB"))


def read_image(path: str | os.PathLike, exif_transpose: bool = False) -> np.ndarray:
    """Read an image as (H, W, 3) uint8 RGB, whatever its mode.

    - 8-bit and fewer bits (``1``, ``L``, ``P``, ``RGB``, ...): PIL's conversion; greyscale is
      repeated in the three channels, 1-bit pixels become 0 or 255.
    - 16-bit (greyscale ``I;16``, or ``I`` from a PNG; 16-bit colour PNGs, which PIL opens as
      ``RGB``/``RGBA``): the high byte, ``x >> 8`` (within 1 of ``round(x / 257)``).
    - Alpha (``RGBA``, ``LA``, ``PA``, a palette or colour key with transparency): dropped. The
      colours stored under transparent pixels are kept, not composited on any background.
    - ``CMYK``: PIL's conversion, without the file's ICC profile.
    - Pixels whose range cannot be known (floating-point ``F``, 32-bit ``I`` other than a PNG's)
      raise :class:`DataError` naming the file rather than being guessed at.

    An image of more than :data:`MAX_IMAGE_PIXELS` pixels (its header's size) raises
    :class:`DataError` naming the file, its size and how to lift the limit (the environment
    variable :data:`MAX_IMAGE_PIXELS_ENV`), before any decoding.

    EXIF orientation is not applied by default: dataset masks are aligned with the stored pixels.
    ``exif_transpose=True`` turns the image upright as viewers show it (photos without masks,
    :class:`afa.data.folder.ImageFolder`).

    Every image of the project is read here (splits, COCO after ``tools/prepare_coco.py``,
    folders of photos), so a file reads the same whichever way it comes in.
    """
    if not os.path.isfile(path):
        raise DataError(f"{path}: image file not found")
    limit = _max_image_pixels(path)
    try:
        with _pil_size_check_off():
            img = Image.open(path)
        with img:
            width, height = img.size
            if limit is not None and width * height > limit:
                raise DataError(
                    f"{path}: {width}x{height} image ({width * height / 1e6:.0f} megapixels) is "
                    f"larger than the limit of {limit} pixels, a guard against decompression "
                    f"bombs; set {MAX_IMAGE_PIXELS_ENV}={width * height} (0: no limit) to read it")
            img.load()
            file_format = img.format  # a transposed copy has none
            if exif_transpose:
                img = ImageOps.exif_transpose(img)
            return _to_rgb(img, file_format, path)
    except DataError:
        raise
    except (OSError, SyntaxError, ValueError) as exc:  # PIL's errors for corrupt/truncated data
        raise DataError(f"{path}: cannot decode image ({exc})") from exc


def read_mask(
    path: str | os.PathLike, num_classes: int | None = None, ignore_index: int = IGNORE_INDEX
) -> np.ndarray:
    """Read a class-index mask PNG as (H, W) uint8.

    Palette PNGs give their index values (the VOC convention), not colours. Colour (RGB/RGBA)
    masks are rejected. With ``num_classes``, values outside ``0..num_classes-1`` and
    ``ignore_index`` raise :class:`DataError`.
    """
    if not os.path.isfile(path):
        raise DataError(f"{path}: mask file not found")
    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            mask = np.asarray(img)
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path}: cannot decode mask ({exc})") from exc
    if mode not in _INDEX_MODES:
        raise DataError(f"{path}: mask has mode {mode}; expected class indices (a palette or "
                        "single-channel PNG), not colours")
    if mask.dtype != np.uint8 and mask.size and (mask.min() < 0 or mask.max() > 255):
        raise DataError(f"{path}: mask values span {mask.min()}..{mask.max()}, beyond 0..255")
    mask = mask.astype(np.uint8)
    if num_classes is not None:
        values = np.flatnonzero(np.bincount(mask.ravel()))
        bad = values[(values >= num_classes) & (values != ignore_index)]
        if bad.size:
            raise DataError(f"{path}: mask values {bad.tolist()} outside 0..{num_classes - 1} "
                            f"and {ignore_index}")
    return mask


def write_mask(path: str | os.PathLike, mask: np.ndarray) -> None:
    """Write (H, W) uint8 class indices as a VOC-palette PNG, atomically (temp file + rename)."""
    png = Image.fromarray(np.ascontiguousarray(mask, dtype=np.uint8))  # mode L
    png.putpalette(_PALETTE)
    write_atomic(path, lambda tmp: png.save(tmp, format="PNG"))


def labels_from_mask(mask: np.ndarray, num_classes: int) -> list[int]:
    """Sorted object classes present in a mask: indices in 1..num_classes-1 (no 0, no ignore)."""
    counts = np.bincount(mask.ravel().astype(np.int64), minlength=num_classes)
    return [int(c) for c in np.flatnonzero(counts[1:num_classes]) + 1]


def read_name_list(path: str | os.PathLike) -> list[str]:
    """Ids from a name list, one per line; blank lines are skipped.

    Only the first column counts, and a path in it is reduced to its stem, so the
    ``/JPEGImages/<id>.jpg /SegmentationClassAug/<id>.png`` lists that circulate for SBD also work.
    """
    if not os.path.isfile(path):
        raise DataError(f"{path}: name list not found")
    names = []
    for line in Path(path).read_text().splitlines():
        fields = line.split()
        if fields:
            names.append(Path(fields[0]).stem if "/" in fields[0] else fields[0])
    return names


def write_name_list(path: str | os.PathLike, names: list[str]) -> None:
    """Write ids one per line (parent directories are created)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("".join(f"{name}\n" for name in names))


def read_label_file(path: str | os.PathLike, num_classes: int) -> dict[str, list[int]]:
    """Read ``{id: [class indices]}`` and check every index lies in 1..num_classes-1."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: label file not found")
    try:
        labels = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not a JSON label file ({exc})") from exc
    if not isinstance(labels, dict):
        raise DataError(f"{path}: expected a JSON object {{id: [class indices]}}")
    for name, classes in labels.items():
        if not isinstance(classes, list) or not all(
            isinstance(c, int) and 1 <= c < num_classes for c in classes
        ):
            raise DataError(f"{path}: labels of {name!r} must be a list of class indices in "
                            f"1..{num_classes - 1}, got {classes!r}")
    return labels


def write_label_file(path: str | os.PathLike, labels: dict[str, list[int]]) -> None:
    """Write ``{id: sorted classes}`` as JSON, one id per line, ids sorted."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    lines = [f"{json.dumps(name)}: {json.dumps(sorted(int(c) for c in labels[name]))}"
             for name in sorted(labels)]
    Path(path).write_text("{\n" + ",\n".join(lines) + "\n}\n")


# --------------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------------


class VOCStyleDataset(Dataset):
    """Images + image-level labels (``mode="cls"``), images + masks (``mode="seg"``), or images
    with whatever masks and labels exist (``mode="infer"``).

    Args:
        root: dataset root holding ``JPEGImages`` and ``mask_dir``.
        name_list: file with one id per line.
        label_file: JSON ``{id: [classes]}``; required for ``mode="cls"``. In ``"cls"`` mode (and
            ``"seg"`` mode when given) every id must be listed; in ``"infer"`` mode an id it does
            not list takes its labels from its mask.
        num_classes: classes including background (VOC 21, COCO 81).
        split: sub-folder of ``JPEGImages`` and ``mask_dir`` (COCO layout); None for VOC.
        mask_dir: folder of the class-index PNGs.
        mode: ``"cls"``, ``"seg"`` or ``"infer"``.
        crop_size, scale_range, hflip, jitter: augmentation, see
            :class:`afa.data.transforms.Augment` (all off by default; the paper's training uses
            ``crop_size=512, scale_range=(0.5, 2.0), hflip=True``).
        skip_bad: warn and skip bad ids instead of raising.
        ignore_index: mask value that is ignored (padding fill of the mask).
    """

    MODES = ("cls", "seg", "infer")

    def __init__(
        self,
        root: str | os.PathLike,
        name_list: str | os.PathLike,
        label_file: str | os.PathLike | None,
        num_classes: int,
        *,
        split: str | None = None,
        mask_dir: str = "SegmentationClassAug",
        mode: str = "cls",
        crop_size: int | None = None,
        scale_range: tuple[float, float] | None = None,
        hflip: bool = False,
        jitter: tuple[float, float, float, float] | None = None,
        skip_bad: bool = False,
        ignore_index: int = IGNORE_INDEX,
    ):
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {self.MODES}, got {mode!r}")
        if num_classes < 2:
            raise ValueError(f"num_classes counts the background and must be >= 2, "
                             f"got {num_classes}")
        if mode == "cls" and label_file is None:
            raise ValueError("mode='cls' needs a label_file")
        self.root = Path(root)
        self.mode = mode
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.skip_bad = skip_bad
        self.augment = Augment(crop_size, scale_range, hflip, jitter, ignore_index)
        self.image_dir = self.root / "JPEGImages"
        self.mask_dir = self.root / mask_dir
        if split is not None:
            self.image_dir, self.mask_dir = self.image_dir / split, self.mask_dir / split
        if not self.image_dir.is_dir():
            raise DataError(f"{self.image_dir}: image folder not found (root={self.root})")
        if mode == "seg" and not self.mask_dir.is_dir():
            raise DataError(f"{self.mask_dir}: mask folder not found (root={self.root})")

        names = read_name_list(name_list)
        if not names:
            raise DataError(f"{name_list}: name list is empty")
        duplicates = sorted(name for name, count in Counter(names).items() if count > 1)
        if duplicates:
            raise DataError(f"{name_list}: duplicate ids {duplicates[:5]}")
        self.label_file = label_file
        self.labels = None if label_file is None else read_label_file(label_file, num_classes)

        self.skipped: list[tuple[str, str]] = []  # (id, reason) left out at construction
        self.load_failures = 0  # samples replaced at load time (this process only)
        self.names = []
        for name in names:
            problem = self._check_files(name, label_file)
            if problem is None:
                self.names.append(name)
            elif skip_bad:
                self.skipped.append((name, problem))
            else:
                raise DataError(problem)
        if self.skipped:
            shown = "; ".join(reason for _, reason in self.skipped[:5])
            warnings.warn(f"{name_list}: skipped {len(self.skipped)} of {len(names)} ids: {shown}"
                          + (" ..." if len(self.skipped) > 5 else ""), stacklevel=2)
        if not self.names:
            raise DataError(f"{name_list}: no usable ids left after skipping bad ones")

    def _check_files(self, name: str, label_file) -> str | None:
        """The problem with ``name`` that can be seen without decoding, or None."""
        if self.mode != "infer" and self.labels is not None and name not in self.labels:
            return f"{label_file}: no labels for id {name!r}"
        if not self.image_path(name).is_file():
            return f"{self.image_path(name)}: image file not found"
        if self.mode == "seg" and not self.mask_path(name).is_file():
            return f"{self.mask_path(name)}: mask file not found"
        return None

    def image_path(self, name: str) -> Path:
        return self.image_dir / f"{name}.jpg"

    def mask_path(self, name: str) -> Path:
        return self.mask_dir / f"{name}.png"

    def has_mask(self, name: str) -> bool:
        return self.mask_path(name).is_file()

    def image(self, name: str) -> np.ndarray:
        """(H, W, 3) uint8 RGB of ``name``; :class:`DataError` naming the file when it is missing
        or corrupt."""
        return read_image(self.image_path(name))

    def mask(self, name: str, shape: tuple[int, int] | None = None) -> np.ndarray:
        """(H, W) uint8 class indices of ``name``; with ``shape`` (the image's (H, W)), a mask of
        another size is a :class:`DataError`."""
        mask = read_mask(self.mask_path(name), self.num_classes, self.ignore_index)
        if shape is not None and mask.shape != tuple(shape):
            raise DataError(f"{self.mask_path(name)}: mask size {mask.shape[::-1]} differs "
                            f"from image size {tuple(shape)[::-1]} ({self.image_path(name)})")
        return mask

    def classes(self, name: str, mask: np.ndarray | None = None) -> list[int]:
        """Image-level labels (1..C-1) of ``name``: the label file's entry, else the classes of
        its mask (``mask`` when the caller has read it already); :class:`DataError` when neither
        exists."""
        if self.labels is not None and name in self.labels:
            return list(self.labels[name])
        if mask is None and self.has_mask(name):
            mask = self.mask(name)
        if mask is not None:
            return labels_from_mask(mask, self.num_classes)
        where = (f"the label file {self.label_file}" if self.labels is not None
                 else "a label file")
        raise DataError(f"no image-level labels for {name!r}: neither {where} nor a mask "
                        f"{self.mask_path(name)} has them")

    def __len__(self) -> int:
        return len(self.names)

    def multi_hot(self, classes: list[int]) -> torch.Tensor:
        """Class indices 1..C-1 -> (C-1,) float32 multi-hot (background has no entry)."""
        label = torch.zeros(self.num_classes - 1, dtype=torch.float32)
        label[[c - 1 for c in classes]] = 1.0
        return label

    def load(self, index: int, rng: np.random.Generator) -> dict:
        """Sample ``index`` augmented with ``rng`` (the entry point for custom samplers).

        With ``skip_bad`` in ``cls`` mode, a sample that fails to decode is replaced by the next
        one, with a warning, and every sample carries ``skipped``: the problems of the samples it
        replaced ("" for none), so that a trainer can count and log them across loader workers.
        In ``seg`` mode a bad sample always raises: replacing a validation image by another would
        score that one twice, so the caller leaves it out instead.
        """
        if not self.skip_bad or self.mode == "seg":
            return self._load_one(index, rng)
        problems = []
        for attempt in range(len(self.names)):
            try:
                sample = self._load_one((index + attempt) % len(self.names), rng)
            except DataError as exc:
                self.load_failures += 1
                problems.append(str(exc))
                warnings.warn(f"skipping a bad sample ({exc}); {self.load_failures} so far in "
                              "this process", stacklevel=2)
                continue
            sample["skipped"] = "\n".join(problems)
            return sample
        raise DataError(f"{self.root}: no sample of the dataset could be loaded")

    def __getitem__(self, index: int) -> dict:
        # One generator per sample, seeded from torch's RNG: the DataLoader seeds that per worker.
        return self.load(index, np.random.default_rng(int(torch.randint(0, 2**62, (1,)).item())))

    def _load_one(self, index: int, rng: np.random.Generator) -> dict:
        """Decode, check and augment one sample."""
        name = self.names[index]
        image = self.image(name)
        mask = None
        if self.mode == "seg" or (self.mode == "infer" and self.has_mask(name)):
            mask = self.mask(name, image.shape[:2])
        classes = None
        if self.mode != "infer" or mask is not None or name in (self.labels or {}):
            classes = self.classes(name, mask)
        image, mask, box = self.augment(image, mask, rng)
        sample = {"name": name, "image": normalize(image)}
        if classes is not None:
            sample["label"] = self.multi_hot(classes)
        sample["box"] = torch.from_numpy(box)
        if mask is not None:
            sample["mask"] = torch.from_numpy(mask.astype(np.int64))
        return sample

    def __repr__(self) -> str:
        return (f"VOCStyleDataset(root={str(self.root)!r}, mode={self.mode!r}, "
                f"num_classes={self.num_classes}, size={len(self)}, {self.augment})")


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: seed ``numpy`` and ``random`` from torch's per-worker seed."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def make_generator(seed: int) -> torch.Generator:
    """A seeded CPU generator for the DataLoader (shuffling and the workers' base seed)."""
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    seed: int,
    shuffle: bool = False,
    num_workers: int = 0,
    drop_last: bool = False,
    sampler: Sampler | None = None,
    pin_memory: bool = False,
) -> DataLoader:
    """A repeatable DataLoader: same ``seed`` -> same order and same augmentations.

    Under DDP pass a ``DistributedSampler`` (it shuffles; leave ``shuffle`` False) and
    ``seed + rank``, so that ranks draw different augmentations.
    """
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        sampler=sampler,
        num_workers=num_workers,
        drop_last=drop_last,
        pin_memory=pin_memory,
        worker_init_fn=seed_worker,
        generator=make_generator(seed),
        persistent_workers=num_workers > 0,
    )
