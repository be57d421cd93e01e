"""Decoding: greedy, sampling (top-k / nucleus) and beam search over a `Generator`, and the
three ways to get K diverse outputs per source that the benchmark compares:

    selector_generate   for each of the K experts, threshold (or sample) its focus and decode
    beam_generate       plain seq2seq, the K best beams
    sample_generate     plain seq2seq, K independent top-k / nucleus samples

Each returns `Generations` with the K outputs of every example sorted by score (the
length-normalised log-likelihood under the generator), so output 0 is the top-1. The selector
can also rank by the mixture's joint log-likelihood log pi_k + log p(y | x, focus_k), with pi_k
the share of training examples expert k won (`expert_log_prior`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from moe_scale.models.selector.generator import BOS, EOS, PAD, Generator, Memory


@dataclass
class Generations:
    """K outputs per example, best first.

    ids_BKL     extended-vocabulary ids, <pad> after </s>
    score_BK    ranking score: mean log-probability per token (</s> included), or with an
                expert prior the joint log pi_k + sum of log-probabilities
    expert_BK   the selector expert behind each output (-1 for the baselines)
    """

    ids_BKL: Tensor
    score_BK: Tensor
    expert_BK: Tensor


def _lengths(ids_NL: Tensor) -> Tensor:
    """Tokens up to and including the first </s> (all of them when there is none)."""
    is_eos = ids_NL == EOS
    first = torch.where(is_eos.any(1), is_eos.float().argmax(1), torch.full_like(ids_NL[:, 0], ids_NL.shape[1] - 1))
    return first + 1


@torch.no_grad()
def sample_or_greedy(
    generator: Generator, memory: Memory, max_len: int, top_k: int = 0, top_p: float = 1.0,
    greedy: bool = False, rng: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Decode every row of `memory`: ids `[N, L]` and summed log-probability `[N]`.

    greedy: argmax; otherwise sample from the distribution cut to the top_k tokens (0 = all)
    and to the smallest set of mass >= top_p (nucleus), renormalised.
    """
    N = memory.h_NSH.shape[0]
    prev = torch.full((N,), BOS, dtype=torch.long, device=memory.h_NSH.device)
    state = generator.init_state(memory)
    done = torch.zeros(N, dtype=torch.bool, device=prev.device)
    total = torch.zeros(N, device=prev.device)
    out = []
    for _ in range(max_len):
        logp_NX, state = generator.step(prev, state, memory)
        if greedy:
            token = logp_NX.argmax(-1)
        else:
            token = torch.multinomial(torch.softmax(_truncate(logp_NX, top_k, top_p), -1), 1, generator=rng)[:, 0]
        token = token.masked_fill(done, PAD)
        total = total + logp_NX.gather(1, token[:, None])[:, 0].masked_fill(done, 0.0)
        out.append(token)
        done = done | (token == EOS)
        prev = token
        if done.all():
            break
    ids = torch.stack(out, dim=1)
    if not done.all():  # cut at max_len: close the unfinished rows
        ids = torch.cat([ids, torch.full_like(ids[:, :1], EOS).masked_fill(done[:, None], PAD)], dim=1)
    return ids, total


def _truncate(logp_NX: Tensor, top_k: int, top_p: float) -> Tensor:
    if top_k > 0:
        kth = logp_NX.topk(min(top_k, logp_NX.shape[-1]), dim=-1).values[:, -1:]
        logp_NX = logp_NX.masked_fill(logp_NX < kth, float("-inf"))
    if top_p < 1.0:
        sorted_lp, order = logp_NX.sort(dim=-1, descending=True)
        cum = torch.softmax(sorted_lp, -1).cumsum(-1)
        drop_sorted = cum - torch.softmax(sorted_lp, -1) >= top_p  # mass before this token already >= p
        logp_NX = logp_NX.masked_fill(torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted), float("-inf"))
    return logp_NX


@torch.no_grad()
def beam_search(generator: Generator, memory: Memory, beam_size: int, max_len: int, num_return: int = 1):
    """Beam search for each row of `memory`: ids `[N, num_return, L]`, summed log-prob `[N, num_return]`.

    Finished beams stay in the beam with their score frozen; the survivors are ranked at the
    end by mean log-probability per token.
    """
    if not 1 <= num_return <= beam_size:
        raise ValueError(f"num_return must be in [1, beam_size={beam_size}], got {num_return}")
    N, W = memory.h_NSH.shape[0], beam_size
    device = memory.h_NSH.device
    memory = memory.repeat(W)
    state = generator.init_state(memory)
    prev = torch.full((N * W,), BOS, dtype=torch.long, device=device)
    score_NW = torch.full((N, W), float("-inf"), device=device)
    score_NW[:, 0] = 0.0  # all beams start identical: keep one alive
    done_NW = torch.zeros(N, W, dtype=torch.bool, device=device)
    hist = torch.zeros(N, W, 0, dtype=torch.long, device=device)
    for _ in range(max_len):
        logp_MX, state = generator.step(prev, state, memory)
        X = logp_MX.shape[-1]
        logp_NWX = logp_MX.view(N, W, X)
        # A finished beam extends only by <pad>, at no cost.
        frozen = torch.full_like(logp_NWX, float("-inf"))
        frozen[..., PAD] = 0.0
        logp_NWX = torch.where(done_NW[..., None], frozen, logp_NWX)
        cand_NWX = score_NW[..., None] + logp_NWX
        score_NW, flat = cand_NWX.view(N, W * X).topk(W, dim=-1)
        beam_NW, token_NW = flat // X, flat % X
        rows = (beam_NW + torch.arange(N, device=device)[:, None] * W).view(-1)
        state = state.select(rows)
        hist = torch.cat([hist.gather(1, beam_NW[..., None].expand(-1, -1, hist.shape[2])), token_NW[..., None]], dim=2)
        done_NW = done_NW.gather(1, beam_NW) | (token_NW == EOS)
        prev = token_NW.view(-1)
        if done_NW.all():
            break
    if not done_NW.all():  # cut at max_len: close the unfinished beams
        hist = torch.cat([hist, torch.full_like(hist[..., :1], EOS).masked_fill(done_NW[..., None], PAD)], dim=2)
    lengths = _lengths(hist.view(N * W, -1)).view(N, W).float()
    mean_NW = score_NW / lengths
    order = mean_NW.argsort(dim=-1, descending=True)[:, :num_return]
    ids = hist.gather(1, order[..., None].expand(-1, -1, hist.shape[2]))
    return ids, score_NW.gather(1, order)


def _sorted(ids_NL: Tensor, total_N: Tensor, B: int, K: int, expert_BK: Tensor, normalise: bool = True) -> Generations:
    score_BK = (total_N / _lengths(ids_NL).float() if normalise else total_N).view(B, K)
    order = score_BK.argsort(dim=-1, descending=True)
    ids_BKL = ids_NL.view(B, K, -1).gather(1, order[..., None].expand(-1, -1, ids_NL.shape[1]))
    return Generations(ids_BKL, score_BK.gather(1, order), expert_BK.gather(1, order))


@torch.no_grad()
def selector_generate(
    selector, generator: Generator, batch, sample_focus: bool = False, threshold: float | None = None,
    beam_size: int = 1, max_len: int | None = None, expert_log_prior: Tensor | None = None,
) -> Generations:
    """One output per selector expert: focus of expert k (thresholded or sampled) -> decode.

    expert_log_prior   `[K]` log pi_k: rank by the joint log pi_k + log p(y | x, focus_k)
                       (None: by the generator's mean log-probability alone, as Cho et al. do)
    """
    max_len = max_len or generator.cfg.max_len
    focus_BKS = selector.select(
        batch.src_BS, batch.src_mask_BS, batch.answer_BS, threshold=threshold, sample=sample_focus
    )
    B, K, S = focus_BKS.shape
    rep = lambda t: t.repeat_interleave(K, dim=0)  # noqa: E731  row b*K + k = example b, expert k
    memory = generator.encode(
        rep(batch.src_BS), rep(batch.src_ext_BS), rep(batch.src_mask_BS), rep(batch.answer_BS),
        focus_BKS.reshape(B * K, S), batch.num_oov,
    )
    if beam_size > 1:
        ids, total = beam_search(generator, memory, beam_size, max_len)
        ids, total = ids[:, 0], total[:, 0]
    else:
        ids, total = sample_or_greedy(generator, memory, max_len, greedy=True)
    expert_BK = torch.arange(K, device=ids.device).expand(B, K)
    if expert_log_prior is None:
        return _sorted(ids, total, B, K, expert_BK)
    return _sorted(ids, total + expert_log_prior.to(total).repeat(B), B, K, expert_BK, normalise=False)


def _plain_memory(generator: Generator, batch) -> Memory:
    return generator.encode(batch.src_BS, batch.src_ext_BS, batch.src_mask_BS, batch.answer_BS, None, batch.num_oov)


@torch.no_grad()
def beam_generate(generator: Generator, batch, k: int, max_len: int | None = None) -> Generations:
    """The k best beams of a beam search of width k."""
    max_len = max_len or generator.cfg.max_len
    ids, total = beam_search(generator, _plain_memory(generator, batch), k, max_len, num_return=k)
    B = ids.shape[0]
    return _sorted(ids.view(B * k, -1), total.view(-1), B, k, torch.full((B, k), -1, device=ids.device))


@torch.no_grad()
def sample_generate(
    generator: Generator, batch, k: int, top_k: int = 0, top_p: float = 1.0,
    max_len: int | None = None, rng: torch.Generator | None = None,
) -> Generations:
    """k independent samples (top-k and / or nucleus truncation)."""
    max_len = max_len or generator.cfg.max_len
    memory = _plain_memory(generator, batch).repeat(k)
    ids, total = sample_or_greedy(generator, memory, max_len, top_k=top_k, top_p=top_p, rng=rng)
    B = batch.src_BS.shape[0]
    return _sorted(ids, total, B, k, torch.full((B, k), -1, device=ids.device))
