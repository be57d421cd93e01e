"""Selector (Cho, Seo and Hajishirzi, EMNLP 2019): mixture content selection for diverse generation."""

from moe_scale.models.selector.config import GeneratorConfig, SelectorConfig
from moe_scale.models.selector.decoding import Generations, beam_generate, sample_generate, selector_generate
from moe_scale.models.selector.generator import Generator
from moe_scale.models.selector.model import SelectorSeq2Seq, SelectorStats
from moe_scale.models.selector.selector import Selector, SelectorLoss

__all__ = [
    "GeneratorConfig", "Generations", "Generator", "Selector", "SelectorConfig", "SelectorLoss",
    "SelectorSeq2Seq", "SelectorStats", "beam_generate", "sample_generate", "selector_generate",
]
