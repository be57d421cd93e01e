"""The MoE language model client: GPT-2-style (byte-level) or Llama-style decoder blocks."""

from moe_scale.models.lm.config import LMConfig, LMDataConfig
from moe_scale.models.lm.model import KVCache, MoELM, lm_loss

__all__ = ["KVCache", "LMConfig", "LMDataConfig", "MoELM", "lm_loss"]
