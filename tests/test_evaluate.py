"""tools/evaluate.py on a tiny generated set with a random tiny model: it runs, and it announces a
validation list that ``prepare_voc.py --skip-missing`` shortened."""

import json
import shutil
from pathlib import Path

import torch

from conftest import load_tool
from afa.data.synthetic import make_demo_dataset
from afa.models import AFANet

REPO = Path(__file__).resolve().parents[1]
NUM_CLASSES = 9

evaluate = load_tool("evaluate")


def test_a_val_list_that_prepare_voc_shortened_is_announced(tmp_path, capsys):
    data = tmp_path / "data"
    make_demo_dataset(data, num_train=1, num_val=2, size=32, progress=False)
    model = AFANet("mit_b0", num_classes=NUM_CLASSES, embedding_dim=32)
    torch.save({"model": model.state_dict()}, tmp_path / "ckpt.pth")
    lists = tmp_path / "lists"
    lists.mkdir()
    for name in ("train_aug.txt", "val.txt", "cls_labels.json"):
        shutil.copy(data / name, lists / name)
    record = lists / "left_out.json"
    record.write_text(json.dumps({"val": {"listed": 3, "written": 2, "left_out": {
        "gone": "JPEGImages/gone.jpg: image file not found"}}}))
    argv = ["--config", str(REPO / "configs" / "demo.yaml"), "--checkpoint",
            str(tmp_path / "ckpt.pth"), "--json", str(tmp_path / "scores.json"),
            f"data.root={data}", f"data.list_dir={lists}", f"data.num_classes={NUM_CLASSES}",
            "model.embedding_dim=32", "data.crop_size=32", "cam.scales=[1.0]", "device=cpu"]
    assert evaluate.main(argv) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == (f"{lists / 'val.txt'}: 2 of 3 listed ids (1 left out by "
                                   f"prepare_voc --skip-missing, see {record})")
    assert (tmp_path / "scores.json").is_file()
    record.unlink()
    assert evaluate.main(argv) == 0
    assert "listed ids" not in capsys.readouterr().out
