"""VOCStyleDataset on tiny VOC-layout trees: fields, labels, box, flips, modes, and bad input."""

import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from afa.constants import IGNORE_INDEX
from afa.data import DataError, VOCStyleDataset, denormalize, make_loader, write_mask

NUM_CLASSES = 21
# Image colour of each class: no channel is 0, so zero padding is told apart from content.
TABLE = np.random.default_rng(0).integers(30, 256, size=(256, 3)).astype(np.uint8)


def _masks():
    """Three masks of different sizes with known classes."""
    a = np.zeros((40, 50), np.uint8)
    a[5:20, 10:30] = 15
    a[25:35, 5:45] = 7
    a[20, :] = IGNORE_INDEX
    b = np.zeros((30, 24), np.uint8)
    b[:, 12:] = 3
    c = np.full((20, 20), 12, np.uint8)
    return {"img_a": (a, [7, 15]), "img_b": (b, [3]), "img_c": (c, [12])}


def _write_image(path, array, lossless=True):
    """Lossless files (PNG data under a .jpg name, PIL reads by content) keep colours exact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="PNG" if lossless else "JPEG")


def make_tree(root, split=None, mask_dir="SegmentationClassAug"):
    """A VOC-style tree; with ``split``, the COCO layout. Returns (root, name list, label file)."""
    image_dir, masks_dir = root / "JPEGImages", root / mask_dir
    if split:
        image_dir, masks_dir = image_dir / split, masks_dir / split
    labels = {}
    for name, (mask, classes) in _masks().items():
        _write_image(image_dir / f"{name}.jpg", TABLE[mask])
        write_mask(masks_dir / f"{name}.png", mask)
        labels[name] = classes
    (root / "list.txt").write_text("\n".join(labels) + "\n")
    (root / "labels.json").write_text(json.dumps(labels))
    return root, root / "list.txt", root / "labels.json"


@pytest.fixture
def tree(tmp_path):
    return make_tree(tmp_path)


def _rgb255(image):
    return denormalize(image, 255.0).round().to(torch.uint8).permute(1, 2, 0).numpy()


def test_cls_mode_fields_shapes_and_labels(tree):
    root, names, labels = tree
    ds = VOCStyleDataset(root, names, labels, NUM_CLASSES, crop_size=32, scale_range=(0.5, 2.0),
                         hflip=True)
    assert len(ds) == 3
    for index, (name, (_, classes)) in enumerate(_masks().items()):
        sample = ds[index]
        assert set(sample) == {"name", "image", "label", "box"} and sample["name"] == name
        assert sample["image"].shape == (3, 32, 32) and sample["image"].dtype == torch.float32
        assert sample["label"].shape == (NUM_CLASSES - 1,)
        assert sample["label"].dtype == torch.float32
        assert torch.nonzero(sample["label"]).flatten().add(1).tolist() == classes
        box = sample["box"]
        assert box.shape == (4,) and box.dtype == torch.int64
        y0, y1, x0, x1 = box.tolist()
        rgb = _rgb255(sample["image"])
        inside = np.zeros((32, 32), bool)
        inside[y0:y1, x0:x1] = True
        assert (rgb[inside] > 0).any(axis=1).all(), "content inside the box"
        assert (rgb[~inside] == 0).all(), "zero padding outside the box"


def test_seg_mode_is_exact_without_augmentation(tree):
    root, names, labels = tree
    for label_file in (None, labels):
        ds = VOCStyleDataset(root, names, label_file, NUM_CLASSES, mode="seg")
        for index, (mask, classes) in enumerate(_masks().values()):
            sample = ds[index]
            assert set(sample) == {"name", "image", "label", "box", "mask"}
            assert sample["mask"].dtype == torch.int64
            assert np.array_equal(sample["mask"].numpy(), mask)
            assert np.array_equal(_rgb255(sample["image"]), TABLE[mask])
            assert sample["box"].tolist() == [0, mask.shape[0], 0, mask.shape[1]]
            assert torch.nonzero(sample["label"]).flatten().add(1).tolist() == classes


def test_flip_and_crop_keep_image_and_mask_aligned(tree):
    root, names, labels = tree
    ds = VOCStyleDataset(root, names, labels, NUM_CLASSES, mode="seg", crop_size=24, hflip=True)
    flipped = 0
    for seed in range(12):
        torch.manual_seed(seed)
        sample = ds[0]
        mask, rgb = sample["mask"].numpy(), _rgb255(sample["image"])
        y0, y1, x0, x1 = sample["box"].tolist()
        valid = np.zeros(mask.shape, bool)
        valid[y0:y1, x0:x1] = True
        assert (mask[~valid] == IGNORE_INDEX).all() and (rgb[~valid] == 0).all()
        assert np.array_equal(rgb[valid], TABLE[mask[valid]])
        # Mask a: class 15 is above-left of the ignore row; after a flip it is above-right.
        ys, xs = np.nonzero(mask == 15)
        if xs.size and (mask == 7).any():
            flipped += xs.mean() > np.nonzero(mask == 7)[1].mean()
    assert flipped > 0


def test_rescale_keeps_alignment_away_from_edges(tree):
    root, names, labels = tree
    ds = VOCStyleDataset(root, names, labels, NUM_CLASSES, mode="seg", scale_range=(0.5, 2.0),
                         hflip=True)
    torch.manual_seed(0)
    sample = ds[1]  # mask b: left half 0, right half 3
    mask, rgb = sample["mask"].numpy(), _rgb255(sample["image"]).astype(int)
    col = mask.shape[1] // 4
    assert (mask[:, col] == mask[0, col]).all() and (mask[:, -col - 1] != mask[0, col]).all()
    assert np.abs(rgb[:, col] - TABLE[mask[0, col]]).max() <= 2


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK"])
def test_images_are_always_rgb(tmp_path, mode):
    root, names, labels = make_tree(tmp_path)
    mask = _masks()["img_c"][0]
    image = Image.fromarray(TABLE[mask]).convert(mode)
    image.save(root / "JPEGImages" / "img_c.jpg", format="JPEG" if mode in ("L", "CMYK") else "PNG")
    ds = VOCStyleDataset(root, names, labels, NUM_CLASSES, mode="seg")
    rgb = _rgb255(ds[2]["image"])
    assert rgb.shape == (20, 20, 3)
    if mode == "L":
        assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()


def test_coco_split_layout(tmp_path):
    root, names, labels = make_tree(tmp_path, split="train", mask_dir="SegmentationClass")
    ds = VOCStyleDataset(root, names, labels, NUM_CLASSES, split="train",
                         mask_dir="SegmentationClass", mode="seg")
    assert np.array_equal(ds[0]["mask"].numpy(), _masks()["img_a"][0])


def test_infer_mode_needs_only_images(tree):
    """What the inference tools read (``afa.inference.ImageSet`` is this mode): masks and labels
    where they exist; the label file names some ids, the others take the classes of their mask."""
    root, names, labels = tree
    (root / "SegmentationClassAug" / "img_b.png").unlink()
    labels.write_text(json.dumps({"img_a": [7, 15]}))
    ds = VOCStyleDataset(root, names, labels, NUM_CLASSES, mode="infer")
    assert ds.names == ["img_a", "img_b", "img_c"]
    assert set(ds[0]) == {"name", "image", "label", "box", "mask"}
    assert set(ds[1]) == {"name", "image", "box"}  # neither mask nor labels
    assert torch.nonzero(ds[2]["label"]).flatten().add(1).tolist() == [12]  # from the mask
    assert [ds.has_mask(n) for n in names.read_text().split()] == [True, False, True]
    assert ds.classes("img_a") == [7, 15] and ds.classes("img_c") == [12]
    with pytest.raises(DataError, match=r"no image-level labels for 'img_b'.*labels\.json"):
        ds.classes("img_b")
    assert np.array_equal(ds.mask("img_c", (20, 20)), _masks()["img_c"][0])
    with pytest.raises(DataError, match=r"img_c\.png: mask size \(20, 20\) differs"):
        ds.mask("img_c", (20, 21))
    # No mask folder at all (the VOC test split) and no label file.
    for mask in (root / "SegmentationClassAug").iterdir():
        mask.unlink()
    (root / "SegmentationClassAug").rmdir()
    assert set(VOCStyleDataset(root, names, None, NUM_CLASSES, mode="infer")[0]) == {
        "name", "image", "box"}
    # Images stay required.
    (root / "JPEGImages" / "img_c.jpg").unlink()
    with pytest.raises(DataError, match=r"img_c\.jpg: image file not found"):
        VOCStyleDataset(root, names, None, NUM_CLASSES, mode="infer")


def test_image_set_is_the_infer_mode(tmp_path):
    from afa.inference import ImageSet

    root, names, labels = make_tree(tmp_path, split="val", mask_dir="SegmentationClass")
    images = ImageSet(root, names, NUM_CLASSES, mask_dir="SegmentationClass", split_subdir="val",
                      label_file=root / "absent.json")  # a missing label file is no label file
    assert isinstance(images, VOCStyleDataset) and images.mode == "infer"
    assert images.labels is None and images.classes("img_a") == [7, 15]
    assert images.image_path("img_a") == root / "JPEGImages" / "val" / "img_a.jpg"
    assert images.mask_path("img_a") == root / "SegmentationClass" / "val" / "img_a.png"
    assert np.array_equal(images.image("img_b"), TABLE[_masks()["img_b"][0]])
    names.write_text("img_a\nimg_a\n")
    with pytest.raises(DataError, match=r"duplicate ids \['img_a'\]"):
        ImageSet(root, names, NUM_CLASSES, mask_dir="SegmentationClass", split_subdir="val")


def test_loader_is_repeatable_across_workers(tree):
    root, names, labels = tree
    ds = VOCStyleDataset(root, names, labels, NUM_CLASSES, crop_size=16, scale_range=(0.5, 2.0),
                         hflip=True, jitter=(0.3, 0.3, 0.3, 0.0))

    def epoch(seed, workers):
        loader = make_loader(ds, 3, seed=seed, shuffle=True, num_workers=workers)
        return [batch for batch in loader]

    first, again, other = epoch(1, 2), epoch(1, 2), epoch(2, 2)
    assert first[0]["image"].shape == (3, 3, 16, 16) and first[0]["box"].shape == (3, 4)
    assert first[0]["name"] == again[0]["name"]
    assert torch.equal(first[0]["image"], again[0]["image"])
    assert not torch.equal(first[0]["image"], other[0]["image"])


def test_load_with_an_explicit_generator_is_reproducible(tree):
    root, names, labels = tree
    ds = VOCStyleDataset(root, names, labels, NUM_CLASSES, crop_size=16, scale_range=(0.5, 2.0),
                         hflip=True)
    a, b = ds.load(0, np.random.default_rng(7)), ds.load(0, np.random.default_rng(7))
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["box"], b["box"])


# ----------------------------------------------------------------------------------------------
# Bad input: an error naming the file and the problem, or (skip_bad) a counted warning
# ----------------------------------------------------------------------------------------------


def test_missing_image(tree):
    root, names, labels = tree
    (root / "JPEGImages" / "img_b.jpg").unlink()
    with pytest.raises(DataError, match=r"img_b\.jpg: image file not found"):
        VOCStyleDataset(root, names, labels, NUM_CLASSES)
    with pytest.warns(UserWarning, match="skipped 1 of 3 ids.*img_b"):
        ds = VOCStyleDataset(root, names, labels, NUM_CLASSES, skip_bad=True)
    assert ds.names == ["img_a", "img_c"] and ds.skipped[0][0] == "img_b"


def test_missing_mask_in_seg_mode_only(tree):
    root, names, labels = tree
    (root / "SegmentationClassAug" / "img_a.png").unlink()
    VOCStyleDataset(root, names, labels, NUM_CLASSES)  # cls mode never reads masks
    with pytest.raises(DataError, match=r"img_a\.png: mask file not found"):
        VOCStyleDataset(root, names, labels, NUM_CLASSES, mode="seg")


def test_corrupt_jpeg(tree):
    root, names, labels = tree
    path = root / "JPEGImages" / "img_a.jpg"
    _write_image(path, TABLE[_masks()["img_a"][0]], lossless=False)
    path.write_bytes(path.read_bytes()[:200])  # truncated
    ds = VOCStyleDataset(root, names, labels, NUM_CLASSES)
    with pytest.raises(DataError, match=r"img_a\.jpg: cannot decode image"):
        ds[0]
    path.write_bytes(b"not an image at all")
    with pytest.raises(DataError, match=r"img_a\.jpg: cannot decode image"):
        ds[0]
    ds = VOCStyleDataset(root, names, labels, NUM_CLASSES, skip_bad=True)
    with pytest.warns(UserWarning, match=r"skipping a bad sample.*img_a\.jpg"):
        sample = ds[0]
    assert sample["name"] == "img_b" and ds.load_failures == 1


def test_mask_values_out_of_range(tree):
    root, names, labels = tree
    mask = _masks()["img_b"][0].copy()
    mask[0, 0], mask[1, 1] = 30, 254
    write_mask(root / "SegmentationClassAug" / "img_b.png", mask)
    ds = VOCStyleDataset(root, names, labels, NUM_CLASSES, mode="seg")
    with pytest.raises(DataError, match=r"img_b\.png: mask values \[30, 254\] outside 0\.\.20"):
        ds[1]
    Image.fromarray(np.full((30, 24), 300, np.uint16)).save(root / "SegmentationClassAug/img_b.png")
    with pytest.raises(DataError, match=r"img_b\.png: mask values span 300\.\.300, beyond"):
        ds[1]


def test_colour_mask_is_rejected(tree):
    root, names, labels = tree
    Image.new("RGB", (24, 30)).save(root / "SegmentationClassAug" / "img_b.png")
    ds = VOCStyleDataset(root, names, labels, NUM_CLASSES, mode="seg")
    with pytest.raises(DataError, match=r"img_b\.png: mask has mode RGB"):
        ds[1]


def test_image_and_mask_sizes_differ(tree):
    root, names, labels = tree
    write_mask(root / "SegmentationClassAug" / "img_c.png", np.zeros((21, 20), np.uint8))
    ds = VOCStyleDataset(root, names, labels, NUM_CLASSES, mode="seg")
    with pytest.raises(DataError, match=r"img_c\.png: mask size \(20, 21\) differs from image "
                                        r"size \(20, 20\)"):
        ds[2]


def test_empty_name_list(tree):
    root, names, labels = tree
    names.write_text("\n\n")
    with pytest.raises(DataError, match=r"list\.txt: name list is empty"):
        VOCStyleDataset(root, names, labels, NUM_CLASSES)


def test_duplicate_ids(tree):
    root, names, labels = tree
    names.write_text("img_a\nimg_b\nimg_a\n")
    with pytest.raises(DataError, match=r"duplicate ids \['img_a'\]"):
        VOCStyleDataset(root, names, labels, NUM_CLASSES)


def test_id_without_label(tree):
    root, names, labels = tree
    labels.write_text(json.dumps({"img_a": [7, 15], "img_c": [12]}))
    with pytest.raises(DataError, match=r"labels\.json: no labels for id 'img_b'"):
        VOCStyleDataset(root, names, labels, NUM_CLASSES)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = VOCStyleDataset(root, names, labels, NUM_CLASSES, skip_bad=True)
    assert len(caught) == 1 and "skipped 1 of 3" in str(caught[0].message)
    assert len(ds) == 2


def test_label_out_of_range_and_missing_label_file(tree):
    root, names, labels = tree
    labels.write_text(json.dumps({"img_a": [7, 21], "img_b": [3], "img_c": [12]}))
    with pytest.raises(DataError, match=r"labels of 'img_a' must be .* in 1\.\.20"):
        VOCStyleDataset(root, names, labels, NUM_CLASSES)
    with pytest.raises(DataError, match=r"nope\.json: label file not found"):
        VOCStyleDataset(root, names, root / "nope.json", NUM_CLASSES)
    with pytest.raises(ValueError, match="needs a label_file"):
        VOCStyleDataset(root, names, None, NUM_CLASSES)


def test_16_bit_and_oversized_images_in_a_split(tmp_path):
    """The VOC and COCO layouts read images with the same reader as a folder of photos: a 16-bit
    greyscale image keeps its values (x >> 8; PIL alone turned it white), and one over the pixel
    limit is a DataError naming the file, not PIL's DecompressionBombError traceback."""
    root, names, labels = make_tree(tmp_path, split="train", mask_dir="SegmentationClass")
    image_dir = root / "JPEGImages" / "train"
    grey16 = (np.arange(20 * 20, dtype=np.uint32) * 160).reshape(20, 20).astype(np.uint16)
    Image.fromarray(grey16).save(image_dir / "img_c.jpg", format="PNG")
    ds = VOCStyleDataset(root, names, labels, NUM_CLASSES, split="train",
                         mask_dir="SegmentationClass", mode="seg")
    np.testing.assert_array_equal(ds.image("img_c"),
                                  np.repeat((grey16 >> 8).astype(np.uint8)[..., None], 3, 2))
    Image.new("1", (14000, 14000)).save(image_dir / "img_b.jpg", format="PNG")
    with pytest.raises(DataError, match=f"{image_dir / 'img_b.jpg'}: 14000x14000 image .*"
                                        "AFA_MAX_IMAGE_PIXELS=196000000"):
        ds[1]
