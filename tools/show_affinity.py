r"""Show what AFA learned from attention: the affinity of chosen pixels to the rest of an image.

    python tools/show_affinity.py --config configs/voc.yaml --checkpoint CKPT \
        --image data/VOCdevkit/VOC2012/JPEGImages/2007_000033.jpg --pixels 120,200 250,330 \
        --out affinity.png [key=value ...]

Writes one PNG: the image, then for every query pixel ``y,x`` (image coordinates) a heat map of the
predicted affinity ``aff_pred`` between that pixel's stage-4 position and every other one, and the
single-scale segmentation. The image is resized so its long side is ``infer.long_side``; pixels are
given in the original image's coordinates.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from afa import config as C
from afa.config import load_config
from afa.data import normalize, read_image
from afa.engine.run_config import model_config_from_checkpoint
from afa.engine.validate import check_image_size
from afa.errors import USER_ERRORS, UsageError
from afa.inference import resize_long_side
from afa.io import write_rgb_png
from afa.models import AFANet
from afa.viz import affinity_overlay, colorize_label, make_grid


def _pixel(text: str) -> tuple[int, int]:
    try:
        y, x = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a pixel is 'y,x', got {text!r}") from None
    return y, x


@torch.no_grad()
def affinity_picture(model: AFANet, image, pixels, long_side: int | None):
    """The grid for ``image`` (H, W, 3) uint8 and query ``pixels`` [(y, x), ...]."""
    height, width = image.shape[:2]
    for y, x in pixels:  # before the network runs
        if not (0 <= y < height and 0 <= x < width):
            raise UsageError(f"pixel (y={y}, x={x}) lies outside the {height}x{width} image")
    x = resize_long_side(normalize(image)[None], long_side)
    check_image_size(f"the image ({height}x{width} px, long side resized to {long_side})"
                     if long_side else "the image", tuple(x.shape[-2:]), model, (1.0,))
    out = model(x)  # out.grid: the stage-4 grid the affinity lives on
    seg = F.interpolate(out.seg_logits, size=(height, width), mode="bilinear",
                        align_corners=False).max(dim=1).indices[0]
    panels = [image] + [affinity_overlay(image, out.aff_pred[0], out.grid, p) for p in pixels]
    panels.append(colorize_label(seg))
    titles = ["image"] + [f"affinity of {y},{x}" for y, x in pixels] + ["segmentation"]
    return make_grid(panels, titles=titles)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True,
                        help="a YAML config, e.g. configs/voc.yaml (our checkpoints bring their "
                             "own network settings; the config gives infer.long_side)")
    parser.add_argument("--checkpoint", required=True, help="our checkpoint or the authors'")
    parser.add_argument("--image", required=True, help="an image file (JPEG or PNG, any size)")
    parser.add_argument("--pixels", type=_pixel, nargs="+", required=True, metavar="Y,X",
                        help="query pixels in the original image's coordinates, row first")
    parser.add_argument("--out", required=True, help="the PNG to write (folders are created)")
    parser.add_argument("overrides", nargs="*", help="config overrides as key=value, anywhere "
                                                     "on the line")
    argv = sys.argv[1:] if argv is None else list(argv)
    # key=value overrides may stand anywhere, e.g. after --pixels, whose nargs="+" would
    # otherwise take them for pixels: set them aside before parsing.
    overrides = [a for a in argv if "=" in a and not a.startswith("-")]
    args = parser.parse_args([a for a in argv if a not in overrides])
    overrides = list(args.overrides) + overrides
    try:
        cfg = load_config(args.config, overrides)
        cfg, _, taken = model_config_from_checkpoint(cfg, args.checkpoint, overrides)
        if taken:
            print(taken)
        model = AFANet(**C.model_kwargs(cfg)).eval()
        model.load_weights(args.checkpoint)
        image = read_image(args.image)
        picture = affinity_picture(model, image, args.pixels, cfg.infer.long_side)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_rgb_png(args.out, picture)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
