"""Generate the synthetic demo set (8 shape/texture classes) in the PASCAL VOC layout.

    python tools/make_demo_data.py --out data/demo
    python tools/make_demo_data.py --out data/demo --seed 0 --num-train 3000 --num-val 300 \
        --size 128

Output (the same loader arguments as VOC, with root = list dir = ``--out``)::

    OUT/JPEGImages/{train,val}_NNNNN.jpg
    OUT/SegmentationClassAug/{train,val}_NNNNN.png     palette PNG, 0 bg, 1..8 classes, 255 ignore
    OUT/train_aug.txt  OUT/val.txt  OUT/cls_labels.json  (as tools/prepare_voc.py writes them)
    OUT/ImageSets/Segmentation/{train_aug,val}.txt   (so prepare_voc.py can read it too)
    OUT/meta.json                                    generator version, class names, parameters

A short frame sequence instead (``--frames N``: 1-2 demo objects gliding over a still
background, ``--size`` high and ``--width`` wide, as ``OUT/frame_NNN.png``; the input of
``tools/make_video.py``, see README "Segment a folder of images or frames")::

    python tools/make_demo_data.py --frames 24 --width 160 --out data/demo_frames

Whether OUT already holds the set some flags make (exit 0 if so, 1 if not; writes nothing;
``tools/run_demo.py``, behind ``make demo``, asks before it reuses a set)::

    python tools/make_demo_data.py --out data/demo --num-train 12000 --check

What OUT may hold beforehand. A set goes only into a folder that is absent, empty, or a demo set
this generator wrote (its ``meta.json`` says so, and the folder holds nothing else), which is
removed first, so no image of a larger earlier set is left behind; frames go only into an absent
or empty folder or one of ``frame_NNN.png`` files alone (an earlier sequence, replaced). Any other
folder, a user's data, a VOC root or a folder of VOC lists, is left as it is: the tool names it
and what is in the way on one line and exits with status 2.

Deterministic: the same ``--seed`` and sizes give byte-identical files. The data design (why it is
hard for WSSS yet learnable quickly) is described in ``afa/data/synthetic.py``. The defaults take
about 8 s on one CPU core. Progress bars are drawn only when stderr is a terminal: output
redirected to a log holds the summary lines alone.
"""

import argparse
import json
import re
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from afa.data.synthetic import (  # noqa: E402
    DEMO_CLASSES,
    ELLIPSE_TEXTURES,
    RIM_CONTRAST,
    RIM_FADE,
    NotADemoSet,
    check_demo_args,
    demo_meta,
    make_demo_dataset,
    make_demo_frames,
    remove_demo_set,
)

# make_demo_frames's names; a folder of these alone is taken for an earlier sequence.
_FRAME = re.compile(r"frame_\d{3,}\.png")


def _earlier_frames(out: Path) -> list[Path]:
    """The frames of an earlier sequence in ``out`` (none when it is absent or empty); raises
    :class:`NotADemoSet` when it holds anything else."""
    if not out.exists() and not out.is_symlink():
        return []
    if not out.is_dir():
        raise NotADemoSet(out, "is not a folder")
    entries = sorted(out.iterdir())
    foreign = [p.name for p in entries
               if p.is_symlink() or not p.is_file() or not _FRAME.fullmatch(p.name)]
    if foreign:
        more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
        raise NotADemoSet(out, f"holds {foreign[0]}{more}, which is no frame of an earlier "
                               "--frames run")
    return entries


def _refuse(err: NotADemoSet) -> int:
    print(f"make_demo_data.py: {err}; nothing written there: give another --out, or empty the "
          "folder yourself", file=sys.stderr)
    return 2


def main(argv=None) -> int:
    # Named, since tools/run_demo.py calls main() too: its errors must name this tool.
    parser = argparse.ArgumentParser(prog="make_demo_data.py", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="data/demo", help="output root (default: data/demo)")
    parser.add_argument("--seed", type=int, default=0,
                        help="the generator's seed: another seed, another set (default 0)")
    parser.add_argument("--num-train", type=int, default=3000,
                        help="training images (default 3000; make demo uses 12000)")
    parser.add_argument("--num-val", type=int, default=300,
                        help="validation images with masks (default 300)")
    parser.add_argument("--size", type=int, default=128, help="image side in pixels")
    parser.add_argument("--parts", type=float, default=0.0, metavar="P",
                        help="texture only a part of each object (the pixels within 2P radii of "
                             "the rim along a random direction; 0.5 = one half), the rest plain "
                             "in one of its colours: CAMs then cover only that part (default 0: "
                             "whole objects)")
    parser.add_argument("--parts-share", type=float, default=1.0, metavar="S",
                        help="with --parts: the share of objects textured in part, each drawn "
                             "at random; the others are whole (default 1: all)")
    parser.add_argument("--ellipse-texture", choices=ELLIPSE_TEXTURES, default=ELLIPSE_TEXTURES[0],
                        help="the ellipse's texture: bubbles (hollow circles, default), which no "
                             "other class resembles, or concentric rings (version 3's), nearly "
                             "straight bands away from the centre like the stripes of the "
                             "triangle it co-occurs with; the same set otherwise")
    parser.add_argument("--rim-fade", type=float, default=RIM_FADE, metavar="F",
                        help="each object's texture fades towards its outline over this share of "
                             f"the shape's inradius (default {RIM_FADE}; 0: full contrast to the "
                             "edge, version 3's); the same set otherwise")
    parser.add_argument("--rim-contrast", type=float, default=RIM_CONTRAST, metavar="C",
                        help="with --rim-fade: the texture's contrast left at the outline "
                             f"(default {RIM_CONTRAST}; 1: no fade)")
    parser.add_argument("--check", action="store_true",
                        help="write nothing: exit 0 if OUT/meta.json says OUT holds the set these "
                             "flags make, 1 if not (missing, another version or other flags)")
    parser.add_argument("--frames", type=int, metavar="N",
                        help="write N frames of a moving-object sequence instead of the set")
    parser.add_argument("--width", type=int,
                        help="with --frames: frame width (default: --size; the height is --size)")
    parser.add_argument("--frame-noise", type=float, default=0.0,
                        help="with --frames: per-frame pixel noise (standard deviation, default 0)")
    args = parser.parse_args(argv)
    if args.check and args.frames is not None:
        parser.error("--check applies to the set, not to --frames")
    out = Path(args.out)
    meta_args = dict(seed=args.seed, num_train=args.num_train, num_val=args.num_val,
                     size=args.size, parts=args.parts, parts_share=args.parts_share,
                     ellipse_texture=args.ellipse_texture, rim_fade=args.rim_fade,
                     rim_contrast=args.rim_contrast)
    try:  # before --check too: a flag that makes no set must not count as "another set"
        check_demo_args(args.size, args.parts, args.parts_share, args.ellipse_texture,
                        args.rim_fade, args.rim_contrast)
    except ValueError as err:
        parser.error(str(err))
    if args.check:
        try:
            held = json.loads((out / "meta.json").read_text())
        except (OSError, ValueError):
            held = None
        expected = demo_meta(**meta_args)
        # A set written before meta.json carried "generator" has the same images: still reused.
        unmarked = {k: v for k, v in expected.items() if k != "generator"}
        same = held in (expected, unmarked)
        print(f"{args.out} {'holds' if same else 'does not hold'} the set these flags make")
        return 0 if same else 1
    if args.frames is not None:
        try:
            earlier = _earlier_frames(out)
        except NotADemoSet as err:
            return _refuse(err)
        start = time.time()
        paths = make_demo_frames(args.out, args.frames, args.size, args.width or args.size,
                                 seed=args.seed, noise=args.frame_noise,
                                 ellipse_texture=args.ellipse_texture, rim_fade=args.rim_fade,
                                 rim_contrast=args.rim_contrast)
        for path in set(earlier) - set(paths):  # a longer sequence's tail would play on
            path.unlink()
        print(f"wrote {len(paths)} frames of {args.width or args.size}x{args.size} px to "
              f"{args.out} in {time.time() - start:.1f} s")
        return 0

    try:
        remove_demo_set(out)
    except NotADemoSet as err:
        return _refuse(err)
    start = time.time()
    labels = make_demo_dataset(args.out, **meta_args)
    counts = Counter(c for classes in labels.values() for c in classes)
    per_class = ", ".join(f"{DEMO_CLASSES[c]} {counts[c]}" for c in range(1, len(DEMO_CLASSES)))
    print(f"wrote {args.num_train} train + {args.num_val} val images of {args.size} px to "
          f"{args.out} in {time.time() - start:.1f} s")
    print(f"images per class: {per_class}")
    print(f"loader: root={args.out} name_list={args.out}/train_aug.txt (val.txt) "
          f"label_file={args.out}/cls_labels.json num_classes={len(DEMO_CLASSES)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
