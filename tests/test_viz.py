"""Visualisation: shapes and dtypes, VOC palette colours, RGB order, affinity of a chosen pixel,
and tools/visualize.py on a tiny directory of saved outputs."""


import numpy as np
from conftest import load_tool
import pytest
import torch
from PIL import Image

from afa.constants import VOC_CLASSES, color_palette
from afa.io import write_label_png
from afa.viz import (
    add_title,
    affinity_of_pixel,
    affinity_overlay,
    colorize_label,
    fit_text,
    heatmap,
    make_grid,
    overlay_heatmap,
    overlay_label,
    to_chw,
    visualize_sample,
)

H, W = 32, 48
IMAGE = np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8)


def test_palette_colours_at_known_pixels():
    label = np.array([[0, 1, 15], [255, 20, 0]], np.uint8)
    colours = colorize_label(torch.from_numpy(label))
    assert colours.shape == (2, 3, 3) and colours.dtype == np.uint8
    assert colours[0, 0].tolist() == [0, 0, 0]  # background
    assert colours[0, 1].tolist() == [128, 0, 0]  # aeroplane
    assert colours[0, 2].tolist() == [192, 128, 128]  # person
    assert colours[1, 0].tolist() == [224, 224, 192]  # ignore: distinct from every class
    assert colours[1, 1].tolist() == [0, 64, 128]  # tvmonitor


def test_overlay_label_keeps_background_and_tints_objects():
    label = np.zeros((H, W), np.int64)
    label[:10, :10] = 1
    out = overlay_label(IMAGE, label, alpha=0.5)
    assert out.shape == IMAGE.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(out[20:, 20:], IMAGE[20:, 20:])
    expected = np.rint(0.5 * IMAGE[0, 0].astype(float) + 0.5 * np.array([128, 0, 0]))
    np.testing.assert_array_equal(out[0, 0], expected)


def test_heatmap_is_rgb_jet():
    values = np.array([[0.0, 1.0]])
    colours = heatmap(values)
    low, high = colours[0, 0].astype(int), colours[0, 1].astype(int)
    assert low[2] > 100 and low[0] == 0  # blue for 0
    assert high[0] > 100 and high[2] == 0  # red for 1 (a BGR mix-up would swap these)


def test_cam_overlay_resizes_to_image():
    cam = torch.zeros(4, 6)
    cam[0, 0] = 1.0
    out = overlay_heatmap(IMAGE, cam)
    assert out.shape == (H, W, 3) and out.dtype == np.uint8


def test_affinity_of_chosen_pixel_peaks_at_its_partner():
    grid_h, grid_w = 4, 6  # one cell = 8 x 8 image pixels
    n = grid_h * grid_w
    aff = np.full((n, n), 0.1, np.float32)
    query = (5, 41)  # image pixel in cell (0, 5) -> position 5
    partner = 3 * grid_w + 1  # cell (3, 1): image rows 24..31, columns 8..15
    aff[5, partner] = 1.0
    aff[10, 5] = 1.0  # column 5 peaks elsewhere: reading a column instead of a row is caught
    values = affinity_of_pixel(torch.from_numpy(aff), (grid_h, grid_w), query, (H, W))
    assert values.shape == (H, W) and values.dtype == np.float32
    peak_y, peak_x = np.unravel_index(values.argmax(), values.shape)
    assert 24 <= peak_y < 32 and 8 <= peak_x < 16
    out = affinity_overlay(IMAGE, aff, (grid_h, grid_w), query)
    assert out.shape == (H, W, 3) and out.dtype == np.uint8
    assert out[query].tolist() == [255, 255, 255]  # the query pixel is marked
    with pytest.raises(ValueError, match="outside"):
        affinity_of_pixel(aff, (grid_h, grid_w), (H, 0), (H, W))


def test_grid_layout_and_sample_row():
    grid = make_grid([IMAGE, IMAGE[:16, :24], IMAGE], pad=4)
    # The half-size panel is scaled to the first panel's height (32 x 48).
    assert grid.shape == (H, 3 * W + 2 * 4, 3) and grid.dtype == np.uint8
    np.testing.assert_array_equal(grid[:, :W], IMAGE)
    assert (grid[:, W : W + 4] == 255).all()

    gt = np.zeros((H, W), np.uint8)
    gt[5:10, 5:10] = 12
    row = visualize_sample(IMAGE, cams=np.zeros((2, 4, 6)), cam_titles=["dog", "cat"],
                           pred=gt, gt=gt)
    assert row.dtype == np.uint8 and row.shape[1] == 5 * W + 4 * 4 and row.shape[0] > H
    chw = to_chw(row)
    assert chw.shape == (3, *row.shape[:2]) and chw.flags["C_CONTIGUOUS"]
    no_titles = visualize_sample(IMAGE, gt=gt, titles=False)
    assert no_titles.shape == (H, 2 * W + 4, 3)
    np.testing.assert_array_equal(no_titles[7, W + 4 + 7], [64, 0, 128])  # dog (12)


def test_visualize_tool(tmp_path):
    tool = load_tool("visualize")
    dirs = {name: tmp_path / name for name in ("img", "pred", "gt", "cam", "out")}
    for directory in dirs.values():
        directory.mkdir()
    gt = np.zeros((H, W), np.uint8)
    gt[5:10, 5:10] = 12
    Image.fromarray(IMAGE).save(dirs["img"] / "a.jpg")
    write_label_png(dirs["gt"] / "a.png", gt)
    write_label_png(dirs["pred"] / "a.png", gt)
    cams = np.zeros((20, 8, 12), np.float32)  # foreground classes: channel c is class c + 1
    cams[7, 2, 2] = 0.5  # cat
    cams[11, 1, 1] = 1.0  # dog
    np.save(dirs["cam"] / "a.npy", cams)
    (tmp_path / "list.txt").write_text("a\n")

    _, titles = tool.load_cams(dirs["cam"], "a", VOC_CLASSES, max_cams=3)
    assert titles == ["dog", "cat"]  # by peak; all-zero maps skipped
    args = ["--list", str(tmp_path / "list.txt"), "--image-dir", str(dirs["img"]),
            "--pred-dir", str(dirs["pred"]), "--gt-dir", str(dirs["gt"]),
            "--cam-dir", str(dirs["cam"]), "--out-dir", str(dirs["out"])]
    (written,) = tool.main(args)
    picture = np.asarray(Image.open(written))
    assert written == dirs["out"] / "a.png"
    assert picture.shape[1] == 5 * W + 4 * 4 and picture.shape[0] > H  # image, 2 CAMs, pred, gt
    # Below the panels, the legend: background and dog, in their colours.
    band = picture[-LEGEND_ROW:]
    assert tuple(PALETTE[12]) in _colours(band) and tuple(PALETTE[8]) not in _colours(band)
    assert (band[:, :2] == 255).all()  # a white strip, not the bottom of a panel

    (dirs["pred"] / "a.png").unlink()
    with pytest.raises(SystemExit, match=r"pred[/\\]a\.png"):
        tool.main(args)


# --------------------------------------------------------------------------------------------
# Legends, titles that fit, panels in the middle of their cells
# --------------------------------------------------------------------------------------------

PALETTE = color_palette(256)
LEGEND_ROW = 22  # a legend row, as tall as a title strip


def _colours(picture) -> set:
    return {tuple(c) for c in picture.reshape(-1, 3).tolist()}


def test_fit_text_shrinks_then_shortens_with_an_ellipsis():
    import cv2

    def width(text, scale):
        return cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)[0][0]

    assert fit_text("dog", 100, 0.55) == ("dog", 0.55)
    text, scale = fit_text("CAM: traffic light", 80, 0.55)  # smaller type is enough
    assert text == "CAM: traffic light" and 0.275 <= scale < 0.55 and width(text, scale) <= 80
    title = "CAM: a very long class name"
    text, scale = fit_text(title, 54, 0.55)  # half size is not enough: shortened
    prefix = text[:-3]
    assert text.endswith("...") and title.startswith(prefix) and scale == 0.275
    longer = title[: len(prefix) + 1]
    while longer.endswith(" "):
        longer = title[: len(longer) + 1]
    assert width(text, scale) <= 54 < width(longer + "...", scale)  # the longest that fits
    assert fit_text("CAM: anything", 4, 0.55)[0] == ""  # not even "...": nothing, not a stub


def test_a_long_title_is_shortened_instead_of_cut_off_at_the_edge():
    panel = np.zeros((20, 60, 3), np.uint8)
    strip = add_title(panel, "CAM: a very long class name")[:22]
    ink = np.flatnonzero((strip.min(axis=2) < 128).any(axis=0))
    assert ink.size and ink.max() < 60 - 3  # its right margin stays white: nothing clipped


def test_sample_row_has_a_legend_of_the_classes_its_label_maps_show():
    pred = np.zeros((H, W), np.uint8)
    pred[5:10, 5:10] = 12  # dog
    pred[0, :] = 255  # ignore
    gt = np.zeros((H, W), np.uint8)
    gt[20:, 20:] = 15  # person
    plain = visualize_sample(IMAGE, pred=pred, gt=gt)
    row = visualize_sample(IMAGE, pred=pred, gt=gt, class_names=VOC_CLASSES)
    legend_height = row.shape[0] - plain.shape[0]  # whole rows of names below the panels
    assert row.shape[1] == plain.shape[1] and legend_height % LEGEND_ROW == 0 and legend_height
    np.testing.assert_array_equal(row[: plain.shape[0]], plain)
    band = _colours(row[plain.shape[0]:])
    for c in (12, 15, 255):  # swatches: dog, person, ignore (background is black, as the frame)
        assert tuple(PALETTE[c]) in band, c
    assert tuple(PALETTE[8]) not in band  # cat: not in either map
    # A row too narrow for two entries side by side: one row each, inside the picture.
    narrow = visualize_sample(IMAGE[:, 28:], gt=gt[:, 28:], class_names=VOC_CLASSES, titles=False)
    assert narrow.shape[0] == H + 2 * LEGEND_ROW  # background; person
    # CAMs alone: no label map, no legend.
    assert visualize_sample(IMAGE, cams=[np.zeros((4, 6))], class_names=VOC_CLASSES).shape == \
        visualize_sample(IMAGE, cams=[np.zeros((4, 6))]).shape


def test_a_narrower_panel_sits_in_the_middle_of_its_cell():
    red = np.zeros((H, W, 3), np.uint8)
    red[..., 0] = 255
    narrow = np.zeros((H, 20, 3), np.uint8)  # as tall as the first: kept at its width
    grid = make_grid([red, narrow, red], ncols=1, pad=4)
    cell = grid[H + 4 : 2 * H + 4]
    dark = np.flatnonzero((cell == 0).all(axis=2).any(axis=0))
    assert (dark.min(), dark.max()) == ((W - 20) // 2, (W - 20) // 2 + 19)
