"""Segment a split, or any folder of images, with multi-scale + flip inference and an optional
dense CRF; score it when masks exist.

Single process (CPU or one GPU):

    python tools/infer_seg.py --config configs/voc.yaml \\
        --checkpoint work_dirs/voc/checkpoints/best.pth --split val \\
        --out-dir work_dirs/voc/seg_val --protocol paper --crf \\
        [--scales 1.0,0.5,0.75] [--save-logits] [--overwrite] [key=value ...]

A folder of photos or video frames, a glob pattern or one image instead of a split (``--images``;
no name list, no masks, nothing scored; ``--split`` and ``--images`` exclude each other):

    python tools/infer_seg.py --config configs/voc.yaml --checkpoint CKPT \\
        --images my_photos/ --out-dir out/my_photos [--crf]
    python tools/infer_seg.py ... --images 'frames/**/*.jpg' --out-dir out/frames

JPEG and PNG files of any mode (greyscale, 16-bit, RGBA and palette images are read as 8-bit RGB,
EXIF-rotated photos upright) up to 179 megapixels (``AFA_MAX_IMAGE_PIXELS=N`` in the environment
lifts that; the error naming a larger image says so); an image's id is its file stem, or its
path below the pattern's fixed folder for ``dir/**/*.jpg`` (``afa/data/folder.py``). The config
still gives the class names (``data.name``) and, with our checkpoints, the network settings; the
outputs are those of a split run, at each image's own size.

Several processes (images sharded by rank, confusion matrices summed; gloo on CPU, NCCL on GPU):

    torchrun --nproc_per_node=2 tools/infer_seg.py --config configs/voc.yaml --checkpoint ... \\
        --split val --out-dir work_dirs/voc/seg_val --crf

Each image is resized so that its long side is ``infer.long_side`` (512), run at ``infer.scales``
each with its horizontal flip (``infer.flip``; the pair is averaged); the element-wise maximum of
the logits over the scales, taken on the logit grid of scale 1 and then upsampled to the image,
gives the prediction (``afa.inference.predict_seg_logits``, the authors' released
``scripts/test_msc_flip.py`` to the pixel). With ``--crf`` the softmax of those logits is refined
by the authors' dense CRF (``afa.crf.CRF_SETTINGS``) in a pool of worker processes
(``--crf-workers``; default: the usable CPUs shared among the ranks of the machine), while the
network goes on with the next images.

An image so long and thin that a scaled input would fall below the encoder's minimum (29 px for
AFA's strides; a 20x300 strip at scale 0.5 of a 512 long side is 17 px high) is enlarged, aspect
kept, until every input is wide enough, predicted at that size and its logits resized back to the
image (``afa.inference.seg_work_size``), as ``tools/infer_cam.py`` does for its CAMs; a line
names each such image. Its outputs are at its own size and a split run scores it as any other.

Two named protocols (``--protocol``) set the ``infer.*`` values; ``key=value`` overrides and
``--scales`` (shorthand for ``infer.scales=[...]``) still win, and ``--crf`` still switches the
CRF on. Both set ``infer.long_side=512``, ``infer.flip=true`` and the authors' CRF (10 iterations,
Gaussian sxy 3 compat 3, bilateral sxy 64 srgb 5 compat 4):

    paper        infer.scales=[1.0,0.5,0.75]: the authors' released test script; with --crf
                 it is the protocol of the paper's 66.0 mIoU on VOC val.
                 The config defaults are these values.
    maintainers  infer.scales=[0.5,0.75,1.0,1.25,1.5]: the scales the first author named when
                 asked how the paper's VOC results were tested (github.com/rulixiang/afa
                 issue 6); with --crf, his answer for reproducing the same 66.0.

The run records the protocol in ``run.json`` and ``scores.json``: the preset whose values the
merged config has (whether named or not), or ``custom``. ``--crf-min-prob 0.01`` gives the CRF
only the classes that reach that probability somewhere (faster; results differ only where a
dropped class would have won after the CRF, which the Potts terms make very unlikely).

Writes under ``--out-dir``:

    pred/<id>.png       class indices, VOC palette
    overlay/<id>.png    prediction colours over the image (not with --no-overlay)
    logits/<id>.npy     (C, H, W) float16 fused logits before the CRF (with --save-logits;
                        softmax gives the CRF's input; ~8 MB per VOC image)
    scores.json         mIoU etc. over the images that have a ground-truth mask (with
                        "subset_note" when the name list is a subset, see below)
    config.yaml, run.json   the merged config and the settings the outputs were made with
                        (the checkpoint's path and the SHA-256 of its content)

When the name list has a ``left_out.json`` beside it that names it (``tools/prepare_voc.py
--skip-missing`` left bad ids out), the run starts by printing ``<list>: N of M listed ids (K left
out by prepare_voc --skip-missing, see <path>)``: the scores are then over a subset of the split.

A rerun skips images whose outputs all exist (their saved predictions are still scored) unless
``--overwrite``; it refuses to mix outputs of other settings (scales, CRF, ...) or of other
weights: the checkpoint is compared by the SHA-256 of its content, so a ``best.pth`` that further
training rewrote is refused (pass ``--overwrite`` or another ``--out-dir``), and the same file
moved or renamed resumes. Accepts our checkpoints and the authors' (``module.``-prefixed) ones.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from afa import config as C
from afa.crf import CRF_SETTINGS, dense_crf_many, import_densecrf
from afa.data import class_names, normalize, write_mask
from afa.engine import distributed as D
from afa.errors import USER_ERRORS
from afa.inference import (ImageSet, InferenceRun, OutputFiles, enlarged_note, likely_classes,
                           predict_seg_logits, run_config, save_npy_atomic, seg_work_size,
                           write_rgb_png_atomic)
from afa.io import read_label_png
from afa.metrics import ConfusionMatrix, format_scores
from afa.viz import overlay_label

__all__ = ["PROTOCOLS", "main", "parse_args", "protocol_of"]

# Named test protocols: the infer.* values each sets (module docstring: which figure each is for).
# --crf runs the authors' dense CRF with either (afa.crf.CRF_SETTINGS: utils/dcrf.py as set up in
# their scripts/test_msc_flip.py).
PROTOCOLS = {
    "paper": {"infer.long_side": 512, "infer.scales": [1.0, 0.5, 0.75], "infer.flip": True},
    "maintainers": {"infer.long_side": 512, "infer.scales": [0.5, 0.75, 1.0, 1.25, 1.5],
                    "infer.flip": True},
}


def _dotlist(values: dict) -> list[str]:
    """``{"infer.scales": [1.0, 0.5]}`` -> ``["infer.scales=[1.0,0.5]"]`` (config overrides)."""
    def text(value):
        if isinstance(value, bool):
            return str(value).lower()
        if isinstance(value, list):
            return "[" + ",".join(map(str, value)) + "]"
        return str(value)
    return [f"{key}={text(value)}" for key, value in values.items()]


# What each protocol is for, shown by --help under its values.
_PROTOCOL_PURPOSE = {
    "paper": "the authors' released test script; with --crf: the paper's 66.0 mIoU, VOC val",
    "maintainers": "the scales named by the first author in rulixiang/afa issue 6 for "
                   "reproducing the paper's VOC results; with --crf: the same 66.0",
}


def _protocols_help() -> str:
    """The --help epilog: what every protocol sets, generated from PROTOCOLS."""
    shared = {k: v for k, v in PROTOCOLS["paper"].items()
              if all(p.get(k) == v for p in PROTOCOLS.values())}
    lines = ["protocols (--protocol NAME sets these config values):",
             *textwrap.wrap(" ".join(_dotlist(shared)), 96, initial_indent="  both: ",
                            subsequent_indent="    ")]
    for name, values in PROTOCOLS.items():
        own = {k: v for k, v in values.items() if k not in shared}
        lines.append(f"  {name}: {' '.join(_dotlist(own))}")
        lines += textwrap.wrap(_PROTOCOL_PURPOSE[name], 96, initial_indent="    ",
                               subsequent_indent="    ")
    crf = " ".join(f"{k}={v}" for k, v in CRF_SETTINGS.items())
    lines += textwrap.wrap(f"--crf, with either: the authors' dense CRF, {crf}", 96,
                           initial_indent="  ", subsequent_indent="    ")
    return "\n".join(lines)


def protocol_of(cfg: DictConfig) -> str:
    """The name of the preset whose every ``infer.*`` value ``cfg`` has, else ``"custom"``."""
    for name, values in PROTOCOLS.items():
        if all(OmegaConf.select(cfg, key) == value for key, value in values.items()):
            return name
    return "custom"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog=_protocols_help(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML file, e.g. configs/voc.yaml")
    parser.add_argument("--checkpoint", required=True, help="our checkpoint or the authors'")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--split", help="name list <data.list_dir>/<split>.txt "
                                        "(default: the config's data.val_split)")
    source.add_argument("--images", metavar="DIR_OR_GLOB",
                        help="segment these images instead of a split: a folder (its "
                             ".jpg/.jpeg/.png files), one image, or a quoted glob pattern "
                             "('frames/*.png', 'trip/**/*.jpg'); ids are file stems (paths "
                             "below the fixed folder for **); nothing is scored")
    parser.add_argument("--out-dir", required=True, type=Path,
                        help="where pred/, overlay/ (and logits/) go, with scores.json and run.json")
    parser.add_argument("--scales", type=_float_list, metavar="S1,S2,...",
                        help="comma-separated, e.g. 1.0,0.5,0.75: shorthand for the override "
                             "infer.scales=[...]")
    parser.add_argument("--protocol", choices=sorted(PROTOCOLS),
                        help="set the infer.* values of a named test protocol (listed below); "
                             "key=value overrides and --scales still win; the CRF stays off "
                             "without --crf")
    parser.add_argument("--crf", action="store_true", help="refine with a dense CRF")
    parser.add_argument("--crf-workers", type=int,
                        help="CRF processes per rank (default: the usable CPUs / local ranks; "
                             "0 runs the CRF in this process)")
    parser.add_argument("--crf-min-prob", type=float,
                        help="give the CRF only the classes whose probability exceeds this "
                             "somewhere (e.g. 0.01; faster); default: all classes")
    parser.add_argument("--save-logits", action="store_true", help="also write logits/<id>.npy")
    parser.add_argument("--no-overlay", action="store_true", help="skip overlay/<id>.png")
    parser.add_argument("--overwrite", action="store_true",
                        help="recompute images whose outputs exist")
    parser.add_argument("overrides", nargs="*", help="config overrides as key=value")
    args = parser.parse_args(argv)
    if not args.crf and (args.crf_workers is not None or args.crf_min_prob is not None):
        parser.error("--crf-workers and --crf-min-prob only apply with --crf")
    return args


def _float_list(text: str) -> list[float]:
    try:
        return [float(value) for value in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}") from None




def _crf_workers(requested: int | None) -> int | None:
    """Split this machine's CPUs between the ranks started on it (None: afa.crf's default)."""
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if requested is not None or local_ranks == 1:
        return requested
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cpus or 1) // local_ranks)


class SegInference:
    """One rank's share of the split: predict, write, score."""

    def __init__(self, model, images: ImageSet, files: OutputFiles, cfg: DictConfig,
                 args: argparse.Namespace, device: torch.device):
        self.model, self.images, self.files, self.args, self.device = (
            model, images, files, args, device)
        self.scales, self.flip, self.long_side = (
            tuple(cfg.infer.scales), cfg.infer.flip, cfg.infer.long_side)
        self.crf_kwargs = dict(CRF_SETTINGS)
        self.min_side = model.encoder.min_input_side
        self.matrix = ConfusionMatrix(C.num_classes(cfg), device=device)
        self.scored = 0

    def _score(self, name: str, pred: np.ndarray) -> None:
        if self.images.has_mask(name):
            self.matrix.update(pred, self.images.mask(name, pred.shape))
            self.scored += 1

    def _predict(self, names: list[str]) -> Iterator[tuple[str, np.ndarray, torch.Tensor]]:
        """(id, RGB image, fused logits (C, H, W)) per image; saves the logits if asked.

        An image too thin for the encoder at some scale is enlarged for the network (one note
        line each) rather than stopping the run: its logits still come at its own size.
        """
        for name in names:
            image = self.images.image(name)
            work = seg_work_size(*image.shape[:2], self.scales, self.long_side, self.min_side)
            if work is not None:
                tqdm.write(enlarged_note(self.images.image_path(name), image.shape[:2], work,
                                         self.min_side))
            x = normalize(image)[None].to(self.device)
            logits = predict_seg_logits(self.model, x, self.scales, self.flip, self.long_side,
                                        min_side=self.min_side)[0]
            if self.args.save_logits:
                save_npy_atomic(self.files.path("logits", name), logits.half().cpu().numpy())
            yield name, image, logits

    def _finish(self, name: str, image: np.ndarray, pred: np.ndarray) -> None:
        if not self.args.no_overlay:
            write_rgb_png_atomic(self.files.path("overlay", name), overlay_label(image, pred))
        write_mask(self.files.path("pred", name), pred)  # written last: marks the image done
        self._score(name, pred)

    def _plain(self, names: list[str], progress: tqdm) -> None:
        for name, image, logits in self._predict(names):
            self._finish(name, image, logits.max(0).indices.to(torch.uint8).cpu().numpy())
            progress.update()

    def _with_crf(self, names: list[str], progress: tqdm) -> None:
        """Stream probabilities to the CRF pool; write each result as it returns (in order)."""
        pending = deque()  # (id, image, class ids) of the pairs handed to the pool

        def pairs():
            for name, image, logits in self._predict(names):
                probs = logits.softmax(0).cpu().numpy()
                if self.args.crf_min_prob is None:  # all classes, as the authors: no renormalising
                    keep = np.arange(len(probs))
                else:
                    keep = likely_classes(probs, self.args.crf_min_prob)
                    probs = probs[keep] / probs[keep].sum(0, keepdims=True)
                pending.append((name, image, keep))
                yield image, probs

        for q in dense_crf_many(pairs(), workers=_crf_workers(self.args.crf_workers),
                                **self.crf_kwargs):
            name, image, keep = pending.popleft()
            self._finish(name, image, keep[q.argmax(0)].astype(np.uint8))
            progress.update()

    def reduce_(self, all_reduce_sum) -> None:
        """Sum the confusion matrix over ranks."""
        self.matrix.reduce_(all_reduce_sum)

    def run(self, names: list[str]) -> int:
        """Process ``names`` (skipping finished ones unless overwriting); returns how many ran."""
        todo = names if self.args.overwrite else [n for n in names if not self.files.done(n)]
        for name in sorted(set(names) - set(todo)):
            self._score(name, read_label_png(self.files.path("pred", name)))
        with tqdm(total=len(todo), desc="infer_seg", disable=not D.is_main()) as progress:
            (self._with_crf if self.args.crf else self._plain)(todo, progress)
        return len(todo)


def _protocol(cfg: DictConfig, named: str | None) -> str:
    """The protocol the run records (:func:`protocol_of`); a note when overrides changed the one
    named by --protocol."""
    protocol = protocol_of(cfg)
    if named and protocol != named:
        changed = sorted(k for k, v in PROTOCOLS[named].items() if OmegaConf.select(cfg, k) != v)
        if D.env_rank() == 0:
            print(f"note: overrides change {', '.join(changed)} of --protocol {named}: recorded "
                  f"as protocol {protocol!r}", flush=True)
    return protocol


def _scores(run: InferenceRun, job: SegInference, total: int, scored: int) -> dict:
    """Print the scores; the scores.json record."""
    scores = job.matrix.compute(class_names(run.cfg))
    print(format_scores(scores))
    result = {**run.source, "num_images": total, "num_scored": scored,
              **{k: run.settings[k] for k in ("checkpoint_sha256", "protocol", "long_side",
                                              "scales", "flip", "crf")},
              "seg": scores.to_dict()}
    if run.note:
        result["subset_note"] = run.note
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    # The preset first, so that explicit overrides win.
    overrides = _dotlist(PROTOCOLS[args.protocol]) if args.protocol else []
    overrides += list(args.overrides)
    if args.scales:
        overrides.append(f"infer.scales=[{','.join(map(str, args.scales))}]")
    try:
        cfg = run_config(args, overrides)
        run = InferenceRun.open(args, cfg, cfg.data.val_split, announce_subset=True)
        if args.crf:
            import_densecrf()
        run.record("infer_seg", protocol=_protocol(cfg, args.protocol),
                   long_side=cfg.infer.long_side, scales=list(cfg.infer.scales),
                   flip=cfg.infer.flip, crf=dict(CRF_SETTINGS) if args.crf else None,
                   crf_min_prob=args.crf_min_prob if args.crf else None)
    except (*USER_ERRORS, ImportError) as err:  # ImportError: --crf without pydensecrf
        print(f"error: {err}", file=sys.stderr)
        return 2
    kinds = {"pred": ".png"}
    if not args.no_overlay:
        kinds["overlay"] = ".png"
    if args.save_logits:
        kinds["logits"] = ".npy"
    return run.execute(
        lambda files, device: SegInference(run.model, run.images, files, cfg, args, device),
        kinds, done="predicted", outputs="predictions",
        scores=lambda job, total, scored: _scores(run, job, total, scored))


if __name__ == "__main__":
    sys.exit(main())
