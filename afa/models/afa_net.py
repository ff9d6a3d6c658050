"""AFANet: MiT encoder + CAM classifier + affinity-from-attention head + SegFormer decoder.

Reference: Ru, Zhan, Yu, Du, "Learning Affinity from Attention: End-to-End Weakly-Supervised
Semantic Segmentation with Transformers", CVPR 2022.

The state-dict layout (``encoder.*``, ``decoder.*``, ``attn_proj.*``, ``classifier.weight``) equals
the authors' trained checkpoints, so their VOC/COCO models evaluate with our tools.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from afa.models import mix_transformer
from afa.models.weights import load_pretrained
from afa.safe_load import CheckpointError, read_torch_file
from afa.models.segformer_head import SegFormerHead

__all__ = ["AFANet", "AFAOutput", "CAMForward", "load_state_dict_flexible"]


class AFAOutput(NamedTuple):
    cls_logits: torch.Tensor  # (B, C-1) image-level logits, no background
    # The next three are None after ``forward(x, cls_only=True)``.
    seg_logits: torch.Tensor | None  # (B, C, H/4, W/4) segmentation logits, background first
    attn_logits: list | None  # per last-stage block: (B, heads, N, N) raw q.k, N = (H/16)(W/16)
    aff_pred: torch.Tensor | None  # (B, N, N) predicted affinity in (0, 1), symmetric
    # (B, C-1, H/16, W/16) CAM before ReLU of this forward (as forward_cam's); None after
    # a cls_only forward. The trainer can reuse it as the multi-scale CAM's scale-1 copy.
    cam_logits: torch.Tensor | None = None
    # (h, w) stage-4 grid of this forward: attn_logits and aff_pred are over its N = h * w
    # positions, row-major. Taken from the encoder's output, never guessed from N.
    grid: tuple[int, int] | None = None


@dataclass(frozen=True)
class CAMForward:
    """What a CAM forward computed (:meth:`AFANet.forward_cam`). It unpacks as the pair
    ``cam, aff = model.forward_cam(x)``; the multi-scale CAM also reads the rest."""

    cam: torch.Tensor  # (B, C-1, h, w) CAM before ReLU on the stage-4 grid
    aff: torch.Tensor | None  # (B, N, N) affinity, N = h * w; None unless asked for
    grid: tuple[int, int]  # (h, w) stage-4 grid of this forward
    features: list[torch.Tensor]  # the four encoder stages, for the decoder
    cls_logits: torch.Tensor | None = None  # (B, C-1) image-level logits of this forward

    def __iter__(self):
        return iter((self.cam, self.aff))


class AFANet(nn.Module):
    """The AFA network.

    Args:
        backbone: ``mit_b0`` .. ``mit_b5``.
        num_classes: classes including background (21 for VOC, 81 for COCO).
        embedding_dim: width of the SegFormer decoder.
        stride: strides of the four encoder stages; AFA keeps stride 16 at stage 4.
        pooling: ``"gmp"`` (global max pooling, AFA's default) or ``"gap"`` for the classifier.
        pretrained: the official ``mit_b*.pth``, a Hugging Face download folder, a hub id
            ``hf:nvidia/mit-b1[@revision]`` (afa.models.weights), or None.
        drop_path_rate: stochastic depth of the encoder.
    """

    def __init__(self, backbone: str = "mit_b1", num_classes: int = 21, embedding_dim: int = 256,
                 stride=(4, 2, 2, 1), pooling: str = "gmp", pretrained: str | Path | None = None,
                 drop_path_rate: float = 0.1):
        super().__init__()
        if backbone not in mix_transformer.MIT_SETTINGS:
            raise ValueError(f"Unknown backbone '{backbone}'; choose one of "
                             f"{sorted(mix_transformer.MIT_SETTINGS)}")
        if pooling not in ("gmp", "gap"):
            raise ValueError(f"pooling must be 'gmp' or 'gap', got '{pooling}'")
        self.num_classes = num_classes
        self.pooling = pooling
        self.encoder = getattr(mix_transformer, backbone)(
            strides=tuple(stride), drop_path_rate=drop_path_rate)
        # What was loaded (path, sha256 prefix, variant) for the run's log; None from scratch.
        self.pretrained_info = None
        if pretrained:
            self.pretrained_info = load_pretrained(
                self.encoder, pretrained, name=backbone)
        dims = self.encoder.embed_dims
        self.decoder = SegFormerHead(dims, embedding_dim, num_classes)
        self.classifier = nn.Conv2d(dims[3], num_classes - 1, 1, bias=False)
        self.attn_proj = nn.Conv2d(self.encoder.num_attn_channels, 1, 1, bias=True)

    @property
    def stride(self) -> int:
        return self.encoder.stride

    def _affinity(self, attn_logits: list[torch.Tensor]) -> torch.Tensor:
        """``sigmoid(attn_proj(A + A^T))`` with ``A`` the (B, blocks*heads, N, N) stacked logits.

        The 1x1 projection is linear, so it is applied before symmetrising:
        ``w . (A + A^T) + b = P + P^T + b`` with ``P = w . A``. The (B, blocks*heads, N, N) stack
        and its transpose are never built (at the 1.5x CAM scale of a 512 crop they would take
        hundreds of MB).
        """
        weights = self.attn_proj.weight.flatten().split([a.shape[1] for a in attn_logits])
        proj = sum(torch.einsum("bhnm,h->bnm", logits, w.to(logits))  # logits: (B, heads, N, N)
                   for logits, w in zip(attn_logits, weights))
        return torch.sigmoid(proj + proj.transpose(-1, -2) + self.attn_proj.bias.to(proj))

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        if self.pooling == "gmp":
            return F.adaptive_max_pool2d(x, 1)
        return F.adaptive_avg_pool2d(x, 1)

    def forward(self, x: torch.Tensor, cls_only: bool = False) -> AFAOutput:
        """All outputs; with ``cls_only`` the classification logits alone (fused attention, no
        decoder, no affinity), the rest None."""
        features, attn_logits = self.encoder(x, return_attn=not cls_only)
        cls_logits = self.classifier(self._pool(features[3])).flatten(1)
        grid = tuple(features[3].shape[-2:])
        if cls_only:
            return AFAOutput(cls_logits, None, None, None, grid=grid)
        seg_logits = self.decoder(features)
        cam_logits = F.conv2d(features[3], self.classifier.weight)
        return AFAOutput(cls_logits, seg_logits, attn_logits, self._affinity(attn_logits),
                         cam_logits, grid)

    def forward_seg(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H/4, W/4) segmentation logits alone, for inference: the encoder on the fused
        attention kernel (no attention maps, no affinity), no classifier."""
        features, _ = self.encoder(x, return_attn=False)
        return self.decoder(features)

    def idle_params(self) -> list[nn.Parameter]:
        """The parameters a ``cls_only`` forward does not use (decoder and affinity head)."""
        return list(self.decoder.parameters()) + list(self.attn_proj.parameters())

    def forward_cam(self, x: torch.Tensor, return_aff: bool = True) -> CAMForward:
        """The encoder and the CAM, with the stage-4 grid and features; skips the decoder.

        With ``return_aff=False`` every block runs the fused attention kernel and the affinity is
        None: the multi-scale CAM needs the affinity of one scale only.
        """
        features, attn_logits = self.encoder(x, return_attn=return_aff)
        cam = F.conv2d(features[3], self.classifier.weight)
        aff = self._affinity(attn_logits) if return_aff else None
        cls_logits = self.classifier(self._pool(features[3])).flatten(1)
        return CAMForward(cam, aff, tuple(features[3].shape[-2:]), features, cls_logits)

    def param_groups(self) -> list[dict]:
        """Named optimiser groups with their learning-rate multipliers (AFA: 1, 0, 10, 10)."""
        norm_ids = {id(p) for m in self.encoder.modules() if isinstance(m, nn.LayerNorm)
                    for p in m.parameters(recurse=False)}
        encoder = list(self.encoder.parameters())
        return [
            {"name": "backbone", "lr_mult": 1.0,
             "params": [p for p in encoder if id(p) not in norm_ids]},
            {"name": "backbone_norm", "lr_mult": 0.0,
             "params": [p for p in encoder if id(p) in norm_ids]},
            {"name": "heads", "lr_mult": 10.0,
             "params": list(self.classifier.parameters()) + list(self.attn_proj.parameters())},
            {"name": "decoder", "lr_mult": 10.0, "params": list(self.decoder.parameters())},
        ]

    def load_weights(self, checkpoint: str | Path | dict) -> None:
        """Load our checkpoints or the authors' (``module.``-prefixed DDP ones included)."""
        load_state_dict_flexible(self, checkpoint)


def load_state_dict_flexible(model: nn.Module, checkpoint: str | Path | dict) -> None:
    """Strictly load ``checkpoint`` into ``model``, unwrapping ``model``/``state_dict`` entries and
    stripping a ``module.`` prefix; a mismatch names the first offending key and both shapes."""
    source = "the given state dict"
    if not isinstance(checkpoint, dict):
        source = f"'{checkpoint}'"
        checkpoint = read_torch_file(checkpoint)  # data only: a file that holds code is refused
        if not isinstance(checkpoint, dict):
            raise CheckpointError(f"Checkpoint {source} holds a {type(checkpoint).__name__}, "
                                  "not a dict of weights")
    state_dict = checkpoint
    for key in ("model", "state_dict"):
        if key in state_dict and isinstance(state_dict[key], dict):
            state_dict = state_dict[key]
    state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}
    own = model.state_dict()
    for key, value in own.items():
        if key not in state_dict:
            raise CheckpointError(f"Checkpoint {source} lacks '{key}' (shape {tuple(value.shape)}); "
                           "was it trained with another backbone or number of classes?")
        if state_dict[key].shape != value.shape:
            raise CheckpointError(
                f"Checkpoint {source} does not fit this model: '{key}' has shape "
                f"{tuple(state_dict[key].shape)}, the model expects {tuple(value.shape)} "
                "(check backbone and num_classes).")
    extra = [k for k in state_dict if k not in own]
    if extra:
        raise CheckpointError(f"Checkpoint {source} has keys this model does not: '{extra[0]}' "
                       f"and {len(extra) - 1} more")
    model.load_state_dict(state_dict, strict=True)
