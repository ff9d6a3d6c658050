"""SegFormer's all-MLP decoder (Xie et al., NeurIPS 2021), the segmentation branch of AFA."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["SegFormerHead", "convert_sync_batchnorm"]


class MLP(nn.Module):
    """Per-position Linear on a feature map: (B, C, h, w) -> (B, E, h, w)."""

    def __init__(self, in_dim: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Linear(in_dim, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        x = self.proj(x.flatten(2).transpose(1, 2))  # (B, hw, E)
        return x.transpose(1, 2).reshape(b, -1, h, w)


class ConvBNReLU(nn.Sequential):
    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, 1, bias=False)
        self.bn = nn.BatchNorm2d(out_ch)
        self.act = nn.ReLU(inplace=True)


class SegFormerHead(nn.Module):
    """Project each stage to ``embed_dim``, upsample to stage 1, fuse, classify (output stride 4)."""

    def __init__(self, in_channels=(64, 128, 320, 512), embed_dim: int = 256,
                 num_classes: int = 21, dropout: float = 0.1):
        super().__init__()
        for i, ch in enumerate(in_channels):
            setattr(self, f"linear_c{i + 1}", MLP(ch, embed_dim))
        self.linear_fuse = ConvBNReLU(embed_dim * len(in_channels), embed_dim)
        self.dropout = nn.Dropout2d(dropout)
        self.linear_pred = nn.Conv2d(embed_dim, num_classes, 1)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        size = features[0].shape[2:]
        projected = []
        for i in reversed(range(len(features))):  # SegFormer concatenates deepest first
            x = getattr(self, f"linear_c{i + 1}")(features[i])
            if x.shape[2:] != size:
                x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            projected.append(x)
        x = self.linear_fuse(torch.cat(projected, dim=1))
        return self.linear_pred(self.dropout(x))  # (B, num_classes, H/4, W/4)


def convert_sync_batchnorm(model: nn.Module, world_size: int, device: torch.device) -> nn.Module:
    """Use SyncBatchNorm when several CUDA processes train together; otherwise leave BatchNorm.

    With a per-GPU batch of 2 the decoder's BatchNorm statistics are too noisy unless synchronised.
    Gloo (CPU) has no SyncBatchNorm support, so CPU runs keep per-process BatchNorm.
    """
    if world_size > 1 and torch.device(device).type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model
