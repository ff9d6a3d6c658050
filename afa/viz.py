"""Pictures of what the model sees and predicts: label colourings, CAM heat maps, affinities, grids.

Every function returns an ``(H, W, 3)`` uint8 RGB array (HWC), ready for ``PIL.Image.fromarray``,
``imageio.imwrite`` or TensorBoard's ``add_image(..., dataformats="HWC")``; :func:`to_chw` gives the
CHW layout. Inputs may be numpy arrays or torch tensors (moved to the CPU here).

Label maps use the VOC palette (class 0 black, 255 = ignore near-white). Heat maps use OpenCV's JET
colour map (blue = low, red = high).

Text never runs off its strip: a title or a legend name too long for its width is set in smaller
type, down to half size, and then shortened with "..." (:func:`fit_text`).
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from afa.constants import IGNORE_INDEX, color_palette

__all__ = [
    "colorize_label",
    "overlay_label",
    "heatmap",
    "overlay_heatmap",
    "affinity_of_pixel",
    "affinity_overlay",
    "fit_text",
    "add_title",
    "legend",
    "label_entries",
    "label_legend",
    "make_grid",
    "visualize_sample",
    "to_chw",
]

_PALETTE = color_palette(256)
_TITLE_HEIGHT = 22
_MARKER_SIZE = 15
_FONT = cv2.FONT_HERSHEY_SIMPLEX
_TEXT_MARGIN = 3  # pixels between text and the edges of its strip


def _numpy(array) -> np.ndarray:
    """numpy view of a numpy array or a (possibly CUDA, grad-tracking) torch tensor."""
    if hasattr(array, "detach"):
        array = array.detach().cpu().numpy()
    return np.asarray(array)


def _rgb_image(image) -> np.ndarray:
    image = _numpy(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(
            f"image must be (H, W, 3) uint8 RGB, got shape {image.shape} dtype {image.dtype}"
        )
    return image


def _blend(image: np.ndarray, colour: np.ndarray, alpha: float) -> np.ndarray:
    mixed = (1.0 - alpha) * image.astype(np.float32) + alpha * colour.astype(np.float32)
    return np.clip(np.rint(mixed), 0, 255).astype(np.uint8)


def colorize_label(label) -> np.ndarray:
    """``(H, W)`` integer label map (0..255) -> ``(H, W, 3)`` uint8 VOC-palette colours."""
    label = _numpy(label)
    if label.ndim != 2:
        raise ValueError(f"label map must be (H, W), got shape {label.shape}")
    if label.size and (label.min() < 0 or label.max() > 255):
        raise ValueError(f"label values must lie in [0, 255], got [{label.min()}, {label.max()}]")
    return _PALETTE[label.astype(np.int64)]


def overlay_label(
    image, label, alpha: float = 0.5, transparent: Sequence[int] = (0, IGNORE_INDEX)
) -> np.ndarray:
    """Blend the palette colours of ``label`` over ``image``; ``transparent`` classes stay bare."""
    image = _rgb_image(image)
    label = _numpy(label)
    if label.shape != image.shape[:2]:
        raise ValueError(f"label shape {label.shape} != image size {image.shape[:2]}")
    out = _blend(image, colorize_label(label), alpha)
    bare = np.isin(label, list(transparent))
    out[bare] = image[bare]
    return out


def heatmap(values, normalize: bool = False, colormap: int = cv2.COLORMAP_JET) -> np.ndarray:
    """``(H, W)`` scores -> ``(H, W, 3)`` uint8 RGB colour map.

    Values are clipped to ``[0, 1]``; with ``normalize`` they are first min-max scaled per map.
    """
    values = _numpy(values).astype(np.float32)
    if values.ndim != 2:
        raise ValueError(f"heat map values must be (H, W), got shape {values.shape}")
    if normalize:
        low, high = float(values.min()), float(values.max())
        values = (values - low) / (high - low) if high > low else np.zeros_like(values)
    levels = np.rint(np.clip(values, 0.0, 1.0) * 255).astype(np.uint8)
    return cv2.cvtColor(cv2.applyColorMap(levels, colormap), cv2.COLOR_BGR2RGB)


def overlay_heatmap(image, values, alpha: float = 0.5, normalize: bool = False) -> np.ndarray:
    """Heat map of ``values`` (bilinearly resized to the image if needed) blended over ``image``."""
    image = _rgb_image(image)
    values = _numpy(values).astype(np.float32)
    height, width = image.shape[:2]
    if values.shape != (height, width):
        values = cv2.resize(values, (width, height), interpolation=cv2.INTER_LINEAR)
    return _blend(image, heatmap(values, normalize=normalize), alpha)


def affinity_of_pixel(
    aff, grid_hw: tuple[int, int], pixel_yx: tuple[int, int], image_hw: tuple[int, int]
) -> np.ndarray:
    """The affinity of one image pixel to every other position, upsampled to the image.

    Args:
        aff: ``(N, N)`` affinity between the ``N = h * w`` positions of a feature grid (row-major);
            row ``i`` holds the affinity of position ``i`` to all positions.
        grid_hw: the grid size ``(h, w)``.
        pixel_yx: the query pixel ``(y, x)`` in image coordinates.
        image_hw: the image size ``(H, W)``; grid cell ``(gy, gx)`` covers image rows
            ``[gy H / h, (gy + 1) H / h)`` and the matching columns.

    Returns:
        ``(H, W)`` float32 map, bilinearly upsampled from the query position's row of ``aff``.
    """
    aff = _numpy(aff)
    grid_h, grid_w = grid_hw
    height, width = image_hw
    if aff.shape != (grid_h * grid_w, grid_h * grid_w):
        raise ValueError(f"aff must be (N, N) with N = {grid_h}*{grid_w}, got shape {aff.shape}")
    y, x = pixel_yx
    if not (0 <= y < height and 0 <= x < width):
        raise ValueError(f"pixel (y={y}, x={x}) lies outside the {height}x{width} image")
    cell_y = min(int(y * grid_h / height), grid_h - 1)
    cell_x = min(int(x * grid_w / width), grid_w - 1)
    row = aff[cell_y * grid_w + cell_x].reshape(grid_h, grid_w).astype(np.float32)
    return cv2.resize(row, (width, height), interpolation=cv2.INTER_LINEAR)


def affinity_overlay(
    image,
    aff,
    grid_hw: tuple[int, int],
    pixel_yx: tuple[int, int],
    alpha: float = 0.5,
    normalize: bool = True,
) -> np.ndarray:
    """Heat map of :func:`affinity_of_pixel` over ``image``, the query pixel marked by a cross."""
    image = _rgb_image(image)
    values = affinity_of_pixel(aff, grid_hw, pixel_yx, image.shape[:2])
    out = _blend(image, heatmap(values, normalize=normalize), alpha)
    y, x = pixel_yx
    # A white cross with a black outline stays visible on any colour.
    cv2.drawMarker(out, (int(x), int(y)), (0, 0, 0), cv2.MARKER_CROSS, _MARKER_SIZE, 4)
    cv2.drawMarker(out, (int(x), int(y)), (255, 255, 255), cv2.MARKER_CROSS, _MARKER_SIZE, 2)
    return out


def _text_width(text: str, scale: float) -> int:
    return cv2.getTextSize(text, _FONT, scale, 1)[0][0]


def fit_text(text: str, width: int, scale: float, min_ratio: float = 0.5) -> tuple[str, float]:
    """``(text, scale)`` for drawing ``text`` in at most ``width`` pixels: ``scale`` when it fits,
    else smaller type down to ``min_ratio * scale``, then the longest start of the text that fits
    with "..." after it ("" when not even one letter and "..." do)."""
    full = _text_width(text, scale)
    if full <= width:
        return text, scale
    scale *= max(min_ratio, width / full)
    if _text_width(text, scale) <= width:
        return text, scale
    low, high = 0, len(text)  # the longest prefix that fits, by bisection
    while low < high:
        mid = (low + high + 1) // 2
        if _text_width(text[:mid].rstrip() + "...", scale) <= width:
            low = mid
        else:
            high = mid - 1
    return (text[:low].rstrip() + "..." if low else ""), scale


def add_title(panel, title: str, height: int = _TITLE_HEIGHT) -> np.ndarray:
    """``panel`` with a white strip of ``height`` pixels on top holding ``title`` in black,
    fitted to the panel's width (:func:`fit_text`) rather than cut off at its edge."""
    panel = _rgb_image(panel)
    strip = np.full((height, panel.shape[1], 3), 255, dtype=np.uint8)
    text, scale = fit_text(title, panel.shape[1] - 2 * _TEXT_MARGIN, height / 40.0)
    cv2.putText(strip, text, (_TEXT_MARGIN, height - 6), _FONT, scale, (0, 0, 0), 1,
                cv2.LINE_AA)
    return np.concatenate([strip, panel], axis=0)


def legend(entries: Sequence[tuple[str, Sequence[int]]], width: int,
           row_height: int = _TITLE_HEIGHT) -> np.ndarray:
    """A white strip ``width`` pixels wide naming each ``(name, rgb)`` entry beside a swatch of
    its colour, left to right; entries that do not fit start another row of ``row_height``, and
    a name too long for a row of its own is fitted to it (:func:`fit_text`)."""
    scale = row_height / 40.0
    swatch, gap = row_height - 8, 10
    room = max(1, width - 2 * _TEXT_MARGIN - swatch - 4)  # for a name alone on its row
    rows: list[list[tuple[int, str, float, Sequence[int]]]] = [[]]
    x = _TEXT_MARGIN
    for name, colour in entries:
        text, text_scale = fit_text(name, room, scale)
        item_w = swatch + 4 + _text_width(text, text_scale)
        if rows[-1] and x + item_w > width - _TEXT_MARGIN:
            rows.append([])
            x = _TEXT_MARGIN
        rows[-1].append((x, text, text_scale, colour))
        x += item_w + gap
    strip = np.full((row_height * len(rows), width, 3), 255, dtype=np.uint8)
    for index, row in enumerate(rows):
        top = index * row_height
        for left, text, text_scale, colour in row:
            cv2.rectangle(strip, (left, top + 4), (left + swatch - 1, top + 3 + swatch),
                          tuple(int(c) for c in colour), -1)
            cv2.rectangle(strip, (left, top + 4), (left + swatch - 1, top + 3 + swatch),
                          (0, 0, 0), 1)
            cv2.putText(strip, text, (left + swatch + 4, top + row_height - 6), _FONT,
                        text_scale, (0, 0, 0), 1, cv2.LINE_AA)
    return strip


def label_entries(labels: Sequence, class_names: Sequence[str],
                  skip: Sequence[int] = (0, IGNORE_INDEX),
                  min_fraction: float = 0.0) -> list[tuple[str, np.ndarray]]:
    """``(name, palette colour)`` of every class present in the label maps ``labels`` (together),
    by class index, but those in ``skip`` and those on no more than ``min_fraction`` of the
    pixels. Index 255 is named "ignore"; an index past ``class_names``, "class <i>"."""
    counts = np.zeros(256, dtype=np.int64)
    total = 0
    for label in labels:
        label = _numpy(label)
        counts += np.bincount(label.ravel().astype(np.int64), minlength=256)[:256]
        total += label.size
    present = [c for c in np.flatnonzero(counts)
               if c not in skip and counts[c] > min_fraction * total]

    def name(c: int) -> str:
        if c < len(class_names):
            return class_names[c]
        return "ignore" if c == IGNORE_INDEX else f"class {c}"

    return [(name(c), _PALETTE[c]) for c in present]


def label_legend(label, class_names: Sequence[str], width: int,
                 skip: Sequence[int] = (0, IGNORE_INDEX), min_fraction: float = 0.0) -> np.ndarray:
    """:func:`legend` of the classes present in ``label`` (not those in ``skip``: background and
    ignore by default, which :func:`overlay_label` leaves bare), in palette colours; classes on
    no more than ``min_fraction`` of the pixels are left out."""
    entries = label_entries([label], class_names, skip, min_fraction)
    return legend(entries or [("no object", (255, 255, 255))], width)


def make_grid(
    panels: Sequence,
    titles: Sequence[str] | None = None,
    ncols: int | None = None,
    pad: int = 4,
    pad_value: int = 255,
) -> np.ndarray:
    """Tile ``(H, W, 3)`` uint8 panels left to right, ``ncols`` per row (default: one row).

    Panels of another height than the first are resized (nearest, keeping their aspect ratio) to
    the first panel's height; every cell is as wide as the widest panel, and a narrower one sits
    in the middle of its cell, so that the columns line up; ``pad`` pixels of ``pad_value``
    separate neighbouring cells.
    """
    if not panels:
        raise ValueError("make_grid needs at least one panel")
    if titles is not None and len(titles) != len(panels):
        raise ValueError(f"{len(titles)} titles for {len(panels)} panels")
    base_h = _rgb_image(panels[0]).shape[0]
    cells = []
    for index, panel in enumerate(panels):
        panel = _rgb_image(panel)
        if panel.shape[0] != base_h:
            new_w = max(1, round(panel.shape[1] * base_h / panel.shape[0]))
            panel = cv2.resize(panel, (new_w, base_h), interpolation=cv2.INTER_NEAREST)
        if titles is not None:
            panel = add_title(panel, titles[index])
        cells.append(panel)
    ncols = ncols or len(cells)
    cell_h = cells[0].shape[0]
    cell_w = max(cell.shape[1] for cell in cells)
    nrows = -(-len(cells) // ncols)
    grid = np.full(
        (nrows * cell_h + (nrows - 1) * pad, ncols * cell_w + (ncols - 1) * pad, 3),
        pad_value,
        dtype=np.uint8,
    )
    for index, cell in enumerate(cells):
        top = (index // ncols) * (cell_h + pad)
        left = (index % ncols) * (cell_w + pad) + (cell_w - cell.shape[1]) // 2
        grid[top : top + cell_h, left : left + cell.shape[1]] = cell
    return grid


def visualize_sample(
    image,
    *,
    cams: Sequence | None = None,
    cam_titles: Sequence[str] | None = None,
    pseudo_label=None,
    pred=None,
    gt=None,
    titles: bool = True,
    alpha: float = 0.5,
    class_names: Sequence[str] | None = None,
) -> np.ndarray:
    """One row: image | CAM overlays | pseudo label | prediction | ground truth (those given).

    ``cams`` is a sequence (or ``(C, h, w)`` array) of score maps in ``[0, 1]``, resized to the
    image; ``cam_titles`` names them (default ``"cam <i>"``). Label maps are drawn in VOC colours;
    with ``class_names`` a legend below the row names every class they show, background and
    ignore included (drawn black and near-white here, not left bare as in an overlay).
    """
    panels = [_rgb_image(image)]
    names = ["image"]
    if cams is not None:
        cams = list(cams)
        if cam_titles is None:
            cam_titles = [f"cam {i}" for i in range(len(cams))]
        if len(cam_titles) != len(cams):
            raise ValueError(f"{len(cam_titles)} CAM titles for {len(cams)} CAMs")
        panels += [overlay_heatmap(image, cam, alpha=alpha) for cam in cams]
        names += list(cam_titles)
    labels = []
    for name, label in (("pseudo label", pseudo_label), ("prediction", pred), ("ground truth", gt)):
        if label is not None:
            panels.append(colorize_label(label))
            names.append(name)
            labels.append(label)
    grid = make_grid(panels, titles=names if titles else None)
    if class_names is None or not labels:
        return grid
    strip = legend(label_entries(labels, class_names, skip=()), grid.shape[1])
    return np.concatenate([grid, strip], axis=0)


def to_chw(image) -> np.ndarray:
    """``(H, W, 3)`` -> contiguous ``(3, H, W)`` (TensorBoard's default ``dataformats``)."""
    image = _numpy(image)
    if image.ndim != 3:
        raise ValueError(f"expected an (H, W, C) array, got shape {image.shape}")
    return np.ascontiguousarray(image.transpose(2, 0, 1))
