"""Does PAR keep each demo class when the CAM is right but coarse?

    python research/par_on_coarse_cams.py --seed 2 --images 300 --size 144

For each val image the generator makes (``afa.data.synthetic.render_sample``, the same images as
``make_demo_data.py --seed S --size N``), a stand-in for a good CAM: each present class's
ground-truth mask averaged over 16 x 16 cells (the encoder's stride) and upsampled bilinearly,
normalised to a maximum of 1. From it, the CAM label at background score 0.45 and the
PAR-refined label (docs/method.md, step 4, with 0.45 as the only background score, PAR as in
configs/demo_full.yaml) are scored against the mask, per class. A class that loses much from
"cam" to "refined" here is one PAR's colour kernel erodes whatever the network learns; one that
keeps it fails, if it fails, in the CAM the network learns.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F

from afa.cam import cam_to_label, refine_cams_with_par
from afa.constants import DEMO_CLASSES
from afa.data.synthetic import _sample_rng, render_sample
from afa.models import PAR


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--size", type=int, default=144)
    parser.add_argument("--stride", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(2)
    par = PAR(dilations=(1, 2, 4, 8), num_iter=5)
    classes = len(DEMO_CLASSES)
    inter = {k: np.zeros(classes) for k in ("cam", "refined")}
    union = {k: np.zeros(classes) for k in ("cam", "refined")}
    for index in range(args.images):
        image, mask = render_sample(_sample_rng(args.seed, "val", index), args.size)
        truth = torch.from_numpy(mask.astype(np.int64))
        labels = torch.zeros(1, classes - 1)
        for c in set(np.unique(mask).tolist()) - {0, 255}:
            labels[0, c - 1] = 1
        onehot = torch.stack([(truth == c).float() for c in range(1, classes)])[None]
        coarse = F.adaptive_avg_pool2d(onehot, args.size // args.stride)
        cam = F.interpolate(coarse, size=mask.shape, mode="bilinear", align_corners=False)
        cam = cam / cam.flatten(2).amax(-1).clamp(min=1e-5)[..., None, None]
        rgb = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
        boxes = torch.tensor([[0, args.size, 0, args.size]])
        predictions = {"cam": cam_to_label(cam, labels, bkg_score=0.45)[0],
                       "refined": refine_cams_with_par(par, rgb, cam, labels, boxes, high=0.45,
                                                       low=0.45)[0]}
        valid = truth != 255
        for kind, pred in predictions.items():
            for c in range(classes):
                p, g = (pred == c) & valid, (truth == c) & valid
                inter[kind][c] += int((p & g).sum())
                union[kind][c] += int((p | g).sum())
    print(f"seed {args.seed}, {args.images} val images of {args.size} px, CAM from the masks "
          f"at stride {args.stride}; IoU in %")
    print("| label | " + " | ".join(DEMO_CLASSES) + " | mean |")
    print("| --- |" + " ---: |" * (classes + 1))
    for kind in ("cam", "refined"):
        iou = 100 * inter[kind] / np.maximum(union[kind], 1)
        print(f"| {kind} | " + " | ".join(f"{v:.1f}" for v in iou) + f" | {iou.mean():.1f} |")


if __name__ == "__main__":
    main()
