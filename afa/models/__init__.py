"""Networks of AFA: the MiT encoder (and its pretrained-weight loader), the SegFormer decoder,
AFANet and PAR."""

from afa.models.afa_net import AFANet, AFAOutput, CAMForward, load_state_dict_flexible
from afa.models.mix_transformer import (
    MixVisionTransformer,
    mit_b0,
    mit_b1,
    mit_b2,
    mit_b3,
    mit_b4,
    mit_b5,
)
from afa.models.par import PAR
from afa.models.segformer_head import SegFormerHead, convert_sync_batchnorm
from afa.models.weights import PretrainedWeights, WeightsError, load_pretrained

__all__ = [
    "AFANet",
    "AFAOutput",
    "CAMForward",
    "MixVisionTransformer",
    "PAR",
    "PretrainedWeights",
    "SegFormerHead",
    "WeightsError",
    "convert_sync_batchnorm",
    "load_pretrained",
    "load_state_dict_flexible",
    "mit_b0",
    "mit_b1",
    "mit_b2",
    "mit_b3",
    "mit_b4",
    "mit_b5",
]
