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
        self.embed_dim = embed_dim
        self.linear_fuse = ConvBNReLU(embed_dim * len(in_channels), embed_dim)
        self.dropout = nn.Dropout2d(dropout)
        self.linear_pred = nn.Conv2d(embed_dim, num_classes, 1)

    def fused_projection(self, features: list[torch.Tensor]) -> torch.Tensor:
        """``linear_fuse``'s convolution of the concatenated, upsampled stage projections.

        Computed without building them: the 1x1 convolution of a concatenation is the sum of
        per-stage 1x1 convolutions, each composes with its stage's Linear into one (E x C_i)
        matrix, and bilinear upsampling is linear and keeps constants (the biases), so

            W [up(L_4 f_4 + b_4); ...; L_1 f_1 + b_1] = sum_i up(W_i L_i f_i + W_i b_i),

        with stages of the same grid summed before one upsampling. Equal up to float rounding
        (tested), without the (B, 4E, H/4, W/4) concatenation and its (4E -> E) convolution at
        stride 4: a third less time for this head on CPU.
        """
        size = features[0].shape[2:]
        blocks = self.linear_fuse.conv.weight.flatten(1).split(self.embed_dim, dim=1)
        by_grid: dict[tuple[int, int], torch.Tensor] = {}
        # SegFormer concatenates the deepest stage first: block k belongs to stage n - k.
        for block, i in zip(blocks, reversed(range(len(features)))):
            proj = getattr(self, f"linear_c{i + 1}").proj
            weight = (block @ proj.weight)[:, :, None, None]  # (E, C_i, 1, 1)
            x = F.conv2d(features[i], weight, block @ proj.bias)
            grid = tuple(x.shape[2:])
            by_grid[grid] = x if grid not in by_grid else by_grid[grid] + x
        fused = None
        for grid, x in by_grid.items():
            if grid != tuple(size):
                x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            fused = x if fused is None else fused + x
        return fused

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = self.linear_fuse.act(self.linear_fuse.bn(self.fused_projection(features)))
        return self.linear_pred(self.dropout(x))  # (B, num_classes, H/4, W/4)

    def update_statistics(self, features: list[torch.Tensor]) -> None:
        """What a train-mode forward does to the BatchNorm running statistics, and nothing else
        (``cam.update_decoder_bn``: the CAM forwards' decoder outputs are never used)."""
        self.linear_fuse.bn(self.fused_projection(features))


def convert_sync_batchnorm(model: nn.Module, world_size: int, device: torch.device) -> nn.Module:
    """Use SyncBatchNorm when several CUDA processes train together; otherwise leave BatchNorm.

    With a per-GPU batch of 2 the decoder's BatchNorm statistics are too noisy unless synchronised.
    Gloo (CPU) has no SyncBatchNorm support, so CPU runs keep per-process BatchNorm.
    """
    if world_size > 1 and torch.device(device).type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model
