"""Numeric precision of the network's forwards: ``train.amp`` and ``train.tf32``."""

from __future__ import annotations

import contextlib

import torch

__all__ = ["autocast", "set_tf32"]


def autocast(device: torch.device, amp: str):
    """Mixed precision for the network's forwards (``train.amp``); bf16 also on CPU."""
    if amp == "none":
        return contextlib.nullcontext()
    if amp == "fp16" and device.type != "cuda":
        raise ValueError("fp16 autocast needs CUDA; use amp=bf16 or none on CPU")
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def set_tf32(device: torch.device, enabled: bool) -> None:
    """``train.tf32``: TF32 tensor cores for fp32 matmuls and convolutions on CUDA."""
    if device.type != "cuda":
        return
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
