"""afa: Learning Affinity from Attention (Ru et al., CVPR 2022), a modern re-implementation."""

__version__ = "0.1.0"
