"""`SelectorSeq2Seq`: the selector and the focus-aware generator as one trainable module.

The two parts share nothing and are trained side by side on each batch (Cho et al. 2019,
sec. 3.5): the selector by hard EM against the guidance focus, the generator by maximum
likelihood with the guidance focus as its input. At test time the selector's K focuses drive
the generator (`generate`).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from moe_scale.models.selector.config import GeneratorConfig, SelectorConfig
from moe_scale.models.selector.decoding import Generations, selector_generate
from moe_scale.models.selector.generator import Generator
from moe_scale.models.selector.selector import Selector


@dataclass
class SelectorStats:
    """selector_loss (hard-EM BCE), generator_loss (NLL per token), wins_K (examples won per expert)."""

    selector_loss: Tensor
    generator_loss: Tensor
    wins_K: Tensor


class SelectorSeq2Seq(nn.Module):
    def __init__(self, selector_cfg: SelectorConfig, generator_cfg: GeneratorConfig):
        super().__init__()
        if not generator_cfg.use_focus:
            raise ValueError("the Selector's generator reads the focus: set generator use_focus=True")
        if selector_cfg.vocab_size != generator_cfg.vocab_size:
            raise ValueError(
                f"selector vocab_size={selector_cfg.vocab_size} != generator vocab_size={generator_cfg.vocab_size}"
            )
        self.selector = Selector(selector_cfg)
        self.generator = Generator(generator_cfg)

    def forward(self, batch) -> tuple[Tensor, SelectorStats]:
        """Training loss of a `moe_scale.data.selector.Batch` and its statistics."""
        sel = self.selector.hard_em_loss(batch.src_BS, batch.src_mask_BS, batch.focus_BS, batch.answer_BS)
        gen_loss = self.generator.loss(batch, batch.focus_BS)
        stats = SelectorStats(sel.loss.detach(), gen_loss.detach(), sel.wins_K)
        return sel.loss + gen_loss, stats

    def generate(self, batch, **options) -> Generations:
        """K outputs per example, one per expert, best first (see `selector_generate`)."""
        return selector_generate(self.selector, self.generator, batch, **options)
