"""File sizes of tools/export.py's ONNX and TorchScript files, and CPU images/s of ONNX Runtime
and of the TorchScript module beside forward_seg in PyTorch, in one run.

    python benchmarks/export.py                      # mit_b1, decoder 256, 21 classes, 2 threads
    python benchmarks/export.py --threads 1 --repeats 20
    python benchmarks/export.py --backbone mit_b0 --embedding-dim 32 --long-side 64   # smoke run

A randomly initialised network (the sizes and speeds do not depend on the weights) is saved as a
checkpoint with its config, exported both ways by ``tools/export.py`` into ``--work-dir`` (a
temporary folder by default), and the three are timed on one real photo (default a 500 x 375 VOC
photo of ``tests/data``) resized to ``--long-side`` as ``tools/infer_seg.py`` does, batch 1,
single scale, no flip: what is timed is the network alone, from the normalised input to the
stride-4 logits. ``--threads`` sets torch's intra-op threads and ONNX Runtime's
``intra_op_num_threads``. The engines take turns, one image each per round (after ``--warmup``
untimed rounds), so that a change of load on a shared machine touches all three alike; for that,
ONNX Runtime's threads do not spin-wait after a run (they would hold the cores while the next
engine runs). The median of ``--repeats`` rounds is reported, and the minimum. Prints a table,
then one JSON line.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from omegaconf import OmegaConf

from afa import config as C
from afa.config import load_config
from afa.data import normalize, read_image
from afa.inference import resize_long_side
from afa.models import AFANet

REPO = Path(__file__).resolve().parents[1]
DEFAULT_IMAGE = REPO / "tests" / "data" / "voc_photos" / "JPEGImages" / "2007_000063.jpg"


def processor() -> str:
    """The processor's model name as lscpu gives it (/proc/cpuinfo without lscpu)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        lines = out.splitlines()
    except (OSError, subprocess.CalledProcessError):
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    for line in lines:
        key, _, value = line.partition(":")
        if key.strip().lower() in ("model name",):
            return value.strip()
    return "unknown"


def _export_tool():
    spec = importlib.util.spec_from_file_location("export_tool", REPO / "tools" / "export.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="mit_b1")
    parser.add_argument("--embedding-dim", type=int, default=256)
    parser.add_argument("--dataset", default="voc", help="data.name: the classes (voc: 21)")
    parser.add_argument("--image", type=Path, default=DEFAULT_IMAGE)
    parser.add_argument("--long-side", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    parser.add_argument("--opset", type=int, default=17)
    parser.add_argument("--work-dir", type=Path, help="where the checkpoint and the exported "
                                                      "files go (default: a temporary folder)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import onnxruntime

    with tempfile.TemporaryDirectory() as tmp:
        work = args.work_dir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        cfg = load_config(REPO / "configs" / "voc.yaml", [
            f"data.name={args.dataset}", f"model.backbone={args.backbone}",
            f"model.embedding_dim={args.embedding_dim}", "model.pretrained=null"])
        torch.manual_seed(0)
        model = AFANet(**C.model_kwargs(cfg)).eval()
        checkpoint = work / "random.pth"
        torch.save({"model": model.state_dict(), "config": OmegaConf.to_container(cfg)},
                   checkpoint)
        tool = _export_tool()
        files = {"onnx": work / "model.onnx", "torchscript": work / "model.pt"}
        for fmt, path in files.items():
            started = time.perf_counter()
            extra = ["--opset", str(args.opset)] if fmt == "onnx" else []
            if tool.main(["--checkpoint", str(checkpoint), "--format", fmt, "--out", str(path),
                          *extra]) != 0:
                sys.exit(f"export to {fmt} failed")
            print(f"{fmt}: exported in {time.perf_counter() - started:.1f} s")
        file_bytes = {fmt: path.stat().st_size for fmt, path in files.items()}
        checkpoint_bytes = checkpoint.stat().st_size

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = args.threads
        options.inter_op_num_threads = 1
        # Its worker threads would otherwise spin on after each run and hold the cores while
        # the next engine runs.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = onnxruntime.InferenceSession(str(files["onnx"]), options,
                                               providers=["CPUExecutionProvider"])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit is marked deprecated
            scripted = torch.jit.load(str(files["torchscript"]), map_location="cpu")

    x = resize_long_side(normalize(read_image(args.image))[None], args.long_side)
    x_numpy = x.numpy()

    @torch.no_grad()
    def pytorch():
        return model.forward_seg(x)

    @torch.no_grad()
    def torchscript():
        return scripted(x)

    def ort_run():
        return torch.from_numpy(session.run(None, {"image": x_numpy})[0])

    engines = {"pytorch_forward_seg": pytorch, "onnxruntime": ort_run, "torchscript": torchscript}
    times = {name: [] for name in engines}
    for round_ in range(args.warmup + args.repeats):
        for name, run in engines.items():
            started = time.perf_counter()
            run()
            if round_ >= args.warmup:
                times[name].append(time.perf_counter() - started)
    reference = pytorch()
    max_diff = {name: float((engines[name]() - reference).abs().max())
                for name in ("onnxruntime", "torchscript")}

    median = {name: statistics.median(t) for name, t in times.items()}
    result = {
        "processor": processor(),
        "threads": args.threads,
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "backbone": args.backbone,
        "embedding_dim": args.embedding_dim,
        "num_classes": C.num_classes(cfg),
        "image": args.image.name,
        "input": list(x.shape),
        "opset": args.opset,
        "file_mb": {fmt: round(b / 1e6, 2) for fmt, b in file_bytes.items()},
        "checkpoint_mb": round(checkpoint_bytes / 1e6, 2),
        "repeats": args.repeats,
        "median_s": {k: round(v, 4) for k, v in median.items()},
        "min_s": {k: round(min(t), 4) for k, t in times.items()},
        "images_per_s": {k: round(1 / v, 2) for k, v in median.items()},
        "max_abs_diff_from_forward_seg": max_diff,
    }
    print(f"{result['processor']}, {args.threads} threads, {args.backbone} (decoder "
          f"{args.embedding_dim}, {result['num_classes']} classes), input "
          f"{'x'.join(map(str, x.shape))}")
    for fmt, size in result["file_mb"].items():
        print(f"  {fmt} file: {size} MB")
    for name in engines:
        print(f"  {name:20s} {result['images_per_s'][name]:7.2f} images/s "
              f"(median {median[name]:.4f} s, min {min(times[name]):.4f} s)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
