"""The CPU backend's expert MLP (moe/cpu/grouped_mlp.py): its layouts, span schedules and the
compiled span loop equal a per-expert nn.Linear MLP in float64 / float32. The float64 cases
need no compiled kernels and run everywhere; `CPUTuning` pins the choices the layer would make
from the shapes and the machine."""

from __future__ import annotations

import pytest
import torch
import torch.utils._python_dispatch

from moe_scale.moe import GroupedExperts
from moe_scale.moe.cpu import CPUTuning, grouped_mlp, use_tuning
from moe_scale.moe.cpu.grouped_mlp import Span
from tests.moe.test_grouped_gemm import (
    _assert_expert_grads_match,
    _assert_matches_reference,
    _linear_reference,
    _run_reference,
)


def _span_mlp(experts: GroupedExperts, x, counts, method, tuning: CPUTuning | None = None):
    return grouped_mlp.grouped_mlp(x, *experts.weights(x.dtype), list(counts), method, experts.activation, tuning)


@pytest.mark.parametrize("counts", [[4, 0, 7, 1, 3], [2, 5, 0, 4]])
@pytest.mark.parametrize("method", ["loop", "bmm", "loop-bucketed", "loop-fused", "loop-bucketed-fused"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("activation", ["relu", "gelu", "swiglu"])
def test_grouped_experts_equal_per_expert_linear(activation, bias, method, counts):
    """loop-fused: the single-node MLP. loop-bucketed: the bf16-on-CPU shape bucketing forced on
    in float64 with a bucket of 3 rows: spans that reach back into lower experts, a first span
    that reaches forward, experts with a head and a tail, or a tail only (first counts); a first
    expert with a tail only, whose weight gradient looks ahead (second counts)."""
    torch.manual_seed(0)
    # fused: one node, backward expert by expert (many rows per expert)
    tuning = CPUTuning(fused_backward=method.endswith("fused"))
    method = method.removesuffix("-fused")
    if method == "loop-bucketed":
        tuning = CPUTuning(fused_backward=tuning.fused_backward, bucket_rows=True, row_bucket=3)
        method = "loop"
    experts = GroupedExperts(len(counts), 6, 10, activation=activation, bias=bias).double()
    mods = _linear_reference(experts)
    x = torch.randn(sum(counts), 6, dtype=torch.float64, requires_grad=True)
    up = torch.randn(sum(counts), 6, dtype=torch.float64)

    y = _span_mlp(experts, x, counts, method, tuning)
    ref = _run_reference(mods, activation, x, counts)
    _assert_matches_reference(y, ref, x, up, experts, mods)


class _CountGEMMs(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        gemms = (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_, torch.ops.aten.bmm, torch.ops.aten.baddbmm)
        if func.overloadpacket in gemms:
            self.calls += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("method", ["loop", "bmm", "loop-fused"])
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_backward_skips_the_input_gradient_gemms_when_the_input_needs_none(activation, method):
    """Only the weight gradients are computed for an input without requires_grad (as nn.Linear)."""
    tuning = CPUTuning(fused_backward=True) if method == "loop-fused" else None
    method = method.removesuffix("-fused")
    counts = [4, 0, 7, 1]
    experts = GroupedExperts(len(counts), 6, 10, activation=activation)
    calls = {}
    for needs_grad in (True, False):
        x = torch.randn(sum(counts), 6, requires_grad=needs_grad)
        y = _span_mlp(experts, x, counts, method, tuning)
        with _CountGEMMs() as counter:
            y.sum().backward()
        calls[needs_grad] = counter.calls
    per_expert_input_gemms = 2 if activation == "swiglu" else 1
    groups = 1 if method == "bmm" else sum(c > 0 for c in counts)
    assert calls[True] - calls[False] == per_expert_input_gemms * groups


def test_bucketed_spans_use_few_row_counts_and_cover_every_row_once():
    counts = (130, 0, 64, 1, 200, 63, 129)
    schedule = grouped_mlp._SpanSchedule(counts, bucket=64)
    # Row-wise products: every span's GEMMs run over a multiple of 64 rows that holds its
    # expert's rows; they end where those rows end and run from the last expert to the first,
    # except the first span, which cannot reach back and reaches forward instead.
    ends = torch.cumsum(torch.tensor(counts), 0).tolist()
    assert [sp.expert for sp in schedule.spans] == [6, 5, 4, 3, 2, 0]
    for sp in schedule.spans:
        assert (sp.own_start, sp.own_end) == (ends[sp.expert] - counts[sp.expert], ends[sp.expert])
        assert (sp.gemm_end - sp.gemm_start) % 64 == 0
        assert sp.gemm_start <= sp.own_start < sp.own_end <= sp.gemm_end <= sum(counts)
        assert sp.gemm_end == sp.own_end or sp == Span(0, 0, 192, 0, 130)
    assert grouped_mlp._SpanSchedule((5, 0, 7), bucket=64).spans == [Span(2, 5, 12, 5, 12), Span(0, 0, 5, 0, 5)]
    # Sums over rows (weight gradients) count each expert's own rows: each row exactly once.
    covered = sorted(row for sp in schedule.spans for row in range(sp.own_start, sp.own_end))
    assert covered == list(range(sum(counts)))


def test_foreign_rows_zeroed_zeroes_the_rows_of_other_experts_and_restores_them():
    g = torch.arange(1.0, 9.0)[:, None]
    with grouped_mlp.foreign_rows_zeroed(g, Span(0, gemm_start=1, gemm_end=7, own_start=3, own_end=5)) as rows:
        assert rows.flatten().tolist() == [0.0, 0.0, 4.0, 5.0, 0.0, 0.0]
        assert rows.data_ptr() == g[1:7].data_ptr()
    assert g.flatten().tolist() == list(range(1, 9))
    with grouped_mlp.foreign_rows_zeroed(g, Span(0, 2, 4, 2, 4)) as rows:
        assert rows.data_ptr() == g[2:4].data_ptr()
    with pytest.raises(KeyError), grouped_mlp.foreign_rows_zeroed(g, Span(0, 0, 4, 2, 4)):
        raise KeyError  # restored on the way out of an error too
    assert g.flatten().tolist() == list(range(1, 9))


@pytest.mark.parametrize("counts", [(4, 0, 7, 1, 3, 9, 2), (2, 5, 0, 4)])
@pytest.mark.parametrize("groups", [1, 2, 3, "2-split", "3-split"])
@pytest.mark.parametrize("bucket", [0, 3])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("activation", ["relu", "gelu", "swiglu"])
def test_expert_parallel_span_loop_equals_per_expert_linear(activation, bias, bucket, groups, counts):
    """csrc/mlp_kernels.cpp runs groups of experts on threads of their own. In float32 against
    the float64 per-expert reference, with groups that start with a span reaching forward
    (bucket 3), one group (the calling thread alone), more groups than threads, and ("-split")
    exact spans evened out by splitting experts across groups (their weight gradients summed
    from partials); `span_loop="compiled"` makes sure the compiled loop runs."""
    if grouped_mlp.kernels_for(torch.zeros(1)) is None:
        pytest.skip("the fused CPU kernels are not built here")
    split = isinstance(groups, str)
    if split:
        if bucket:
            pytest.skip("bucketed spans are never split")
        groups = int(groups[0])
        counts = (sum(counts), *counts[1:])  # one expert too large for any partition to even out
        assert grouped_mlp._SpanSchedule(counts, 0, groups, split=True, split_min_rows=0).num_parts >= 2
    tuning = CPUTuning(fused_backward=True, expert_groups=groups, span_loop="compiled", bucket_rows=bucket > 0,
                       row_bucket=bucket or CPUTuning.row_bucket,
                       split_min_rows=0 if split else CPUTuning.split_min_rows)
    torch.manual_seed(0)
    counts = list(counts)
    experts = GroupedExperts(len(counts), 6, 10, activation=activation, bias=bias)
    ref_experts = GroupedExperts(len(counts), 6, 10, activation=activation, bias=bias).double()
    ref_experts.load_state_dict(experts.state_dict())
    mods = _linear_reference(ref_experts)
    x = torch.randn(sum(counts), 6, requires_grad=True)
    x64 = x.detach().double().requires_grad_()
    up = torch.randn(sum(counts), 6)

    y = _span_mlp(experts, x, counts, "loop", tuning)
    assert (y.grad_fn.gemms.schedule.num_parts >= 2) == split  # the tuning reached the schedule
    ref = _run_reference(mods, activation, x64, counts)
    (y * up).sum().backward()
    (ref * up.double()).sum().backward()
    tol = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y.double(), ref, **tol)
    torch.testing.assert_close(x.grad.double(), x64.grad, **tol)
    _assert_expert_grads_match(experts, mods, **tol)


def test_expert_groups_follow_the_threads_unless_experts_are_fewer(monkeypatch):
    monkeypatch.setattr(grouped_mlp.torch, "get_num_threads", lambda: 8)
    default = CPUTuning()
    assert grouped_mlp.expert_groups(default, 64) == 8
    assert grouped_mlp.expert_groups(default, 8) == 8
    assert grouped_mlp.expert_groups(default, 7) == 1  # 7 experts on 8 threads: one group, GEMMs on every thread
    assert grouped_mlp.expert_groups(CPUTuning(expert_groups=3), 7) == 3


def test_grouped_spans_stay_inside_their_group():
    counts = (130, 0, 64, 1, 200, 63, 129, 5)
    schedule = grouped_mlp._SpanSchedule(counts, bucket=64, groups=3)
    ends = torch.cumsum(torch.tensor(counts), 0).tolist()
    assert schedule.group_ptr[0] == 0 and schedule.group_ptr[-1] == len(schedule.spans) == 7
    rows_seen = []
    for g in range(len(schedule.group_ptr) - 1):
        spans = schedule.spans[schedule.group_ptr[g] : schedule.group_ptr[g + 1]]
        first, last = min(sp.own_start for sp in spans), max(sp.own_end for sp in spans)
        experts = [sp.expert for sp in spans]
        assert experts == sorted(experts, reverse=True)  # last expert first
        for e, lo, hi, s, end in spans:
            assert (s, end) == (ends[e] - counts[e], ends[e])
            assert first <= lo <= s < end <= hi <= last  # groups share no rows
            assert (hi - lo) % 64 == 0 or (lo, hi) == (first, last)
        rows_seen += [(first, last)]
    assert rows_seen == sorted(rows_seen) and rows_seen[0][0] == 0 and rows_seen[-1][1] == sum(counts)
    assert all(a[1] == b[0] for a, b in zip(rows_seen, rows_seen[1:]))  # contiguous, no gaps
    # about a third of the rows each: no group holds more than a third plus its largest block
    sizes = [last - first for first, last in rows_seen]
    assert len(sizes) == 3 and max(sizes) <= sum(counts) / 3 + max(counts)


@pytest.mark.parametrize("groups", [2, 3])
def test_exact_spans_go_to_groups_of_balanced_rows(groups):
    """Without buckets a few dozen experts are split into groups of nearly equal rows (the
    groups run one per thread): with two groups the best split there is, found by brute force."""
    import itertools

    counts = (1081, 797, 1034, 0, 1085, 1058, 1063, 1053, 1021)
    schedule = grouped_mlp._SpanSchedule(counts, groups=groups)
    ends = torch.cumsum(torch.tensor(counts), 0).tolist()
    spans = schedule.spans
    assert sorted(sp.expert for sp in spans) == [e for e, c in enumerate(counts) if c]
    assert all(sp.is_exact and (sp.own_start, sp.own_end) == (ends[sp.expert] - counts[sp.expert], ends[sp.expert])
               for sp in spans)
    loads = [sum(sp.gemm_end - sp.gemm_start for sp in spans[a:b])
             for a, b in zip(schedule.group_ptr, schedule.group_ptr[1:])]
    assert len(loads) == groups and sum(loads) == sum(counts)
    rows = [c for c in counts if c]
    if groups == 2:
        best = min(max(sum(x), sum(rows) - sum(x)) for r in range(len(rows) + 1)
                   for x in itertools.combinations(rows, r))
        assert max(loads) == best
    else:  # 8 blocks of ~1000 rows in 3 groups: the heaviest holds 3 of them
        assert max(loads) <= 3 * max(rows)
        assert min(loads) >= 2 * min(rows)


def test_split_moves_the_excess_rows_and_never_leaves_an_empty_piece():
    groups, parts = grouped_mlp._split_to_balance([[(0, 0, 900)], [(1, 900, 1000)]], split_min_rows=0)
    assert groups == [[(0, 0, 500)], [(0, 500, 900), (1, 900, 1000)]] and parts == {(0, 0): 0, (0, 500): 1}
    # one-row blocks cannot give anything away: no split, no empty piece
    one_row = [[(0, 0, 1), (1, 1, 2), (2, 2, 3)], [(3, 3, 4)]]
    assert grouped_mlp._split_to_balance(one_row, split_min_rows=0) == (one_row, {})
    # 200 rows above the share: below the default threshold, the groups are left as they are
    uneven = [[(0, 0, 700)], [(1, 700, 1000)]]
    assert grouped_mlp._split_to_balance(uneven) == (uneven, {})
    assert grouped_mlp._split_to_balance(uneven, split_min_rows=0)[1] == {(0, 0): 0, (0, 500): 1}


def test_use_tuning_sets_the_tuning_of_the_block_it_runs():
    """`grouped_mlp` without a `tuning` runs with the current one; `use_tuning` changes it for
    its block only, nested blocks on top of the outer one's."""
    experts = GroupedExperts(3, 6, 10).double()
    x = torch.randn(9, 6, dtype=torch.float64)
    assert grouped_mlp.current_tuning() == CPUTuning()
    with use_tuning(fused_backward=True) as outer:
        assert type(_span_mlp(experts, x, [2, 3, 4], "loop").grad_fn).__name__ == "_FusedMLPBackward"
        with use_tuning(split_min_rows=0) as inner:
            assert inner == CPUTuning(fused_backward=True, split_min_rows=0)
        assert grouped_mlp.current_tuning() is outer
    assert grouped_mlp.current_tuning() == CPUTuning()
    assert type(_span_mlp(experts, x, [2, 3, 4], "loop").grad_fn).__name__ == "_DownBackward"  # 9 rows < E * d


def test_tuning_rejects_what_it_cannot_run():
    with pytest.raises(ValueError, match="span_loop must be one of"):
        CPUTuning(span_loop="fast")
    with pytest.raises(ValueError, match="row_bucket"):
        CPUTuning(row_bucket=0)
    with pytest.raises(TypeError, match="no_such_field"):
        with use_tuning(no_such_field=1):
            pass
    x = torch.randn(9, 6, dtype=torch.float64)  # float64: never the compiled loop's
    experts = GroupedExperts(3, 6, 10).double()
    with pytest.raises(RuntimeError, match="compiled span loop does not apply"):
        _span_mlp(experts, x, [2, 3, 4], "loop", CPUTuning(fused_backward=True, span_loop="compiled"))


def test_span_loop_errors_in_threads_reach_python():
    kernels = grouped_mlp.kernels_for(torch.zeros(1))
    if kernels is None:
        pytest.skip("the fused CPU kernels are not built here")
    schedule = grouped_mlp._SpanSchedule((4, 4, 4, 4), groups=2)
    x, w1 = torch.randn(16, 6), torch.randn(4, 6, 10)
    w2_wrong = torch.randn(4, 9, 6)  # inner dimension 9, not 10: every thread's GEMM fails
    with pytest.raises(RuntimeError, match="mat1 and mat2 shapes cannot be multiplied|size mismatch|shape"):
        kernels.mlp_forward(x, w1, w2_wrong, None, None, None, schedule.spans_tensor, schedule.group_ptr, 0, False)
    with pytest.raises(RuntimeError, match="group_ptr"):
        kernels.mlp_forward(x, w1, torch.randn(4, 10, 6), None, None, None, schedule.spans_tensor, [0, 1], 0, False)
