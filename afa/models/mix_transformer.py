"""Mix Transformer (MiT) encoder of SegFormer, as used by AFA.

Reference: Xie et al., "SegFormer: Simple and Efficient Design for Semantic Segmentation with
Transformers", NeurIPS 2021. AFA (Ru et al., "Learning Affinity from Attention: End-to-End
Weakly-Supervised Semantic Segmentation with Transformers", CVPR 2022) changes two things: the stage
strides are configurable (AFA uses ``(4, 2, 2, 1)`` so that stage 4 keeps stride 16), and the blocks
of the last stage hand out their raw attention logits ``q @ k^T`` (before scaling and softmax), from
which AFA learns semantic affinity.

Every other block runs the fused ``F.scaled_dot_product_attention`` kernel; a block returns explicit
logits only when its ``return_attn`` flag is set. Parameter names follow the official SegFormer
checkpoints (``mit_b0.pth`` .. ``mit_b5.pth``); :func:`checkpoint_filter_fn` adapts such a file and
:func:`afa.models.weights.load_pretrained` loads it with its checks.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "MixVisionTransformer",
    "MIT_SETTINGS",
    "checkpoint_filter_fn",
    "mit_b0",
    "mit_b1",
    "mit_b2",
    "mit_b3",
    "mit_b4",
    "mit_b5",
]

# Block norms and stage norms use eps 1e-6; the patch-embedding norm and the spatial-reduction norm
# keep PyTorch's default 1e-5, the settings the official SegFormer weights were trained with.
NORM_EPS = 1e-6

# (embed_dims, num_heads, depths) of the official variants; all share mlp_ratio 4 and sr (8, 4, 2, 1).
MIT_SETTINGS = {
    "mit_b0": ((32, 64, 160, 256), (1, 2, 5, 8), (2, 2, 2, 2)),
    "mit_b1": ((64, 128, 320, 512), (1, 2, 5, 8), (2, 2, 2, 2)),
    "mit_b2": ((64, 128, 320, 512), (1, 2, 5, 8), (3, 4, 6, 3)),
    "mit_b3": ((64, 128, 320, 512), (1, 2, 5, 8), (3, 4, 18, 3)),
    "mit_b4": ((64, 128, 320, 512), (1, 2, 5, 8), (3, 8, 27, 3)),
    "mit_b5": ((64, 128, 320, 512), (1, 2, 5, 8), (3, 6, 40, 3)),
}


class DropPath(nn.Module):
    """Stochastic depth: zero a sample's residual branch with probability ``p`` in training and
    scale the kept ones by ``1 / (1 - p)``.

    It draws and computes as ``timm.layers.DropPath`` does (a seeded training forward and its
    gradients are bit-identical with either), but timm is not imported for it: importing any part
    of timm imports all of its models, about 190 MB of resident memory and 2 s more in every
    process that builds the encoder.
    """

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class OverlapPatchEmbed(nn.Module):
    """Strided convolution with overlapping windows, then LayerNorm over channels."""

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int, stride: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride, padding=patch_size // 2)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        x = self.proj(x)  # (B, C, H', W')
        _, _, h, w = x.shape
        x = self.norm(x.flatten(2).transpose(1, 2))  # (B, H'W', C)
        return x, h, w


class Attention(nn.Module):
    """Efficient self-attention: keys and values come from a map shrunk ``sr_ratio`` times."""

    def __init__(self, dim: int, num_heads: int, sr_ratio: int, qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.sr_ratio = sr_ratio
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim)

    def qkv(self, x: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, ...]:
        """Split ``x`` (B, N, C) into per-head q (B, heads, N, d) and k, v (B, heads, M, d)."""
        b, n, c = x.shape
        q = self.q(x).reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)
        if self.sr_ratio > 1:
            x = x.transpose(1, 2).reshape(b, c, h, w)
            x = self.norm(self.sr(x).flatten(2).transpose(1, 2))  # (B, M, C), M = N / sr^2
        kv = self.kv(x).reshape(b, -1, 2, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        return q, kv[0], kv[1]

    def forward(self, x: torch.Tensor, h: int, w: int, return_attn: bool = False):
        b, n, c = x.shape
        q, k, v = self.qkv(x, h, w)
        drop = self.attn_drop if self.training else 0.0
        if return_attn:
            logits = q @ k.transpose(-2, -1)  # (B, heads, N, M) pre-scale, pre-softmax q.k
            attn = F.dropout((logits * self.scale).softmax(dim=-1), drop, self.training)
            out = attn @ v
        else:
            logits = None
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=drop)
        out = self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, n, c)))
        return out, logits


class DWConv(nn.Module):
    """3x3 depthwise convolution on a token sequence laid out as an (h, w) map."""

    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        b, n, c = x.shape
        x = self.dwconv(x.transpose(1, 2).reshape(b, c, h, w))
        return x.flatten(2).transpose(1, 2)


class MixFFN(nn.Module):
    """Linear -> 3x3 depthwise conv -> GELU -> Linear (the conv gives positional information)."""

    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.dwconv = DWConv(hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        x = self.drop(self.act(self.dwconv(self.fc1(x), h, w)))
        return self.drop(self.fc2(x))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + ffn(norm(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, sr_ratio: int,
                 qkv_bias: bool = True, drop: float = 0.0, attn_drop: float = 0.0,
                 drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=NORM_EPS)
        self.attn = Attention(dim, num_heads, sr_ratio, qkv_bias, attn_drop, drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=NORM_EPS)
        self.mlp = MixFFN(dim, int(dim * mlp_ratio), drop)
        self.return_attn = False  # set on the blocks whose attention logits AFA consumes

    def forward(self, x: torch.Tensor, h: int, w: int, return_attn: bool | None = None):
        """``return_attn`` (default: the block's flag) asks for the explicit attention logits."""
        if return_attn is None:
            return_attn = self.return_attn
        out, logits = self.attn(self.norm1(x), h, w, return_attn=return_attn)
        x = x + self.drop_path(out)
        x = x + self.drop_path(self.mlp(self.norm2(x), h, w))
        return x, logits


class MixVisionTransformer(nn.Module):
    """Four-stage hierarchical encoder.

    ``forward(x)`` returns ``(features, attn_logits)``: the four stage outputs ``(B, C_i, H_i, W_i)``
    and, for every block of the last stage, the raw attention logits ``(B, heads, N, N)`` with
    ``N = H_4 * W_4`` (the last stage has no spatial reduction, so keys are the same N tokens).
    """

    def __init__(self, embed_dims=(64, 128, 320, 512), num_heads=(1, 2, 5, 8),
                 depths=(2, 2, 2, 2), mlp_ratio: float = 4.0, sr_ratios=(8, 4, 2, 1),
                 strides=(4, 2, 2, 1), in_chans: int = 3, qkv_bias: bool = True,
                 drop_rate: float = 0.0, attn_drop_rate: float = 0.0, drop_path_rate: float = 0.1):
        super().__init__()
        self.embed_dims = tuple(embed_dims)
        self.num_heads = tuple(num_heads)
        self.depths = tuple(depths)
        self.strides = tuple(strides)
        # Stochastic depth grows linearly over all blocks of all stages.
        total = sum(depths)
        rates = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        prev_dim, first = in_chans, 0
        for i in range(4):
            patch = 7 if i == 0 else 3
            setattr(self, f"patch_embed{i + 1}",
                    OverlapPatchEmbed(prev_dim, embed_dims[i], patch, strides[i]))
            blocks = nn.ModuleList(
                Block(embed_dims[i], num_heads[i], mlp_ratio, sr_ratios[i], qkv_bias, drop_rate,
                      attn_drop_rate, rates[first + j])
                for j in range(depths[i]))
            setattr(self, f"block{i + 1}", blocks)
            setattr(self, f"norm{i + 1}", nn.LayerNorm(embed_dims[i], eps=NORM_EPS))
            prev_dim, first = embed_dims[i], first + depths[i]
        for blk in self.block4:
            blk.return_attn = True
        self.apply(self._init_weights)

    @property
    def num_attn_channels(self) -> int:
        """Channels of the concatenated last-stage attention logits (blocks x heads)."""
        return self.depths[3] * self.num_heads[3]

    def set_strides(self, strides) -> None:
        """Run the stages at other strides: only the patch embeddings' convolution strides change
        (the weights fit any stride; there is no positional embedding)."""
        self.strides = tuple(int(s) for s in strides)
        for i, s in enumerate(self.strides):
            getattr(self, f"patch_embed{i + 1}").proj.stride = (s, s)

    @property
    def stride(self) -> int:
        """Output stride of the last stage (16 for AFA's (4, 2, 2, 1))."""
        out = 1
        for s in self.strides:
            out *= s
        return out

    @property
    def min_input_side(self) -> int:
        """The shortest image side the encoder accepts (29 for AFA's strides).

        Each stage's key/value reduction is a convolution with kernel and stride ``sr_ratio``,
        so the stage's grid must be at least ``sr_ratio`` wide; the grid of a stage is that of
        its overlapping patch embedding, ``(n + 2 pad - kernel) // stride + 1``.
        """
        def fits(side: int) -> bool:
            for i in range(1, 5):
                proj = getattr(self, f"patch_embed{i}").proj
                side = (side + 2 * proj.padding[0] - proj.kernel_size[0]) // proj.stride[0] + 1
                if side < getattr(self, f"block{i}")[0].attn.sr_ratio:
                    return False
            return True

        side = 1
        while not fits(side):
            side += 1
        return side

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02, a=-2.0, b=2.0)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
            nn.init.normal_(m.weight, 0.0, (2.0 / fan_out) ** 0.5)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor, return_attn: bool = True):
        """``return_attn=False`` runs every block fused and returns an empty logits list."""
        features, attn_logits = [], []
        b = x.shape[0]
        for i in range(1, 5):
            x, h, w = getattr(self, f"patch_embed{i}")(x)
            for blk in getattr(self, f"block{i}"):
                x, logits = blk(x, h, w, return_attn=return_attn and blk.return_attn)
                if logits is not None:
                    attn_logits.append(logits)
            x = getattr(self, f"norm{i}")(x)
            x = x.transpose(1, 2).reshape(b, -1, h, w)  # (B, C_i, H_i, W_i)
            features.append(x)
        return features, attn_logits


def checkpoint_filter_fn(state_dict: dict) -> dict:
    """Adapt an official SegFormer ImageNet checkpoint: unwrap it and drop the classifier head."""
    for key in ("state_dict", "model"):
        if key in state_dict and isinstance(state_dict[key], dict):
            state_dict = state_dict[key]
    return {k: v for k, v in state_dict.items()
            if not (isinstance(k, str) and k.startswith("head."))}


def _create(name: str, **kwargs) -> MixVisionTransformer:
    embed_dims, num_heads, depths = MIT_SETTINGS[name]
    return MixVisionTransformer(embed_dims=embed_dims, num_heads=num_heads, depths=depths, **kwargs)


def mit_b0(**kwargs) -> MixVisionTransformer:
    return _create("mit_b0", **kwargs)


def mit_b1(**kwargs) -> MixVisionTransformer:
    return _create("mit_b1", **kwargs)


def mit_b2(**kwargs) -> MixVisionTransformer:
    return _create("mit_b2", **kwargs)


def mit_b3(**kwargs) -> MixVisionTransformer:
    return _create("mit_b3", **kwargs)


def mit_b4(**kwargs) -> MixVisionTransformer:
    return _create("mit_b4", **kwargs)


def mit_b5(**kwargs) -> MixVisionTransformer:
    return _create("mit_b5", **kwargs)
