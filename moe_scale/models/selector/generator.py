"""The generator: a focus-aware seq2seq with additive attention and a copy mechanism.

Encoder input per source token: [word embedding; focus embedding (0/1); answer-position
embedding], so a different focus yields a different encoding and hence a different output
(Cho et al. 2019, sec. 3.4). With `use_focus=False` it is the plain seq2seq the beam-search
and sampling baselines decode.

Decoder step (input feeding, Bahdanau attention, See et al. 2017's pointer-generator):
    d' = GRUCell([emb(y_prev); c_prev], d)
    a_S = softmax_S(v . tanh(W_h h_S + W_d d'))          c = sum_S a_S h_S
    p_vocab = softmax(W_o tanh(W_r [d'; c]))
    p_gen = sigmoid(w . [d'; c; emb(y_prev)])
    P(w) = p_gen p_vocab(w) + (1 - p_gen) sum_{S: x_S = w} a_S     over V + num_oov words
so an out-of-vocabulary source word (extended id V + j) can be produced by copying.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_scale.models.selector.config import GeneratorConfig
from moe_scale.models.selector.encoder import BiGRUEncoder
from moe_scale.models.selector.selector import NUM_ANSWER_TAGS

PAD, UNK, BOS, EOS = 0, 1, 2, 3
_EPS = 1e-12


@dataclass
class Memory:
    """Encoder side of N decoding rows (N = examples x experts / beams / samples).

    h_NSH        encoder outputs          proj_NSH   W_h h (attention keys)
    mask_NS      real source tokens       src_ext_NS source ids in the extended vocabulary
    num_oov      extended vocabulary = V + num_oov
    """

    h_NSH: Tensor
    proj_NSH: Tensor
    mask_NS: Tensor
    src_ext_NS: Tensor
    init_NH: Tensor
    num_oov: int

    def repeat(self, n: int) -> "Memory":
        """Each row repeated n times in place: row i -> rows i*n .. i*n+n-1."""
        r = lambda t: t.repeat_interleave(n, dim=0)  # noqa: E731
        return Memory(
            r(self.h_NSH), r(self.proj_NSH), r(self.mask_NS), r(self.src_ext_NS), r(self.init_NH), self.num_oov
        )


@dataclass
class State:
    """Decoder state of N rows: GRU hidden d_NH and previous attention context c_NH."""

    d_NH: Tensor
    c_NH: Tensor

    def select(self, rows_N: Tensor) -> "State":
        return State(self.d_NH[rows_N], self.c_NH[rows_N])


class Generator(nn.Module):
    def __init__(self, cfg: GeneratorConfig):
        super().__init__()
        self.cfg = cfg
        E, H = cfg.embed_dim, cfg.hidden_dim
        self.embed = nn.Embedding(cfg.vocab_size, E, padding_idx=PAD)
        self.answer_embed = nn.Embedding(NUM_ANSWER_TAGS, cfg.answer_dim) if cfg.answer_dim else None
        self.focus_embed = nn.Embedding(2, cfg.focus_dim) if cfg.use_focus else None
        input_dim = E + (cfg.answer_dim if cfg.answer_dim else 0) + (cfg.focus_dim if cfg.use_focus else 0)
        self.dropout = nn.Dropout(cfg.dropout)
        self.encoder = BiGRUEncoder(input_dim, H)
        self.bridge = nn.Sequential(nn.Linear(H, H), nn.Tanh())
        self.cell = nn.GRUCell(E + H, H)
        self.att_h = nn.Linear(H, H, bias=False)
        self.att_d = nn.Linear(H, H)
        self.att_v = nn.Linear(H, 1, bias=False)
        self.readout = nn.Linear(2 * H, H)
        self.out = nn.Linear(H, cfg.vocab_size)
        self.p_gen = nn.Linear(2 * H + E, 1) if cfg.copy else None

    @property
    def vocab_size(self) -> int:
        return self.cfg.vocab_size

    def encode(self, src_BS, src_ext_BS, mask_BS, answer_BS=None, focus_BS=None, num_oov: int = 0) -> Memory:
        parts = [self.embed(src_BS)]
        if self.answer_embed is not None:
            parts.append(self.answer_embed(answer_BS if answer_BS is not None else torch.zeros_like(src_BS)))
        if self.focus_embed is not None:
            if focus_BS is None:
                raise ValueError("this generator uses focus (use_focus=True): pass focus_BS")
            parts.append(self.focus_embed(focus_BS.long()))
        h_BSH, final_BH = self.encoder(self.dropout(torch.cat(parts, dim=-1)), mask_BS)
        num_oov = num_oov if self.cfg.copy else 0
        return Memory(h_BSH, self.att_h(h_BSH), mask_BS, src_ext_BS, self.bridge(final_BH), num_oov)

    def init_state(self, memory: Memory) -> State:
        return State(memory.init_NH, torch.zeros_like(memory.init_NH))

    def step(self, prev_N: Tensor, state: State, memory: Memory) -> tuple[Tensor, State]:
        """Log-probabilities `[N, V + num_oov]` of the next token given the previous one."""
        V = self.vocab_size
        emb_NE = self.dropout(self.embed(prev_N.masked_fill(prev_N >= V, UNK)))
        d_NH = self.cell(torch.cat([emb_NE, state.c_NH], dim=-1), state.d_NH)
        score_NS = self.att_v(torch.tanh(memory.proj_NSH + self.att_d(d_NH)[:, None])).squeeze(-1)
        attn_NS = torch.softmax(score_NS.masked_fill(~memory.mask_NS, float("-inf")), dim=-1)
        c_NH = torch.bmm(attn_NS[:, None], memory.h_NSH)[:, 0]
        dc_N2H = torch.cat([d_NH, c_NH], dim=-1)
        logits_NV = self.out(torch.tanh(self.readout(self.dropout(dc_N2H))))
        if self.p_gen is None:
            return torch.log_softmax(logits_NV, dim=-1), State(d_NH, c_NH)
        p_gen_N1 = torch.sigmoid(self.p_gen(torch.cat([dc_N2H, emb_NE], dim=-1)))
        prob_NX = F.pad(p_gen_N1 * torch.softmax(logits_NV, dim=-1), (0, memory.num_oov))
        prob_NX = prob_NX.scatter_add(1, memory.src_ext_NS, (1 - p_gen_N1) * attn_NS)
        return torch.log(prob_NX + _EPS), State(d_NH, c_NH)

    def nll(self, memory: Memory, tgt_in_BT: Tensor, tgt_out_BT: Tensor) -> Tensor:
        """Teacher-forced negative log-likelihood per target token, `[B, T]` (0 on padding)."""
        if self.p_gen is None:
            tgt_out_BT = tgt_out_BT.masked_fill(tgt_out_BT >= self.vocab_size, UNK)
        state = self.init_state(memory)
        nll = []
        for t in range(tgt_in_BT.shape[1]):
            logp_NX, state = self.step(tgt_in_BT[:, t], state, memory)
            nll.append(-logp_NX.gather(1, tgt_out_BT[:, t : t + 1])[:, 0])
        return torch.stack(nll, dim=1) * (tgt_out_BT != PAD)

    def loss(self, batch, focus_BS: Tensor | None = None) -> Tensor:
        """Mean NLL per target token of a `moe_scale.data.selector.Batch`; focus = guidance by default."""
        if focus_BS is None and self.cfg.use_focus:
            focus_BS = batch.focus_BS
        memory = self.encode(
            batch.src_BS, batch.src_ext_BS, batch.src_mask_BS, batch.answer_BS, focus_BS, batch.num_oov
        )
        nll_BT = self.nll(memory, batch.tgt_in_BT, batch.tgt_out_BT)
        return nll_BT.sum() / (batch.tgt_out_BT != PAD).sum().clamp(min=1)
