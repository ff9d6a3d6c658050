"""Time PAR and one iteration's pseudo-label computation (everything but the network forward).

    python benchmarks/pseudo_labels.py                     # CPU, 2 threads
    python benchmarks/pseudo_labels.py --device cuda

Inputs are synthetic with the shapes of a VOC iteration: smooth random CAMs with 2 and 1 present
classes, the affinity of the 1.5x CAM scale, and the training forward's outputs at stride 4 / 16.
Prints the minimum and the median of ``--repeat`` timed runs after one warm-up run; on a shared
machine the minimum is the better estimate of the code's own cost.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from afa.losses import DenseCRFLoss
from afa.models.par import PAR
from afa.pseudo_labels import compute_afa_losses


def _timed(fn, device: torch.device, repeat: int) -> str:
    fn()
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return f"min {min(times):.3f} s, median {statistics.median(times):.3f} s"


def _iteration_inputs(batch: int, crop: int, num_classes: int, device: torch.device) -> dict:
    gen = torch.Generator().manual_seed(0)
    labels = torch.zeros(batch, num_classes - 1)
    labels[0, [6, 14]] = 1
    labels[1:, 11] = 1
    cam = F.interpolate(torch.rand(batch, num_classes - 1, 8, 8, generator=gen), size=(crop, crop),
                        mode="bicubic", align_corners=False).clamp(0, 1)
    tokens, tokens_large = (crop // 16) ** 2, (int(crop * 1.5) // 16) ** 2
    inputs = dict(
        cls_logits=torch.randn(batch, num_classes - 1, generator=gen),
        seg_logits=torch.randn(batch, num_classes, crop // 4, crop // 4, generator=gen),
        aff_pred=torch.rand(batch, tokens, tokens, generator=gen),
        cam=cam,
        cam_aff=torch.rand(batch, tokens_large, tokens_large, generator=gen),
        grids=((crop // 16, crop // 16), (int(crop * 1.5) // 16, int(crop * 1.5) // 16)),
        rgb=torch.rand(batch, 3, crop, crop, generator=gen),
        labels=labels,
        boxes=torch.tensor([[0, crop, 0, crop]] + [[16, crop, 0, crop - 40]] * (batch - 1)),
    )
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}")

    par = PAR(num_iter=10).to(device)
    rgb = torch.rand(2, 3, 256, 256, device=device)
    masks = torch.rand(2, 21, 256, 256, device=device)
    with torch.no_grad():
        timing = _timed(lambda: par(rgb, masks), device, args.repeat)
    print(f"PAR, 2 x 21 channels, 256x256, 10 iterations: {timing}")

    inputs = _iteration_inputs(batch=2, crop=320, num_classes=21, device=device)
    crf = DenseCRFLoss()
    for name, crf_loss in (("without", None), ("with", crf)):
        timing = _timed(lambda: compute_afa_losses(**inputs, affinity_target=True, par=par,
                                                   crf_loss=crf_loss), device, args.repeat)
        print(f"compute_afa_losses, batch 2, crop 320, {name} the DenseCRF loss: {timing}")


if __name__ == "__main__":
    main()
