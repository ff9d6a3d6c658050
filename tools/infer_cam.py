"""Write CAMs and pseudo labels of a split (for training a separate segmenter); score them.

Single process (CPU or one GPU):

    python tools/infer_cam.py --config configs/voc.yaml \\
        --checkpoint work_dirs/voc/checkpoints/best.pth --split train_aug \\
        --out-dir work_dirs/voc/pseudo_train_aug [--save-npy] [--overwrite] [key=value ...]

Several processes (images sharded by rank, confusion matrices summed; gloo on CPU, NCCL on GPU):

    torchrun --nproc_per_node=2 tools/infer_cam.py --config configs/voc.yaml --checkpoint ... \\
        --split train_aug --out-dir work_dirs/voc/pseudo_train_aug

Per image, at its own size, with its image-level labels (from ``<data.list_dir>/cls_labels.json``
when it lists the id, else from the ground-truth mask), exactly as one training iteration makes
them (DESIGN.md section 3):

    cam_label/<id>.png  the multi-scale CAM (``cam.scales``) thresholded at ``cam.bkg_score``
                        (step 3)
    refined/<id>.png    the PAR-refined pseudo label with the ``cam.high``/``cam.low`` ignore band
                        (step 4)
    affinity/<id>.png   the affinity pseudo label (steps 8-9): the CAMs propagated by a random walk
                        with ``cam.high`` and with ``cam.low`` as background score, PAR, the same
                        band. The walk uses the affinity predicted at the *largest* CAM scale, as
                        in training (validation uses the scale-1 one), so these are the labels
                        the segmentation branch learns from.
    cam/<id>.npy        with --save-npy: (C-1, h, w) float16 CAMs in [0, 1], channel c = class
                        c + 1, classes absent from the image labels set to 0, resized by
                        --npy-scale (default 0.25: the CAM comes from a stride-16 grid, so a
                        quarter of the image size loses nothing; 1 gives the image size) -- the
                        format tools/visualize.py --cam-dir reads
    scores.json         mIoU of each kind over the images that have a ground-truth mask
    config.yaml, run.json   the merged config and the settings the outputs were made with

Labels are VOC-palette PNGs of class indices, 255 = ignore. Scoring a pseudo label with ignore
pixels: the mIoU is taken over the pixels the label commits to (the ground truth is set to ignore
where the label is 255), and the fraction of valid ground-truth pixels the label leaves ignored is
reported beside it; a label is only as good as both numbers together.

A rerun skips images whose outputs all exist (their saved labels are still scored) unless
``--overwrite``; it refuses to mix outputs of other settings.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from afa import config as C
from afa.atomic import write_atomic
from afa.cam import multi_scale_cam
from afa.config import ConfigError, load_config
from afa.data import DataError, class_names, denormalize, normalize, write_mask
from afa.engine import distributed as D
from afa.engine.run_config import model_config_from_checkpoint
from afa.inference import (ImageSet, OutputFiles, check_run_settings, mask_ignored,
                           run_sharded, save_npy_atomic)
from afa.io import read_label_png
from afa.metrics import ConfusionMatrix, format_table
from afa.models import PAR, AFANet
from afa.pseudo_labels import make_pseudo_labels

__all__ = ["KINDS", "main", "parse_args", "pseudo_labels"]

KINDS = ("cam_label", "refined", "affinity")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML file, e.g. configs/voc.yaml")
    parser.add_argument("--checkpoint", required=True, help="our checkpoint or the authors'")
    parser.add_argument("--split", help="name list <data.list_dir>/<split>.txt "
                                        "(default: the config's data.train_split)")
    parser.add_argument("--out-dir", required=True, type=Path,
                        help="where cam_label/, refined/, affinity/ (and cam/) go, with scores.json")
    parser.add_argument("--save-npy", action="store_true", help="also write cam/<id>.npy")
    parser.add_argument("--npy-scale", type=float, default=0.25,
                        help="size of the saved CAMs relative to the image (default 0.25)")
    parser.add_argument("--overwrite", action="store_true",
                        help="recompute images whose outputs exist")
    parser.add_argument("overrides", nargs="*", help="config overrides as key=value")
    args = parser.parse_args(argv)
    if not 0 < args.npy_scale <= 1:
        parser.error(f"--npy-scale must lie in (0, 1], got {args.npy_scale}")
    return args



@torch.no_grad()
def pseudo_labels(model, par, image: torch.Tensor, label: torch.Tensor, *, scales, bkg_score: float,
                  high: float, low: float, radius: int,
                  ignore_index: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The three labels (each (1, H, W) long) of one image (1, 3, H, W) with labels (1, C-1),
    and its masked CAMs (1, C-1, H, W)."""
    height, width = image.shape[-2:]
    ms = multi_scale_cam(model, image, scales)
    cam = ms.cam.float()
    box = torch.tensor([[0, height, 0, width]], device=image.device)
    pseudo = make_pseudo_labels(cam, label, denormalize(image.float()), box, par=par,
                                cam_bkg=bkg_score, refine_bkg=(high, low), aff=ms.aff.float(),
                                aff_grid=ms.aff_grid, walk_bkg=(high, low), radius=radius,
                                ignore_index=ignore_index)
    labels = {"cam_label": pseudo.cam_label, "refined": pseudo.refined_label,
              "affinity": pseudo.aff_pseudo_label}
    return labels, cam * label[:, :, None, None]


class CamInference:
    """One rank's share of the split: pseudo labels, files, scores."""

    def __init__(self, model, par, images: ImageSet, files: OutputFiles, cfg: DictConfig,
                 args: argparse.Namespace, device: torch.device):
        self.model, self.par, self.images, self.files, self.args, self.device = (
            model, par, images, files, args, device)
        c = cfg.cam
        self.label_kwargs = dict(scales=tuple(c.scales), bkg_score=c.bkg_score, high=c.high,
                                 low=c.low, radius=c.radius, ignore_index=c.ignore_index)
        self.ignore_index = c.ignore_index
        num_classes = cfg.data.num_classes
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

    def _process(self, name: str) -> None:
        image = self.images.image(name)
        x = normalize(image)[None].to(self.device)
        label = self.images.multi_hot(self.images.classes(name))[None].to(self.device)
        labels, cam = pseudo_labels(self.model, self.par, x, label, **self.label_kwargs)
        if self.args.save_npy:
            height, width = image.shape[:2]
            size = (max(1, round(height * self.args.npy_scale)),
                    max(1, round(width * self.args.npy_scale)))
            small = F.interpolate(cam, size=size, mode="bilinear", align_corners=False)
            save_npy_atomic(self.files.path("cam", name),
                            small[0].clamp(0, 1).half().cpu().numpy())
        labels = {k: v[0].to(torch.uint8).cpu().numpy() for k, v in labels.items()}
        for kind in KINDS:  # the last kind is written last: it marks the image done
            write_mask(self.files.path(kind, name), labels[kind])
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


def main(argv=None) -> int:
    args = parse_args(argv)
    kinds = {kind: ".png" for kind in KINDS}
    if args.save_npy:
        kinds = {"cam": ".npy", **kinds}
    try:
        cfg = load_config(args.config, args.overrides)
        # Our checkpoints bring their network settings (backbone, decoder width): say which.
        cfg, _, taken = model_config_from_checkpoint(cfg, args.checkpoint, args.overrides)
        if taken and D.env_rank() == 0:
            print(taken, flush=True)
        split = args.split or cfg.data.train_split
        images = ImageSet(**C.image_set_kwargs(cfg, split))
        model = AFANet(**C.model_kwargs(cfg))
        model.load_weights(args.checkpoint)
        c = cfg.cam
        settings = {"tool": "infer_cam", "checkpoint": str(Path(args.checkpoint).resolve()),
                    "split": split, "cam_scales": list(c.scales), "bkg_score": c.bkg_score,
                    "high": c.high, "low": c.low, "radius": c.radius,
                    "par": {k: list(v) if isinstance(v, tuple) else v
                            for k, v in C.par_kwargs(cfg).items()},
                    "npy_scale": args.npy_scale if args.save_npy else None}
        check_run_settings(args.out_dir, settings, args.overwrite)
    except (ConfigError, DataError, FileNotFoundError, KeyError, RuntimeError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    info = D.init_distributed(cfg.device)
    try:
        model.to(info.device).eval()
        par = PAR(**C.par_kwargs(cfg)).to(info.device)
        files = OutputFiles(args.out_dir, kinds)
        job = CamInference(model, par, images, files, cfg, args, info.device)
        counts = run_sharded(job, images.names, files, OmegaConf.to_yaml(cfg), settings)
    finally:
        D.cleanup()
    if counts is None:
        return 2
    if info.rank == 0:
        ran, scored = counts
        total = len(images.names)
        print(f"{split}: {ran} of {total} images processed, {total - ran} reused from "
              f"{args.out_dir}")
        if scored:
            names = class_names(cfg)
            scores = job.scores(names)
            print(format_table({k: scores[k]["iou"] for k in KINDS}, names, {
                "mIoU": [scores[k]["miou"] for k in KINDS],
                "ignored": [scores[k]["ignored_fraction"] for k in KINDS]}))
            result = {"split": split, "num_images": total, "num_scored": scored, **scores}
            write_atomic(args.out_dir / "scores.json",
                         lambda tmp: tmp.write_text(json.dumps(result, indent=2) + "\n"))
        else:
            print("no ground-truth masks: labels only, no scores")
    return 0


if __name__ == "__main__":
    sys.exit(main())
