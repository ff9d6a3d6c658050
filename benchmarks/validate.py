"""Seconds per image of the trainer's validation (``afa.engine.validate.predict_labels``).

    python benchmarks/validate.py                                    # CPU, mit_b1, 2 threads
    python benchmarks/validate.py --image-dir tests/data/voc_photos/JPEGImages --images 10
    python benchmarks/validate.py --config configs/coco.yaml --size 480x640   # COCO's setting

Per image: the five label maps validation scores (CAM, PAR-refined CAM, affinity CAM, affinity
pseudo label, single-scale segmentation) with the config's CAM scales, PAR and radius (VOC's by
default: 1.0, 0.5, 1.5), a randomly initialised model with the config's classes, one image at a
time at its own size. Random images are ``--size`` (375x500) smooth colour fields; ``--image-dir`` times real photos (the first ``--images``
JPEGs, sorted by name). One warm-up image is not timed. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from afa import config as C
from afa.config import load_config
from afa.data import normalize, read_image
from afa.engine.validate import predict_labels
from afa.models import PAR, AFANet
from afa.host_memory import keep_freed_host_memory

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="mit_b1")
    parser.add_argument("--images", type=int, default=5)
    parser.add_argument("--image-dir", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "voc.yaml")
    parser.add_argument("--size", default="375x500", help="HxW of the random images")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--amp", default="none", choices=("none", "bf16"),
                        help="the forwards' precision (train.amp)")
    args = parser.parse_args()
    device = torch.device(args.device)
    height, width = (int(v) for v in args.size.split("x"))
    torch.set_num_threads(args.threads)
    print(f"host memory: {keep_freed_host_memory()}")  # as the tools; AFA_KEEP_HOST_MEMORY=0: not
    cfg = load_config(args.config, [f"model.backbone={args.backbone}"])
    classes = C.num_classes(cfg)
    torch.manual_seed(0)
    model = AFANet(args.backbone, num_classes=classes).eval().to(device)
    par = PAR(**C.par_kwargs(cfg)).to(device)
    if args.image_dir:
        paths = sorted(args.image_dir.glob("*.jpg"))[:args.images + 1]
        images = [normalize(read_image(p))[None] for p in paths]
    else:
        gen = torch.Generator().manual_seed(0)
        images = [F.interpolate(torch.randn(1, 3, 12, 16, generator=gen), size=(height, width),
                                mode="bicubic", align_corners=False)
                  for _ in range(args.images + 1)]
    label = torch.zeros(1, classes - 1, device=device)
    label[0, [6, 14]] = 1
    kwargs = dict(par=par, cam_scales=tuple(cfg.cam.scales), thresholds=C.thresholds(cfg),
                  radius=cfg.cam.radius, amp=args.amp)
    times = []
    for i, image in enumerate(images):
        image = image.to(device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        predict_labels(model, image, label, **kwargs)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:  # the first is a warm-up
            times.append(time.perf_counter() - start)
    print(json.dumps({"backbone": args.backbone, "device": args.device, "amp": args.amp,
                      "threads": args.threads, "images": len(times),
                      "sec_per_image": round(statistics.median(times), 3),
                      "config": str(args.config), "par_iters": cfg.par.num_iter,
                      "source": str(args.image_dir) if args.image_dir else f"random {args.size}"}))


if __name__ == "__main__":
    main()
