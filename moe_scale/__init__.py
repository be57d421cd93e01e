"""moe_scale: distributed, large-scale sparsely-gated Mixture-of-Experts training on PyTorch."""

from moe_scale.moe import AuxLossWeights, MoEConfig, MoELayer, MoEStats

__version__ = "0.1.0"
__all__ = ["AuxLossWeights", "MoEConfig", "MoELayer", "MoEStats", "__version__"]
