"""Images per second of infer_seg's core: multi-scale + flip prediction, with and without the CRF.

    python benchmarks/infer.py                                  # CPU, mit_b1, 500x375, 2 threads
    python benchmarks/infer.py --device cuda --images 50
    python benchmarks/infer.py --image-dir tests/data/voc_photos/JPEGImages

What is timed per image is what ``tools/infer_seg.py`` does between reading the image and writing
its files: ``afa.inference.predict_seg_logits`` at the paper's test setting (long side 512, scales
1.0/0.5/0.75, flip) with a randomly initialised VOC model (21 classes), then the argmax; with the
CRF, the softmax goes to ``afa.crf.dense_crf_many`` (10 iterations, the paper's kernels), serially
(``workers=0``) and through the process pool that overlaps the CRF with the network (its
start-up, about a second per worker, is inside the timing; a real split amortises it). The CRF
alone on precomputed probabilities is timed too.

Random images are smooth colour fields (bicubic-upsampled 12x16 noise plus mild pixel noise): the
CRF's bilateral lattice grows with the number of distinct colours, so white noise would make it
unrealistically slow. ``--image-dir`` times real photos instead (the first ``--images`` JPEGs, at
their own sizes). One warm-up image is not timed. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from afa.crf import dense_crf_many
from afa.data import normalize, read_image
from afa.inference import predict_seg_logits
from afa.models import AFANet
from afa.host_memory import keep_freed_host_memory


def _random_images(count: int, height: int, width: int, seed: int = 0) -> list[np.ndarray]:
    gen = torch.Generator().manual_seed(seed)
    images = []
    for _ in range(count):
        field = torch.rand(1, 3, 12, 16, generator=gen) * 255
        field = F.interpolate(field, size=(height, width), mode="bicubic", align_corners=False)
        field = field + torch.randn(1, 3, height, width, generator=gen) * 4
        images.append(field[0].clamp(0, 255).round().byte().permute(1, 2, 0).numpy())
    return images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (CPU)")
    parser.add_argument("--backbone", default="mit_b1")
    parser.add_argument("--images", type=int, default=4, help="timed images")
    parser.add_argument("--image-dir", type=Path, help="time these JPEGs instead of random ones")
    parser.add_argument("--crf-workers", type=int, default=2, help="processes of the CRF pool")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"host memory: {keep_freed_host_memory()}")  # as the tools; AFA_KEEP_HOST_MEMORY=0: not
    device = torch.device(args.device)

    model = AFANet(args.backbone, num_classes=21).to(device).eval()
    if args.image_dir:
        paths = sorted(args.image_dir.glob("*.jpg"))[: args.images + 1]
        images = [read_image(p) for p in paths]
    else:
        images = _random_images(args.images + 1, 375, 500)
    warmup, timed = images[0], images[1:]

    def logits_of(image: np.ndarray) -> torch.Tensor:
        x = normalize(image)[None].to(device)
        return predict_seg_logits(model, x, (1.0, 0.5, 0.75), True, 512)[0]

    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def seg_only() -> None:
        for image in timed:
            logits_of(image).max(0).indices.cpu()
        synchronize()

    def with_crf(workers: int):
        def pairs():
            for image in timed:
                yield image, logits_of(image).softmax(0).cpu().numpy()

        def run() -> None:
            for q in dense_crf_many(pairs(), workers=workers):
                q.argmax(0)
        return run

    def crf_only() -> None:
        for q in dense_crf_many(zip(timed, probs), workers=0):
            q.argmax(0)

    def images_per_second(fn) -> float:
        start = time.perf_counter()
        fn()
        return len(timed) / (time.perf_counter() - start)

    logits_of(warmup)
    probs = [logits_of(image).softmax(0).cpu().numpy() for image in timed]
    result = {
        "device": str(device), "threads": torch.get_num_threads(), "backbone": args.backbone,
        "images": len(timed),
        "sizes": sorted({f"{im.shape[1]}x{im.shape[0]}" for im in timed}),
        "source": str(args.image_dir) if args.image_dir else "random smooth",
        "seg_images_per_s": round(images_per_second(seg_only), 3),
        "crf_only_images_per_s": round(images_per_second(crf_only), 3),
        "seg_crf_serial_images_per_s": round(images_per_second(with_crf(0)), 3),
        f"seg_crf_pool{args.crf_workers}_images_per_s":
            round(images_per_second(with_crf(args.crf_workers)), 3),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
