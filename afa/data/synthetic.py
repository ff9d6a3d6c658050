"""A synthetic weakly-supervised segmentation set in the PASCAL VOC layout (``make demo``).

Design. Eight object classes whose identity is carried by *shape and texture together*, never by
colour: every colour in an image (both colours of each object's texture, the background field and
the clutter) is drawn from one shared distribution (uniform RGB), so no colour threshold separates
a class from another class or from the background. Each class has its own silhouette and its own
texture, drawn in the object's rotated frame:

    class      shape                         texture
    disc       filled circle                 polka dots
    square     square                        checkerboard
    triangle   equilateral triangle          straight stripes
    star       five-pointed star             brick wall (offset rows)
    ring       annulus (background inside)   grid of thin lines
    cross      plus sign                     random blocks (binary noise)
    crescent   disc minus an offset disc     zigzag (chevron) stripes
    ellipse    ellipse, aspect ~0.45         bubbles (hollow circles)

What makes it a WSSS problem rather than a colour-threshold one:

- the background is a smooth random colour field (same colour distribution) with a fine irregular
  grain, a few random lines and small blobs on top, then pixel noise over the whole image;
- several textures share local statistics (stripes, zigzag and bricks are all straight-edged
  bands; dots and bubbles are both round), so shape and context still matter. But no
  co-occurring pair (below) is two bands: in version 3 the ellipse wore concentric rings, which
  away from their centre are bands like the stripes of the triangle it co-occurs with, and in
  some runs the classifier told the two apart only at a corner or a centre and lost the triangle
  (``ellipse_texture="concentric"`` draws them again);
- each object's texture fades towards its outline (version 4, ``rim_fade``, ``rim_contrast``):
  full contrast deeper than 0.3 of the shape's inradius, falling to a tenth at the outline,
  towards the mean of its two colours. As on a real object, whose CAM fires on the distinctive
  part and weakly on the rest, the rim carries little class evidence, so the CAM is partial
  there, while the rim's colours run on continuously from the core, which PAR's colour kernel
  and an affinity can follow. With full contrast to the edge (``rim_fade=0``) and no confusable
  pair, a CAM covers the shapes about as well as any walk could spread it, and the affinity
  branch has nothing to add; fading half the inradius leaves CAMs on the cores only
  (docs/demo.md gives the runs);
- 1-3 objects per image from 1-2 classes, diameters 30-65% of the image side, random rotation and
  position (objects may be cut by the border), later objects partially occlude earlier ones (each
  keeps at least half of its visible area), and sometimes a thin occluding stick crosses the scene;
- classes come in fixed co-occurring pairs (disc+ring, square+cross, triangle+ellipse,
  star+crescent): a two-class image shows such a pair 60% of the time, so image-level labels alone
  do not tell a class from its partner; single-class images (half of all) break the tie;
- the ring's hole shows background, so a CAM that fills the convex hull is penalised.

What keeps it learnable by a small network trained from scratch in minutes: objects are large,
silhouettes are distinct, the two colours of a texture always differ in brightness (by at least
100 of 255 in luma), so texture is a luminance pattern whatever the hues, and texture periods
(7-10% of the side) survive a 0.5x rescale.

Masks follow VOC: 0 background, 1..8 the classes, 255 on a thin band (one pixel on each side) along
every label boundary, where JPEG and anti-aliasing make the true label ambiguous. Image-level labels
are the classes present in the final mask. Each image is generated from its own generator seeded by
``(seed, split, index)``, so the output is byte-identical for a seed on any machine with the same
PIL/zlib/libjpeg, however the work is scheduled.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from tqdm import tqdm

from afa.constants import DEMO_CLASSES, IGNORE_INDEX
from afa.data.voc import labels_from_mask, write_label_file, write_mask, write_name_list

__all__ = [
    "DEMO_VERSION",
    "DEMO_GENERATOR",
    "DEMO_CLASSES",
    "CLASS_TEXTURES",
    "ELLIPSE_TEXTURES",
    "CO_OCCURRING",
    "demo_meta",
    "check_demo_args",
    "render_sample",
    "render_frames",
    "make_demo_frames",
    "generate_split",
    "make_demo_dataset",
    "NotADemoSet",
    "demo_set_contents",
    "remove_demo_set",
]

# Bumped whenever the generated images change; written to meta.json so stale sets can be detected.
DEMO_VERSION = 4
# meta.json's "generator": how a tool knows a folder for one this module wrote before it removes
# it to write another set (demo_set_contents); no one else's folder carries it.
DEMO_GENERATOR = "afa.data.synthetic"

CLASS_TEXTURES = (
    None, "dots", "checker", "stripes", "bricks", "grid", "noise", "zigzag", "bubbles",
)
CO_OCCURRING = ((1, 5), (2, 6), (3, 8), (4, 7))
# The ellipse's texture: the first is the default (DEMO_VERSION's sets); "concentric" was the
# default of version 3 and earlier.
ELLIPSE_TEXTURES = ("bubbles", "concentric")
# The rim fade of version 4 (render_sample's rim_fade): the share of each object's depth over
# which its texture's contrast falls towards the rim, and the contrast left at the rim itself.
RIM_FADE = 0.3
RIM_CONTRAST = 0.1

_SPLIT_CODES = {"train": 0, "val": 1}
_JPEG_QUALITY = 90


# --------------------------------------------------------------------------------------------
# Shapes: boolean membership of rotated, radius-normalised coordinates (u, v) (object radius 1)
# --------------------------------------------------------------------------------------------


def _star(u, v):
    angle = np.arctan2(v, u)
    # Radius oscillates between 0.45 (inner corners) and 1.0 (tips), five times round the circle.
    phase = np.abs(((angle * 5 / (2 * np.pi)) % 1.0) - 0.5) * 2  # 1 at a tip, 0 between tips
    return np.hypot(u, v) <= 0.45 + 0.55 * phase ** 2


def _triangle(u, v):
    inside = np.ones_like(u, dtype=bool)
    for k in range(3):  # three half-planes at distance 0.5 from the centre
        angle = np.pi / 2 + k * 2 * np.pi / 3
        inside &= u * np.cos(angle) + v * np.sin(angle) <= 0.5
    return inside


_SHAPES = (
    None,
    lambda u, v: u * u + v * v <= 1.0,                                             # disc
    lambda u, v: np.maximum(np.abs(u), np.abs(v)) <= 0.8,                          # square
    _triangle,                                                                     # triangle
    _star,                                                                         # star
    lambda u, v: (u * u + v * v <= 1.0) & (u * u + v * v >= 0.55 ** 2),            # ring
    lambda u, v: ((np.abs(u) <= 0.32) | (np.abs(v) <= 0.32))
    & (np.maximum(np.abs(u), np.abs(v)) <= 1.0),                                   # cross
    lambda u, v: (u * u + v * v <= 1.0) & ((u - 0.5) ** 2 + v * v >= 0.8 ** 2),    # crescent
    lambda u, v: u * u + (v / 0.45) ** 2 <= 1.0,                                   # ellipse
)


# --------------------------------------------------------------------------------------------
# Textures: mixing weight t in [0, 1] between an object's two colours, in rotated pixel units
# --------------------------------------------------------------------------------------------


def _texture(kind: str, a: np.ndarray, b: np.ndarray, period: float) -> np.ndarray:
    """``a, b``: pixel offsets in the object frame, phase-shifted."""
    if kind == "bricks":  # rows of bricks, every other row shifted by half a brick
        row_height = 0.6 * period
        row = np.floor(b / row_height)
        shifted = a + (row % 2) * period / 2
        mortar = (b % row_height < 0.25 * row_height) | (shifted % period < 0.15 * period)
        return mortar.astype(np.float32)
    if kind == "noise":  # cells of a third of a period, each on or off by a hash of its index
        cell = period / 3
        key = np.floor(a / cell) * 12.9898 + np.floor(b / cell) * 78.233
        return (np.sin(key) * 43758.5453 % 1.0 < 0.5).astype(np.float32)
    if kind == "dots":
        da, db = a % period - period / 2, b % period - period / 2
        return (da * da + db * db <= (0.3 * period) ** 2).astype(np.float32)
    if kind == "checker":
        return ((np.floor(a / period) + np.floor(b / period)) % 2).astype(np.float32)
    if kind == "stripes":
        return (a % period < period / 2).astype(np.float32)
    if kind == "grid":
        return ((a % period < 0.3 * period) | (b % period < 0.3 * period)).astype(np.float32)
    if kind == "zigzag":  # chevrons: stripes whose direction flips every half period
        bent = a + np.abs(b % period - period / 2)
        return (bent % period < period / 2).astype(np.float32)
    if kind == "concentric":
        return (np.hypot(a, b) % period < period / 2).astype(np.float32)
    if kind == "bubbles":  # hollow circles on a square lattice: curved at every position
        da, db = a % period - period / 2, b % period - period / 2
        return (np.abs(np.hypot(da, db) - 0.28 * period) <= 0.11 * period).astype(np.float32)
    raise ValueError(f"unknown texture {kind!r}")


def _depth_scale(cls: int, radius: float) -> float:
    """The greatest depth (pixels from the outline) inside class ``cls``'s shape at ``radius``:
    its inradius, measured as the fade measures depth, on an upright canvas of its own."""
    half = int(np.ceil(radius)) + 2
    yy, xx = np.mgrid[-half:half + 1, -half:half + 1].astype(np.float32)
    shape = _SHAPES[cls](xx / radius, yy / radius).astype(np.uint8)
    return float(cv2.distanceTransform(shape, cv2.DIST_L2, 5).max())


def _rim_contrast(inside: np.ndarray, cls: int, radius: float, rim_fade: float,
                  rim_contrast: float = RIM_CONTRAST) -> np.ndarray:
    """Contrast of the texture at each pixel of ``inside``: 1 deeper than ``rim_fade`` of the
    shape's inradius, falling linearly to ``rim_contrast`` at the outline. Depth is measured
    in the image, so an object cut by the border keeps full contrast along the cut."""
    depth = cv2.distanceTransform(inside.astype(np.uint8), cv2.DIST_L2, 5)[inside]
    ramp = np.clip(depth / (rim_fade * _depth_scale(cls, radius)), 0.0, 1.0)
    return (rim_contrast + (1 - rim_contrast) * ramp).astype(np.float32)


# --------------------------------------------------------------------------------------------
# One sample
# --------------------------------------------------------------------------------------------


def _colour(rng: np.random.Generator) -> np.ndarray:
    """The one colour distribution shared by objects, background and clutter."""
    return rng.uniform(15, 240, size=3).astype(np.float32)


_LUMA = np.float32([0.299, 0.587, 0.114])


def _colour_pair(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Two colours of the shared distribution whose brightness differs enough for crisp texture."""
    first = _colour(rng)
    while True:
        second = _colour(rng)
        if abs(float((first - second) @ _LUMA)) >= 100:
            return first, second


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Smooth random colour field + random lines and small blobs, (size, size, 3) float32."""
    cells = int(rng.integers(2, 5))
    grid = np.stack([_colour(rng) for _ in range(cells * cells)]).reshape(cells, cells, 3)
    image = cv2.resize(grid, (size, size), interpolation=cv2.INTER_CUBIC)
    # Fine irregular texture (blurred noise), unlike the crisp periodic textures of the objects.
    grain = cv2.GaussianBlur(rng.normal(0, 1, (size, size, 3)).astype(np.float32), (0, 0), 1.5)
    image += grain * (rng.uniform(10, 25) / grain.std())
    image = np.ascontiguousarray(np.clip(image, 0, 255))
    for _ in range(int(rng.integers(0, 4))):
        p0, p1 = rng.integers(0, size, size=2), rng.integers(0, size, size=2)
        thickness = int(rng.integers(1, max(2, size // 48) + 1))
        cv2.line(image, tuple(int(x) for x in p0), tuple(int(x) for x in p1),
                 _colour(rng).tolist(), thickness, lineType=cv2.LINE_AA)
    for _ in range(int(rng.integers(1, 5))):
        centre = tuple(int(x) for x in rng.integers(0, size, size=2))
        axes = tuple(int(x) for x in rng.integers(max(1, size // 64), max(2, size // 20) + 1,
                                                  size=2))
        cv2.ellipse(image, centre, axes, float(rng.uniform(0, 180)), 0, 360,
                    _colour(rng).tolist(), -1, lineType=cv2.LINE_AA)
    return image


def _pick_classes(rng: np.random.Generator) -> list[int]:
    """Class of each object: 1-3 objects from 1-2 classes, pairs biased to co-occur."""
    num_fg = len(DEMO_CLASSES) - 1
    if rng.random() < 0.5:
        cls = int(rng.integers(1, num_fg + 1))
        count = int(rng.choice([1, 2, 3], p=[0.6, 0.3, 0.1]))
        return [cls] * count
    if rng.random() < 0.6:
        pair = list(CO_OCCURRING[int(rng.integers(len(CO_OCCURRING)))])
    else:
        pair = [int(c) for c in rng.choice(np.arange(1, num_fg + 1), size=2, replace=False)]
    rng.shuffle(pair)
    if rng.random() < 0.3:
        pair.append(pair[int(rng.integers(2))])
    return pair


def _place(rng: np.random.Generator, classes: list[int], size: int):
    """Random geometry per object; retried until every object keeps half of its in-image area."""
    diameter_range = {1: (0.45, 0.65), 2: (0.35, 0.55), 3: (0.3, 0.45)}[len(classes)]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    for _ in range(50):
        objects, masks = [], []
        for cls in classes:
            radius = rng.uniform(*diameter_range) * size / 2
            cy, cx = rng.uniform(0.5 * radius, size - 0.5 * radius, size=2)
            angle = rng.uniform(0, 2 * np.pi)
            cos, sin = np.cos(angle), np.sin(angle)
            a = (xx - cx) * cos + (yy - cy) * sin  # object frame, pixels
            b = -(xx - cx) * sin + (yy - cy) * cos
            inside = _SHAPES[cls](a / radius, b / radius)
            objects.append((cls, radius, a, b))
            masks.append(inside)
        visible_ok = True
        for i, inside in enumerate(masks):
            covered = np.zeros_like(inside)
            for later in masks[i + 1:]:
                covered |= later
            area = inside.sum()
            if area < 0.01 * size * size or (inside & ~covered).sum() < 0.5 * area:
                visible_ok = False
                break
        if visible_ok:
            return objects, masks
    raise RuntimeError("could not place the objects without hiding one (check the size)")


def _boundary_band(mask: np.ndarray) -> np.ndarray:
    """Pixels with a 4-neighbour of another label (both sides of every boundary)."""
    band = np.zeros(mask.shape, dtype=bool)
    vertical = mask[1:] != mask[:-1]
    horizontal = mask[:, 1:] != mask[:, :-1]
    band[1:] |= vertical
    band[:-1] |= vertical
    band[:, 1:] |= horizontal
    band[:, :-1] |= horizontal
    return band


def render_sample(rng: np.random.Generator, size: int = 128, parts: float = 0.0,
                  parts_rng: np.random.Generator | None = None, parts_share: float = 1.0,
                  textures: tuple[str | None, ...] = CLASS_TEXTURES,
                  rim_fade: float = RIM_FADE, rim_contrast: float = RIM_CONTRAST,
                  ) -> tuple[np.ndarray, np.ndarray]:
    """One image (size, size, 3) uint8 RGB and its mask (size, size) uint8 (0, 1..8, 255).

    ``parts`` > 0: only a part of each object carries its class texture, the pixels within
    ``2 * parts`` radii of the rim along a random direction (0.5: one half); the rest of the
    object, its label included, is plain in the texture's first colour (the illumination ramp
    and the pixel noise still apply), alike for every class, as the body of a VOC object whose CAM
    fires only on its discriminative part; 1 (or 0, the default) textures whole objects. The
    directions come from ``parts_rng`` (default: a generator seeded 0), never from ``rng``, so the
    same ``rng`` gives the same objects, masks and background whatever ``parts`` is.
    ``parts_share`` < 1: each object is textured in part with this probability (also drawn from
    ``parts_rng``), else whole, so that a classifier still sees whole objects of every class.
    ``textures``: each class's texture (index 0 unused); a texture draws nothing from ``rng``, so
    another one changes the pixels of that class's objects and nothing else.
    ``rim_fade`` > 0: each object's texture fades towards its outline over this share of the
    shape's inradius, to ``rim_contrast`` at the outline (towards the mean of its two colours);
    0 keeps full contrast to the edge (version 3). It draws nothing from ``rng`` either.
    """
    if parts and parts < 1 and parts_rng is None:
        parts_rng = np.random.default_rng(0)
    image = _background(rng, size)
    mask = np.zeros((size, size), dtype=np.uint8)
    objects, masks = _place(rng, _pick_classes(rng), size)
    for (cls, radius, a, b), inside in zip(objects, masks):
        period = rng.uniform(0.07, 0.1) * size
        phase_a, phase_b = rng.uniform(0, period, size=2)
        t = _texture(textures[cls], a[inside] + phase_a, b[inside] + phase_b, period)[:, None]
        first, second = _colour_pair(rng)
        # A mild illumination ramp so flat textures are not perfectly flat.
        light = 1 + 0.15 * (b[inside] / radius)[:, None] * rng.uniform(-1, 1)
        partial = parts and parts < 1 and (parts_share >= 1 or parts_rng.random() < parts_share)
        if partial:
            direction = parts_rng.uniform(0, 2 * np.pi)
            along = (a[inside] * np.cos(direction) + b[inside] * np.sin(direction)) / radius
            t = np.where((along >= 1 - 2 * parts)[:, None], t, 0.0)
        if rim_fade:
            t = 0.5 + (t - 0.5) * _rim_contrast(inside, cls, radius, rim_fade,
                                                rim_contrast)[:, None]
        image[inside] = np.clip(((1 - t) * first + t * second) * light, 0, 255)
        mask[inside] = cls
    if rng.random() < 0.3:  # a thin occluding stick in front of everything
        p0, p1 = rng.integers(0, size, size=2), rng.integers(0, size, size=2)
        thickness = int(rng.integers(2, max(3, size // 32) + 1))
        ends = (tuple(int(x) for x in p0), tuple(int(x) for x in p1))
        cv2.line(image, *ends, _colour(rng).tolist(), thickness)
        cv2.line(mask, *ends, 0, thickness)
    image += rng.normal(0, rng.uniform(2, 8), size=image.shape).astype(np.float32)
    mask[_boundary_band(mask)] = IGNORE_INDEX
    return np.clip(image + 0.5, 0, 255).astype(np.uint8), mask


# --------------------------------------------------------------------------------------------
# A frame sequence (a short "video" for tools/make_video.py)
# --------------------------------------------------------------------------------------------


def render_frames(rng: np.random.Generator, num_frames: int, height: int = 128,
                  width: int = 160, noise: float = 0.0, rim_fade: float = RIM_FADE,
                  rim_contrast: float = RIM_CONTRAST,
                  textures: tuple[str | None, ...] = CLASS_TEXTURES,
                  ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Frames of 1-2 demo objects gliding and turning over one still background.

    The objects (classes drawn as for a training image, at most two objects) keep their texture,
    colours and size; each moves in a straight line from one side of the frame to the other
    while it turns, the later one in front. ``noise`` > 0 adds fresh pixel noise of that
    standard deviation to every frame, as a camera would (the training images have 2-8); by
    default the background stays the same to the bit, which keeps a GIF of the frames small.
    ``rim_fade``, ``rim_contrast``, ``textures``: as :func:`render_sample`'s.

    Returns ``num_frames`` pairs ``(image (H, W, 3) uint8 RGB, mask (H, W) uint8)``, masks as
    :func:`render_sample`'s (0, 1..8, 255 on boundaries).
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be at least 1, got {num_frames}")
    side = min(height, width)
    if side < 32:
        raise ValueError(f"frames must be at least 32 pixels on each side, got {height}x{width}")
    background = _background(rng, max(height, width))[:height, :width]
    classes = _pick_classes(rng)[:2]
    objects = []
    for index, cls in enumerate(classes):
        radius = rng.uniform(0.2, 0.28) * side
        start, end = rng.uniform(0.2, 0.8, size=2), rng.uniform(0.2, 0.8, size=2)
        start[index % 2], end[index % 2] = 0.15, 0.85  # one across, one down: they cross
        if rng.random() < 0.5:
            start, end = end, start
        period = rng.uniform(0.07, 0.1) * side
        objects.append(dict(cls=cls, radius=radius, start=start, end=end, period=period,
                            phase=rng.uniform(0, period, size=2), colours=_colour_pair(rng),
                            angle=rng.uniform(0, 2 * np.pi), turn=rng.uniform(-1.5, 1.5)))
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    frames = []
    for t in np.linspace(0.0, 1.0, num_frames):
        image = background.copy()
        mask = np.zeros((height, width), dtype=np.uint8)
        for obj in objects:
            fy, fx = (1 - t) * obj["start"] + t * obj["end"]  # fractions of the frame
            cy, cx = fy * height, fx * width
            angle = obj["angle"] + t * obj["turn"]
            cos, sin = np.cos(angle), np.sin(angle)
            a = (xx - cx) * cos + (yy - cy) * sin  # object frame, pixels
            b = -(xx - cx) * sin + (yy - cy) * cos
            inside = _SHAPES[obj["cls"]](a / obj["radius"], b / obj["radius"])
            weight = _texture(textures[obj["cls"]], a[inside] + obj["phase"][0],
                              b[inside] + obj["phase"][1], obj["period"])[:, None]
            if rim_fade:
                contrast = _rim_contrast(inside, obj["cls"], obj["radius"], rim_fade,
                                         rim_contrast)
                weight = 0.5 + (weight - 0.5) * contrast[:, None]
            first, second = obj["colours"]
            image[inside] = (1 - weight) * first + weight * second
            mask[inside] = obj["cls"]
        if noise:
            image = image + rng.normal(0, noise, size=image.shape).astype(np.float32)
        mask[_boundary_band(mask)] = IGNORE_INDEX
        frames.append((np.clip(image + 0.5, 0, 255).astype(np.uint8), mask))
    return frames


def make_demo_frames(out: str | os.PathLike, num_frames: int = 24, height: int = 128,
                     width: int = 160, seed: int = 0, noise: float = 0.0,
                     ellipse_texture: str = ELLIPSE_TEXTURES[0], rim_fade: float = RIM_FADE,
                     rim_contrast: float = RIM_CONTRAST) -> list[Path]:
    """Write :func:`render_frames` as ``out/frame_NNN.png`` (lossless, so a still background
    stays still); returns the paths. The same arguments give the same files. The last three:
    as :func:`make_demo_dataset`'s."""
    check_demo_args(ellipse_texture=ellipse_texture, rim_fade=rim_fade,
                    rim_contrast=rim_contrast)
    textures = CLASS_TEXTURES[:-1] + (ellipse_texture,)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 2])  # 2: neither the train (0) nor the val (1) stream
    paths = []
    frames = render_frames(rng, num_frames, height, width, noise, rim_fade, rim_contrast, textures)
    for index, (image, _) in enumerate(frames):
        path = out / f"frame_{index:03d}.png"
        Image.fromarray(image).save(path)
        paths.append(path)
    return paths


# --------------------------------------------------------------------------------------------
# Writing the data set
# --------------------------------------------------------------------------------------------


def _sample_rng(seed: int, split: str, index: int, stream: int = 0) -> np.random.Generator:
    """The generator of one sample; ``stream`` 1: that of its parts' directions."""
    key = [seed, _SPLIT_CODES[split], index] + ([stream] if stream else [])
    return np.random.default_rng(key)


def generate_split(
    root: str | os.PathLike, split: str, num: int, seed: int, size: int,
    progress: bool | None = None, parts: float = 0.0, parts_share: float = 1.0,
    textures: tuple[str | None, ...] = CLASS_TEXTURES, rim_fade: float = RIM_FADE,
    rim_contrast: float = RIM_CONTRAST,
) -> dict[str, list[int]]:
    """Write ``num`` images and masks of ``split`` under ``root``; returns ``{id: classes}``.
    ``progress``: see :func:`make_demo_dataset`; ``parts``, ``parts_share``, ``textures``,
    ``rim_fade``, ``rim_contrast``: see :func:`render_sample`."""
    if progress is None:
        progress = _interactive()
    root = Path(root)
    (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
    (root / "SegmentationClassAug").mkdir(parents=True, exist_ok=True)
    labels = {}
    for index in tqdm(range(num), desc=f"demo {split}", disable=not progress, unit="img"):
        name = f"{split}_{index:05d}"
        image, mask = render_sample(_sample_rng(seed, split, index), size, parts,
                                    _sample_rng(seed, split, index, stream=1), parts_share,
                                    textures, rim_fade, rim_contrast)
        Image.fromarray(image).save(root / "JPEGImages" / f"{name}.jpg", quality=_JPEG_QUALITY)
        write_mask(root / "SegmentationClassAug" / f"{name}.png", mask)
        labels[name] = labels_from_mask(mask, len(DEMO_CLASSES))
    return labels


def _interactive() -> bool:
    """Whether stderr, where tqdm draws, is a terminal: a bar redrawn with carriage returns would
    fill a redirected log with one line per update."""
    return sys.stderr.isatty()


def demo_meta(seed: int = 0, num_train: int = 3000, num_val: int = 300, size: int = 128,
              parts: float = 0.0, parts_share: float = 1.0,
              ellipse_texture: str = ELLIPSE_TEXTURES[0], rim_fade: float = RIM_FADE,
              rim_contrast: float = RIM_CONTRAST) -> dict:
    """The ``meta.json`` that :func:`make_demo_dataset` writes for these arguments. A set whose
    ``meta.json`` equals it is byte for byte the set they make (``make_demo_data.py --check``);
    one whose ``meta.json`` equals it less ``"generator"`` was written before that field was, and
    holds the same images, masks and lists."""
    meta = {"generator": DEMO_GENERATOR, "version": DEMO_VERSION,
            "classes": list(DEMO_CLASSES), "num_classes": len(DEMO_CLASSES), "seed": seed,
            "num_train": num_train, "num_val": num_val, "size": size}
    if parts:  # options at their defaults are left out, so older sets' meta.json still match
        meta["parts"] = parts
        if parts_share < 1:
            meta["parts_share"] = parts_share
    if ellipse_texture != ELLIPSE_TEXTURES[0]:
        meta["ellipse_texture"] = ellipse_texture
    if rim_fade != RIM_FADE:
        meta["rim_fade"] = rim_fade
    if rim_contrast != RIM_CONTRAST:
        meta["rim_contrast"] = rim_contrast
    return meta


def check_demo_args(size: int = 128, parts: float = 0.0, parts_share: float = 1.0,
                    ellipse_texture: str = ELLIPSE_TEXTURES[0], rim_fade: float = RIM_FADE,
                    rim_contrast: float = RIM_CONTRAST) -> None:
    """Raise ``ValueError`` for arguments :func:`make_demo_dataset` makes no set of; a tool asks
    before it removes an earlier set, which a bad flag must not cost."""
    if size < 32:
        raise ValueError(f"size must be at least 32 pixels, got {size}")
    if not 0 <= parts <= 1:
        raise ValueError(f"parts must lie in [0, 1], got {parts}")
    if not 0 <= parts_share <= 1:
        raise ValueError(f"parts_share must lie in [0, 1], got {parts_share}")
    if ellipse_texture not in ELLIPSE_TEXTURES:
        raise ValueError(f"ellipse_texture must be one of {ELLIPSE_TEXTURES}, got "
                         f"{ellipse_texture!r}")
    if not 0 <= rim_fade <= 1:
        raise ValueError(f"rim_fade must lie in [0, 1], got {rim_fade}")
    if not 0 <= rim_contrast <= 1:
        raise ValueError(f"rim_contrast must lie in [0, 1], got {rim_contrast}")


def make_demo_dataset(
    root: str | os.PathLike,
    seed: int = 0,
    num_train: int = 3000,
    num_val: int = 300,
    size: int = 128,
    progress: bool | None = None,
    parts: float = 0.0,
    parts_share: float = 1.0,
    ellipse_texture: str = ELLIPSE_TEXTURES[0],
    rim_fade: float = RIM_FADE,
    rim_contrast: float = RIM_CONTRAST,
) -> dict[str, list[int]]:
    """Write the demo set under ``root`` in the VOC layout; returns the labels of all ids.

    ``progress``: draw a progress bar per split on stderr; ``None`` (default): only when stderr is
    an interactive terminal, as the trainer decides (``afa.engine.logger.progress_enabled``).

    ``parts`` > 0 (at most 1): objects textured only in part, each with probability
    ``parts_share`` (see :func:`render_sample`); ``ellipse_texture``: one of
    :data:`ELLIPSE_TEXTURES`; ``rim_fade``, ``rim_contrast``: see :func:`render_sample`. Options away from their
    defaults are recorded in ``meta.json`` (:func:`demo_meta`).

    Besides ``JPEGImages/`` and ``SegmentationClassAug/`` it writes what ``tools/prepare_voc.py``
    would write for it, inside ``root`` itself: ``train_aug.txt``, ``val.txt``, ``cls_labels.json``;
    plus ``ImageSets/Segmentation/{train_aug,val}.txt`` (so ``prepare_voc.py --root root`` works
    on it too) and ``meta.json`` (class names and generation parameters, marked with
    :data:`DEMO_GENERATOR`). ``root`` is written into as it is: whether it may be (a folder of
    someone else's) is for the caller to ask, see :func:`demo_set_contents`.
    """
    check_demo_args(size, parts, parts_share, ellipse_texture, rim_fade, rim_contrast)
    textures = CLASS_TEXTURES[:-1] + (ellipse_texture,)
    root = Path(root)
    meta = demo_meta(seed, num_train, num_val, size, parts, parts_share, ellipse_texture,
                     rim_fade, rim_contrast)
    # Marked first, as unfinished: a run stopped half-way leaves a folder that is known to be
    # this module's (so make demo may replace it) and that no check takes for a finished set.
    root.mkdir(parents=True, exist_ok=True)
    (root / "meta.json").write_text(json.dumps({**meta, "complete": False}, indent=2) + "\n")
    labels = {}
    lists = {}
    for split, num, list_name in (("train", num_train, "train_aug"), ("val", num_val, "val")):
        split_labels = generate_split(root, split, num, seed, size, progress, parts, parts_share,
                                      textures, rim_fade, rim_contrast)
        labels.update(split_labels)
        lists[list_name] = sorted(split_labels)
    for list_name, names in lists.items():
        write_name_list(root / f"{list_name}.txt", names)
        write_name_list(root / "ImageSets" / "Segmentation" / f"{list_name}.txt", names)
    write_label_file(root / "cls_labels.json", labels)
    (root / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return labels


# --------------------------------------------------------------------------------------------
# Knowing a folder for a demo set before replacing it
# --------------------------------------------------------------------------------------------


class NotADemoSet(ValueError):
    """``root`` holds something the demo generator did not write; ``reason`` says what."""

    def __init__(self, root: str | os.PathLike, reason: str):
        super().__init__(f"{root} {reason}")
        self.root, self.reason = Path(root), reason


# Every path make_demo_dataset writes, relative to the root; nothing else may be removed.
_SET_FILE = re.compile(r"meta\.json|train_aug\.txt|val\.txt|cls_labels\.json"
                       r"|ImageSets/Segmentation/(train_aug|val)\.txt"
                       r"|JPEGImages/(train|val)_\d{5,}\.jpg"
                       r"|SegmentationClassAug/(train|val)_\d{5,}\.png")
_SET_DIRS = frozenset({"JPEGImages", "SegmentationClassAug", "ImageSets", "ImageSets/Segmentation"})
# meta.json as written before it carried DEMO_GENERATOR: exactly these keys, no others.
_OLD_META_KEYS = frozenset({"classes", "num_classes", "seed", "num_train", "num_val", "size"})
_OLD_META_OPTIONS = frozenset({"version", "parts", "parts_share", "ellipse_texture", "rim_fade",
                               "rim_contrast"})


def _is_demo_meta(meta: object) -> bool:
    if not isinstance(meta, dict):
        return False
    if "generator" in meta:
        return meta["generator"] == DEMO_GENERATOR
    keys = set(meta)
    return (_OLD_META_KEYS <= keys <= _OLD_META_KEYS | _OLD_META_OPTIONS
            and isinstance(meta["classes"], list) and meta["num_classes"] == len(meta["classes"]))


def demo_set_contents(root: str | os.PathLike) -> list[Path]:
    """What :func:`remove_demo_set` would remove from ``root``: the files and folders of a demo
    set, deepest first; none for an absent or empty folder.

    Raises :class:`NotADemoSet` unless ``root`` is absent, empty, or a set this module wrote: its
    ``meta.json`` marked with :data:`DEMO_GENERATOR` (or in the form written before the mark, a
    finished set of the same layout) and every entry under it one of the names it writes. So a
    folder of someone's own files, a VOC root or a folder of VOC lists (no such ``meta.json``),
    and a demo set to which anything was added, all stay untouched. Links count as foreign.
    """
    root = Path(root)
    if not root.exists() and not root.is_symlink():
        return []
    if not root.is_dir():
        raise NotADemoSet(root, "is not a folder")
    ours, foreign = [], []
    for folder, dirs, files in os.walk(root):
        here = Path(folder)
        for name in sorted(dirs):
            rel = (here / name).relative_to(root).as_posix()
            if rel in _SET_DIRS and not (here / name).is_symlink():
                ours.append(here / name)
            else:
                foreign.append(rel)
                dirs.remove(name)  # not ours: nothing under it is looked at, nor removed
        for name in sorted(files):
            rel = (here / name).relative_to(root).as_posix()
            if _SET_FILE.fullmatch(rel) and not (here / name).is_symlink():
                ours.append(here / name)
            else:
                foreign.append(rel)
    if foreign:
        more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
        raise NotADemoSet(root, f"holds {sorted(foreign)[0]}{more}, which the demo generator "
                                "did not write")
    if not ours:
        return []
    try:
        meta = json.loads((root / "meta.json").read_text())
    except (OSError, ValueError):
        meta = None
    if not _is_demo_meta(meta):
        raise NotADemoSet(root, "holds files named as a demo set's but no meta.json of the demo "
                                "generator (they may be someone's own data)")
    # Deepest first, so each folder is empty when its turn comes; meta.json last, so a removal
    # cut short leaves a folder that is still known for a demo set.
    return sorted(ours, key=lambda p: (p == root / "meta.json", -len(p.parts), p))


def remove_demo_set(root: str | os.PathLike) -> None:
    """Remove the demo set under ``root``, leaving the folder itself, empty; raises
    :class:`NotADemoSet` (and removes nothing) when ``root`` holds anything else."""
    for path in demo_set_contents(root):
        if path.is_dir():
            path.rmdir()  # fails, rather than deletes, if anything appeared in it meanwhile
        else:
            path.unlink()
