"""tools/export.py: a tiny trained-style checkpoint exported to ONNX and TorchScript; the files
give forward_seg's logits on real photos of several sizes (portraits, odd sizes, a batch), carry
their metadata, run from docs/export.md's snippet without afa, and every bad input is one line
with exit status 2."""

import json
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, VOC_PHOTOS, load_tool
from omegaconf import OmegaConf

from afa import config as C
from afa.config import load_config
from afa.constants import DEMO_CLASSES, IMAGENET_MEAN, IMAGENET_STD
from afa.data import normalize, read_image
from afa.inference import file_sha256, resize_long_side
from afa.models import AFANet

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

export = load_tool("export")

PHOTOS = VOC_PHOTOS / "JPEGImages"
# On the photos below the largest |difference| from forward_seg was 7.3e-6 with ONNX Runtime and
# 4.8e-7 with TorchScript (logits up to 2.5): float32 sums in another order (ONNX Runtime's own
# LayerNorm, attention and convolution kernels). With rtol 1e-4 they needed an atol of 3.8e-6 and
# 1.8e-7, where a logit lies near zero; 1e-5 leaves a margin.
TOL = {"rtol": 1e-4, "atol": 1e-5}


def _checkpoint(path: Path) -> AFANet:
    """What the trainer saves for a tiny demo run (weights and the run's merged config), with
    decoder BatchNorm statistics away from their initial 0 and 1 so that eval mode matters."""
    cfg = load_config(REPO / "configs" / "demo.yaml",
                      ["model.backbone=mit_b0", "model.embedding_dim=32", "model.pretrained=null"])
    torch.manual_seed(0)
    model = AFANet(**C.model_kwargs(cfg)).eval()
    bn = model.decoder.linear_fuse.bn
    with torch.no_grad():
        bn.running_mean.normal_(0, 0.2)
        bn.running_var.uniform_(0.5, 2.0)
        model.decoder.linear_pred.weight.mul_(4)  # logits of a few units, as trained ones are
    torch.save({"model": model.state_dict(), "iteration": 2,
                "config": OmegaConf.to_container(cfg, resolve=True)}, path)
    return model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    _checkpoint(root / "ours.pth")
    # The model as the project's tools load it: built from the checkpoint's config, then its
    # weights through the safe reader.
    model = AFANet("mit_b0", num_classes=len(DEMO_CLASSES), embedding_dim=32).eval()
    model.load_weights(root / "ours.pth")
    for fmt, name in (("onnx", "model.onnx"), ("torchscript", "model.pt")):
        code = export.main(["--checkpoint", str(root / "ours.pth"), "--format", fmt,
                            "--out", str(root / "out" / name)])
        assert code == 0
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(root / "out" / "model.onnx"), options,
                                   providers=["CPUExecutionProvider"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load is marked deprecated
        extra = {export.METADATA_FILE: ""}
        scripted = torch.jit.load(str(root / "out" / "model.pt"), map_location="cpu",
                                  _extra_files=extra)
    return {"root": root, "model": model, "session": session, "scripted": scripted,
            "extra": extra}


def _photo(name: str, long_side: int | None = None) -> torch.Tensor:
    x = normalize(read_image(PHOTOS / f"{name}.jpg"))[None]
    return resize_long_side(x, long_side) if long_side else x


def _inputs() -> dict[str, torch.Tensor]:
    """Real photos at their own sizes, one at the tools' long side 512, and a batch of two."""
    return {
        "portrait 375x500": _photo("2008_003238"),
        "odd both ways 300x219": _photo("2011_001722"),
        "odd height 500x377": _photo("2010_002507"),
        "portrait 333x500 at long side 512 (340x512)": _photo("2009_003904", 512),
        "batch of two 500x375": torch.cat([_photo("2007_000063"), _photo("2009_000488")]),
    }


def test_onnx_runtime_and_torchscript_give_forward_seg_on_real_photos(exported):
    for label, x in _inputs().items():
        assert x.shape[-2] % 16 or x.shape[-1] % 16 or x.shape[0] > 1, label
        with torch.no_grad():
            expected = exported["model"].forward_seg(x)
            scripted = exported["scripted"](x)
        (onnx_out,) = exported["session"].run(None, {"image": x.numpy()})
        height, width = x.shape[-2:]
        assert expected.shape == (x.shape[0], len(DEMO_CLASSES), -(-height // 4), -(-width // 4))
        assert expected.abs().max() > 1  # logits of a few units: rtol means something
        torch.testing.assert_close(torch.from_numpy(onnx_out), expected, **TOL,
                                   msg=lambda m, label=label: f"ONNX, {label}: {m}")
        torch.testing.assert_close(scripted, expected, **TOL,
                                   msg=lambda m, label=label: f"TorchScript, {label}: {m}")


def test_metadata_round_trips_and_axes_are_dynamic(exported):
    root = exported["root"]
    proto = onnx.load(str(root / "out" / "model.onnx"))
    from_onnx = {p.key: json.loads(p.value) for p in proto.metadata_props}
    from_runtime = {k: json.loads(v) for k, v in
                    exported["session"].get_modelmeta().custom_metadata_map.items()}
    from_torchscript = json.loads(exported["extra"][export.METADATA_FILE])
    assert from_onnx == from_runtime == from_torchscript
    meta = from_onnx
    assert meta["class_names"] == list(DEMO_CLASSES) and meta["num_classes"] == 9
    assert meta["mean"] == list(IMAGENET_MEAN) and meta["std"] == list(IMAGENET_STD)
    assert meta["output_stride"] == 4 and meta["min_input_side"] == 29
    assert meta["input_name"] == "image" and meta["output_name"] == "logits"
    assert meta["input_layout"].startswith("NCHW float32 RGB")
    assert (meta["backbone"], meta["embedding_dim"]) == ("mit_b0", 32)
    assert meta["checkpoint_sha256"] == file_sha256(root / "ours.pth")
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [17]
    (image,) = proto.graph.input
    dims = image.type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["batch", 3, "height", "width"]


def _snippet() -> str:
    text = (REPO / "docs" / "export.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    (snippet,) = [b for b in blocks if "onnxruntime" in b]
    return snippet


def test_the_docs_snippet_runs_the_onnx_file_without_afa(exported, tmp_path):
    """docs/export.md's block, verbatim, in a fresh process with only NumPy, Pillow and ONNX
    Runtime: neither afa nor torch is imported, and it gives forward_seg's logits."""
    shutil.copy(exported["root"] / "out" / "model.onnx", tmp_path / "afa_voc.onnx")
    shutil.copy(PHOTOS / "2010_003055.jpg", tmp_path / "photo.jpg")  # portrait, odd width
    check = ("\nimport sys\n"
             "assert not {'afa', 'torch'} & set(sys.modules), sorted(sys.modules)\n"
             "np.save('x.npy', x); np.save('logits.npy', logits); np.save('labels.npy', labels)\n")
    proc = subprocess.run([sys.executable, "-I", "-c", _snippet() + check], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    counts = eval(proc.stdout.strip().splitlines()[-1])  # the snippet's {class: pixels}
    assert set(counts) <= set(DEMO_CLASSES) and sum(counts.values()) == 393 * 500
    x = torch.from_numpy(np.load(tmp_path / "x.npy"))
    assert x.shape == (1, 3, 512, 402)
    with torch.no_grad():
        expected = exported["model"].forward_seg(x)
    torch.testing.assert_close(torch.from_numpy(np.load(tmp_path / "logits.npy")), expected[0],
                               **TOL)
    # The labels: PIL's bilinear upsampling is PyTorch's (align_corners=False) up to rounding.
    full = torch.nn.functional.interpolate(expected, size=(500, 393), mode="bilinear",
                                           align_corners=False)
    labels = torch.from_numpy(np.load(tmp_path / "labels.npy"))
    assert labels.shape == (500, 393)
    assert (labels != full[0].max(0).indices).float().mean() < 1e-3


def test_a_bare_state_dict_exports_with_config_like_ours(exported, tmp_path, capsys):
    state = {f"module.{k}": v for k, v in exported["model"].state_dict().items()}
    torch.save({"state_dict": state}, tmp_path / "authors.pth")
    argv = ["--checkpoint", str(tmp_path / "authors.pth"), "--format", "torchscript",
            "--out", str(tmp_path / "a.pt")]
    assert export.main(argv) == 2  # no saved config: --config is needed
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "--config configs/voc.yaml" in err
    assert export.main(argv + ["--config", str(REPO / "configs" / "demo.yaml"),
                               "model.backbone=mit_b0", "model.embedding_dim=32"]) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.load(str(tmp_path / "a.pt"), map_location="cpu")
    x = _photo("2009_005158")
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), exported["model"].forward_seg(x), **TOL)


def test_a_custom_set_brings_its_class_names_from_the_checkpoint(tmp_path):
    """data.name=custom: the class names live only in the checkpoint's saved config."""
    classes = ["background", "red kite", "oak tree"]
    cfg = load_config(REPO / "configs" / "custom.yaml", [
        "model.backbone=mit_b0", "model.embedding_dim=32", "model.pretrained=null",
        f"data.classes=[{','.join(repr(c) for c in classes)}]"])
    model = AFANet(**C.model_kwargs(cfg))
    torch.save({"model": model.state_dict(), "config": OmegaConf.to_container(cfg)},
               tmp_path / "custom.pth")
    out = tmp_path / "custom.pt"
    assert export.main(["--checkpoint", str(tmp_path / "custom.pth"), "--format", "torchscript",
                        "--out", str(out)]) == 0
    extra = {export.METADATA_FILE: ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.load(str(out), map_location="cpu", _extra_files=extra)
    meta = json.loads(extra[export.METADATA_FILE])
    assert meta["class_names"] == classes and meta["num_classes"] == 3
    assert meta["dataset"] == "custom"


def _unsafe_checkpoint(path: Path) -> None:
    """A pickle that would call a function when unpickled (the safe reader refuses it)."""
    class Payload:
        def __reduce__(self):
            return (print, ("ran",))
    torch.save({"model": Payload()}, path)


@pytest.mark.parametrize("case", ["missing checkpoint", "unsafe checkpoint",
                                  "damaged checkpoint", "contradicting override",
                                  "out under a file", "out is a folder", "no onnx package"])
def test_bad_input_is_one_line_and_exit_2(exported, tmp_path, capsys, monkeypatch, case):
    checkpoint, out = exported["root"] / "ours.pth", tmp_path / "m.onnx"
    extra = []
    expected = {"missing checkpoint": "Checkpoint not found",
                "unsafe checkpoint": "Refusing to load checkpoint",
                "damaged checkpoint": "Cannot read checkpoint",
                "contradicting override": "model.embedding_dim=64 was given on the command line",
                "out under a file": "cannot write --out",
                "out is a folder": "is a folder",
                "no onnx package": "pip install -e .[export]"}[case]
    if case == "missing checkpoint":
        checkpoint = tmp_path / "nothing.pth"
    elif case == "unsafe checkpoint":
        checkpoint = tmp_path / "unsafe.pth"
        _unsafe_checkpoint(checkpoint)
    elif case == "damaged checkpoint":
        checkpoint = tmp_path / "damaged.pth"
        checkpoint.write_bytes(b"PK\x03\x04 not really a zip file")
    elif case == "contradicting override":
        extra = ["model.embedding_dim=64"]
    elif case == "out under a file":
        (tmp_path / "file").write_text("")
        out = tmp_path / "file" / "m.onnx"
    elif case == "out is a folder":
        out = tmp_path
    else:
        monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx raises ImportError
    code = export.main(["--checkpoint", str(checkpoint), "--format", "onnx", "--out", str(out),
                        *extra])
    captured = capsys.readouterr()
    assert code == 2, captured
    err = captured.err.strip()
    assert err.startswith("error: ") and "\n" not in err and expected in err, err
    assert "ran" not in captured.out
    assert not out.is_file() and not list(tmp_path.glob(".m.onnx*"))


def test_a_file_that_disagrees_with_forward_seg_is_not_written(exported, tmp_path, capsys,
                                                               monkeypatch):
    monkeypatch.setattr(export, "CHECK_TOLERANCE", -1.0)  # every difference is too large
    out = tmp_path / "m.pt"
    code = export.main(["--checkpoint", str(exported["root"] / "ours.pth"),
                        "--format", "torchscript", "--out", str(out)])
    assert code == 1
    assert "differ from forward_seg" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_benchmark_script_reports_sizes_and_speeds(tmp_path):
    """benchmarks/export.py on a tiny network and image: one JSON line with every figure."""
    proc = subprocess.run(
        [sys.executable, "benchmarks/export.py", "--backbone", "mit_b0", "--embedding-dim", "32",
         "--long-side", "64", "--repeats", "2", "--threads", "1", "--work-dir", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["input"] == [1, 3, 48, 64]
    assert set(result["images_per_s"]) == {"pytorch_forward_seg", "onnxruntime", "torchscript"}
    assert all(v > 0 for v in result["images_per_s"].values())
    assert result["file_mb"]["onnx"] > 1 and result["file_mb"]["torchscript"] > 1
