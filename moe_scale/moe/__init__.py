"""The MoE engine: routing, dispatch, grouped experts, balancing losses, the layer."""

from moe_scale.moe.config import ROUTERS, MoEConfig
from moe_scale.moe.experts import GroupedExperts
from moe_scale.moe.layer import MoELayer, MoEStats
from moe_scale.moe.losses import AuxLossWeights
from moe_scale.moe.routing import Routing, RouterStats

__all__ = ["ROUTERS", "AuxLossWeights", "GroupedExperts", "MoEConfig", "MoELayer", "MoEStats", "Routing", "RouterStats"]
