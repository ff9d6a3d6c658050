"""tools/ablate_affinity.py: its reference rows are the validation's scores, its "grid" row is the
CAM passed through the stage-4 grid and back (no walk), its "perfect" affinity and pair groups
follow the ground truth, and bad input is reported."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import load_tool
from afa.cam import multi_scale_cam
from afa.config import load_config
from afa.constants import IGNORE_INDEX
from afa.models import PAR, AFANet

REPO = Path(__file__).resolve().parents[1]
NUM_CLASSES = 9

ablate = load_tool("ablate_affinity")
evaluate = load_tool("evaluate")


def _mask_on_a_3x4_grid() -> torch.Tensor:
    """A (1, 24, 32) mask whose nearest samples on a 3 x 4 grid (8 px cells) are ``tokens``."""
    tokens = torch.tensor([[0, 0, 1, 1],
                           [0, 2, 1, IGNORE_INDEX],
                           [0, 2, 0, 0]])
    return tokens.repeat_interleave(8, 0).repeat_interleave(8, 1)[None]


def test_the_perfect_affinity_and_the_pair_groups_follow_the_ground_truth():
    mask = _mask_on_a_3x4_grid()
    flat = [0, 0, 1, 1, 0, 2, 1, IGNORE_INDEX, 0, 2, 0, 0]
    perfect = ablate.perfect_affinity(mask, (3, 4))[0]
    for i, a in enumerate(flat):
        for j, b in enumerate(flat):
            expected = float(a == b and a != IGNORE_INDEX)
            assert perfect[i, j].item() == expected, (i, j)
    groups = ablate.pair_groups(mask, (3, 4), radius=1)
    expected = {name: torch.zeros(12, 12, dtype=torch.bool) for name in ablate.PAIRS}
    for i, a in enumerate(flat):
        for j, b in enumerate(flat):
            near = abs(i // 4 - j // 4) <= 1 and abs(i % 4 - j % 4) <= 1
            if i == j or not near or IGNORE_INDEX in (a, b):
                continue
            if a == b == 0:
                expected["background-background"][i, j] = True
            elif a == b:
                expected["same object class"][i, j] = True
            elif 0 in (a, b):
                expected["object-background"][i, j] = True
            else:
                expected["different object classes"][i, j] = True
    for name in ablate.PAIRS:
        assert torch.equal(groups[name][0], expected[name]), name
    # Class 1 at (0, 2), (0, 3), (1, 2) and class 2 at (1, 1), (2, 1): three neighbouring
    # pairs, each counted both ways.
    assert int(groups["different object classes"].sum()) == 6


def test_the_grid_row_is_the_cam_through_the_grid_without_a_walk():
    """On a 75 x 101 image (not a multiple of 16): the identity walk only rescales the scores,
    so its argmax is the softmax of the CAM scores taken to the grid and back."""
    model = AFANet("mit_b0", num_classes=NUM_CLASSES, embedding_dim=32).eval()
    image = torch.randn(1, 3, 75, 101)
    label = torch.zeros(1, NUM_CLASSES - 1)
    label[0, [1, 4]] = 1
    mask = torch.zeros(1, 75, 101, dtype=torch.long)
    labels, pairs = ablate.ablation_labels(model, image, label, mask, par=PAR(), cam_scales=(1.0,),
                                           bkg_score=0.45, low=0.35, radius=3)
    assert set(labels) == {(r, c) for r in ablate.ROWS for c in ablate.COLUMNS}
    assert all(v.shape == (1, 75, 101) for v in labels.values())
    with torch.no_grad():
        out = model(image)
        cam = multi_scale_cam(model, image, (1.0,), aff_scale=1.0, scale1=out).cam.float()
    small = F.interpolate(cam * label[:, :, None, None], size=out.grid, mode="bilinear",
                          align_corners=False)
    scores = F.pad(small, (0, 0, 0, 0, 1, 0), value=0.35)
    present = F.pad(label.bool(), (1, 0), value=True)
    scores = scores.masked_fill(~present[:, :, None, None], float("-inf")).softmax(dim=1)
    back = F.interpolate(scores, size=(75, 101), mode="bilinear", align_corners=False)
    assert torch.equal(labels["grid", "argmax"], back.max(dim=1).indices)
    # The CAM rows: the thresholds at 0.45 and 0.35 give different labels on this image.
    cam_scores = F.pad(cam * label[:, :, None, None], (0, 0, 0, 0, 1, 0), value=0.35)
    assert torch.equal(labels["low", "argmax"], cam_scores.max(dim=1).indices)
    # An all-background mask: every pair within the radius is background-background.
    n = out.grid[0] * out.grid[1]
    assert pairs["background-background"].numel() > n
    assert all(pairs[name].numel() == 0 for name in ablate.PAIRS[1:])


def _argv(data, checkpoint, *extra):
    return ["--config", str(REPO / "configs" / "demo_full.yaml"), "--checkpoint",
            str(checkpoint), *extra, f"data.root={data}", f"data.list_dir={data}",
            "model.embedding_dim=32", "device=cpu", "cam.scales=[1.0,0.5]", "data.val_batch=1"]


@pytest.fixture(scope="module")
def random_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ablate") / "ckpt.pth"
    torch.manual_seed(1)
    model = AFANet("mit_b0", num_classes=NUM_CLASSES, embedding_dim=32)
    torch.save({"model": model.state_dict()}, path)
    return path


def test_its_reference_rows_are_the_validation_scores(tiny_data, random_checkpoint, tmp_path,
                                                      capsys):
    out_json, val_json = tmp_path / "ablation.json", tmp_path / "val.json"
    assert ablate.main(_argv(tiny_data, random_checkpoint, "--json", str(out_json))) == 0
    text = capsys.readouterr().out
    radius = load_config(REPO / "configs" / "demo_full.yaml").cam.radius  # the walk's reach
    assert "val, 3 images" in text and f"walks: radius {radius}, background score 0.35" in text
    for title in ("cam@0.45", "cam@0.35", "grid", "learned", "perfect", "learned+PAR"):
        assert title in text
    assert "a perfect affinity would add" in text
    assert evaluate.main(_argv(tiny_data, random_checkpoint, "--json", str(val_json))) == 0
    record, val = json.loads(out_json.read_text()), json.loads(val_json.read_text())
    same = {"bkg_score/argmax": "cam", "bkg_score/par": "refined",
            "learned/argmax": "aff_cam", "learned/par": "affinity"}
    for ours, theirs in same.items():
        assert record[ours]["iou"] == val[theirs]["iou"], ours
    assert record["num_images"] == 3 and record["radius"] == radius
    pairs = record["pairs"]
    assert sum(p["pairs"] for p in pairs.values()) > 0
    for entry in pairs.values():
        if entry["pairs"]:
            assert 0 <= entry["mean_affinity"] <= 1 and 0 <= entry["wrong_side"] <= 1


def test_the_radius_override_changes_only_the_walks(tiny_data, random_checkpoint, tmp_path):
    runs = {}
    for radius in (1, 3):
        path = tmp_path / f"r{radius}.json"
        assert ablate.main(_argv(tiny_data, random_checkpoint, "--limit", "2", "--json",
                                 str(path), f"cam.radius={radius}")) == 0
        runs[radius] = json.loads(path.read_text())
    assert runs[1]["num_images"] == 2 and runs[1]["radius"] == 1
    for key in ("bkg_score/argmax", "low/par", "grid/argmax", "grid/par"):
        assert runs[1][key]["iou"] == runs[3][key]["iou"], key
    counts = [sum(p["pairs"] for p in runs[r]["pairs"].values()) for r in (1, 3)]
    assert counts[0] < counts[1]


def test_bad_input_is_reported(tiny_data, random_checkpoint, tmp_path, capsys):
    missing = tmp_path / "gone.pth"
    assert ablate.main(_argv(tiny_data, missing)) == 2
    assert str(missing) in capsys.readouterr().err
    assert ablate.main(_argv(tiny_data, random_checkpoint, "--limit", "0")) == 2
    assert "--limit must be at least 1" in capsys.readouterr().err
    assert ablate.main(_argv(tiny_data, random_checkpoint, "cam.radious=2")) == 2
    assert "radious" in capsys.readouterr().err


def test_it_refuses_torchrun(tiny_data, random_checkpoint, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert ablate.main(_argv(tiny_data, random_checkpoint)) == 2
    assert "runs in one process" in capsys.readouterr().err


def test_help_gives_the_description_once(capsys):
    with pytest.raises(SystemExit) as stop:
        ablate.parse_args(["--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert out.count("Does the learned affinity help?") == 1
    assert "python tools/ablate_affinity.py" in out  # the usage example stays
