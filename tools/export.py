r"""Export a checkpoint's segmentation network to ONNX or TorchScript, for use outside afa.

    python tools/export.py --checkpoint work_dirs/voc/checkpoints/best.pth \
        --format onnx --out afa_voc.onnx [--opset 17] [--config CFG] [key=value ...]
    python tools/export.py --checkpoint CKPT --format torchscript --out afa_voc.pt

What is exported is the network ``tools/infer_seg.py`` runs at each scale,
``AFANet.forward_seg``: the MiT encoder on the fused attention kernel and the SegFormer decoder,
in float32, without the classifier or the affinity head. Input ``image``: (N, 3, H, W) float32,
RGB normalised as ``(pixel - mean) / std`` with pixels in 0-255; batch, height and width are
free (any side of at least ``min_input_side``, 29 px for AFA's strides; multiples of 16 are not
needed). Output ``logits``: (N, C, ceil(H/4), ceil(W/4)), background first; upsample them
(bilinear) to the image for the argmax. The multi-scale + flip fusion and the dense CRF of
``tools/infer_seg.py`` are not part of the file; the caller resizes the image (the tools use
long side ``infer.long_side``, 512).

The file carries what a user needs to feed it (docs/export.md): the class names, ``mean`` and
``std`` (0-255 RGB), the output stride (4), the input layout and the network's settings. ONNX:
the model's ``metadata_props``, each value JSON text. TorchScript: the extra file ``afa.json``
(``torch.jit.load(path, _extra_files={"afa.json": ""})``), one JSON object with the same keys.

The checkpoint is read as data only (``afa.safe_load``). Ours carry their run's config, which
gives the network and the classes; ``--config`` is needed only for a bare state dict such as the
authors' checkpoints (``--config configs/voc.yaml``), and with it our checkpoints' network
settings still win (``afa.engine.run_config``). The written file is checked against
``forward_seg`` on an input of another batch and size than the one traced (ONNX: when
``onnxruntime`` is installed), and only then moved into place.

ONNX needs the ``onnx`` package (``pip install -e .[export]``). It is written by PyTorch's
TorchScript-based exporter (``dynamo=False``): the ``torch.export`` route cannot follow the
decoder's grouping of stages by their grid size with symbolic sizes. Default opset 17, the
first with a LayerNormalization operator, read by ONNX Runtime 1.12 and later; ``--opset`` takes
14 to 20.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn as nn
from omegaconf import DictConfig

from afa import config as C
from afa.config import ConfigError, load_config
from afa.constants import IMAGENET_MEAN, IMAGENET_STD
from afa.engine.run_config import model_config_from_checkpoint, read_checkpoint
from afa.errors import USER_ERRORS, UsageError
from afa.inference import file_sha256
from afa.models import AFANet

__all__ = ["FORMATS", "METADATA_FILE", "SegmentationNetwork", "export", "main", "metadata",
           "parse_args"]

FORMATS = ("onnx", "torchscript")
METADATA_FILE = "afa.json"  # the TorchScript extra file that holds the metadata
INPUT_NAME, OUTPUT_NAME = "image", "logits"
DEFAULT_OPSET = 17
# 14: the first opset with scaled_dot_product_attention in the TorchScript-based exporter;
# 20: the last that exporter writes.
OPSETS = range(14, 21)
# Traced at one size and batch, checked at another: a size or batch baked into the graph shows
# up as a wrong shape or wrong values. Neither is a multiple of 16, and the check is a portrait
# where the trace is a landscape.
TRACE_SHAPE = (1, 3, 100, 132)
CHECK_SHAPE = (2, 3, 123, 77)
CHECK_TOLERANCE = 1e-3  # max |difference| / (1 + max |logit|): a broken export is far above
ONNX_HINT = "pip install -e .[export] (or: pip install onnx)"


class ExportMismatch(RuntimeError):
    """The written file does not compute what ``forward_seg`` computes."""


class SegmentationNetwork(nn.Module):
    """``AFANet.forward_seg`` as a module's ``forward``, which both exporters trace. The whole
    network stays inside (the unused classifier and affinity projection are a few kB), so that
    the traced path is exactly the one ``afa.inference.seg_logits`` calls."""

    def __init__(self, model: AFANet):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model.forward_seg(image)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True,
                        help="our checkpoint (it brings its config) or a bare state dict such as "
                             "the authors' (then --config is needed)")
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument("--out", required=True, type=Path,
                        help="the file to write (folders are created; an existing file is "
                             "replaced)")
    parser.add_argument("--config", help="a YAML config, e.g. configs/voc.yaml: needed for a "
                                         "checkpoint without a saved config")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, choices=OPSETS,
                        metavar=f"{OPSETS[0]}..{OPSETS[-1]}",
                        help=f"ONNX opset (default {DEFAULT_OPSET})")
    parser.add_argument("overrides", nargs="*", help="config overrides as key=value")
    args = parser.parse_args(argv)
    if args.opset != DEFAULT_OPSET and args.format != "onnx":
        parser.error("--opset only applies to --format onnx")
    return args


def _import_onnx():
    """The ``onnx`` module, or a UsageError that says how to install it."""
    try:
        import onnx
    except ImportError:
        raise UsageError(f"--format onnx needs the onnx package, which is not installed: "
                         f"{ONNX_HINT}") from None
    return onnx


def _check_out(path: Path) -> None:
    """Refuse an --out that cannot be written before the checkpoint is read and the network
    traced (a large backbone takes a while): create its folder and a file in it."""
    if path.is_dir():
        raise UsageError(f"--out '{path}' is a folder: name the file to write")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".probe"):
            pass
    except OSError as err:
        raise UsageError(f"cannot write --out '{path}': {err.strerror or err}") from None


def load_network(args: argparse.Namespace) -> tuple[AFANet, DictConfig]:
    """The network of ``args.checkpoint`` with its weights, in eval mode on the CPU, and the
    config it was built from. Prints the network settings taken from the checkpoint."""
    if args.config:
        cfg = load_config(args.config, args.overrides)
    else:
        saved = read_checkpoint(args.checkpoint).get("config")
        if not isinstance(saved, dict):
            raise ConfigError(
                f"checkpoint '{args.checkpoint}' has no saved config (a bare state dict, such "
                "as the authors' checkpoints): pass --config with the config it was trained "
                "with, e.g. --config configs/voc.yaml")
        # The classes come from the data a run was trained on: take them from the saved config
        # as well; model_config_from_checkpoint takes the network settings.
        name = C.upgrade_saved_config(saved).get("data", {}).get("name")
        cfg = load_config(None, ([f"data.name={name}"] if name else []) + list(args.overrides))
    cfg, _, note = model_config_from_checkpoint(cfg, args.checkpoint, args.overrides)
    if note and args.config:
        print(note)
    model = AFANet(**C.model_kwargs(cfg)).eval()
    model.load_weights(args.checkpoint)
    m = cfg.model
    print(f"network: {m.backbone}, decoder width {m.embedding_dim}, strides "
          f"{list(m.stride)}, {C.num_classes(cfg)} classes ({cfg.data.name})")
    return model, cfg


def metadata(model: AFANet, cfg: DictConfig, checkpoint: str | os.PathLike) -> dict:
    """What the exported file says about itself (module docstring; docs/export.md)."""
    return {
        "format_version": 1,
        "producer": "afa tools/export.py",
        "network": "AFANet.forward_seg (MiT encoder + SegFormer decoder)",
        "class_names": C.class_names(cfg),
        "num_classes": C.num_classes(cfg),
        "dataset": cfg.data.name,
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "pixel_range": [0, 255],
        "input_name": INPUT_NAME,
        "input_layout": "NCHW float32 RGB, (pixel - mean) / std per channel",
        "output_name": OUTPUT_NAME,
        "output_layout": "NCHW float32 logits, (N, num_classes, ceil(H/4), ceil(W/4)), "
                         "background first; upsample bilinearly, then argmax over C",
        "output_stride": 4,
        "min_input_side": model.encoder.min_input_side,
        "long_side": cfg.infer.long_side,
        "backbone": cfg.model.backbone,
        "embedding_dim": cfg.model.embedding_dim,
        "encoder_strides": list(cfg.model.stride),
        "checkpoint": Path(checkpoint).name,
        "checkpoint_sha256": file_sha256(checkpoint),
        "torch_version": torch.__version__,
    }


@contextlib.contextmanager
def _quiet_tracing():
    """Hide the warnings of a known-good trace.

    The tracer warns where the decoder compares stage grid sizes (which stages share a grid is
    decided by the encoder's strides, not by the image size, so the constant it records holds
    for every size; the check at another size verifies it), and torch 2.9+ marks both the
    TorchScript-based ONNX exporter and ``torch.jit`` deprecated: neither says anything about
    the file written.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning,
                                module=r"afa\.models\.")
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx")
        warnings.filterwarnings("ignore", message=r".*legacy TorchScript-based ONNX export")
        warnings.filterwarnings("ignore", category=FutureWarning,
                                message=r"`torch\.jit\.\w+` is deprecated")
        yield


def _max_difference(actual: torch.Tensor, expected: torch.Tensor) -> float:
    if actual.shape != expected.shape:
        raise ExportMismatch(f"the exported network gives shape {tuple(actual.shape)} for a "
                             f"{tuple(CHECK_SHAPE)} input, forward_seg {tuple(expected.shape)}")
    difference = (actual - expected).abs().max().item()
    if not difference <= CHECK_TOLERANCE * (1 + expected.abs().max().item()):
        raise ExportMismatch(f"the exported network's logits differ from forward_seg's by up to "
                             f"{difference:.3g} on a {tuple(CHECK_SHAPE)} input")
    return difference


def _write_onnx(net: nn.Module, tmp: Path, meta: dict, opset: int, expected: torch.Tensor,
                check_input: torch.Tensor) -> float | None:
    onnx = _import_onnx()
    with _quiet_tracing(), torch.no_grad():
        torch.onnx.export(
            net, (torch.randn(TRACE_SHAPE),), str(tmp), dynamo=False, opset_version=opset,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], do_constant_folding=True,
            dynamic_axes={INPUT_NAME: {0: "batch", 2: "height", 3: "width"},
                          OUTPUT_NAME: {0: "batch", 2: "height_4", 3: "width_4"}})
    proto = onnx.load(str(tmp))
    # metadata_props holds strings: every value is JSON text, so a reader json.loads each one.
    onnx.helper.set_model_props(proto, {k: json.dumps(v) for k, v in meta.items()})
    proto.doc_string = (f"AFA segmentation network ({meta['backbone']}, {meta['num_classes']} "
                        "classes): normalised RGB (N, 3, H, W) -> logits at stride 4")
    onnx.checker.check_model(proto)
    onnx.save(proto, str(tmp))
    try:
        import onnxruntime
    except ImportError:
        return None
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = onnxruntime.InferenceSession(str(tmp), options,
                                           providers=["CPUExecutionProvider"])
    actual = session.run(None, {INPUT_NAME: check_input.numpy()})[0]
    return _max_difference(torch.from_numpy(actual), expected)


def _write_torchscript(net: nn.Module, tmp: Path, meta: dict, expected: torch.Tensor,
                       check_input: torch.Tensor) -> float:
    with _quiet_tracing(), torch.no_grad():
        # check_trace would rerun the trace's own input only; the check below uses another size.
        traced = torch.jit.trace(net, torch.randn(TRACE_SHAPE), check_trace=False)
        torch.jit.save(traced, str(tmp), _extra_files={METADATA_FILE: json.dumps(meta, indent=1)})
        loaded = torch.jit.load(str(tmp), map_location="cpu")
        actual = loaded(check_input)
    return _max_difference(actual, expected)


def export(model: AFANet, meta: dict, out: str | os.PathLike, fmt: str,
           opset: int = DEFAULT_OPSET) -> float | None:
    """Write ``model.forward_seg`` to ``out`` as ``fmt`` with ``meta``; the file appears only
    once written and checked. Returns the largest difference from ``forward_seg`` on the check
    input (None: ONNX without onnxruntime, not checked); raises :class:`ExportMismatch`."""
    from afa.atomic import write_atomic

    if fmt == "onnx":
        _import_onnx()  # before any work
    net = SegmentationNetwork(model).eval().float().cpu()
    generator = torch.Generator().manual_seed(0)
    check_input = torch.randn(CHECK_SHAPE, generator=generator)
    with torch.no_grad():
        expected = model.forward_seg(check_input)
    result = {}

    def write(tmp: Path) -> None:
        if fmt == "onnx":
            result["difference"] = _write_onnx(net, tmp, meta, opset, expected, check_input)
        else:
            result["difference"] = _write_torchscript(net, tmp, meta, expected, check_input)

    write_atomic(out, write)
    return result["difference"]


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.format == "onnx":
            _import_onnx()
        _check_out(args.out)
        model, cfg = load_network(args)
        meta = metadata(model, cfg, args.checkpoint)
        difference = export(model, meta, args.out, args.format, args.opset)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except ExportMismatch as err:
        print(f"error: {err}; nothing was written (torch {torch.__version__})", file=sys.stderr)
        return 1
    size = args.out.stat().st_size / 1e6
    kind = f"ONNX opset {args.opset}" if args.format == "onnx" else "TorchScript"
    print(f"wrote {args.out} ({kind}, {size:.1f} MB): input '{INPUT_NAME}' (N, 3, H, W) float32 "
          f"normalised RGB, output '{OUTPUT_NAME}' (N, {meta['num_classes']}, ceil(H/4), "
          "ceil(W/4))")
    shape = "x".join(map(str, CHECK_SHAPE))
    if difference is None:
        print("not checked against forward_seg: onnxruntime is not installed "
              "(pip install onnxruntime)")
    else:
        print(f"checked against forward_seg on a {shape} input: max |difference| "
              f"{difference:.2g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
