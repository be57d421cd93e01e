"""Sampling from a trained LM, with a KV cache: `moe-scale generate RUN_DIR --prompt "..."`.

    model, tokenizer, cfg = load_run("runs/olmoe_debug", device="cpu")    # moe_scale.train.runs
    out = generate(model, prompt_BT, max_new_tokens=64, temperature=0.8, top_p=0.95)

With the cache, the prompt runs once (prefill) and every later step feeds only the newest
token; without it every step reruns the whole sequence. Both compute the same logits, which
the tests check. A run's MoE layers keep their eval capacity: a router with a per-expert
capacity can drop assignments of a long prompt that one-token steps would not, so for
identical results with and without the cache use a dropless configuration.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moe_scale.models.lm.model import KVCache, MoELM


def sample_next(logits_BV: Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> Tensor:
    """Next ids `[B]`: argmax at temperature 0, else a draw from the smallest set of most likely
    tokens whose probability reaches top_p (nucleus sampling), at the given temperature."""
    if temperature == 0:
        return logits_BV.argmax(-1)
    probs_BV = torch.softmax(logits_BV.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_BV, order_BV = probs_BV.sort(dim=-1, descending=True)
        before_BV = sorted_BV.cumsum(-1) - sorted_BV  # mass of the more likely tokens
        sorted_BV = sorted_BV.masked_fill(before_BV >= top_p, 0.0)
        probs_BV = torch.zeros_like(probs_BV).scatter_(-1, order_BV, sorted_BV)
    return torch.multinomial(probs_BV, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model: MoELM, prompt_BT: Tensor, max_new_tokens: int, *, temperature: float = 1.0,
             top_p: float = 1.0, use_cache: bool = True, eos_id: int | None = None,
             generator: torch.Generator | None = None, return_logits: bool = False):
    """Continue `prompt_BT` `[B, T]` by up to max_new_tokens ids -> `[B, T + N]`.

    Stops early when every row has produced `eos_id`, or at the model's max_seq_len. With
    return_logits, also returns the logits of each step `[B, N, vocab]` (float32).
    """
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
    if prompt_BT.shape[1] < 1:
        raise ValueError("the prompt must hold at least one token")
    was_training = model.training
    model.eval()
    tokens_BT = prompt_BT
    cache = KVCache.empty(len(model.blocks)) if use_cache else None
    steps = min(max_new_tokens, model.max_seq_len - prompt_BT.shape[1])
    done_B = torch.zeros(prompt_BT.shape[0], dtype=torch.bool, device=prompt_BT.device)
    step_logits = []
    for step in range(steps):
        feed_BT = tokens_BT if cache is None or step == 0 else tokens_BT[:, -1:]
        logits_BV = model(feed_BT, cache=cache)[0][:, -1].float()
        step_logits.append(logits_BV)
        next_B = sample_next(logits_BV, temperature, top_p, generator)
        if eos_id is not None:
            next_B = next_B.masked_fill(done_B, eos_id)
            done_B |= next_B == eos_id
        tokens_BT = torch.cat([tokens_BT, next_B[:, None]], dim=1)
        if eos_id is not None and bool(done_B.all()):
            break
    model.train(was_training)
    if return_logits:
        return tokens_BT, torch.stack(step_logits, dim=1) if step_logits else prompt_BT.new_zeros(0)
    return tokens_BT

