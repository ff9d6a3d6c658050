"""An animated GIF (and an MP4) of a folder of frames: image | CAM of the main class | segmentation.

From a folder of video frames (or photos) to a GIF in three commands: segment the folder, take its
CAMs, draw them (the same ``--images`` in all three; ``CFG``/``CKPT`` as for any inference):

    python tools/infer_seg.py --config CFG --checkpoint CKPT --images frames/ --out-dir out/seg
    python tools/infer_cam.py --config CFG --checkpoint CKPT --images frames/ --out-dir out/cam
    python tools/make_video.py --images frames/ --seg-dir out/seg --cam-dir out/cam \\
        --out frames.gif [--mp4 frames.mp4] [--fps 8] [--max-width 640]

One frame per image, in the order of ``afa.data.folder.ImageFolder`` (by name, numbers compared
as numbers: ``frame2`` before ``frame10``). Each frame shows, side by side:

    image          the frame
    CAM: <class>   ``<cam-dir>/heat/<id>_<class>.png`` of the image's main class: the first of
                   ``<cam-dir>/classes/<id>.json``, i.e. the chosen class with the largest
                   classifier logit (``tools/infer_cam.py --images``, whose --classes / --top-k
                   chose the classes)
    segmentation   ``<seg-dir>/pred/<id>.png`` in VOC-palette colours over the image

with, below, a legend of the classes present in the segmentation (those on more than
``--legend-min-area`` of the frame, default 0.005, so that a few stray pixels do not crowd it; 0
lists every class present). ``--seg-dir`` or ``--cam-dir`` alone gives two panels. The class
names come from the ``config.yaml`` that the tools wrote into those folders.

Every panel is shrunk so that a frame is at most ``--max-width`` pixels wide (default 640) and a
panel at most as tall (small frames are not enlarged); frames of different sizes sit in the
middle of one canvas as large as the largest, white around them, each with its legend as wide as
the canvas. Titles and class names too long for their room are set smaller and then shortened
with "...". All frames
are held in memory (about 0.3 MB each at 640 px). The GIF loops forever at ``--fps`` (default 8)
with one palette of ``--colors`` colours (default 255; fewer give a smaller file); Pillow writes
consecutive identical frames as one frame shown for their total time. ``--limit N`` takes the
first N frames. ``--mp4`` also writes an H.264 MP4 and needs the optional package
``imageio-ffmpeg`` (``pip install imageio-ffmpeg`` or ``pip install -e .[video]``; it brings its
own ffmpeg); without it the tool stops before drawing anything.

Missing outputs (an id without ``pred/<id>.png``, ``classes/<id>.json`` or its heat map), an
unreadable frame or a folder without images: a message naming the file or folder, exit status 2.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from tqdm import tqdm

from afa.atomic import write_atomic
from afa.data import DataError, read_image
from afa.data.folder import ImageFolder
from afa.errors import USER_ERRORS
from afa.io import RUN_CONFIG, read_label_png, run_class_names
from afa.viz import label_entries, legend, make_grid, overlay_label

__all__ = ["compose_frame", "main", "parse_args", "render_frames", "write_gif", "write_mp4"]

PAD = 4  # pixels between panels (make_grid's default)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:3]),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", required=True, metavar="DIR_OR_GLOB",
                        help="the frames: the --images given to infer_seg and infer_cam")
    parser.add_argument("--seg-dir", type=Path,
                        help="--out-dir of tools/infer_seg.py --images (reads pred/<id>.png)")
    parser.add_argument("--cam-dir", type=Path,
                        help="--out-dir of tools/infer_cam.py --images (reads classes/<id>.json "
                             "and heat/<id>_<class>.png)")
    parser.add_argument("--out", required=True, type=Path, help="the GIF to write")
    parser.add_argument("--mp4", type=Path,
                        help="also write this MP4 (needs: pip install imageio-ffmpeg)")
    parser.add_argument("--fps", type=float, default=8.0, help="frames per second (default 8)")
    parser.add_argument("--max-width", type=int, default=640,
                        help="largest frame width in pixels; panels are shrunk to fit "
                             "(default 640)")
    parser.add_argument("--colors", type=int, default=255,
                        help="colours of the GIF's one palette, 2-255 (default 255; fewer give "
                             "smaller files)")
    parser.add_argument("--legend-min-area", type=float, default=0.005, metavar="FRACTION",
                        help="leave classes on no more than this fraction of a frame out of its "
                             "legend (default 0.005; 0: every class present)")
    parser.add_argument("--limit", type=int, help="only the first LIMIT frames")
    args = parser.parse_args(argv)
    if args.seg_dir is None and args.cam_dir is None:
        parser.error("give --seg-dir, --cam-dir or both")
    if args.fps <= 0:
        parser.error(f"--fps must be positive, got {args.fps}")
    if args.max_width < 3 * 16:
        parser.error(f"--max-width must be at least 48 pixels, got {args.max_width}")
    if not 0 <= args.legend_min_area < 1:
        parser.error(f"--legend-min-area must lie in [0, 1), got {args.legend_min_area}")
    if not 2 <= args.colors <= 255:
        parser.error(f"--colors must lie in 2..255, got {args.colors}")
    if args.limit is not None and args.limit < 1:
        parser.error(f"--limit must be at least 1, got {args.limit}")
    return args


def _class_names(dirs: Sequence[Path]) -> list[str]:
    """Class names of the config.yaml the inference tools saved in ``dirs``; they must agree."""
    found = {}
    for directory in dirs:
        path = directory / RUN_CONFIG
        names = run_class_names(directory)  # a custom set's too: its data.classes
        if names is None:
            raise DataError(f"{path}: not found; is {directory} the --out-dir of "
                            "tools/infer_seg.py or tools/infer_cam.py?")
        found[path] = names
    names = list(found.values())
    if any(n != names[0] for n in names):
        raise DataError(f"{' and '.join(map(str, found))} name different classes: were they "
                        "made with the same config?")
    return names[0]


def _require(path: Path, tool: str) -> Path:
    if not path.is_file():
        raise DataError(f"{path}: missing; run tools/{tool} with the same --images into "
                        f"{path.parent.parent}")
    return path


def _main_class(cam_dir: Path, name: str) -> str:
    """The chosen class with the largest logit (classes/<id>.json lists them in that order)."""
    path = _require(cam_dir / "classes" / f"{name}.json", "infer_cam.py")
    try:
        return json.loads(path.read_text())["classes"][0]
    except (json.JSONDecodeError, KeyError, IndexError, TypeError) as err:
        raise DataError(f"{path}: not a classes record of tools/infer_cam.py ({err})") from err


def _panel_width(height: int, width: int, count: int, max_width: int) -> int:
    """The width of each of ``count`` panels of a ``height`` x ``width`` image: the frame at most
    ``max_width`` wide and a panel at most ``max_width`` tall (a tall, thin image would
    otherwise make every frame of the GIF that tall); never enlarged."""
    room = (max_width - (count - 1) * PAD) // count
    return max(1, min(width, room, width * max_width // height))


def _resize(array: np.ndarray, width: int, nearest: bool = False) -> np.ndarray:
    """``array`` at ``width`` pixels wide, aspect kept (area averaging, or nearest for labels)."""
    if array.shape[1] == width:
        return array
    height = max(1, round(array.shape[0] * width / array.shape[1]))
    mode = cv2.INTER_NEAREST if nearest else cv2.INTER_AREA
    return cv2.resize(array, (width, height), interpolation=mode)


def _frame_parts(image: np.ndarray, *, names: Sequence[str], max_width: int,
                 heat: np.ndarray | None, cam_class: str | None, pred: np.ndarray | None,
                 legend_min_area: float) -> tuple[np.ndarray, list | None]:
    """The titled panels of a frame and its legend entries (None without a segmentation)."""
    count = 1 + (heat is not None) + (pred is not None)
    width = _panel_width(*image.shape[:2], count, max_width)
    small = _resize(image, width)
    panels, titles = [small], ["image"]
    if heat is not None:
        panels.append(_resize(heat, width))
        titles.append(f"CAM: {cam_class}")
    if pred is not None:
        panels.append(overlay_label(small, _resize(pred, width, nearest=True)))
        titles.append("segmentation")
    grid = make_grid(panels, titles=titles, pad=PAD)
    if pred is None:
        return grid, None
    # Counted on the full-size prediction, so that --legend-min-area means the same at any size.
    return grid, label_entries([pred], names, min_fraction=legend_min_area)


def _assemble(grid: np.ndarray, entries: list | None, width: int) -> np.ndarray:
    """The panels in the middle of a white band ``width`` wide, over the legend of ``entries``
    drawn across that whole width (a narrow frame's legend gets the room of the widest)."""
    band = np.full((grid.shape[0], width, 3), 255, dtype=np.uint8)
    left = (width - grid.shape[1]) // 2
    band[:, left : left + grid.shape[1]] = grid
    if entries is None:
        return band
    strip = legend(entries or [("no object", (255, 255, 255))], width)
    return np.concatenate([band, strip], axis=0)


def compose_frame(image: np.ndarray, *, names: Sequence[str], max_width: int,
                  heat: np.ndarray | None = None, cam_class: str | None = None,
                  pred: np.ndarray | None = None, legend_min_area: float = 0.0,
                  width: int | None = None) -> np.ndarray:
    """One frame: image | CAM heat map | segmentation overlay (those given), titled, with the
    legend of the classes in ``pred`` (on more than ``legend_min_area`` of it) below; panels
    shrunk to fit ``max_width`` (and as tall at most). ``width``: a wider frame, the panels
    centred in it."""
    grid, entries = _frame_parts(image, names=names, max_width=max_width, heat=heat,
                                 cam_class=cam_class, pred=pred, legend_min_area=legend_min_area)
    return _assemble(grid, entries, max(grid.shape[1], width or 0))


def render_frames(folder: ImageFolder, *, seg_dir: Path | None, cam_dir: Path | None,
                  max_width: int, legend_min_area: float = 0.0,
                  limit: int | None = None) -> list[np.ndarray]:
    """The composed frames of ``folder`` on one canvas with even sides, each frame in its middle
    (white around it) and its legend as wide as the canvas."""
    names = _class_names([d for d in (seg_dir, cam_dir) if d is not None])
    parts = []
    for name in tqdm(folder.names[:limit], desc="make_video"):
        image = folder.image(name)
        heat = cam_class = pred = None
        if cam_dir is not None:
            cam_class = _main_class(cam_dir, name)
            heat_file = f"{name}_{cam_class.replace(' ', '_')}.png"  # infer_cam's heat_name
            heat = read_image(_require(cam_dir / "heat" / heat_file, "infer_cam.py"))
        if seg_dir is not None:
            pred = read_label_png(_require(seg_dir / "pred" / f"{name}.png", "infer_seg.py"))
        for what, array in (("heat map", heat), ("prediction", pred)):
            if array is not None and array.shape[:2] != image.shape[:2]:
                raise DataError(f"{folder.image_path(name)}: its {what} is "
                                f"{array.shape[1]}x{array.shape[0]}, the image "
                                f"{image.shape[1]}x{image.shape[0]}: outputs of other images?")
        parts.append(_frame_parts(image, names=names, max_width=max_width, heat=heat,
                                  cam_class=cam_class, pred=pred,
                                  legend_min_area=legend_min_area))
    width = max(grid.shape[1] for grid, _ in parts)
    width += width % 2  # H.264's 4:2:0 wants even sides
    frames = [_assemble(grid, entries, width) for grid, entries in parts]
    height = max(f.shape[0] for f in frames)
    height += height % 2
    canvas = []
    for frame in frames:
        padded = np.full((height, width, 3), 255, dtype=np.uint8)
        top = (height - frame.shape[0]) // 2
        padded[top : top + frame.shape[0]] = frame
        canvas.append(padded)
    return canvas


def write_gif(path: Path, frames: Sequence[np.ndarray], fps: float, colors: int = 255) -> None:
    """An endlessly looping GIF of RGB ``frames`` (one size), atomically.

    One palette of ``colors`` colours (median cut over up to 8 evenly spaced frames) serves every
    frame, without dithering: what stays still keeps its palette index, so Pillow stores only
    the changed pixels of each frame (the spare 256th index marks the unchanged ones). A palette
    per frame would change indices everywhere and makes the file several times larger.
    """
    sample = np.concatenate(list(frames[:: max(1, len(frames) // 8)]), axis=0)
    palette = Image.fromarray(sample).quantize(colors=colors, method=Image.Quantize.MEDIANCUT,
                                               dither=Image.Dither.NONE)
    images = [Image.fromarray(f).quantize(palette=palette, dither=Image.Dither.NONE)
              for f in frames]
    duration = max(10, round(1000 / fps))  # milliseconds; GIF counts in tens of them
    write_atomic(path, lambda tmp: images[0].save(
        tmp, format="GIF", save_all=True, append_images=images[1:], duration=duration, loop=0,
        optimize=True))


def ffmpeg_available() -> bool:
    return importlib.util.find_spec("imageio_ffmpeg") is not None


def write_mp4(path: Path, frames: Sequence[np.ndarray], fps: float) -> None:
    """An H.264 MP4 (yuv420p, plays everywhere) through imageio's ffmpeg plugin, atomically."""
    import imageio.v2 as imageio

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")  # ffmpeg reads the suffix
    try:
        # macro_block_size=2: the frames already have even sides, so imageio need not resize.
        with imageio.get_writer(tmp, format="FFMPEG", mode="I", fps=fps, codec="libx264",
                                pixelformat="yuv420p", macro_block_size=2,
                                ffmpeg_log_level="error") as writer:
            for frame in frames:
                writer.append_data(frame)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.mp4 and not ffmpeg_available():
        print("make_video: error: --mp4 needs the package imageio-ffmpeg, which is not "
              "installed: pip install imageio-ffmpeg (or leave out --mp4 for the GIF alone)",
              file=sys.stderr)
        return 2
    try:
        folder = ImageFolder(args.images)
        frames = render_frames(folder, seg_dir=args.seg_dir, cam_dir=args.cam_dir,
                               max_width=args.max_width,
                               legend_min_area=args.legend_min_area, limit=args.limit)
    except USER_ERRORS as err:
        print(f"make_video: error: {err}", file=sys.stderr)
        return 2
    write_gif(args.out, frames, args.fps, args.colors)
    height, width = frames[0].shape[:2]
    print(f"{args.out}: {len(frames)} frames of {width}x{height} at {args.fps:g} fps, "
          f"{args.out.stat().st_size / 1024:.0f} KB")
    if args.mp4:
        write_mp4(args.mp4, frames, args.fps)
        print(f"{args.mp4}: {args.mp4.stat().st_size / 1024:.0f} KB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
