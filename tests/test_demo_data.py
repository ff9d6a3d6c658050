"""The demo set: deterministic, masks agree with labels, VOC layout, not colour-separable."""

import json

import cv2
import numpy as np
from conftest import load_tool
import pytest

from afa.data import VOCStyleDataset, labels_from_mask, read_mask
from afa.data.synthetic import (
    CLASS_TEXTURES,
    CO_OCCURRING,
    DEMO_CLASSES,
    DEMO_VERSION,
    ELLIPSE_TEXTURES,
    RIM_CONTRAST,
    RIM_FADE,
    _depth_scale,
    _rim_contrast,
    _sample_rng,
    _SHAPES,
    _texture,
    make_demo_dataset,
    render_sample,
)

NUM_CLASSES = len(DEMO_CLASSES)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    tool = load_tool("make_demo_data")
    argv = ["--out", str(root), "--seed", "3", "--num-train", "24", "--num-val", "8"]
    assert tool.main(argv) == 0
    return root


def _files(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes(demo, tmp_path):
    make_demo_dataset(tmp_path / "again", seed=3, num_train=24, num_val=8, progress=False)
    assert _files(demo) == _files(tmp_path / "again")
    make_demo_dataset(tmp_path / "other", seed=4, num_train=24, num_val=8, progress=False)
    other = _files(tmp_path / "other")
    assert other.keys() == _files(demo).keys() and other != _files(demo)


def test_layout_lists_and_labels_match_masks(demo):
    assert (demo / "train_aug.txt").read_text().split() == [f"train_{i:05d}" for i in range(24)]
    assert (demo / "val.txt").read_text().split() == [f"val_{i:05d}" for i in range(8)]
    assert (demo / "ImageSets/Segmentation/val.txt").read_text() == (demo / "val.txt").read_text()
    labels = json.loads((demo / "cls_labels.json").read_text())
    assert len(labels) == 32
    for name, classes in labels.items():
        mask = read_mask(demo / "SegmentationClassAug" / f"{name}.png", NUM_CLASSES)
        assert mask.shape == (128, 128)
        assert classes == labels_from_mask(mask, NUM_CLASSES) and 1 <= len(classes) <= 2
    meta = json.loads((demo / "meta.json").read_text())
    assert meta["classes"] == list(DEMO_CLASSES) and meta["version"] == DEMO_VERSION


def test_prepare_voc_reproduces_the_demo_lists(demo, tmp_path):
    prepare_voc = load_tool("prepare_voc")
    out = tmp_path / "lists"
    assert prepare_voc.main(["--root", str(demo), "--out", str(out), "--num-classes",
                             str(NUM_CLASSES), "--workers", "1"]) == 0
    for name in ("train_aug.txt", "val.txt", "cls_labels.json"):
        assert (out / name).read_bytes() == (demo / name).read_bytes(), name


def test_loader_reads_the_demo_with_voc_arguments(demo):
    ds = VOCStyleDataset(demo, demo / "train_aug.txt", demo / "cls_labels.json", NUM_CLASSES,
                         crop_size=96, scale_range=(0.5, 2.0), hflip=True)
    sample = ds[0]
    assert sample["image"].shape == (3, 96, 96) and sample["label"].shape == (NUM_CLASSES - 1,)
    val = VOCStyleDataset(demo, demo / "val.txt", demo / "cls_labels.json", NUM_CLASSES, mode="seg")
    assert val[0]["mask"].shape == (128, 128)


def test_colour_does_not_identify_the_class():
    """Nearest class-mean colour of an object's pixels is close to chance (1/8)."""
    colours, classes = [], []
    for index in range(240):
        image, mask = render_sample(_sample_rng(0, "train", index), 64)
        for cls in labels_from_mask(mask, NUM_CLASSES):
            colours.append(image[mask == cls].mean(axis=0))
            classes.append(cls)
    colours, classes = np.asarray(colours), np.asarray(classes)
    assert set(classes.tolist()) == set(range(1, NUM_CLASSES))
    half = len(classes) // 2
    means = np.stack([colours[:half][classes[:half] == c].mean(0) for c in range(1, NUM_CLASSES)])
    predicted = np.argmin(((colours[half:, None] - means[None]) ** 2).sum(-1), axis=1) + 1
    assert (predicted == classes[half:]).mean() < 0.25


def test_every_class_texture_mixes_both_colours():
    """Each class carries a two-colour pattern inside the object (none is flat), and no two
    classes share a pattern."""
    yy, xx = np.mgrid[0:96, 0:96].astype(np.float32)
    patterns = []
    for kind in CLASS_TEXTURES[1:]:
        t = _texture(kind, xx + 0.37, yy + 0.61, period=11.0)
        assert 0.15 < t.mean() < 0.85, kind
        patterns.append(t.ravel())
    patterns = np.stack(patterns)
    assert len({p.tobytes() for p in patterns}) == len(patterns)


def _band_coherence(kind: str, period: float = 11.0) -> float:
    """How one-directional the texture is over windows of 1.5 periods, far from its origin:
    the mean coherence of the structure tensor, 1 for parallel bands, near 0 for round dots."""
    yy, xx = np.mgrid[0:192, 0:192].astype(np.float32)
    t = cv2.GaussianBlur(_texture(kind, xx + 200.0, yy + 200.0, period), (0, 0), 1.0)
    gx, gy = cv2.Sobel(t, cv2.CV_32F, 1, 0), cv2.Sobel(t, cv2.CV_32F, 0, 1)
    w = int(1.5 * period)
    jxx, jyy, jxy = (cv2.blur(g, (w, w)) for g in (gx * gx, gy * gy, gx * gy))
    coherence = np.sqrt((jxx - jyy) ** 2 + 4 * jxy ** 2) / (jxx + jyy + 1e-6)
    return float(coherence[w:-w, w:-w].mean())


def test_no_co_occurring_pair_shares_bands():
    """Version 3 paired the triangle's stripes with the ellipse's concentric rings, which away
    from their centre are bands too: two classes that share most two-class images and a local
    pattern, told apart only at a corner or a centre (the two shapes runs lost). The default
    ellipse texture, bubbles, leaves no co-occurring pair of two bands."""
    assert _band_coherence("stripes") > 0.95  # the measure sees bands...
    assert _band_coherence("concentric") > 0.95  # ...and the rings as bands, far from the centre
    assert CLASS_TEXTURES[8] == ELLIPSE_TEXTURES[0] == "bubbles"
    for first, second in CO_OCCURRING:
        coherences = sorted(_band_coherence(CLASS_TEXTURES[c]) for c in (first, second))
        assert coherences[0] < 0.5, (DEMO_CLASSES[first], DEMO_CLASSES[second], coherences)
    old = CLASS_TEXTURES[:-1] + ("concentric",)
    assert min(_band_coherence(old[3]), _band_coherence(old[8])) > 0.95


def test_ellipse_texture_changes_the_ellipses_pixels_and_nothing_else():
    textures = CLASS_TEXTURES[:-1] + ("concentric",)
    changed = 0
    for index in range(40):
        image, mask = render_sample(_sample_rng(0, "train", index), 64)
        rings, same_mask = render_sample(_sample_rng(0, "train", index), 64, textures=textures)
        np.testing.assert_array_equal(mask, same_mask)
        differ = (image != rings).any(-1)
        # The ellipses' pixels (their boundary band included), but no other object's.
        assert not (differ & ~np.isin(mask, (8, 255))).any(), index
        changed += differ[mask == 8].mean() > 0.2 if (mask == 8).any() else 0
    assert changed >= 5


def test_depth_scale_is_the_shapes_inradius():
    radius = 40.0
    # disc, square, triangle, star, ring (half its width), ellipse: in radii, from their formulas
    for cls, inradius in ((1, 1.0), (2, 0.8), (3, 0.5), (4, 0.45), (5, 0.225), (8, 0.45)):
        assert abs(_depth_scale(cls, radius) - inradius * radius) <= 1.5, DEMO_CLASSES[cls]


def test_rim_contrast_falls_from_full_in_the_core_to_the_rim_contrast_at_the_outline():
    yy, xx = np.mgrid[0:101, 0:101].astype(np.float32)
    radius = 30.0
    inside = _SHAPES[1]((xx - 50) / radius, (yy - 50) / radius)
    contrast = np.zeros(inside.shape, np.float32)
    contrast[inside] = _rim_contrast(inside, 1, radius, RIM_FADE)
    depth = radius - np.hypot(xx - 50, yy - 50)
    assert (contrast[inside & (depth > RIM_FADE * radius + 1)] == 1).all()
    outline = inside & (depth < 1)
    # within a pixel of the outline: the nearest pixel outside is at most 2 px away
    top = RIM_CONTRAST + (1 - RIM_CONTRAST) * 2.0 / (RIM_FADE * radius)
    assert RIM_CONTRAST <= contrast[outline].min() and contrast[outline].max() <= top + 1e-6
    profile = contrast[50, 50:81]  # centre to outline
    assert (np.diff(profile) <= 0).all() and profile[0] == 1
    # An object cut by the image border keeps its full contrast along the cut.
    cut = _SHAPES[1]((xx + 5) / radius, (yy - 50) / radius)  # centre 5 px left of the image
    cut_contrast = np.zeros(cut.shape, np.float32)
    cut_contrast[cut] = _rim_contrast(cut, 1, radius, RIM_FADE)
    assert cut_contrast[50, 0] == 1


def test_rim_fade_softens_the_objects_rims_and_changes_nothing_else():
    """The same geometry, masks, colours and background as without the fade: only object pixels
    change, and along the objects' outlines the texture's local contrast drops."""
    def rim_gradient(image, rim):  # summed horizontal luma steps between two rim pixels
        grey = image.astype(np.float32) @ np.float32([0.299, 0.587, 0.114])
        return np.abs(np.diff(grey, axis=1))[rim[:, 1:] & rim[:, :-1]].sum()

    rim_faded = rim_sharp = 0.0
    for index in range(20):
        faded, mask = render_sample(_sample_rng(0, "train", index), 144)
        sharp, same_mask = render_sample(_sample_rng(0, "train", index), 144, rim_fade=0)
        np.testing.assert_array_equal(mask, same_mask)
        assert not ((faded != sharp).any(-1) & (mask == 0)).any(), index
        objects = ((mask > 0) & (mask != 255)).astype(np.uint8)
        depth = cv2.distanceTransform(objects, cv2.DIST_L2, 5)
        rim = (depth > 0) & (depth <= 3)
        rim_faded += rim_gradient(faded, rim)
        rim_sharp += rim_gradient(sharp, rim)
    assert rim_faded < 0.9 * rim_sharp  # 1 without the fade; the pixel noise is not faded


def test_check_says_whether_a_set_is_the_one_the_flags_make(demo, tmp_path):
    """``make_demo_data.py --check`` (what run_demo.py asks before reusing a set): every flag
    counts, the seed and the generator options included."""
    tool = load_tool("make_demo_data")
    same = ["--out", str(demo), "--seed", "3", "--num-train", "24", "--num-val", "8"]
    stamp = (demo / "meta.json").stat().st_mtime_ns
    assert tool.main([*same, "--check"]) == 0
    for other in (["--seed", "4"], ["--num-val", "9"], ["--size", "96"], ["--parts", "0.5"],
                  ["--ellipse-texture", "concentric"], ["--rim-fade", "0"],
                  ["--rim-contrast", "0.5"]):
        assert tool.main([*same, *other, "--check"]) == 1, other
    assert (demo / "meta.json").stat().st_mtime_ns == stamp  # --check writes nothing
    assert tool.main(["--out", str(tmp_path / "none"), "--check"]) == 1
    assert not (tmp_path / "none").exists()
    version3 = ["--out", str(tmp_path / "b"), "--num-train", "4", "--num-val", "2", "--size", "48",
                "--ellipse-texture", "concentric", "--rim-fade", "0"]
    assert tool.main(version3) == 0
    meta = json.loads((tmp_path / "b" / "meta.json").read_text())
    assert meta["ellipse_texture"] == "concentric" and meta["rim_fade"] == 0
    assert tool.main([*version3, "--check"]) == 0
    assert tool.main([*version3[:-2], "--check"]) == 1
    assert tool.main([*version3[:-4], "--check"]) == 1
    with pytest.raises(ValueError, match="ellipse_texture must be one of"):
        make_demo_dataset(tmp_path / "c", num_train=1, num_val=1, size=48, ellipse_texture="x")
    with pytest.raises(ValueError, match="rim_fade must lie in"):
        make_demo_dataset(tmp_path / "c", num_train=1, num_val=1, size=48, rim_fade=1.5)
    with pytest.raises(ValueError, match="rim_contrast must lie in"):
        make_demo_dataset(tmp_path / "c", num_train=1, num_val=1, size=48, rim_contrast=-0.1)


def test_parts_texture_only_part_of_each_object_and_change_nothing_else():
    """``parts``: the same objects, masks and background as the plain sample of that generator;
    inside the objects some pixels lose their texture (plain, one colour); 1 is the plain set."""
    from afa.data.synthetic import render_sample

    changed = 0
    for index in range(6):
        plain_image, plain_mask = render_sample(np.random.default_rng([5, index]), 96)
        image, mask = render_sample(np.random.default_rng([5, index]), 96, parts=0.3,
                                    parts_rng=np.random.default_rng([5, index, 1]))
        assert np.array_equal(mask, plain_mask)
        objects = (plain_mask > 0) & (plain_mask != 255)
        background = plain_mask == 0
        assert np.array_equal(image[background], plain_image[background])
        differ = np.abs(image.astype(int) - plain_image.astype(int)).max(axis=2) > 0
        assert not (differ & ~objects & (plain_mask != 255)).any()
        changed += differ[objects].mean()
        whole, _ = render_sample(np.random.default_rng([5, index]), 96, parts=1.0)
        assert np.array_equal(whole, plain_image)
    assert changed / 6 > 0.2  # a third of each object keeps its texture, the rest is plain


def test_parts_share_leaves_some_objects_whole():
    """``parts_share``: each object is partial with that probability, else exactly as in the
    plain sample; 0 is the plain sample, and the masks never change."""
    from afa.data.synthetic import render_sample

    whole = partial = 0  # class regions (an image's pixels of one class) of either kind
    for index in range(12):
        plain_image, plain_mask = render_sample(np.random.default_rng([7, index]), 96)
        image, mask = render_sample(np.random.default_rng([7, index]), 96, parts=0.3,
                                    parts_rng=np.random.default_rng([7, index, 1]),
                                    parts_share=0.5)
        assert np.array_equal(mask, plain_mask)
        differ = np.abs(image.astype(int) - plain_image.astype(int)).max(axis=2) > 0
        assert not (differ & (plain_mask == 0)).any()
        for cls in set(np.unique(plain_mask)) - {0, 255}:
            share = differ[plain_mask == cls].mean()
            whole += share == 0
            partial += share > 0.2
        none, _ = render_sample(np.random.default_rng([7, index]), 96, parts=0.3,
                                parts_rng=np.random.default_rng([7, index, 1]), parts_share=0.0)
        assert np.array_equal(none, plain_image)
    assert whole >= 3 and partial >= 3


def test_parts_are_recorded_and_checked(tmp_path):
    make_demo_dataset(tmp_path / "p", num_train=2, num_val=1, size=32, progress=False, parts=0.5)
    meta = json.loads((tmp_path / "p" / "meta.json").read_text())
    assert meta["parts"] == 0.5
    make_demo_dataset(tmp_path / "q", num_train=2, num_val=1, size=32, progress=False)
    assert "parts" not in json.loads((tmp_path / "q" / "meta.json").read_text())
    make_demo_dataset(tmp_path / "s", num_train=2, num_val=1, size=32, progress=False, parts=0.5,
                      parts_share=0.5)
    meta = json.loads((tmp_path / "s" / "meta.json").read_text())
    assert (meta["parts"], meta["parts_share"]) == (0.5, 0.5)
    with pytest.raises(ValueError, match="parts must lie in"):
        make_demo_dataset(tmp_path / "r", num_train=1, num_val=1, size=32, parts=1.5)
    with pytest.raises(ValueError, match="parts_share must lie in"):
        make_demo_dataset(tmp_path / "r", num_train=1, num_val=1, size=32, parts=0.5,
                          parts_share=2)


def _snapshot(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*")
            if p.is_file()}


def _thesis(folder):
    folder.mkdir()
    (folder / "thesis.txt").write_text("chapter 1\n")


def _voc_root(folder):
    """A VOC root: demo-like folders and list names, no demo meta.json."""
    (folder / "JPEGImages").mkdir(parents=True)
    (folder / "JPEGImages" / "2007_000032.jpg").write_bytes(b"jpeg")
    (folder / "ImageSets" / "Segmentation").mkdir(parents=True)
    (folder / "ImageSets" / "Segmentation" / "val.txt").write_text("2007_000032\n")


def _voc_lists(folder):
    folder.mkdir()
    for name in ("train_aug.txt", "val.txt", "cls_labels.json"):
        (folder / name).write_text("{}\n" if name.endswith(".json") else "2007_000032\n")


def _set_and_notes(folder):
    make_demo_dataset(folder, num_train=2, num_val=1, size=32, progress=False)
    (folder / "JPEGImages" / "notes.txt").write_text("mine\n")


def _foreign_meta(folder):
    folder.mkdir()
    (folder / "meta.json").write_text('{"author": "me"}\n')


@pytest.mark.parametrize("fill, named", [
    (_thesis, "holds thesis.txt"), (_voc_root, "holds JPEGImages/2007_000032.jpg"),
    (_voc_lists, "no meta.json of the demo generator"),
    (_set_and_notes, "holds JPEGImages/notes.txt"), (_foreign_meta, "no meta.json"),
])
def test_out_leaves_a_folder_the_generator_did_not_write_alone(tmp_path, capsys, fill, named):
    """``--out`` into someone's folder wrote the set among their files (a VOC root's val.txt
    overwritten); now only an absent or empty folder or a set the generator wrote is written."""
    tool = load_tool("make_demo_data")
    out = tmp_path / "mine"
    fill(out)
    before = _snapshot(out)
    argv = ["--out", str(out), "--num-train", "3", "--num-val", "1", "--size", "32"]
    assert tool.main(argv) == 2
    assert _snapshot(out) == before
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(out) in err and named in err and "another --out" in err
    assert tool.main(["--frames", "2", "--size", "32", "--out", str(out)]) == 2
    assert _snapshot(out) == before


def test_out_replaces_a_set_the_generator_wrote(tmp_path):
    """An earlier set, finished or cut short, marked or from before the mark, is removed first:
    no image of a larger set stays behind."""
    from afa.data.synthetic import DEMO_GENERATOR

    tool = load_tool("make_demo_data")
    out = tmp_path / "set"
    small = ["--out", str(out), "--num-train", "2", "--num-val", "1", "--size", "32"]
    assert tool.main(["--out", str(out), "--num-train", "4", "--num-val", "2", "--size", "32"]) == 0
    assert tool.main(small) == 0
    assert sorted(p.name for p in (out / "JPEGImages").iterdir()) == [
        "train_00000.jpg", "train_00001.jpg", "val_00000.jpg"]
    made = _snapshot(out)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["generator"] == DEMO_GENERATOR and meta["num_train"] == 2
    for stale in ({k: v for k, v in meta.items() if k != "generator"} | {"num_train": 5},
                  meta | {"complete": False}):  # from before the mark; stopped half-way
        (out / "meta.json").write_text(json.dumps(stale))
        (out / "JPEGImages" / "train_00004.jpg").write_bytes(b"old")
        assert tool.main([*small, "--check"]) == 1
        assert tool.main(small) == 0
        assert _snapshot(out) == made


def test_a_set_from_before_the_mark_is_still_the_set_the_flags_make(tmp_path):
    """Its images are those the flags make: reused, not made again."""
    from afa.data.synthetic import demo_set_contents

    tool = load_tool("make_demo_data")
    argv = ["--out", str(tmp_path), "--num-train", "2", "--num-val", "1", "--size", "32"]
    make_demo_dataset(tmp_path, num_train=2, num_val=1, size=32, progress=False)
    meta = json.loads((tmp_path / "meta.json").read_text())
    del meta["generator"]
    (tmp_path / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    assert tool.main([*argv, "--check"]) == 0
    assert len(demo_set_contents(tmp_path)) == 16  # 12 files, 4 folders: the generator's
    assert tool.main([*argv[:-1], "33", "--check"]) == 1


def test_a_flag_that_makes_no_set_removes_nothing(tmp_path):
    """Checked before the earlier set goes, and --check says so too (exit 2, not 1)."""
    tool = load_tool("make_demo_data")
    make_demo_dataset(tmp_path, num_train=2, num_val=1, size=32, progress=False)
    before = _snapshot(tmp_path)
    for bad in (["--size", "16"], ["--parts", "1.5"], ["--size", "16", "--check"]):
        with pytest.raises(SystemExit) as stop:
            tool.main(["--out", str(tmp_path), "--num-train", "2", *bad])
        assert stop.value.code == 2, bad
    assert _snapshot(tmp_path) == before


def test_frames_replace_an_earlier_sequence_only(tmp_path, capsys):
    tool = load_tool("make_demo_data")
    out = tmp_path / "frames"
    assert tool.main(["--frames", "4", "--size", "32", "--out", str(out)]) == 0
    assert tool.main(["--frames", "2", "--size", "32", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["frame_000.png", "frame_001.png"]
    (out / "clip.mp4").write_bytes(b"mine")
    assert tool.main(["--frames", "3", "--size", "32", "--out", str(out)]) == 2
    assert sorted(p.name for p in out.iterdir()) == ["clip.mp4", "frame_000.png", "frame_001.png"]
    assert "holds clip.mp4" in capsys.readouterr().err
    # Frames are no set, and a set is no sequence: neither replaces the other.
    assert tool.main(["--out", str(out), "--num-train", "2", "--num-val", "1", "--size", "32"]) == 2
    demo = tmp_path / "demo"
    make_demo_dataset(demo, num_train=2, num_val=1, size=32, progress=False)
    assert tool.main(["--frames", "2", "--size", "32", "--out", str(demo)]) == 2


def test_frames_take_the_sets_texture_options():
    """``--frames`` draws the objects as the set does, version 3's look included."""
    from afa.data.synthetic import render_frames

    new = render_frames(np.random.default_rng([0, 2]), 3, 96, 120)
    old = render_frames(np.random.default_rng([0, 2]), 3, 96, 120, rim_fade=0,
                        textures=CLASS_TEXTURES[:-1] + ("concentric",))
    for (image, mask), (old_image, old_mask) in zip(new, old):
        np.testing.assert_array_equal(mask, old_mask)
        differ = (image != old_image).any(-1)
        assert differ.any() and not (differ & (mask == 0)).any()
    tool = load_tool("make_demo_data")
    with pytest.raises(SystemExit):
        tool.main(["--frames", "2", "--size", "32", "--out", "unused", "--rim-fade", "2"])


def test_progress_bars_only_on_a_terminal(tmp_path):
    """Redirected to a file, the tool writes its summary and no progress bar (tqdm redraws a bar
    with carriage returns: a log would get one line per update); on a terminal it still draws."""
    import fcntl
    import os
    import pty
    import struct
    import subprocess
    import sys
    import termios

    from conftest import REPO

    argv = [sys.executable, str(REPO / "tools" / "make_demo_data.py"), "--num-train", "6",
            "--num-val", "2", "--size", "32", "--out"]
    log = tmp_path / "make_demo_data.log"
    with open(log, "wb") as out:
        subprocess.run([*argv, str(tmp_path / "logged")], stdout=out, stderr=out, check=True,
                       timeout=120)
    text = log.read_bytes()
    assert b"wrote 6 train + 2 val images" in text
    assert b"\r" not in text and b"img/s" not in text, text.decode(errors="replace")

    leader, follower = pty.openpty()  # stderr a terminal, stdout the file as before
    # A new terminal is 0 columns wide, in which tqdm draws an empty bar.
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    try:
        with open(log, "wb") as out:
            subprocess.run([*argv, str(tmp_path / "terminal")], stdout=out, stderr=follower,
                           check=True, timeout=120)
        os.close(follower)
        follower = None
        drawn = b""
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the terminal has no writer left
                break
            if not chunk:
                break
            drawn += chunk
    finally:
        if follower is not None:
            os.close(follower)
        os.close(leader)
    assert b"\r" in drawn and b"demo train" in drawn
