"""Write CAMs and pseudo labels of a split (for training a separate segmenter) or of any folder of
images; score them when masks exist.

Single process (CPU or one GPU):

    python tools/infer_cam.py --config configs/voc.yaml \\
        --checkpoint work_dirs/voc/checkpoints/best.pth --split train_aug \\
        --out-dir work_dirs/voc/pseudo_train_aug [--save-npy] [--overwrite] [key=value ...]

Several processes (images sharded by rank, confusion matrices summed; gloo on CPU, NCCL on GPU):

    torchrun --nproc_per_node=2 tools/infer_cam.py --config configs/voc.yaml --checkpoint ... \\
        --split train_aug --out-dir work_dirs/voc/pseudo_train_aug

Any folder of photos or frames, one image or a glob pattern (``--images``, instead of
``--split``; the same sources as ``tools/infer_seg.py --images``, see ``afa/data/folder.py``):

    python tools/infer_cam.py --config configs/voc.yaml --checkpoint CKPT \\
        --images my_photos/ --out-dir out/my_photos_cam [--classes auto | --top-k K |
        --classes cat,dog] [--max-side 512]

Such images have no image-level labels, so the classes whose CAMs are taken come from:

    --classes auto      (default) the classifier: every class whose logit is positive (the rule
                        validation's F1 uses), or the class with the largest logit when none is
    --top-k K           the K classes with the largest logits
    --classes a,b       these classes (names of the config's class list, data.name), whatever
                        the classifier says

Per image, at its own size, with its image-level labels (from ``<data.list_dir>/cls_labels.json``
when it lists the id, else from the ground-truth mask; with ``--images`` the classes chosen as
above), exactly as one training iteration makes them (its steps named below):

    cam_label/<id>.png  the multi-scale CAM (``cam.scales``) thresholded at
                        ``cam.thresholds.background`` (step 3)
    refined/<id>.png    the PAR-refined pseudo label with the ``cam.thresholds`` high/low ignore
                        band (step 4)
    affinity/<id>.png   the affinity pseudo label (steps 8-9): the CAMs propagated by a random walk
                        with the high and with the low threshold as background score, PAR, the same
                        band. The walk uses the affinity predicted at the *largest* CAM scale, as
                        in training (validation uses the scale-1 one), so these are the labels
                        the segmentation branch learns from.
    cam/<id>.npy        with --save-npy: (C-1, h, w) float16 CAMs in [0, 1], channel c = class
                        c + 1, classes absent from the image labels set to 0, resized by
                        --npy-scale (default 0.25: the CAM comes from a stride-16 grid, so a
                        quarter of the image size loses nothing; 1 gives the image size) -- the
                        format tools/visualize.py --cam-dir reads
    heat/<id>_<class>.png   the CAM of each of the image's classes as a colour map (JET:
                        blue low, red high) over the image, image size (always with --images;
                        with --split when --heatmaps is given; spaces in class names become _)
    classes/<id>.json   with --images: the chosen classes, largest logit first, the rule that
                        chose them and the classifier's logit of every class
    classes.json        with --images: {id: [class names]} of all images, largest logit first
    scores.json         mIoU of each kind over the images that have a ground-truth mask
    config.yaml, run.json   the merged config and the settings the outputs were made with
                        (the checkpoint's path and the SHA-256 of its content)

With ``--images`` an image whose long side exceeds ``--max-side`` (default 512) is shrunk to it
for the CAMs, PAR and the random walk (the affinity of a 12-megapixel photo would not fit in
memory), and the outputs are resized back to the image (labels nearest, CAMs bilinear); with
``--split`` there is no limit unless ``--max-side`` is given (training makes its labels at the
image's size). In both modes an image whose short side would fall below the encoder's minimum
(29 px for AFA's strides) at the smallest CAM scale is enlarged for the CAMs in the same way
(``afa.inference.min_side_size``, the policy of ``tools/infer_seg.py`` too), with a line naming
it.

Labels are VOC-palette PNGs of class indices, 255 = ignore. Scoring a pseudo label with ignore
pixels: the mIoU is taken over the pixels the label commits to (the ground truth is set to ignore
where the label is 255), and the fraction of valid ground-truth pixels the label leaves ignored is
reported beside it; a label is only as good as both numbers together.

A rerun skips images whose outputs all exist (their saved labels are still scored) unless
``--overwrite``; it refuses to mix outputs of other settings or of other weights (the checkpoint
is compared by the SHA-256 of its content, not by its path: a rewritten ``best.pth`` is refused,
the same file moved elsewhere resumes).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from tqdm import tqdm

from afa import config as C
from afa.atomic import write_atomic
from afa.cam import MultiScaleCAM, multi_scale_cam
from afa.constants import IGNORE_INDEX, CamThresholds
from afa.data import class_names, denormalize, normalize, write_mask
from afa.data.folder import ImageFolder
from afa.engine import distributed as D
from afa.errors import USER_ERRORS, UsageError
from afa.inference import (ImageSet, InferenceRun, OutputFiles, classes_from_logits,
                           enlarged_note, long_side_size, mask_ignored, min_side_size, run_config,
                           save_npy_atomic, write_rgb_png_atomic)
from afa.io import read_label_png
from afa.metrics import ConfusionMatrix, format_table
from afa.models import PAR
from afa.pseudo_labels import make_pseudo_labels
from afa.viz import overlay_heatmap

__all__ = ["KINDS", "class_rule", "given_classes", "heat_name", "main", "parse_args",
           "pseudo_labels"]

KINDS = ("cam_label", "refined", "affinity")
DEFAULT_MAX_SIDE = 512  # --max-side of --images (module docstring)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML file, e.g. configs/voc.yaml")
    parser.add_argument("--checkpoint", required=True, help="our checkpoint or the authors'")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--split", help="name list <data.list_dir>/<split>.txt "
                                        "(default: the config's data.train_split)")
    source.add_argument("--images", metavar="DIR_OR_GLOB",
                        help="these images instead of a split: a folder (its .jpg/.jpeg/.png "
                             "files), one image, or a quoted glob pattern ('frames/*.png', "
                             "'trip/**/*.jpg'); their classes come from --classes / --top-k")
    parser.add_argument("--out-dir", required=True, type=Path,
                        help="where cam_label/, refined/, affinity/ (and cam/, heat/, classes/) "
                             "go, with scores.json")
    parser.add_argument("--classes", metavar="auto|NAME,NAME,...",
                        help="with --images: 'auto' (default) takes the classes whose classifier "
                             "logit is positive (the largest one when none is); names given "
                             "(comma-separated, from the config's class list) are taken for every "
                             "image")
    parser.add_argument("--top-k", type=int, metavar="K",
                        help="with --images: take the K classes with the largest logits instead "
                             "of the positive ones")
    parser.add_argument("--heatmaps", action="store_true",
                        help="with --split: also write heat/<id>_<class>.png (always written "
                             "with --images)")
    parser.add_argument("--max-side", type=int, metavar="PIXELS",
                        help="shrink images whose long side is longer to this for the CAMs; "
                             "outputs keep the image size (default: 512 with --images, no "
                             "limit with --split; 0: no limit)")
    parser.add_argument("--save-npy", action="store_true", help="also write cam/<id>.npy")
    parser.add_argument("--npy-scale", type=float, default=0.25,
                        help="size of the saved CAMs relative to the image (default 0.25)")
    parser.add_argument("--overwrite", action="store_true",
                        help="recompute images whose outputs exist")
    parser.add_argument("overrides", nargs="*", help="config overrides as key=value")
    args = parser.parse_args(argv)
    if not 0 < args.npy_scale <= 1:
        parser.error(f"--npy-scale must lie in (0, 1], got {args.npy_scale}")
    if not args.images and (args.classes is not None or args.top_k is not None):
        parser.error("--classes and --top-k choose the classes of --images, whose images have "
                     "no labels; a split's ids take their own labels")
    if args.top_k is not None:
        if args.top_k < 1:
            parser.error(f"--top-k must be at least 1, got {args.top_k}")
        if args.classes not in (None, "auto"):
            parser.error("--top-k and named --classes exclude each other")
    if args.max_side is not None and args.max_side < 0:
        parser.error(f"--max-side must be 0 (no limit) or positive, got {args.max_side}")
    if args.max_side is None:
        args.max_side = DEFAULT_MAX_SIDE if args.images else 0
    return args


def given_classes(text: str | None, names: list[str]) -> list[int] | None:
    """The class indices of ``--classes a,b`` (None for ``auto`` or nothing); UsageError naming
    an unknown name and listing the known ones."""
    if text is None or text == "auto":
        return None
    wanted = [part.strip() for part in text.split(",") if part.strip()]
    if not wanted:
        raise UsageError("--classes: give 'auto' or class names separated by commas")
    unknown = [name for name in wanted if name not in names[1:]]
    if unknown:
        raise UsageError(f"--classes: unknown class {', '.join(map(repr, unknown))}; the "
                         f"classes of this config are {', '.join(names[1:])}")
    return sorted({names.index(name) for name in wanted})


def class_rule(args: argparse.Namespace) -> str | list[str]:
    """How --images chose its classes, as recorded in run.json and classes/<id>.json."""
    if args.top_k is not None:
        return f"top-{args.top_k}"
    if args.classes in (None, "auto"):
        return "logit > 0 (else the largest)"
    return sorted({part.strip() for part in args.classes.split(",") if part.strip()})


def heat_name(name: str, class_name: str) -> str:
    """``<id>_<class>``, spaces of the class name as underscores (COCO's 'traffic light')."""
    return f"{name}_{class_name.replace(' ', '_')}"



@torch.no_grad()
def pseudo_labels(par, image: torch.Tensor, label: torch.Tensor, ms: MultiScaleCAM, *,
                  thresholds: CamThresholds, radius: int) -> tuple[dict[str, torch.Tensor],
                                                                   torch.Tensor]:
    """The three labels (each (1, H, W) long) of one image (1, 3, H, W) with labels (1, C-1)
    and multi-scale CAM ``ms``, and its masked CAMs (1, C-1, H, W)."""
    height, width = image.shape[-2:]
    cam = ms.cam.float()
    box = torch.tensor([[0, height, 0, width]], device=image.device)
    pseudo = make_pseudo_labels(cam, label, denormalize(image.float()), box, par=par,
                                thresholds=thresholds, aff=ms.aff.float(),
                                aff_grid=ms.aff_grid, radius=radius)
    labels = {"cam_label": pseudo.cam_label, "refined": pseudo.refined_label,
              "affinity": pseudo.aff_pseudo_label}
    return labels, cam * label[:, :, None, None]


class CamInference:
    """One rank's share of the images: pseudo labels, heat maps, files, scores.

    ``images`` is an :class:`ImageSet` (a split: each id's own labels) or an
    :class:`ImageFolder` (``--images``: the classes ``given``, else chosen from the classifier's
    logits by :func:`classes_from_logits` with ``args.top_k``).
    """

    def __init__(self, model, par, images: ImageSet | ImageFolder, files: OutputFiles,
                 cfg: DictConfig, args: argparse.Namespace, device: torch.device,
                 given: list[int] | None = None):
        self.model, self.par, self.images, self.files, self.args, self.device = (
            model, par, images, files, args, device)
        self.given = given
        self.from_classifier = isinstance(images, ImageFolder)
        self.heatmaps = self.from_classifier or args.heatmaps
        self.class_names = class_names(cfg)
        self.min_side = model.encoder.min_input_side
        c = cfg.cam
        self.scales = tuple(c.scales)
        self.label_kwargs = dict(thresholds=C.thresholds(cfg), radius=c.radius)
        self.ignore_index = IGNORE_INDEX
        self.num_classes = num_classes = C.num_classes(cfg)
        self.matrices = {k: ConfusionMatrix(num_classes, device=device) for k in KINDS}
        # Per kind: valid ground-truth pixels the label leaves ignored, valid ground-truth pixels.
        self.ignored = torch.zeros(len(KINDS), 2, dtype=torch.int64, device=device)
        self.scored = 0

    def _score(self, name: str, labels: dict[str, np.ndarray]) -> None:
        if not self.images.has_mask(name):
            return
        gt = self.images.mask(name, labels[KINDS[0]].shape)
        for index, kind in enumerate(KINDS):
            pred, target, ignored, valid = mask_ignored(labels[kind], gt, self.ignore_index)
            self.matrices[kind].update(pred, target)
            self.ignored[index, 0] += ignored
            self.ignored[index, 1] += valid
        self.scored += 1

    def _work_size(self, height: int, width: int) -> tuple[tuple[int, int], bool]:
        """The size the CAMs are made at -- the image's, its long side shrunk to --max-side, and
        enlarged where the smallest CAM scale would leave a side too short for the encoder --
        and whether it was enlarged."""
        if self.args.max_side and max(height, width) > self.args.max_side:
            height, width = long_side_size(height, width, self.args.max_side)
        work = min_side_size(height, width, self.scales, self.min_side)
        return work, work != (height, width)

    @torch.no_grad()
    def _classes(self, name: str, x: torch.Tensor,
                 ms: MultiScaleCAM) -> tuple[list[int], dict | None]:
        """The image's classes (1..C-1) and, for --images, its classes/<id>.json record."""
        if not self.from_classifier:
            return self.images.classes(name), None
        logits = ms.cls_logits  # the classifier on the scale-1 copy: no forward of its own
        if logits is None:  # no 1.0 among the CAM scales
            logits = self.model(x, cls_only=True).cls_logits
        logits = logits[0].float().cpu()  # (C-1,)
        if self.given is not None:  # the given classes, largest logit first
            classes = sorted(self.given, key=lambda c: -float(logits[c - 1]))
        else:
            classes = classes_from_logits(logits, self.args.top_k)
        record = {"classes": [self.class_names[c] for c in classes], "class_indices": classes,
                  "rule": class_rule(self.args),
                  "logits": {self.class_names[c + 1]: round(float(v), 4)
                             for c, v in enumerate(logits)}}
        return classes, record

    def _process(self, name: str) -> None:
        image = self.images.image(name)
        height, width = image.shape[:2]
        x = normalize(image)[None].to(self.device)
        size, enlarged = self._work_size(height, width)
        if enlarged:
            tqdm.write(enlarged_note(self.images.image_path(name), (height, width), size,
                                     self.min_side))
        if size != (height, width):
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        ms = multi_scale_cam(self.model, x, self.scales)
        classes, record = self._classes(name, x, ms)
        label = torch.zeros(1, self.num_classes - 1, device=self.device)
        label[0, [c - 1 for c in classes]] = 1.0
        labels, cam = pseudo_labels(self.par, x, label, ms, **self.label_kwargs)
        if self.args.save_npy:
            npy_size = (max(1, round(height * self.args.npy_scale)),
                        max(1, round(width * self.args.npy_scale)))
            small = F.interpolate(cam, size=npy_size, mode="bilinear", align_corners=False)
            save_npy_atomic(self.files.path("cam", name),
                            small[0].clamp(0, 1).half().cpu().numpy())
        if self.heatmaps:
            for c in classes:  # overlay_heatmap resizes the CAM to the image (bilinear)
                path = self.files.out_dir / "heat" / f"{heat_name(name, self.class_names[c])}.png"
                write_rgb_png_atomic(path, overlay_heatmap(image, cam[0, c - 1].clamp(0, 1)))
        if size != (height, width):  # labels back to the image
            labels = {k: F.interpolate(v[:, None].float(), size=(height, width),
                                       mode="nearest")[:, 0] for k, v in labels.items()}
        labels = {k: v[0].to(torch.uint8).cpu().numpy() for k, v in labels.items()}
        for kind in KINDS:
            write_mask(self.files.path(kind, name), labels[kind])
        if record is not None:  # last: with it every output of the image exists
            write_atomic(self.files.path("classes", name),
                         lambda tmp: tmp.write_text(json.dumps(record, indent=1) + "\n"))
        self._score(name, labels)

    def run(self, names: list[str]) -> int:
        """Process ``names`` (skipping finished ones unless overwriting); returns how many ran."""
        todo = names if self.args.overwrite else [n for n in names if not self.files.done(n)]
        for name in sorted(set(names) - set(todo)):
            self._score(name, {k: read_label_png(self.files.path(k, name)) for k in KINDS})
        for name in tqdm(todo, desc="infer_cam", disable=not D.is_main()):
            self._process(name)
        return len(todo)

    def reduce_(self, all_reduce_sum) -> None:
        """Sum the confusion matrices and ignored counts over ranks."""
        all_reduce_sum(self.ignored)
        for matrix in self.matrices.values():
            matrix.reduce_(all_reduce_sum)

    def scores(self, class_list: list[str]) -> dict:
        """Per kind: the scores' dict plus ``ignored_fraction`` (call after reducing)."""
        out = {}
        for index, kind in enumerate(KINDS):
            ignored, valid = self.ignored[index].tolist()
            out[kind] = self.matrices[kind].compute(class_list).to_dict()
            out[kind]["ignored_fraction"] = ignored / valid if valid else None
        return out


def _write_class_summary(files: OutputFiles, names: list[str]) -> None:
    """``classes.json`` ({id: [class names]}) from every image's classes/<id>.json; prints how
    often each class was chosen."""
    chosen = {name: json.loads(files.path("classes", name).read_text())["classes"]
              for name in names}
    write_atomic(files.out_dir / "classes.json",
                 lambda tmp: tmp.write_text(json.dumps(chosen, indent=1) + "\n"))
    counts = Counter(c for classes in chosen.values() for c in classes)
    print("classes chosen (images): "
          + ", ".join(f"{name} {count}" for name, count in counts.most_common()))


def _scores(run: InferenceRun, job: CamInference, total: int, scored: int) -> dict:
    """Print the scores of the three kinds of labels; the scores.json record."""
    names = class_names(run.cfg)
    scores = job.scores(names)
    print(format_table({k: scores[k]["iou"] for k in KINDS}, names, {
        "mIoU": [scores[k]["miou"] for k in KINDS],
        "ignored": [scores[k]["ignored_fraction"] for k in KINDS]}))
    return {**run.source, "checkpoint_sha256": run.settings["checkpoint_sha256"],
            "num_images": total, "num_scored": scored, **scores}


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = run_config(args, args.overrides)
        given = given_classes(args.classes, class_names(cfg))
        run = InferenceRun.open(args, cfg, cfg.data.train_split)
        if args.images:
            run.source["classes"] = class_rule(args)
        c = cfg.cam
        run.record("infer_cam", cam_scales=list(c.scales), bkg_score=c.thresholds.background,
                   high=c.thresholds.high, low=c.thresholds.low, radius=c.radius,
                   par={k: list(v) if isinstance(v, tuple) else v
                        for k, v in C.par_kwargs(cfg).items()},
                   npy_scale=args.npy_scale if args.save_npy else None,
                   # None when off, so that directories of older runs still resume.
                   max_side=args.max_side or None,
                   heatmaps=True if args.images or args.heatmaps else None)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    kinds = {kind: ".png" for kind in KINDS}
    if args.save_npy:
        kinds = {"cam": ".npy", **kinds}
    if args.images:
        kinds["classes"] = ".json"

    def make_job(files: OutputFiles, device: torch.device) -> CamInference:
        par = PAR(**C.par_kwargs(cfg)).to(device)
        return CamInference(run.model, par, run.images, files, cfg, args, device, given)

    return run.execute(
        make_job, kinds, done="processed", outputs="labels",
        scores=lambda job, total, scored: _scores(run, job, total, scored),
        summarize=(lambda files: _write_class_summary(files, run.images.names))
        if args.images else None)


if __name__ == "__main__":
    sys.exit(main())
