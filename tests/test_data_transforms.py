"""Transforms: normalisation round trip, crop box, flip, rescale, jitter."""

import numpy as np
import pytest
import torch

from afa.constants import IGNORE_INDEX, IMAGENET_MEAN
from afa.data.transforms import (
    Augment,
    color_jitter,
    denormalize,
    normalize,
    random_crop,
    random_hflip,
    random_rescale,
)


def _image(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def test_normalize_denormalize_round_trip():
    image = _image(7, 9)
    x = normalize(image)
    assert x.shape == (3, 7, 9) and x.dtype == torch.float32
    assert torch.allclose(denormalize(x, 255.0), torch.from_numpy(image).permute(2, 0, 1).float(),
                          atol=1e-3)
    batch = torch.stack([x, x])
    rgb = denormalize(batch)
    assert rgb.shape == (2, 3, 7, 9) and 0 <= rgb.min() and rgb.max() <= 1
    assert torch.allclose(rgb * 255, denormalize(batch, 255.0), atol=1e-4)
    with pytest.raises(ValueError, match="3, H, W"):
        denormalize(torch.zeros(4, 5))


@pytest.mark.parametrize("h, w, crop", [(10, 6, 8), (5, 20, 8), (8, 8, 8), (30, 40, 16), (3, 4, 9)])
def test_random_crop_box_covers_exactly_the_image(h, w, crop):
    image = np.full((h, w, 3), 200, dtype=np.uint8)
    mask = np.ones((h, w), dtype=np.uint8)
    for seed in range(5):
        out, out_mask, box = random_crop(image, mask, crop, np.random.default_rng(seed))
        assert out.shape == (crop, crop, 3) and out_mask.shape == (crop, crop)
        assert box.dtype == np.int64 and box.shape == (4,)
        y0, y1, x0, x1 = box.tolist()
        assert (y1 - y0, x1 - x0) == (min(h, crop), min(w, crop))
        inside = np.zeros((crop, crop), dtype=bool)
        inside[y0:y1, x0:x1] = True
        assert (out[inside] == 200).all() and (out[~inside] == 0).all()
        assert (out_mask[inside] == 1).all() and (out_mask[~inside] == IGNORE_INDEX).all()


def test_padding_is_black_after_normalisation():
    image = np.full((4, 4, 3), 255, dtype=np.uint8)
    out, _, box = random_crop(image, None, 8, np.random.default_rng(0))
    rgb = denormalize(normalize(out), 255.0)
    outside = torch.ones(8, 8, dtype=torch.bool)
    outside[box[0]:box[1], box[2]:box[3]] = False
    assert rgb[:, outside].abs().max() < 1e-3
    assert torch.allclose(normalize(out)[0, 0, 0], torch.tensor(-IMAGENET_MEAN[0] / 58.395))


def test_flip_moves_image_and_mask_together():
    image = _image(6, 10)
    mask = np.arange(60, dtype=np.uint8).reshape(6, 10)
    flips = 0
    for seed in range(20):
        out, out_mask = random_hflip(image, mask, np.random.default_rng(seed))
        flipped = out_mask[0, 0] == 9
        flips += flipped
        expected = (image[:, ::-1], mask[:, ::-1]) if flipped else (image, mask)
        assert np.array_equal(out, expected[0]) and np.array_equal(out_mask, expected[1])
    assert 0 < flips < 20


def test_rescale_range_and_nearest_mask():
    image = _image(40, 60)
    mask = np.random.default_rng(1).integers(0, 3, size=(40, 60)).astype(np.uint8)
    for seed in range(10):
        out, out_mask = random_rescale(image, mask, (0.5, 2.0), np.random.default_rng(seed))
        assert out.shape[:2] == out_mask.shape
        assert 20 <= out.shape[0] <= 80 and abs(out.shape[1] / out.shape[0] - 1.5) < 0.1
        assert set(np.unique(out_mask)) <= {0, 1, 2}


def test_augment_is_deterministic_given_the_generator_and_off_by_default():
    image, mask = _image(50, 70), np.zeros((50, 70), dtype=np.uint8)
    aug = Augment(crop_size=32, scale_range=(0.5, 2.0), hflip=True, jitter=(0.3, 0.3, 0.3, 0.05))
    a = aug(image, mask, np.random.default_rng(3))
    b = aug(image, mask, np.random.default_rng(3))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    same, same_mask, box = Augment()(image, mask, np.random.default_rng(0))
    assert same is image and same_mask is mask and box.tolist() == [0, 50, 0, 70]


def test_color_jitter_changes_colours_not_shape():
    image = _image(16, 16)
    out = color_jitter(image, np.random.default_rng(0), 0.4, 0.4, 0.4, 0.1)
    assert out.shape == image.shape and out.dtype == np.uint8 and not np.array_equal(out, image)
    assert np.array_equal(color_jitter(image, np.random.default_rng(0)), image)
