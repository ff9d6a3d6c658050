"""afa.data.read_image, the one reader of every image (splits, COCO, folders of photos): each PIL
mode to 8-bit RGB, with the right values, real files written by PIL; pixels whose range cannot
be known refused; an image larger than the pixel limit refused before decoding, with a one-line
error saying how to lift the limit."""

import numpy as np
import pytest
from PIL import Image

import afa.data.voc as voc
from afa.data import DataError, read_image

GRADIENT = (np.arange(64 * 64, dtype=np.uint32) * 16).reshape(64, 64).astype(np.uint16)


def _grey3(grey: np.ndarray) -> np.ndarray:
    return np.repeat(grey[..., None], 3, axis=2)


def test_a_16_bit_greyscale_png_keeps_its_gradient(tmp_path):
    """PIL's own conversion clips 16-bit values at 255: 99.6 % of this gradient became white."""
    path = tmp_path / "depth.png"
    Image.fromarray(GRADIENT).save(path)
    with Image.open(path) as img:
        assert img.mode == "I;16"  # the file is a real 16-bit greyscale PNG
    image = read_image(path)
    assert image.dtype == np.uint8 and image.shape == (64, 64, 3)
    np.testing.assert_array_equal(image, _grey3((GRADIENT >> 8).astype(np.uint8)))
    assert np.abs(image[..., 0].astype(int) - np.round(GRADIENT / 257)).max() <= 1
    assert (image == 255).mean() < 0.01


def test_a_32_bit_integer_image_from_a_png_is_16_bit():
    """PIL before 10 opens 16-bit greyscale PNGs as mode I."""
    img = Image.fromarray(GRADIENT.astype(np.int32))
    assert img.mode == "I"
    np.testing.assert_array_equal(voc._to_rgb(img, "PNG", "x.png"),
                                  _grey3((GRADIENT >> 8).astype(np.uint8)))
    with pytest.raises(DataError, match="x.png: mode I pixel values span -1..65535"):
        voc._to_rgb(Image.fromarray(np.array([[-1, 65535]], np.int32)), "PNG", "x.png")


RGB = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)


def _one_bit(path):
    bits = RGB[..., 0] > 127
    Image.fromarray(bits).save(path)
    return _grey3(np.where(bits, 255, 0).astype(np.uint8))


def _grey_alpha(path):
    grey = RGB[..., 0]
    Image.fromarray(np.stack([grey, RGB[..., 1]], axis=2), "LA").save(path)
    return _grey3(grey)  # alpha dropped


def _palette_with_transparency(path):
    palette = np.random.default_rng(1).integers(0, 256, (256, 3), dtype=np.uint8)
    index = RGB[..., 0]
    img = Image.fromarray(index, "L")
    img.putpalette(palette.ravel().tolist())
    img.save(path, transparency=bytes(range(256)))  # a tRNS chunk with an alpha per entry
    return palette[index]  # the palette's colours, transparency dropped


def _rgba(path):
    Image.fromarray(np.concatenate([RGB, RGB[..., :1]], axis=2), "RGBA").save(path)
    return RGB


def _cmyk_jpeg(path):
    Image.fromarray(RGB).convert("CMYK").save(path, format="JPEG", quality=95)
    with Image.open(path) as img:
        assert img.mode == "CMYK"
        return np.asarray(img.convert("RGB"))  # PIL's conversion, no ICC profile


@pytest.mark.parametrize("write", [_one_bit, _grey_alpha, _palette_with_transparency, _rgba,
                                   _cmyk_jpeg], ids=lambda f: f.__name__.strip("_"))
def test_every_mode_reads_as_8_bit_rgb(tmp_path, write, recwarn):
    path = tmp_path / "image.png"
    expected = write(path)
    image = read_image(path)
    assert image.dtype == np.uint8 and image.shape == (20, 30, 3)
    np.testing.assert_array_equal(image, expected)
    assert not [w for w in recwarn if "Transparency" in str(w.message)]


@pytest.mark.parametrize("array, mode", [(RGB[..., 0].astype(np.float32) / 255, "F"),
                                         (RGB[..., 0].astype(np.int32), "I")])
def test_pixels_of_unknown_range_are_refused_naming_the_file(tmp_path, array, mode):
    """A float image in 0..1 would have turned black, a 32-bit one clipped: no guessing."""
    path = tmp_path / "odd.png"  # a TIFF under a .png name: PIL reads by content
    Image.fromarray(array).save(path, format="TIFF")
    with pytest.raises(DataError, match=f"{path}: .*mode {mode}.*8- or 16-bit"):
        read_image(path)


def test_a_huge_png_is_refused_before_decoding(tmp_path):
    """14000 x 14000 pixels in 24 KB: PIL used to stop with a DecompressionBombError traceback."""
    path = tmp_path / "bomb.png"
    Image.new("1", (14000, 14000)).save(path)
    assert path.stat().st_size < 100_000
    with pytest.raises(DataError) as info:
        read_image(path)
    message = str(info.value)
    assert message.startswith(f"{path}: 14000x14000 image (196 megapixels)")
    assert f"{voc.MAX_IMAGE_PIXELS}" in message and "AFA_MAX_IMAGE_PIXELS=196000000" in message
    assert "\n" not in message


def test_the_environment_sets_the_limit_instead_of_pil(tmp_path, monkeypatch):
    path = tmp_path / "small.png"
    Image.fromarray(RGB).save(path)  # 600 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # PIL alone would refuse it
    monkeypatch.delenv(voc.MAX_IMAGE_PIXELS_ENV, raising=False)
    np.testing.assert_array_equal(read_image(path), RGB)
    monkeypatch.setenv(voc.MAX_IMAGE_PIXELS_ENV, "599")
    with pytest.raises(DataError, match="30x20 image .* limit of 599 pixels.*"
                                        "AFA_MAX_IMAGE_PIXELS=600"):
        read_image(path)
    for value in ("600", "0"):
        monkeypatch.setenv(voc.MAX_IMAGE_PIXELS_ENV, value)
        np.testing.assert_array_equal(read_image(path), RGB)
    monkeypatch.setenv(voc.MAX_IMAGE_PIXELS_ENV, "lots")
    with pytest.raises(DataError, match="AFA_MAX_IMAGE_PIXELS='lots' is not a pixel count"):
        read_image(path)
    assert Image.MAX_IMAGE_PIXELS == 100  # PIL's own setting is left as it was
