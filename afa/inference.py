"""Test-time inference: multi-scale + flip segmentation, and what the inference tools share.

The math is :func:`predict_seg_logits`, the authors' released multi-scale
test (``scripts/test_msc_flip.py`` of github.com/rulixiang/afa) step for step:

1. resize the image so that its long side is ``long_side`` (bilinear, size
   ``int(side * (long_side / max(h, w)))``, the ratio computed first as they do);
2. run it together with its horizontal flip; its (flip-averaged) logits, at stride 4, set the
   *fusion grid* (the largest scale's grid when 1.0 is not among the scales; they always run 1.0);
3. for every other scale ``s`` resize the step-1 image with
   ``F.interpolate(scale_factor=s, mode="bilinear", align_corners=False)`` (PyTorch samples at
   ``(i + 0.5) / s - 0.5`` and keeps ``floor(s * side)`` pixels), run it with its flip, resize both
   logit maps to the fusion grid (bilinear), and average the pair, the flipped one flipped back;
4. take the element-wise maximum of the raw logits (no softmax) over the scales on that grid;
5. upsample the fused logits once to the original image (bilinear) for the argmax, or for the
   softmax that the dense CRF (:mod:`afa.crf`) refines.

Their script stops on an image so long and thin that a scaled input falls below the encoder's
``min_input_side`` (29 px). Given ``min_side``, such an image is instead enlarged, aspect kept,
until every scale's input is wide enough (:func:`seg_work_size`; steps 2-4 then run at that size
with no long-side resize of their own) and its logits come back at the image's size; every other
image goes through the five steps above unchanged.

Only the segmentation logits are computed (:func:`seg_logits`): no attention maps, no affinity.

The rest serves ``tools/infer_seg.py`` and ``tools/infer_cam.py``: :class:`ImageSet` (the
``"infer"`` mode of :class:`afa.data.VOCStyleDataset`) reads the ids of a split with their images,
optional masks and image-level labels (:class:`afa.data.folder.ImageFolder` reads a folder of
images through the same methods, and :func:`classes_from_logits` stands in for its missing
labels); :class:`OutputFiles` names the per-image outputs and tells which images are done
(resuming); :func:`check_run_settings` refuses to resume into a directory written with other
settings, the checkpoint's content (:class:`FileFingerprint`, a SHA-256) among them;
:func:`run_sharded` runs a tool's job on this process's share of the images and sums the
results over processes, and :class:`InferenceRun` is the rest of both tools' ``main`` (the config,
the images, the weights, the record of the settings, the run and its summary);
:func:`save_npy_atomic` and :func:`write_rgb_png_atomic` (through :func:`afa.atomic.write_atomic`)
write each file under a temporary name first, so that an interrupted run never leaves a
truncated file that a resumed run would take for finished work;
:func:`seg_input_sizes` gives the input sizes of :func:`predict_seg_logits`; :func:`min_side_size`
and :func:`seg_work_size` the size a long and thin image is enlarged to so that none of them
falls below the encoder's ``min_input_side``, and :func:`enlarged_note` the line that says so.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from afa import config as C
from afa.atomic import write_atomic
from afa.config import load_config
from afa.constants import IGNORE_INDEX
from afa.data.folder import ImageFolder
from afa.data.lists import subset_note
from afa.data.voc import VOCStyleDataset
from afa.engine import distributed as D
from afa.engine.run_config import model_config_from_checkpoint
from afa.errors import USER_ERRORS, UsageError
from afa.host_memory import keep_freed_host_memory
from afa.models import AFANet

__all__ = [
    "SETTINGS_FILE",
    "RECORDED_ONLY",
    "CHECKPOINT_HASH_KEY",
    "FileFingerprint",
    "file_sha256",
    "long_side_size",
    "resize_long_side",
    "seg_logits",
    "predict_seg_logits",
    "seg_input_sizes",
    "min_side_size",
    "seg_work_size",
    "enlarged_note",
    "likely_classes",
    "classes_from_logits",
    "ImageSet",
    "OutputFiles",
    "check_run_settings",
    "run_sharded",
    "run_config",
    "InferenceRun",
    "write_rgb_png_atomic",
    "save_npy_atomic",
    "mask_ignored",
]


# --------------------------------------------------------------------------------------------
# Multi-scale + flip segmentation
# --------------------------------------------------------------------------------------------


def long_side_size(height: int, width: int, long_side: int | None) -> tuple[int, int]:
    """(h, w) after :func:`resize_long_side`: ``int(side * (long_side / max))``, the ratio first
    (``None`` or 0: unchanged)."""
    if not long_side or max(height, width) == long_side:
        return height, width
    ratio = long_side / max(height, width)
    return max(1, int(height * ratio)), max(1, int(width * ratio))


def resize_long_side(images: torch.Tensor, long_side: int | None) -> torch.Tensor:
    """Resize (B, 3, H, W) images (bilinear) so that their long side becomes ``long_side``.

    Each side becomes ``int(side * (long_side / max(H, W)))``, the ratio computed first, as in the
    authors' script: for some sizes that is one pixel short of ``int(side * long_side / max)``
    (a 103 x 103 image goes to 511 x 511). Small images are enlarged too (VOC's 500-pixel images
    go to 512). ``None`` or 0 keeps the size.
    """
    size = long_side_size(*images.shape[-2:], long_side)
    if size == tuple(images.shape[-2:]):
        return images
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False)


def seg_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, C, H/4, W/4) segmentation logits of ``model`` for ``x``, nothing else.

    :meth:`AFANet.forward_seg` builds no attention maps and no (B, N, N) affinity, which inference
    would throw away (the logits equal ``model(x).seg_logits`` up to float rounding); a model
    without it is called and its ``seg_logits`` taken.
    """
    forward_seg = getattr(model, "forward_seg", None)
    return forward_seg(x) if forward_seg is not None else model(x).seg_logits


@torch.no_grad()
def predict_seg_logits(model: nn.Module, images: torch.Tensor,
                       scales: Sequence[float] = (1.0, 0.5, 0.75), flip: bool = True,
                       long_side: int | None = 512,
                       min_side: int | None = None) -> torch.Tensor:
    """Fused multi-scale (+ flip) segmentation logits at the input's size (module docstring).

    Args:
        model: an :class:`AFANet`, or any module returning an object with ``seg_logits``
            (B, C, h, w); call it in eval mode (the decoder has BatchNorm and Dropout).
        images: (B, 3, H, W) normalised images of one size.
        scales: resize factors applied after the long-side resize. The scales are fused on the
            logit grid of scale 1.0; when 1.0 is not among them (the authors always run it), on
            the grid of the largest scale.
        flip: also run the horizontal flip of every scale and average the pair.
        long_side: the long side the image is first resized to; None keeps the size.
        min_side: the encoder's ``min_input_side``: an image whose smallest scaled input would
            be narrower is enlarged (bilinear, aspect kept) to :func:`seg_work_size` in place of
            the long-side resize. None: no check (the authors' script; such an image then fails
            in the encoder).

    Returns:
        (B, C, H, W) float32: the element-wise maximum over scales of the (flip-averaged) logits
        on the fusion grid, upsampled (bilinear) to (H, W).
    """
    if not scales:
        raise ValueError("predict_seg_logits needs at least one scale")
    batch, _, height, width = images.shape
    work = seg_work_size(height, width, scales, long_side, min_side) if min_side else None
    if work is None:
        base = resize_long_side(images, long_side)
    else:  # one resize from the image straight to the work size, not two
        base = F.interpolate(images, size=work, mode="bilinear", align_corners=False)
    grid_scale = 1.0 if 1.0 in scales else max(scales)
    fused = None  # (B, C, h, w) on the fusion grid
    for scale in [grid_scale] + [s for s in scales if s != grid_scale]:
        x = base if scale == 1.0 else F.interpolate(
            base, scale_factor=scale, mode="bilinear", align_corners=False)
        if flip:
            x = torch.cat([x, x.flip(-1)], dim=0)  # one forward for the pair
        logits = seg_logits(model, x).float()
        if fused is not None:  # bring this scale to the fusion grid before pairing the flips
            logits = F.interpolate(logits, size=fused.shape[-2:], mode="bilinear",
                                   align_corners=False)
        if flip:
            logits = (logits[:batch] + logits[batch:].flip(-1)) / 2
        fused = logits if fused is None else torch.maximum(fused, logits)
    return F.interpolate(fused, size=(height, width), mode="bilinear", align_corners=False)


def seg_input_sizes(height: int, width: int, scales: Sequence[float] = (1.0, 0.5, 0.75),
                    long_side: int | None = 512) -> list[tuple[int, int]]:
    """The (h, w) of every input :func:`predict_seg_logits` gives the model for an image of
    ``height`` x ``width``, in its arithmetic: the long-side size, then ``floor(s * side)``.

    A tool checks the smallest against the encoder's ``min_input_side`` to name an image too
    narrow for the network before running it.
    """
    height, width = long_side_size(height, width, long_side)
    return [(height, width) if s == 1.0 else (math.floor(height * s), math.floor(width * s))
            for s in scales]


def min_side_size(height: int, width: int, scales: Sequence[float],
                  min_side: int) -> tuple[int, int]:
    """(h, w) at which every input ``floor(s * side)`` of the ``scales`` is at least ``min_side``
    pixels on both sides: ``(height, width)`` itself when it already is, else enlarged with its
    aspect ratio kept (the short side grows to the least that suffices, the long side by the
    same ratio, rounded up). The multi-scale CAM and :func:`predict_seg_logits` both size a
    scaled input as ``floor(s * side)``.
    """
    smallest = min(scales)
    need = math.ceil(min_side / smallest)
    while math.floor(smallest * need) < min_side:  # float rounding of the division above
        need += 1
    short = min(height, width)
    if short >= need:
        return height, width
    # Integer ceil(side * need / short): the float ratio makes 7 * (58 / 7) 58.000...01, a
    # pixel too many.
    return tuple(max(need, -(-side * need // short)) for side in (height, width))


def seg_work_size(height: int, width: int, scales: Sequence[float], long_side: int | None,
                  min_side: int) -> tuple[int, int] | None:
    """The size :func:`predict_seg_logits` enlarges an image of ``height`` x ``width`` to, or
    None when the long-side resize already leaves every scaled input ``min_side`` wide.

    The long-side resize fixes the long side, so only the aspect ratio decides: a 20 x 300 strip
    at ``long_side`` 512 is 34 x 512, and at scale 0.5 17 px high, below the encoder's 29. Such
    an image is taken from its long-side size up to :func:`min_side_size` (58 x 874 here).
    """
    base = long_side_size(height, width, long_side)
    work = min_side_size(*base, scales, min_side)
    return None if work == base else work


def enlarged_note(path, size: tuple[int, int], work: tuple[int, int], min_side: int) -> str:
    """The line a tool prints for an image it enlarged for the network (sizes are (h, w))."""
    return (f"note: {path}: a {size[1]}x{size[0]} image is enlarged to {work[1]}x{work[0]} for "
            f"the network, whose inputs must be at least {min_side} px on each side at every "
            "scale; its outputs are at its own size")


def likely_classes(probs: np.ndarray, min_prob: float) -> np.ndarray:
    """Indices of the channels of (C, H, W) ``probs`` whose maximum exceeds ``min_prob``.

    A class that nowhere reaches a small probability cannot win the CRF's argmax, so the CRF may
    skip it; its cost grows with the number of channels. Every class that is the argmax somewhere
    is kept, whatever ``min_prob``.
    """
    flat = probs.reshape(probs.shape[0], -1)
    keep = flat.max(axis=1) > min_prob
    keep[np.unique(flat.argmax(axis=0))] = True
    return np.flatnonzero(keep)


def classes_from_logits(cls_logits: torch.Tensor, top_k: int | None = None) -> list[int]:
    """Image-level classes for an image without labels, from its classifier.

    Args:
        cls_logits: (C-1,) classification logits (no background).
        top_k: take the ``top_k`` largest logits; None: every class whose logit is positive
            (the classifier's own decision, as validation's F1 counts it), or the single largest
            when none is.

    Returns:
        Class indices in 1..C-1, largest logit first.
    """
    order = torch.argsort(cls_logits.float(), descending=True, stable=True).tolist()
    if top_k is not None:
        if top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {top_k}")
        chosen = order[:top_k]
    else:
        chosen = [c for c in order if cls_logits[c] > 0] or order[:1]
    return [c + 1 for c in chosen]


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


class ImageSet(VOCStyleDataset):
    """The ids of a name list with their images and, where they exist, masks and labels.

    :class:`afa.data.VOCStyleDataset` in its ``"infer"`` mode (the same paths, name-list and
    label-file checks and readers: ``image``, ``mask``, ``has_mask``, ``classes``,
    ``multi_hot``): nothing is required beyond the images, a split without masks (VOC ``test``) is
    predicted but not scored, and image-level labels come from the label file when it lists the
    id, else from the mask.

    Args:
        root: dataset root holding ``JPEGImages`` and ``mask_dir``.
        name_list: file with one id per line.
        num_classes: classes including background.
        mask_dir: folder of the class-index PNGs.
        split_subdir: COCO layout: images in ``JPEGImages/<split>``, masks in
            ``<mask_dir>/<split>``.
        label_file: JSON ``{id: [classes]}``, or None; a missing file is the same as None.
    """

    def __init__(self, root: str | os.PathLike, name_list: str | os.PathLike, num_classes: int,
                 *, mask_dir: str = "SegmentationClassAug", split_subdir: str | None = None,
                 label_file: str | os.PathLike | None = None):
        if label_file is not None and not Path(label_file).is_file():
            label_file = None
        super().__init__(root, name_list, label_file, num_classes, split=split_subdir,
                         mask_dir=mask_dir, mode="infer")


# --------------------------------------------------------------------------------------------
# Outputs and resuming
# --------------------------------------------------------------------------------------------


class OutputFiles:
    """Per-image output files ``out_dir/<kind>/<id><suffix>`` and which images are complete.

    Args:
        out_dir: the run's output directory.
        kinds: ``{kind: suffix}`` of the files every image gets, e.g. ``{"pred": ".png"}``.

    An image counts as done when every kind's file exists. Files are written atomically, so an
    existing file is a complete one.
    """

    def __init__(self, out_dir: str | os.PathLike, kinds: dict[str, str]):
        self.out_dir = Path(out_dir)
        self.kinds = dict(kinds)

    def path(self, kind: str, name: str) -> Path:
        return self.out_dir / kind / f"{name}{self.kinds[kind]}"

    def make_dirs(self) -> None:
        for kind in self.kinds:
            (self.out_dir / kind).mkdir(parents=True, exist_ok=True)

    def prepare(self, config_yaml: str, settings: dict) -> None:
        """Create the folders and record the run: ``config.yaml`` and the settings file."""
        self.make_dirs()
        write_atomic(self.out_dir / "config.yaml", lambda tmp: tmp.write_text(config_yaml))
        write_atomic(self.out_dir / SETTINGS_FILE,
                     lambda tmp: tmp.write_text(json.dumps(settings, indent=2) + "\n"))

    def done(self, name: str) -> bool:
        return all(self.path(kind, name).is_file() for kind in self.kinds)


SETTINGS_FILE = "run.json"  # in the output directory: the settings its outputs were made with

# Settings recorded in run.json for the reader but not compared: the checkpoint's path says
# nothing about its weights (best.pth is rewritten as training goes on; an identical file may be
# moved). Its content is compared instead, as "checkpoint_sha256".
RECORDED_ONLY = frozenset({"checkpoint"})
CHECKPOINT_HASH_KEY = "checkpoint_sha256"


def file_sha256(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes, read ``chunk_size`` bytes at a time (checkpoints of the
    larger backbones are hundreds of MB: never all in memory at once)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def _file_identity(path: Path) -> tuple[int, int, int, int]:
    stat = path.stat()
    return stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns


class FileFingerprint:
    """The SHA-256 of a file (:attr:`sha256`), and a check that the file is still the one hashed.

    A trainer may save a new ``best.pth`` between the moment the hash is taken and the moment the
    weights are loaded; :meth:`check_unchanged` after loading makes sure that the recorded hash is
    that of the weights in use (an atomic save replaces the file: another inode; a save in place
    changes the size or the modification time).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._identity = _file_identity(self.path)
        self.sha256 = file_sha256(self.path)
        self.check_unchanged()

    def check_unchanged(self) -> None:
        """:class:`~afa.errors.UsageError` when the file was replaced or rewritten since it was
        hashed."""
        if _file_identity(self.path) != self._identity:
            raise UsageError(f"{self.path}: the file changed while this run read it (a training "
                             "run saving it?); run again once it is written")


def _describe_difference(key: str, old, new) -> str:
    if key != CHECKPOINT_HASH_KEY:
        return f"{key}: {old!r} -> {new!r}"
    if old is None:
        return ("the run that wrote it did not record the checkpoint's content (an older "
                "version of this tool), so its outputs may come from other weights")
    return (f"the checkpoint's content changed (sha256 {str(old)[:12]}... -> "
            f"{str(new)[:12]}...): its outputs were made with other weights")


def check_run_settings(out_dir: str | os.PathLike, settings: dict, overwrite: bool) -> None:
    """Refuse to resume into ``out_dir`` when it was written with other ``settings``.

    Without ``overwrite``, existing outputs are kept and reused; mixing, say, CRF and plain
    predictions, or the predictions of two sets of weights, in one directory would silently
    corrupt the scores, so differing settings raise :class:`~afa.errors.UsageError` (a
    ``ValueError``) naming the keys. The
    checkpoint is compared by its content (``settings["checkpoint_sha256"]``), not by its path
    (:data:`RECORDED_ONLY`): new weights saved over ``best.pth`` are refused, the same file moved
    elsewhere resumes. With ``overwrite`` everything is recomputed anyway. The caller writes the
    new settings (:func:`write_atomic` of ``json.dumps(settings)``) once all processes have
    checked.
    """
    path = Path(out_dir) / SETTINGS_FILE
    if overwrite or not path.is_file():
        return
    try:
        old = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UsageError(f"{path}: not a JSON settings file ({err}); pass --overwrite") from err
    normalised = json.loads(json.dumps(settings))  # tuples -> lists, as stored
    differing = sorted(key for key in set(old) | set(normalised)
                       if key not in RECORDED_ONLY and old.get(key) != normalised.get(key))
    if differing:
        details = "; ".join(_describe_difference(key, old.get(key), normalised.get(key))
                            for key in differing)
        raise UsageError(f"{path}: {out_dir} holds outputs of a run with other settings "
                         f"({details}); pass --overwrite to recompute them or pick another "
                         "--out-dir")


def run_sharded(job, names: list[str], files: OutputFiles, config_yaml: str,
                settings: dict) -> tuple[int, int] | None:
    """The distributed part of ``tools/infer_seg.py`` and ``tools/infer_cam.py``.

    Inside an initialised process group: rank 0 records the run in the output directory, every
    rank runs ``job.run(names[rank::world_size])`` (which returns how many images it processed and
    counts the scored ones in ``job.scored``), then the counts and the job's own statistics
    (``job.reduce_(all_reduce_sum)``) are summed over the ranks. Returns ``(processed, scored)``
    over all ranks, or None on every rank when any rank met bad input (that rank prints the
    error); the ranks agree on it first, so none is left waiting in a collective.
    """
    keep_freed_host_memory()  # the same large tensors every image: reuse their memory
    if D.rank() == 0:
        files.prepare(config_yaml, settings)
    D.barrier()
    ran, failed = 0, 0
    try:
        ran = job.run(names[D.rank()::D.world_size()])
    except USER_ERRORS as err:
        print(f"error (rank {D.rank()}): {err}", file=sys.stderr)
        failed = 1
    counts = torch.tensor([ran, job.scored, failed], dtype=torch.int64, device=job.device)
    D.all_reduce_sum(counts)
    ran, scored, failed = counts.tolist()
    if failed:
        return None
    job.reduce_(D.all_reduce_sum)
    return ran, scored



# --------------------------------------------------------------------------------------------
# The inference tools' main
# --------------------------------------------------------------------------------------------


def run_config(args: argparse.Namespace, overrides: list[str]) -> DictConfig:
    """The config of a tool's run: ``args.config`` with ``overrides``, then the network settings
    that our checkpoints bring (``args.checkpoint``; the line naming them is printed once)."""
    cfg = load_config(args.config, overrides)
    cfg, _, taken = model_config_from_checkpoint(cfg, args.checkpoint, args.overrides)
    if taken and D.env_rank() == 0:
        print(taken, flush=True)
    return cfg


@dataclass
class InferenceRun:
    """One run of ``tools/infer_seg.py`` or ``tools/infer_cam.py``: what both set up, and the run.

    Everything that can be wrong with the input (config, images, checkpoint, a directory of other
    settings) is found by :meth:`open` and :meth:`record`, before any process group exists, so
    that the tool names it in one line; :meth:`execute` then starts the processes, runs the job
    and reports. Both tools take the same arguments ``--config``, ``--checkpoint``, ``--split`` /
    ``--images``, ``--out-dir`` and ``--overwrite``.
    """

    args: argparse.Namespace
    cfg: DictConfig
    images: ImageSet | ImageFolder
    label: str  # the split, or the --images argument: the summary line names it
    source: dict  # {"split": ...} or {"images": absolute path}, first in run.json and scores.json
    note: str | None  # a shortened name list's subset_note (a split only)
    model: nn.Module
    checkpoint: FileFingerprint
    settings: dict = field(default_factory=dict)

    @classmethod
    def open(cls, args: argparse.Namespace, cfg: DictConfig, default_split: str,
             announce_subset: bool = False) -> InferenceRun:
        """The images (``--images``, or ``--split`` else ``default_split``) and the model with the
        checkpoint's weights; ``announce_subset`` prints the note of a shortened name list."""
        note = None
        if args.images:
            images = ImageFolder(args.images)
            label, source = args.images, {"images": os.path.abspath(args.images)}
        else:
            label = args.split or default_split
            image_set_kwargs = C.image_set_kwargs(cfg, label)
            images = ImageSet(**image_set_kwargs)
            source = {"split": label}
            note = subset_note(image_set_kwargs["name_list"])
        if note and announce_subset and D.env_rank() == 0:
            print(note, flush=True)
        model = AFANet(**C.model_kwargs(cfg))
        # The outputs are tied to the weights, not to the path (best.pth is rewritten as
        # training goes on): hash the file, load it, and make sure it is still the one hashed.
        checkpoint = FileFingerprint(args.checkpoint)
        model.load_weights(args.checkpoint)
        checkpoint.check_unchanged()
        return cls(args, cfg, images, label, source, note, model, checkpoint)

    def record(self, tool: str, **settings) -> None:
        """Set the run's settings (the tool, the checkpoint, the source, then ``settings``) after
        checking them against those of the outputs already in ``--out-dir``."""
        settings = {"tool": tool, "checkpoint": str(Path(self.args.checkpoint).resolve()),
                    "checkpoint_sha256": self.checkpoint.sha256, **self.source, **settings}
        check_run_settings(self.args.out_dir, settings, self.args.overwrite)
        self.settings = settings

    def execute(self, make_job: Callable, kinds: dict[str, str], *, done: str, outputs: str,
                scores: Callable[[object, int, int], dict],
                summarize: Callable[[OutputFiles], None] | None = None) -> int:
        """Run the job on every process and report on the first; the tool's exit status.

        Args:
            make_job: ``make_job(files, device)`` -> the job :func:`run_sharded` runs.
            kinds: the per-image outputs, as :class:`OutputFiles` takes them.
            done: what happened to an image, for the summary line ("predicted").
            outputs: what the run writes, for a run without masks ("predictions").
            scores: ``scores(job, num_images, num_scored)`` prints the scores and returns the
                record for ``scores.json``; called when some image has a ground-truth mask.
            summarize: ``summarize(files)``, anything else the first process writes at the end.
        """
        args = self.args
        info = D.init_distributed(self.cfg.device)
        try:
            self.model.to(info.device).eval()
            files = OutputFiles(args.out_dir, kinds)
            job = make_job(files, info.device)
            counts = run_sharded(job, self.images.names, files, OmegaConf.to_yaml(self.cfg),
                                 self.settings)
        finally:
            D.cleanup()
        if counts is None:
            return 2
        if info.rank == 0:
            ran, scored = counts
            total = len(self.images.names)
            print(f"{self.label}: {ran} of {total} images {done}, {total - ran} reused from "
                  f"{args.out_dir}")
            if summarize is not None:
                summarize(files)
            if scored:
                result = scores(job, total, scored)
                write_atomic(args.out_dir / "scores.json",
                             lambda tmp: tmp.write_text(json.dumps(result, indent=2) + "\n"))
            elif not args.images:  # a folder has no masks: nothing to say
                print(f"no ground-truth masks: {outputs} only, no scores")
        return 0


def write_rgb_png_atomic(path: str | os.PathLike, image: np.ndarray) -> None:
    """Save an (H, W, 3) uint8 RGB array as PNG, atomically.

    Pictures blended with a photo hardly compress: zlib's fastest level writes them in half the
    time of Pillow's default (6) at the same size (a 500 x 375 heat map: 16 against 30 ms, 389
    against 390 kB).
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected (H, W, 3) uint8, got shape {image.shape} dtype {image.dtype}")
    write_atomic(path, lambda tmp: Image.fromarray(image).save(tmp, format="PNG",
                                                               compress_level=1))


def save_npy_atomic(path: str | os.PathLike, array: np.ndarray) -> None:
    """``np.save`` to ``path`` exactly (no ``.npy`` appended), atomically."""
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            np.save(handle, array)
    write_atomic(path, write)


def mask_ignored(pred: np.ndarray, gt: np.ndarray,
                 ignore_index: int = IGNORE_INDEX) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Prepare a pseudo label with ignore pixels for scoring against the ground truth.

    Returns ``(pred, gt, ignored, valid)``: the ground truth set to ``ignore_index`` where the
    prediction is ignore (so the mIoU covers only the pixels the label commits to), the prediction
    with those pixels set to 0 (never scored), the number of such pixels among the ground truth's
    valid ones, and the number of valid ground-truth pixels.
    """
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} != ground-truth shape {gt.shape}")
    ignored = pred == ignore_index
    valid = gt != ignore_index
    gt = np.where(ignored, ignore_index, gt)
    pred = np.where(ignored, 0, pred)
    return pred, gt, int((ignored & valid).sum()), int(valid.sum())
