"""A small byte-level MoE language model."""

from moe_scale.models.lm.model import MoELM, lm_loss

__all__ = ["MoELM", "lm_loss"]
