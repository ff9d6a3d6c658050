"""Numeric precision of the network's forwards: ``train.amp`` and ``train.tf32``."""

from __future__ import annotations

import contextlib

import torch

__all__ = ["autocast", "precision_warning", "resolve_amp", "set_tf32"]


def autocast(device: torch.device, amp: str):
    """Mixed precision for the network's forwards (``train.amp``); bf16 also on CPU."""
    if amp == "none":
        return contextlib.nullcontext()
    if amp not in ("bf16", "fp16"):
        raise ValueError(f"amp must be none, bf16 or fp16, not {amp!r} (resolve_amp turns auto "
                         "into one of them)")
    if amp == "fp16" and device.type != "cuda":
        raise ValueError("fp16 autocast needs CUDA; use amp=bf16 or none on CPU")
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def _cpu_has_native_bf16() -> bool:
    """Whether this CPU has bfloat16 instructions (AVX512-BF16 or AMX), as oneDNN reports it."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN: unknown, assume not
        return False


def resolve_amp(device: torch.device, amp: str) -> str:
    """The precision ``train.amp`` stands for on ``device``: ``auto`` is bf16 where the device
    computes bfloat16 natively (a CUDA GPU that supports it, a CPU with AVX512-BF16 or AMX), else
    none (float32); any other value is itself. On the CPU of the demo's figures bf16 takes the
    144-px joint step from 1.59 to 0.91 s; emulated on an AVX2 CPU it would be 17 times slower
    than float32 (docs/BENCHMARKS.md), which is why ``auto`` asks the hardware first."""
    if amp != "auto":
        return amp
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "none"
    if device.type == "cpu":
        return "bf16" if _cpu_has_native_bf16() else "none"
    return "none"


def precision_warning(device: torch.device, amp: str) -> str | None:
    """A warning for a precision that runs slower than fp32 here, else None. On a CPU without
    bfloat16 instructions bf16 autocast is emulated: 17x slower than fp32 for the demo's step on
    an AVX2 AMD EPYC (docs/BENCHMARKS.md)."""
    if amp == "bf16" and device.type == "cpu" and not _cpu_has_native_bf16():
        return (f"train.amp=bf16 on a CPU without bfloat16 instructions (torch reports "
                f"{torch.backends.cpu.get_cpu_capability()}): emulated, many times slower than "
                "fp32; set train.amp=none")
    return None


def set_tf32(device: torch.device, enabled: bool) -> None:
    """``train.tf32``: TF32 tensor cores for fp32 matmuls and convolutions on CUDA."""
    if device.type != "cuda":
        return
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
