"""The regularized loss's bilateral filter alone, on each backend (``loss.reg_backend``).

    python benchmarks/bilateral_filter.py                       # CPU: pydensecrf and torch
    python benchmarks/bilateral_filter.py --device cuda         # adds torch on the GPU
    python benchmarks/bilateral_filter.py --batch 4 --crop 512 --classes 21 --workers 4

The input is what the loss filters at the VOC setting: a batch of ``--crop`` crops at half
resolution (``loss.reg_scale``), ``--classes`` softmax maps, kernel widths 15 (colour) and
100 x 0.5 (position). The crops are cut from the repository's photos (tests/data/voc_photos),
resized to the crop; the maps are smooth random softmax maps.

Timed from the loss's ``start`` until the filtered values are on the device (what the training
step waits for at most), the fastest and the median of ``--repeats`` after one warm-up:

- ``pydensecrf``: pydensecrf2's C++ lattice, the images one after another in this process, and
  with ``--workers`` processes (one image each, as the trainer runs it on CUDA);
- ``torch``: afa.permutohedral on the CPU (``--threads``), and on CUDA with ``--device cuda``.

Prints one line per backend and one JSON line, and checks that every backend's values equal the
reference's (bit for bit on the CPU).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from afa.losses import DenseCRFLoss, time_filter

REPO = Path(__file__).resolve().parents[1]
PHOTOS = REPO / "tests" / "data" / "voc_photos" / "JPEGImages"


def inputs(batch: int, crop: int, classes: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rgb in [0, 1], softmax maps, full boxes) of ``batch`` photo crops."""
    paths = sorted(PHOTOS.glob("*.jpg"))
    rgb = torch.stack([
        torch.from_numpy(np.asarray(Image.open(paths[i % len(paths)]).convert("RGB")
                                    .resize((crop, crop), Image.BILINEAR), dtype=np.float32))
        .permute(2, 0, 1) / 255 for i in range(batch)])
    gen = torch.Generator().manual_seed(0)
    logits = F.avg_pool2d(torch.randn(batch, classes, crop // 8, crop // 8, generator=gen), 3, 1, 1)
    probs = F.interpolate(logits * 4, size=(crop, crop), mode="bilinear").softmax(dim=1)
    boxes = torch.tensor([[0, crop, 0, crop]] * batch)
    return rgb, probs, boxes


def timed(crf: DenseCRFLoss, inputs_on_device, repeats: int):
    """(seconds of each timed run, the filtered values, on the CPU)."""
    times = time_filter(crf, *inputs_on_device, repeats=repeats)
    return times, crf.start(*inputs_on_device)._filtered().cpu()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--crop", type=int, default=512)
    parser.add_argument("--classes", type=int, default=21)
    parser.add_argument("--workers", type=int, default=4,
                        help="pydensecrf processes for the batch (0: only in this process)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (CPU)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rgb, probs, boxes = inputs(args.batch, args.crop, args.classes)
    cpu = torch.device("cpu")
    runs = [("pydensecrf", "in this process", DenseCRFLoss(backend="pydensecrf"), cpu)]
    if args.workers:
        runs.append(("pydensecrf", f"{args.workers} process{'es' if args.workers > 1 else ''}",
                     DenseCRFLoss(backend="pydensecrf", workers=args.workers), cpu))
    runs.append(("torch", f"cpu, {args.threads} threads", DenseCRFLoss(backend="torch"), cpu))
    if args.device == "cuda":
        runs.append(("torch", torch.cuda.get_device_name(), DenseCRFLoss(backend="torch"),
                     torch.device("cuda")))
    size = args.crop // 2
    record = {"batch": args.batch, "size": size, "classes": args.classes,
              "processor": platform.processor() or platform.machine(), "threads": args.threads,
              "torch": torch.__version__, "runs": []}
    reference = None
    for backend, where, crf, device in runs:
        times, out = timed(crf, [x.to(device) for x in (rgb, probs, boxes)], args.repeats)
        crf.close()
        if reference is None:
            reference = out
        equal = bool(torch.equal(out, reference))
        error = float(((out - reference).abs().max() / reference.abs().max()))
        line = {"backend": backend, "where": where, "min_ms": round(min(times) * 1e3, 2),
                "median_ms": round(statistics.median(times) * 1e3, 2), "equal": equal,
                "max_relative_difference": error}
        record["runs"].append(line)
        print(f"{backend:10s} {where:28s} {args.batch} x {args.classes} x {size} x {size}: "
              f"min {line['min_ms']:8.2f} ms, median {line['median_ms']:8.2f} ms "
              f"({'equal to the reference' if equal else f'max relative difference {error:.1e}'})")
    print(json.dumps(record))


if __name__ == "__main__":
    main()
