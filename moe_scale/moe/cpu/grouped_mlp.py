"""Fused grouped expert MLP: `y = act(x w1 [+ b1]) w2 [+ b2]` per expert, in two autograd nodes.

Composing the MLP from autograd ops costs copies (split / cat, scatter-add backwards) and
keeps extra activations. These functions run exactly the GEMMs the math needs, forward and
backward, writing into preallocated buffers:

    up      a = act(x w1 [+ b1])   (SwiGLU: silu(x w1) * (x w3))   saves x and what act needs
    down    y = a w2 [+ b2]                                         saves a

Two nodes rather than one so that autograd accumulates and frees dW2 before dW1 exists, as it
does for two plain GEMMs; for ReLU, `up` and `down` save the same `a` tensor, so the saved
activations are exactly those of the bare GEMMs.

Two exact layouts (see layouts.py): "loop" runs one GEMM per non-empty expert on its span of
rows (`a` is `[M, h]`); "bmm" pads rows into `[E, C, d]` once and runs batched GEMMs (`a` is
`[E, C, h]`, padded rows are zero). Where the rows outnumber `E * d` the loop layout runs as
one node instead (`_FusedMLP`), on the compiled span loop (csrc/mlp_kernels.cpp) where it
applies. Every choice made here that a test or benchmark may pin is a field of `CPUTuning`
(tuning.py).

    Span            one expert's GEMM rows and its own rows
    _SpanSchedule   the spans in the order they run, in groups that run one per thread
    _ExpertGEMMs    the per-expert products over a schedule, in one layout
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from moe_scale.moe.cpu.kernels import kernels_for, use_native_bf16_gemm
from moe_scale.moe.cpu.layouts import PaddedLayout
from moe_scale.moe.cpu.tuning import CPUTuning, current_tuning


def shape_bucket(tuning: CPUTuning, device: torch.device, dtype: torch.dtype) -> int:
    """The row bucket of the GEMM shapes, or 0 for exact row counts. By default rows are
    bucketed where oneDNN runs the GEMMs (bf16 / fp16 on CPU): it JIT-compiles a kernel for
    every new shape, and expert loads change every step, so without buckets a layer would
    spend much of its step compiling."""
    bucketed = tuning.bucket_rows
    if bucketed is None:
        bucketed = device.type == "cpu" and dtype in (torch.bfloat16, torch.float16)
    return tuning.row_bucket if bucketed else 0


class Span(NamedTuple):
    """One expert's GEMMs over a block of the sorted rows: its own rows are
    [own_start, own_end), its GEMMs run over [gemm_start, gemm_end), which holds them (more
    rows when bucketed, see `_SpanSchedule`)."""

    expert: int
    gemm_start: int
    gemm_end: int
    own_start: int
    own_end: int

    @property
    def gemm_rows(self) -> slice:
        return slice(self.gemm_start, self.gemm_end)

    @property
    def own_rows(self) -> slice:
        return slice(self.own_start, self.own_end)

    @property
    def reaches_forward(self) -> bool:
        """Whether the GEMM rows run past the expert's own, into rows computed before it:
        its product goes to a new block, whose own rows the caller copies out."""
        return self.gemm_end > self.own_end

    @property
    def is_exact(self) -> bool:
        return (self.gemm_start, self.gemm_end) == (self.own_start, self.own_end)


class _SpanSchedule:
    """The spans of the sorted input, one per non-empty expert (or more, when split), in the
    order they run and in groups that run one per thread.

    spans      `Span`s, in the order given
    group_ptr  spans[group_ptr[g]:group_ptr[g + 1]] is group g: experts with about 1/groups
               of the rows each, whose spans stay inside the group's rows
    parts      per span, -1, or for a piece of a split expert the slot of its partial weight
               gradients

    The groups run one per thread and the layer waits for the longest. Exact spans (no
    `bucket`) of a few dozen experts go to the groups by a balanced partition of their row
    counts (`_balanced_partition`; 8 experts of 797-1085 rows: neighbouring groups of 3997 and
    4195 rows, partitioned ones of 4026 and 4166). With `split`, a group still more than
    `split_min_rows` above its share hands the excess rows of its largest expert to the
    lightest group (`_split_to_balance`): one hot expert can hold more rows than a thread's
    share. Bucketed spans need neighbours and are never split.

    Without `bucket` every span is exact (its GEMM rows are its own rows). With `bucket`
    (bf16 / fp16 on CPU through oneDNN, see `shape_bucket`) no GEMM sees a row count outside a
    small fixed set: a span has `roundup(count, bucket)` rows. Normally they end at the
    expert's last row: the extra rows at the front belong to lower experts of the same group,
    whose own products run later (a group's spans go from its last expert to its first) and
    overwrite them. A span too close to its group's first row to reach back reaches forward
    instead and keeps only its own rows (the caller writes through a temporary); only when all
    the group's rows are fewer than a bucket is a span exact. Sums over rows (weight and bias
    gradients) take the span's gradient rows with the foreign ones zeroed
    (`foreign_rows_zeroed`). Groups share no rows, so they can run at once
    (csrc/mlp_kernels.cpp runs one per thread).

    `balance_max_blocks` and `split_min_rows` are `CPUTuning`'s.
    """

    def __init__(self, counts: tuple[int, ...], bucket: int = 0, groups: int = 1, split: bool = False,
                 balance_max_blocks: int = CPUTuning.balance_max_blocks,
                 split_min_rows: int = CPUTuning.split_min_rows):
        self.counts = counts
        self.parts: list[int] = []  # per span: -1, or the partial-gradient slot of a split expert's piece
        blocks, start = [], 0
        for e, c in enumerate(counts):
            if c:
                blocks.append((e, start, start + c))
            start += c
        self.num_nonempty = len(blocks)
        members: list[list[tuple[int, int, int]]] = [[] for _ in range(max(groups, 1))]
        if bucket or len(members) == 1 or len(blocks) > balance_max_blocks:
            # A block joins the group its middle row falls in: contiguous groups of ~start/groups rows.
            for e, s, end in blocks:
                members[min(len(members) - 1, (s + end) * len(members) // (2 * start))].append((e, s, end))
        else:
            members = _balanced_partition(blocks, len(members))
        part_of: dict[tuple[int, int], int] = {}
        if split and not bucket and len(members) > 1:
            members, part_of = _split_to_balance(members, split_min_rows)
        self.spans: list[Span] = []
        self.group_ptr = [0]
        for group in (m for m in members if m):
            first, last = group[0][1], group[-1][2]
            for e, s, end in reversed(group):
                rows = -(-(end - s) // bucket) * bucket if bucket else end - s
                if end - first >= rows:
                    self.spans.append(Span(e, end - rows, end, s, end))
                elif s + rows <= last:
                    self.spans.append(Span(e, s, s + rows, s, end))
                else:
                    self.spans.append(Span(e, s, end, s, end))
                self.parts.append(part_of.get((e, s), -1))
            self.group_ptr.append(len(self.spans))

    @functools.cached_property
    def spans_tensor(self) -> Tensor:
        """The spans and their parts as a `[n, 6]` int64 tensor (for csrc/mlp_kernels.cpp; made once)."""
        return torch.tensor([(*sp, p) for sp, p in zip(self.spans, self.parts)], dtype=torch.long).view(-1, 6)

    @property
    def num_parts(self) -> int:
        """Pieces of split experts (`split`), each with its own partial weight gradients."""
        return max(self.parts, default=-1) + 1

    @property
    def longest(self) -> int:
        """GEMM rows of the longest span."""
        return max((sp.gemm_end - sp.gemm_start for sp in self.spans), default=0)


def _balanced_partition(blocks: list[tuple[int, int, int]], groups: int) -> list[list[tuple[int, int, int]]]:
    """Blocks (expert, start, end) into `groups` lists with nearly equal total rows, each list
    in expert order. Two groups: the exact best split (subset sums as a bitset); more: largest
    first to the lightest group, then single moves and swaps between the heaviest and the
    lightest group while they narrow its gap."""
    rows = [end - s for _, s, end in blocks]
    if groups == 2:
        reach = [1]  # reach[i]: bit r set when some of the first i blocks sum to r rows
        for r in rows:
            reach.append(reach[-1] | reach[-1] << r)
        half = sum(rows) // 2
        best = (reach[-1] & ((2 << half) - 1)).bit_length() - 1  # the largest sum <= half
        first, second = [], []
        for i in range(len(blocks) - 1, -1, -1):
            if reach[i] >> best & 1:
                second.append(blocks[i])
            else:
                first.append(blocks[i])
                best -= rows[i]
        return [first[::-1], second[::-1]]
    members: list[list[int]] = [[] for _ in range(groups)]
    loads = [0] * groups
    for i in sorted(range(len(blocks)), key=rows.__getitem__, reverse=True):
        g = loads.index(min(loads))
        members[g].append(i)
        loads[g] += rows[i]
    for _ in range(4 * len(blocks)):
        heavy, light = loads.index(max(loads)), loads.index(min(loads))
        gap, best = loads[heavy] - loads[light], None
        for x, i in enumerate(members[heavy]):
            for y, j in enumerate([None, *members[light]]):  # None: move block i alone
                shift = rows[i] - (0 if j is None else rows[j])
                if abs(gap - 2 * shift) < (gap if best is None else best[0]):
                    best = (abs(gap - 2 * shift), x, y - 1, shift)
        if best is None:
            break
        _, x, y, shift = best
        i = members[heavy].pop(x)
        if y >= 0:
            members[heavy].append(members[light].pop(y))
        members[light].append(i)
        loads[heavy] -= shift
        loads[light] += shift
    return [[blocks[i] for i in sorted(m)] for m in members]


def _split_to_balance(
    members: list[list[tuple[int, int, int]]], split_min_rows: int = CPUTuning.split_min_rows,
) -> tuple[list[list[tuple[int, int, int]]], dict[tuple[int, int], int]]:
    """Equal rows per group by splitting blocks (expert, start, end): while the heaviest group
    holds more than `split_min_rows` rows above its share, the tail of its largest block moves
    to the lightest group. Returns the groups and {(expert, start): part} for every piece of a
    split expert (its weight gradients are summed from per-piece partials, `mlp_backward`)."""
    members = [list(m) for m in members]
    loads = [sum(end - s for _, s, end in m) for m in members]
    share = -(-sum(loads) // len(loads))
    split_experts: set[int] = set()
    for _ in range(2 * len(members)):
        heavy, light = loads.index(max(loads)), loads.index(min(loads))
        move = min(loads[heavy] - share, share - loads[light])
        if loads[heavy] - share <= split_min_rows or move <= 0:
            break
        i = max(range(len(members[heavy])), key=lambda j: members[heavy][j][2] - members[heavy][j][1])
        e, s, end = members[heavy][i]
        move = min(move, end - s - 1)  # the piece that stays keeps a row
        if move <= 0:
            break
        members[heavy][i] = (e, s, end - move)
        members[light].append((e, end - move, end))
        loads[heavy] -= move
        loads[light] += move
        split_experts.add(e)
    pieces = sorted((e, s) for m in members for e, s, _ in m if e in split_experts)
    return [sorted(m) for m in members], {piece: p for p, piece in enumerate(pieces)}


def _span_mm(a_span: Tensor, w: Tensor, bias: Tensor | None, out: Tensor, span: Span) -> Tensor:
    """`a_span @ w (+ bias)` for the span's GEMM rows, written into those rows of `out`. A span
    reaching forward would overwrite rows already computed: its product is a new block, whose
    own rows the caller copies to `out`."""
    if span.reaches_forward:
        return a_span @ w if bias is None else torch.addmm(bias, a_span, w)
    if bias is None:
        return torch.mm(a_span, w, out=out[span.gemm_rows])
    return torch.addmm(bias, a_span, w, out=out[span.gemm_rows])


@contextmanager
def foreign_rows_zeroed(g: Tensor, span: Span) -> Iterator[Tensor]:
    """The span's GEMM rows of `g` with those outside the expert's own zero, for the body of
    the `with`. Sums over the span then count only the expert's rows (the foreign rows of the
    other operand are finite: zero times them adds nothing), and every weight-gradient GEMM
    keeps the span's bucketed shape. The foreign rows (fewer than a bucket) are zeroed in place
    and restored afterwards: copying them costs a fraction of copying the span."""
    if span.is_exact:
        yield g[span.own_rows]
        return
    head, tail = slice(span.gemm_start, span.own_start), slice(span.own_end, span.gemm_end)  # foreign rows
    saved_head, saved_tail = g[head].clone(), g[tail].clone()
    g[head].zero_()
    g[tail].zero_()
    try:
        yield g[span.gemm_rows]
    finally:
        g[head] = saved_head
        g[tail] = saved_tail


class _ExpertGEMMs:
    """The per-expert products of a grouped GEMM layer, in one layout ("loop" over the
    schedule's spans, or "bmm" on padded `[E, C, k]` blocks).

    mm(a, w)            a @ w[e] per expert (w[e]^T with `transpose`)
    wgrad(a, g)         a^T @ g per expert, `[E, k, n]`
    bias_grad(g)        the rows of g summed per expert, `[E, n]`
    """

    def __init__(self, method: str, schedule: _SpanSchedule):
        self.method, self.schedule = method, schedule

    def mm(self, a: Tensor, w: Tensor, transpose: bool = False, bias: Tensor | None = None,
           act_: Callable[[Tensor], Tensor] | None = None) -> Tensor:
        """With `bias` `[E, n]`, added inside the GEMM (addmm / baddbmm), as nn.Linear does.
        With `act_`, an in-place activation applied to each expert's block while it is still in
        cache (rows of a bucketed span that belong to another expert are rewritten later)."""
        w = w.transpose(1, 2) if transpose else w
        if self.method == "bmm":
            out = torch.bmm(a, w) if bias is None else torch.baddbmm(bias[:, None], a, w)
            return act_(out) if act_ is not None else out
        out = a.new_empty(a.shape[0], w.shape[-1])
        for sp in self.schedule.spans:
            block = _span_mm(a[sp.gemm_rows], w[sp.expert], None if bias is None else bias[sp.expert], out, sp)
            if act_ is not None:
                act_(block)
            if sp.reaches_forward:
                out[sp.own_rows] = block[: sp.own_end - sp.own_start]
        return out

    def wgrad(self, a: Tensor, g: Tensor) -> Tensor:
        if self.method == "bmm":
            return torch.bmm(a.transpose(1, 2), g)
        # Empty rather than zeros: a fresh buffer costs page faults on first touch, so writing
        # it once (GEMM output, or zeros for an expert without rows) halves that cost.
        out = a.new_empty(len(self.schedule.counts), a.shape[-1], g.shape[-1])
        self.zero_empty_experts(out)
        for sp in self.schedule.spans:
            with foreign_rows_zeroed(g, sp) as rows:
                torch.mm(a[sp.gemm_rows].t(), rows, out=out[sp.expert])
        return out

    def zero_empty_experts(self, out_E: Tensor) -> None:
        """Zero the per-expert results `out_E[e]` of the experts without rows (no span writes them)."""
        if self.schedule.num_nonempty < len(self.schedule.counts):
            empty = [e for e, c in enumerate(self.schedule.counts) if c == 0]
            out_E.index_fill_(0, torch.tensor(empty, device=out_E.device), 0)

    def bias_grad(self, g: Tensor) -> Tensor:
        """Per-expert sum of row gradients (padded rows carry zero gradient)."""
        if self.method == "bmm":
            return g.sum(1)
        out = g.new_empty(len(self.schedule.counts), g.shape[-1])
        self.zero_empty_experts(out)
        for sp in self.schedule.spans:
            torch.sum(g[sp.own_rows], 0, out=out[sp.expert])
        return out


def _up(x, w1, w3, b1, gemms: _ExpertGEMMs, activation: str) -> tuple[Tensor, Tensor, Tensor | None]:
    """a = act(x w1 [+ b1]) (SwiGLU: silu(x w1) * (x w3)) -> (a, t, h3): t is what the
    activation's backward reads (a itself for ReLU, the pre-activation otherwise)."""
    if activation == "relu":
        a = gemms.mm(x, w1, bias=b1, act_=_relu_)
        return a, a, None
    h = gemms.mm(x, w1, bias=b1)
    h3 = gemms.mm(x, w3) if w3 is not None else None
    a, t = _activate(h, h3, activation)
    return a, t, h3


def _activate(h: Tensor, h3: Tensor | None, activation: str) -> tuple[Tensor, Tensor]:
    """(a, t): a = act(h) (SwiGLU: silu(h) * h3; ReLU in place), t what its backward reads."""
    if activation == "relu":
        a = _relu_(h)
        return a, a
    if activation == "gelu":
        return F.gelu(h), h
    return F.silu(h) * h3, h


def _relu_(h: Tensor) -> Tensor:
    kernels = kernels_for(h)
    if kernels is None or not h.is_contiguous():
        return torch.relu_(h)
    kernels.relu_(h)  # csrc/activation_kernels.cpp: ATen's bf16 relu_ is several times slower
    return h


def _relu_backward_(g_a: Tensor, a: Tensor) -> Tensor:
    """g_a where a > 0 (or NaN) else 0, in place: ATen's threshold_backward(g_a, a, 0)."""
    kernels = kernels_for(g_a, a)
    if kernels is None or not (g_a.is_contiguous() and a.is_contiguous()) or g_a.dtype != a.dtype:
        return torch.ops.aten.threshold_backward.grad_input(g_a, a, 0, grad_input=g_a)
    kernels.relu_backward_(g_a, a)
    return g_a


def _act_backward_(g_a: Tensor, t: Tensor, h3: Tensor | None, activation: str) -> tuple[Tensor, Tensor | None]:
    """Activation backward, in place on g_a -> (g_h, g_h3 for SwiGLU else None)."""
    if activation == "relu":
        return _relu_backward_(g_a, t), None
    if activation == "gelu":
        return torch.ops.aten.gelu_backward.grad_input(g_a, t, grad_input=g_a), None
    g_h3 = g_a * F.silu(t)
    return torch.ops.aten.silu_backward.grad_input(g_a.mul_(h3), t, grad_input=g_a), g_h3


class _Up(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_Md, w1, w3, b1, gemms: _ExpertGEMMs, layout: PaddedLayout | None, activation: str):
        x = layout.pad_(x_Md) if layout is not None else x_Md
        a, t, h3 = _up(x, w1, w3, b1, gemms, activation)
        ctx.save_for_backward(w1, w3, x_Md, t, h3)
        ctx.gemms, ctx.layout, ctx.activation, ctx.has_b1 = gemms, layout, activation, b1 is not None
        return a

    @staticmethod
    def backward(ctx, g_a):
        w1, w3, x_Md, t, h3 = ctx.saved_tensors
        gemms, layout = ctx.gemms, ctx.layout
        # g_a is a fresh buffer from `down`'s backward: the activation backward reuses it in
        # place, since a new [M, h] allocation costs page faults comparable to the op itself.
        g_a = g_a.contiguous()
        g_w3 = None
        g_h, g_h3 = _act_backward_(g_a, t, h3, ctx.activation)
        x = layout.pad_(x_Md) if layout is not None else x_Md
        g_w1 = gemms.wgrad(x, g_h)
        g_x = None
        if ctx.needs_input_grad[0]:
            g_x = gemms.mm(g_h, w1, transpose=True)
            if g_h3 is not None:
                g_x += gemms.mm(g_h3, w3, transpose=True)
            if layout is not None:
                g_x = layout.unpad_(g_x)
        if g_h3 is not None:
            g_w3 = gemms.wgrad(x, g_h3)
        g_b1 = gemms.bias_grad(g_h) if ctx.has_b1 else None
        return g_x, g_w1, g_w3, g_b1, None, None, None


class _Down(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, w2, b2, gemms: _ExpertGEMMs, layout: PaddedLayout | None):
        y = gemms.mm(a, w2, bias=b2)
        ctx.save_for_backward(a, w2)
        ctx.gemms, ctx.layout, ctx.has_b2 = gemms, layout, b2 is not None
        return layout.unpad_(y) if layout is not None else y

    @staticmethod
    def backward(ctx, g_y):
        a, w2 = ctx.saved_tensors
        gemms, layout = ctx.gemms, ctx.layout
        g_y = g_y.contiguous()
        if layout is not None:
            g_y = layout.pad_(g_y)
        g_w2 = gemms.wgrad(a, g_y)
        g_a = gemms.mm(g_y, w2, transpose=True)
        g_b2 = gemms.bias_grad(g_y) if ctx.has_b2 else None
        return g_a, g_w2, g_b2, None, None


_ACTIVATION_CODES = {"relu": 0, "gelu": 1, "swiglu": 2}  # csrc/mlp_kernels.cpp's `Activation`


def compiled_span_loop(tuning: CPUTuning, *tensors: Tensor | None) -> ModuleType | None:
    """The kernels whose `mlp_forward` / `mlp_backward` run the fused node's spans
    (csrc/mlp_kernels.cpp), or None for the Python loop: `tuning.span_loop`, and by default
    the compiled loop where it applies to these tensors (one dtype, contiguous, see
    `kernels_for`)."""
    if tuning.span_loop == "python":
        return None
    present = [t for t in tensors if t is not None]
    kernels = None
    if len({t.dtype for t in present}) == 1 and all(t.is_contiguous() for t in present):
        kernels = kernels_for(*present)
    if kernels is None and tuning.span_loop == "compiled":
        raise RuntimeError("CPUTuning(span_loop='compiled'): the compiled span loop does not apply to "
                           f"{sorted({str(t.dtype) for t in present})} tensors here")
    return kernels


def expert_groups(tuning: CPUTuning, num_nonempty: int) -> int:
    """Groups of experts for the compiled span loop (`tuning.expert_groups`): by default one per
    intra-op thread when there are at least as many experts with rows as threads; otherwise
    one group, whose GEMMs each use every thread (fewer experts than threads would leave cores
    idle). Measured only on 2 cores (benchmarks/moe_layer.py)."""
    if tuning.expert_groups is not None:
        return tuning.expert_groups
    threads = torch.get_num_threads()
    return threads if num_nonempty >= threads else 1


def use_fused_backward(tuning: CPUTuning, num_rows: int, num_experts: int, d_model: int) -> bool:
    """Whether the loop layout runs as one node with a per-expert backward (`_FusedMLP`):
    `tuning.fused_backward`, by default when the `[M, h]` hidden gradient it avoids is larger
    than the extra weight gradient it holds (`[E, d, h]`): M > E * d."""
    if tuning.fused_backward is not None:
        return tuning.fused_backward
    return num_rows > num_experts * d_model


class _FusedMLP(torch.autograd.Function):
    """Both layers in one node (loop layout), backward expert by expert.

    The two-node form materialises the hidden gradient of every row, `[M, h]`, between the
    nodes; this one reuses one `[largest span, h]` buffer across experts, at the price of
    holding dW1 and dW2 at once (`grouped_mlp` picks it when M > E * d, where that is the
    smaller cost). With bucketed shapes (`_SpanSchedule`) every product of the backward runs
    over the expert's bucketed span, with the other experts' rows of the output gradient
    zeroed (`foreign_rows_zeroed`): their weight-gradient terms vanish and their
    input-gradient rows come out zero, to be rewritten by their own expert later (or, for a
    span reaching forward, not written at all). The hidden activations are saved per span (`[span, h]` each; the rows a
    bucketed span borrows from its neighbour are kept twice).

    With `compiled_loop` (float32 / bfloat16 on CPU) the same spans run in
    csrc/mlp_kernels.cpp, each group of experts on its own thread with single-threaded GEMMs
    (an expert split across groups sums its weight gradients from float32 partials), their
    bf16 GEMMs by csrc/bf16_gemm.cpp with `native_gemm`; the Python loop below is the path
    without it (one group, never split) and computes the same products.
    """

    @staticmethod
    def forward(ctx, x_Md, w1, w2, w3, b1, b2, gemms: _ExpertGEMMs, activation: str,
                compiled_loop: ModuleType | None, native_gemm: bool):
        ctx.gemms, ctx.activation, ctx.has_bias = gemms, activation, (b1 is not None, b2 is not None)
        ctx.compiled_loop, ctx.native_gemm = compiled_loop, native_gemm
        schedule = gemms.schedule
        if compiled_loop is not None:  # the same spans, one group of experts per thread
            y, *saved = compiled_loop.mlp_forward(x_Md, w1, w2, w3, b1, b2, schedule.spans_tensor,
                                                  schedule.group_ptr, _ACTIVATION_CODES[activation], native_gemm)
            ctx.save_for_backward(x_Md, w1, w2, w3, *saved)
            return y
        # The hidden activations are kept per span, each a fresh `[span, h]` block, not as one
        # `[M, h]` tensor: blocks under glibc's mmap threshold (32 MiB at most) are reused from
        # the heap, where one `[M, h]` of 32 MiB or more is page-faulted in again every step.
        y = x_Md.new_empty(x_Md.shape[0], w2.shape[-1])
        saved = []
        for sp in schedule.spans:
            e = sp.expert
            x_e = x_Md[sp.gemm_rows]
            h = torch.mm(x_e, w1[e]) if b1 is None else torch.addmm(b1[e], x_e, w1[e])
            h3 = x_e @ w3[e] if w3 is not None else None
            a, t = _activate(h, h3, activation)
            block = _span_mm(a, w2[e], None if b2 is None else b2[e], y, sp)
            if sp.reaches_forward:
                y[sp.own_rows] = block[: sp.own_end - sp.own_start]
            saved += [a, None if t is a else t, h3]
        ctx.save_for_backward(x_Md, w1, w2, w3, *saved)
        return y

    @staticmethod
    def backward(ctx, g_y):
        x, w1, w2, w3, *saved = ctx.saved_tensors
        gemms, act = ctx.gemms, ctx.activation
        schedule = gemms.schedule
        g_y = g_y.contiguous()
        if ctx.compiled_loop is not None:
            g_x, g_w1, g_w2, g_w3, g_b1, g_b2 = ctx.compiled_loop.mlp_backward(
                g_y, x, w1, w2, w3, saved, *ctx.has_bias, ctx.needs_input_grad[0], schedule.spans_tensor,
                schedule.group_ptr, _ACTIVATION_CODES[act], ctx.native_gemm)
            return g_x, g_w1, g_w2, g_w3, g_b1, g_b2, None, None, None, None
        E, d, h = w1.shape

        g_w1, g_w2 = x.new_empty(E, d, h), x.new_empty(E, h, d)
        g_w3 = x.new_empty(E, d, h) if w3 is not None else None
        g_b1 = x.new_empty(E, h) if ctx.has_bias[0] else None
        g_b2 = x.new_empty(E, d) if ctx.has_bias[1] else None
        for out in (g_w1, g_w2, g_w3, g_b1, g_b2):
            if out is not None:
                gemms.zero_empty_experts(out)
        g_x = x.new_empty(x.shape) if ctx.needs_input_grad[0] else None
        scratch_h = x.new_empty(schedule.longest, h)
        for i, sp in enumerate(schedule.spans):
            e = sp.expert
            a, t, h3 = saved[3 * i : 3 * i + 3]
            t = a if t is None else t
            # Every product below runs on the whole (bucketed) span and stays exact: the other
            # experts' output-gradient rows are zero, so they add nothing to a weight gradient
            # and yield zero hidden gradients.
            with foreign_rows_zeroed(g_y, sp) as gy:
                g_a = torch.mm(gy, w2[e].t(), out=scratch_h[: sp.gemm_end - sp.gemm_start])
                torch.mm(a.t(), gy, out=g_w2[e])
                if g_b2 is not None:
                    torch.sum(gy, 0, out=g_b2[e])
            g_h, g_h3 = _act_backward_(g_a, t, h3, act)
            torch.mm(x[sp.gemm_rows].t(), g_h, out=g_w1[e])
            if g_b1 is not None:
                torch.sum(g_h, 0, out=g_b1[e])
            if g_h3 is not None:
                torch.mm(x[sp.gemm_rows].t(), g_h3, out=g_w3[e])
            if g_x is not None:
                g_x_rows = _span_mm(g_h, w1[e].t(), None, g_x, sp)
                if g_h3 is not None:
                    g_x_rows.addmm_(g_h3, w3[e].t())
                if sp.reaches_forward:
                    g_x[sp.own_rows] = g_x_rows[: sp.own_end - sp.own_start]
        return g_x, g_w1, g_w2, g_w3, g_b1, g_b2, None, None, None, None


def grouped_mlp(
    x_Md: Tensor,
    w1: Tensor,
    w2: Tensor,
    w3: Tensor | None,
    b1: Tensor | None,
    b2: Tensor | None,
    counts: list[int],
    method: str,
    activation: str,
    tuning: CPUTuning | None = None,
) -> Tensor:
    """Rows sorted by expert (`counts[e]` rows for expert e) through their experts: `[M, d]`.
    w1, w3 `[E, d, h]`, w2 `[E, h, d]`, b1 `[E, h]`, b2 `[E, d]`; `method` "loop" or "bmm"
    (layouts.py); `tuning` the choices of how (default: `current_tuning()`)."""
    tuning = tuning or current_tuning()
    layout = PaddedLayout(counts, x_Md.device) if method == "bmm" else None
    bucket = shape_bucket(tuning, x_Md.device, x_Md.dtype) if method == "loop" else 0
    if method == "loop" and use_fused_backward(tuning, x_Md.shape[0], len(counts), x_Md.shape[-1]):
        # With the compiled span loop, one group of experts per thread (see _SpanSchedule). Its own
        # bf16 GEMM (csrc/bf16_gemm.cpp) compiles nothing per shape: exact spans, no buckets.
        compiled_loop = compiled_span_loop(tuning, x_Md, w1, w2, w3, b1, b2)
        groups = expert_groups(tuning, sum(1 for c in counts if c)) if compiled_loop is not None else 1
        native_gemm = use_native_bf16_gemm(compiled_loop, x_Md, w1, tuning.bf16_gemm)
        schedule = _SpanSchedule(tuple(counts), 0 if native_gemm else bucket, groups, split=True,
                                 balance_max_blocks=tuning.balance_max_blocks, split_min_rows=tuning.split_min_rows)
        return _FusedMLP.apply(x_Md, w1, w2, w3, b1, b2, _ExpertGEMMs(method, schedule), activation,
                               compiled_loop, native_gemm)
    gemms = _ExpertGEMMs(method, _SpanSchedule(tuple(counts), bucket))
    a = _Up.apply(x_Md, w1, w3, b1, gemms, layout, activation)
    return _Down.apply(a, w2, b2, gemms, layout)
