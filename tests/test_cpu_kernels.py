"""Fused CPU kernels (csrc/*.cpp) against the eager ATen code they replace: the router, the
combine / permute gathers and ReLU."""

import shutil
import warnings

import pytest
import torch

from moe_scale.moe import cpu_kernels
from moe_scale.moe import topk_softmax
from moe_scale.moe.topk_softmax import topk_softmax_router

needs_compiler = pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler to build the kernels")


def _route(x, w, k, renormalize, mode, monkeypatch):
    """Outputs and gradients of the router under MOE_SCALE_CPU_KERNELS=mode."""
    monkeypatch.setenv("MOE_SCALE_CPU_KERNELS", mode)
    x = x.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    weight, index, prob_sum, lse_sq, _ = topk_softmax_router(x, w, k, renormalize)
    gen = torch.Generator().manual_seed(1)
    g_weight = torch.randn(weight.shape, generator=gen)
    g_prob = torch.randn(prob_sum.shape, generator=gen)
    ((weight * g_weight).sum() + (prob_sum * g_prob).sum() + 0.3 * lse_sq).backward()
    return weight, index, prob_sum, lse_sq, x.grad, w.grad


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_experts", [8, 100, 1024])
@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("recompute", [False, True], ids=["saved-probs", "recomputed-probs"])
def test_fused_router_matches_eager(dtype, num_experts, k, renormalize, recompute, monkeypatch):
    assert cpu_kernels.load_kernels() is not None, "the fused CPU kernels failed to build"
    # recomputed: backward rebuilds the probabilities from the logits (large [S, E] only)
    monkeypatch.setattr(topk_softmax, "_RECOMPUTE_MIN_BYTES", 0 if recompute else 1 << 60)
    torch.manual_seed(num_experts + k)
    x = torch.randn(300, 32, dtype=dtype)
    w = torch.randn(32, num_experts, dtype=dtype)
    w[:, 5] = w[:, 3]  # exact ties between experts 3 and 5 in every row
    fused = _route(x, w, k, renormalize, "auto", monkeypatch)
    eager = _route(x, w, k, renormalize, "eager", monkeypatch)
    logits = (x @ w).float()
    if recompute and dtype == torch.bfloat16 and k <= 2:
        # The recomputed float32 probabilities are rounded differently from the saved bf16 ones
        # (a few gradient elements differ by more than bf16's spacing where terms cancel):
        # each gradient must be as close to the float64 router's as the eager one is.
        exact = _route(x.double(), w.double(), k, renormalize, "eager", monkeypatch)
        for got, want, ref in zip(fused[4:], eager[4:], exact[4:]):
            err = (got.double() - ref).norm() / ref.norm()
            assert err <= 1.1 * (want.double() - ref).norm() / ref.norm() + 1e-3
        fused, eager = fused[:4], eager[:4]
    if k <= 2:  # both break ties to the lowest index; eager uses torch.topk (no tie rule) for k > 2
        assert torch.equal(fused[1], eager[1])
    else:
        assert torch.equal(logits.gather(1, fused[1]), logits.gather(1, eager[1]))
        # the combine weights and every gradient follow the tie order (bf16 logits tie often);
        # the softmax sums do not
        fused, eager = fused[2:4], eager[2:4]
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-3)
    for got, want in zip(fused, eager):
        if got.dtype != torch.long:
            torch.testing.assert_close(got.float(), want.float(), **tol)


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("recompute", [False, True], ids=["saved-probs", "recomputed-probs"])
def test_fused_router_in_chunks_equals_one_chunk(dtype, recompute, monkeypatch):
    """The fused path over several token chunks (ragged last one): the same outputs and
    gradients as in one chunk, the weight gradient accumulated across chunks in float32."""
    monkeypatch.setattr(topk_softmax, "_RECOMPUTE_MIN_BYTES", 0 if recompute else 1 << 60)
    torch.manual_seed(5)
    x = torch.randn(300, 32, dtype=dtype)
    w = torch.randn(32, 16, dtype=dtype)
    whole = _route(x, w, 2, True, "auto", monkeypatch)
    monkeypatch.setattr(topk_softmax, "_FUSED_CHUNK_ELEMENTS", 64 * 16)  # 64 tokens a chunk: 5 chunks
    chunked = _route(x, w, 2, True, "auto", monkeypatch)
    # bf16: each chunk's weight-gradient part is rounded before the sum (where parts cancel,
    # single elements move by more than bf16's spacing): compared as a whole, by norm
    bound = 1e-5 if dtype == torch.float32 else 1e-2
    for got, want in zip(chunked, whole):
        if got.dtype == torch.long:
            assert torch.equal(got, want)
        else:
            assert (got.double() - want.double()).norm() <= bound * want.double().norm()


def _route_grads(x, w, k, renormalize, need=("x", "w")):
    """Router outputs, first-choice counts and the gradients of the inputs named in `need`."""
    x = x.detach().clone().requires_grad_("x" in need)
    w = w.detach().clone().requires_grad_("w" in need)
    weight, index, prob_sum, lse_sq, top1 = topk_softmax_router(x, w, k, renormalize)
    gen = torch.Generator().manual_seed(1)
    loss = (weight * torch.randn(weight.shape, generator=gen)).sum() + 0.3 * lse_sq
    loss = loss + (prob_sum * torch.randn(prob_sum.shape, generator=gen)).sum()
    loss.backward()
    return weight, index, prob_sum, lse_sq, top1, x.grad, w.grad


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d", [32, 37, 200])
@pytest.mark.parametrize("num_experts,k", [(1, 1), (5, 1), (5, 2), (16, 1), (16, 2)])
@pytest.mark.parametrize("need", [("x", "w"), ("x",), ("w",)], ids=["both", "x-only", "w-only"])
def test_router_gemm_in_kernel_matches_the_aten_gemms(dtype, d, num_experts, k, need, monkeypatch):
    """Up to 16 experts the fused kernels run the router GEMMs themselves (VDPBF16PS pairs for
    bf16 with even d, float32 FMAs otherwise; d padded to whole vectors; a partial last block
    of 16 rows): the same outputs and gradients as the kernels fed by ATen's GEMMs, the first
    choices counted as bincount counts them."""
    torch.manual_seed(d + num_experts + k)
    x = torch.randn(300, d, dtype=dtype)
    w = torch.randn(d, num_experts, dtype=dtype) / d**0.5
    if num_experts > 3:
        w[:, 3] = w[:, 1]  # exact ties between experts 1 and 3 in every row
    in_kernel = _route_grads(x, w, k, True, need)
    monkeypatch.setattr(topk_softmax, "_GEMM_IN_KERNEL_MAX_EXPERTS", 0)
    aten = _route_grads(x, w, k, True, need)
    assert aten[4] is None and in_kernel[4] is not None
    assert torch.equal(in_kernel[1], aten[1])
    assert torch.equal(in_kernel[4], torch.bincount(in_kernel[1][:, 0], minlength=num_experts).float())
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-3)
    for name, got, want in zip(["weight", "prob_sum", "lse_sq", "grad_x", "grad_w"],
                               [in_kernel[0], in_kernel[2], in_kernel[3], in_kernel[5], in_kernel[6]],
                               [aten[0], aten[2], aten[3], aten[5], aten[6]]):
        assert (got is None) == (want is None), name
        if got is not None:
            assert got.dtype == want.dtype, name
            torch.testing.assert_close(got.float(), want.float(), **tol, msg=name)


@needs_compiler
def test_router_gemm_in_kernel_rejects_what_it_does_not_take():
    kernels = cpu_kernels.load_kernels()
    x = torch.randn(8, 4)
    with pytest.raises(RuntimeError, match="at most 16 experts"):
        kernels.router_forward_gemm(x, torch.randn(4, 17), 2, True)
    with pytest.raises(RuntimeError, match="in x's dtype"):
        kernels.router_forward_gemm(x, torch.randn(4, 8, dtype=torch.bfloat16), 2, True)
    with pytest.raises(RuntimeError, match="k in"):
        kernels.router_forward_gemm(x, torch.randn(4, 8), 3, True)


def _router_forward(kernels, logits, k, renormalize=False, keep_prob=True):
    C = logits.shape[0]
    prob = torch.empty_like(logits) if keep_prob else None
    weight, index, lse = torch.empty(C, k), torch.empty(C, k, dtype=torch.long), torch.empty(C)
    prob_sum = kernels.router_forward(logits, prob, weight, index, lse, k, renormalize)
    return prob, weight, index, lse, prob_sum


@needs_compiler
@pytest.mark.parametrize("k", [1, 2, 3])
def test_fused_top_k_breaks_ties_to_the_lowest_index(k):
    """k <= 2 with few experts takes the 16-rows-at-once path, k = 3 the row path."""
    kernels = cpu_kernels.load_kernels()
    logits = torch.tensor([[0.0, 2.0, 1.0, 2.0, 2.0, -1.0], [3.0, 3.0, 3.0, 3.0, 3.0, 3.0]])
    prob, weight, index, lse, prob_sum = _router_forward(kernels, logits, k)
    assert index.tolist() == [[1, 3, 4][:k], [0, 1, 2][:k]]
    torch.testing.assert_close(prob, torch.softmax(logits, -1))
    torch.testing.assert_close(weight, torch.softmax(logits, -1).gather(1, index))
    torch.testing.assert_close(lse, torch.logsumexp(logits, -1))
    torch.testing.assert_close(prob_sum, torch.softmax(logits, -1).sum(0))


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_experts", [2, 7, 64, 65])
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("rows", [1, 16, 37])
def test_fused_router_forward_equals_float64(dtype, num_experts, k, renormalize, rows):
    """The 16-rows-at-once path (up to 64 experts) and the row path (65) against float64:
    a partial last block of rows, renormalized and full-softmax weights."""
    kernels = cpu_kernels.load_kernels()
    torch.manual_seed(num_experts * rows + k)
    logits = (3 * torch.randn(rows, num_experts)).to(dtype)
    prob, weight, index, lse, prob_sum = _router_forward(kernels, logits, k, renormalize)
    ref = logits.double()
    p = torch.softmax(ref, -1)
    # the k largest logits (bf16 logits tie: torch.topk has no tie rule, the kernel takes the
    # lowest index, so compare the values and check the indices are distinct)
    assert torch.equal(ref.gather(1, index), torch.topk(ref, k, -1).values)
    assert k == 1 or bool((index[:, 0] != index[:, 1]).all())
    top = ref.gather(1, index)
    want_weight = torch.softmax(top, -1) if renormalize else p.gather(1, index)
    tol = dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(weight.double(), want_weight, **tol)
    torch.testing.assert_close(lse.double(), torch.logsumexp(ref, -1), **tol)
    torch.testing.assert_close(prob_sum.double(), p.sum(0), **tol)
    prob_tol = tol if dtype == torch.float32 else dict(rtol=2**-8, atol=1e-6)
    torch.testing.assert_close(prob.double(), p, **prob_tol)


def test_eager_mode_does_not_use_the_kernels(monkeypatch):
    monkeypatch.setenv("MOE_SCALE_CPU_KERNELS", "eager")
    assert cpu_kernels.kernels_for(torch.zeros(2, 2)) is None


def test_unknown_kernel_mode_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("MOE_SCALE_CPU_KERNELS", "fast")
    with pytest.raises(ValueError, match="MOE_SCALE_CPU_KERNELS must be one of"):
        cpu_kernels.kernels_for(torch.zeros(2, 2))


def test_kernels_apply_to_cpu_float32_and_bfloat16_only(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "load_kernels", lambda: "kernels")
    assert cpu_kernels.kernels_for(torch.zeros(2, 2)) == "kernels"
    assert cpu_kernels.kernels_for(torch.zeros(2, 2, dtype=torch.bfloat16)) == "kernels"
    assert cpu_kernels.kernels_for(torch.zeros(2, 2, dtype=torch.float64)) is None
    assert cpu_kernels.kernels_for(torch.zeros(2, 2, dtype=torch.float16)) is None
    assert cpu_kernels.kernels_for(torch.zeros(2, 2), torch.zeros(2, dtype=torch.float64)) is None  # every tensor


def test_a_failed_build_warns_and_the_router_stays_eager(monkeypatch):
    from torch.utils import cpp_extension

    def no_compiler(**_):
        raise RuntimeError("no compiler here")

    cpu_kernels.load_kernels.cache_clear()
    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    try:
        with pytest.warns(UserWarning, match="fused CPU kernels unavailable"):
            assert cpu_kernels.kernels_for(torch.zeros(2, 2)) is None
        x, w = torch.randn(16, 8), torch.randn(8, 4)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # warned once, not on every call
            weight, index, *_ = topk_softmax_router(x, w, 2, True)
        assert torch.equal(index, torch.topk(x @ w, 2).indices)
    finally:
        cpu_kernels.load_kernels.cache_clear()


# ----------------------------------------------------------------------------- ReLU


def _special_values(dtype) -> torch.Tensor:
    nan = torch.tensor(float("nan"), dtype=dtype)
    # the x86 default NaN (what 0 * inf gives) has its sign bit set: 0xFFC0 / 0xFFC00000
    neg_nan = torch.tensor(-64, dtype=torch.int16).view(dtype) if dtype == torch.bfloat16 \
        else torch.tensor(-4194304, dtype=torch.int32).view(dtype)
    vals = torch.tensor([0.0, -0.0, 1.0, -1.0, float("inf"), float("-inf"), 1e-40, -1e-40, 3.5, -2.25], dtype=dtype)
    return torch.cat([vals, nan[None], neg_nan[None], torch.randn(4000, dtype=torch.float32).to(dtype)])


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal values, NaN where the other has NaN (the sign of zero is not compared)."""
    return torch.equal(torch.isnan(a), torch.isnan(b)) and torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0))


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_relu_kernels_equal_aten_on_special_values(dtype):
    kernels = cpu_kernels.load_kernels()
    x = _special_values(dtype)
    assert torch.isnan(x).sum() == 2 and torch.signbit(x[torch.isnan(x)]).tolist() == [False, True]
    got = x.clone()
    kernels.relu_(got)
    assert _same(got, torch.relu(x))
    g = torch.randn(x.shape, dtype=torch.float32).to(dtype)
    for saved in (torch.relu(x), x):  # relu's output (what the layer saves) or its input
        got = g.clone()
        kernels.relu_backward_(got, saved)
        assert _same(got, torch.ops.aten.threshold_backward(g, saved, 0))


@needs_compiler
def test_relu_kernels_reject_other_dtypes_and_layouts():
    kernels = cpu_kernels.load_kernels()
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        kernels.relu_(torch.zeros(4, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="contiguous"):
        kernels.relu_(torch.zeros(4, 4).t())
    with pytest.raises(RuntimeError, match="match in shape and dtype"):
        kernels.relu_backward_(torch.zeros(4), torch.zeros(5))


# ----------------------------------------------------------------------------- gathers


def _gather_case(dtype, k, S=300, d=24, drop_every=7, seed=0):
    gen = torch.Generator().manual_seed(seed)
    M = k * S - k * S // drop_every
    rows = torch.randn(M, d, generator=gen).to(dtype)
    pos = torch.full((k * S,), M, dtype=torch.long)  # M: dropped
    kept = torch.randperm(k * S, generator=gen)[:M]
    pos[kept] = torch.randperm(M, generator=gen)
    weight = torch.rand(k, S, generator=gen)
    return rows, pos.view(k, S), weight


def _gather_sum_float64(rows, pos, weight):
    M = rows.shape[0]
    w = torch.ones(pos.shape, dtype=torch.float64) if weight is None else weight.double()
    w = w * (pos < M)
    return sum(w[j, :, None] * rows.double()[pos[j].clamp(max=M - 1)] for j in range(pos.shape[0]))


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("weighted", [True, False])
def test_gather_sum_kernel_matches_float64_and_eager(dtype, k, weighted, monkeypatch):
    from moe_scale.moe.dispatch import _gather_sum

    rows, pos, weight = _gather_case(dtype, k)
    weight = weight if weighted else None
    got = cpu_kernels.load_kernels().gather_sum(rows, pos, weight)
    want = _gather_sum_float64(rows, pos, weight)
    assert got.dtype == dtype and got.shape == want.shape
    # float32 accumulation, one rounding to the output dtype
    rtol = 2**-8 if dtype == torch.bfloat16 else 1e-6
    torch.testing.assert_close(got.double(), want, rtol=rtol, atol=1e-6)
    monkeypatch.setenv("MOE_SCALE_CPU_KERNELS", "eager")
    eager = _gather_sum(rows, pos, weight)
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got.float(), eager.float(), **tol)
    if dtype == torch.float32:  # tokens with every assignment dropped come out exactly zero
        none_kept = (pos >= rows.shape[0]).all(0)
        assert none_kept.any() or k > 1
        assert torch.count_nonzero(got[none_kept]) == 0


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("need_rows", [True, False])
def test_unpermute_backward_kernel_matches_float64(dtype, need_rows):
    k, S, d = 2, 200, 40
    rows, pos, weight = _gather_case(dtype, k, S=S, d=d, seed=3)
    M = rows.shape[0]
    assignment = torch.nonzero(pos.reshape(-1) < M).squeeze(1)
    assignment = assignment[torch.argsort(pos.reshape(-1)[assignment])]  # row m holds assignment[m]
    token = assignment % S
    grad = torch.randn(S, d).to(dtype)
    grad_rows, grad_w = cpu_kernels.load_kernels().unpermute_backward(
        rows, grad, token, assignment, weight.reshape(-1), need_rows)
    g64 = grad.double()[token]
    want_w = torch.zeros(k * S, dtype=torch.float64)
    want_w[assignment] = (rows.double() * g64).sum(-1)
    torch.testing.assert_close(grad_w.double(), want_w, rtol=1e-5, atol=1e-5)
    dropped = torch.ones(k * S, dtype=torch.bool)
    dropped[assignment] = False
    assert torch.count_nonzero(grad_w[dropped]) == 0
    if need_rows:
        want_rows = weight.reshape(-1).double()[assignment, None] * g64
        rtol = 2**-8 if dtype == torch.bfloat16 else 1e-6
        torch.testing.assert_close(grad_rows.double(), want_rows, rtol=rtol, atol=1e-6)
    else:
        assert grad_rows.numel() == 0


@needs_compiler
def test_gather_kernels_reject_bad_arguments():
    kernels = cpu_kernels.load_kernels()
    rows, pos, weight = _gather_case(torch.float32, 2)
    with pytest.raises(RuntimeError, match="int64"):
        kernels.gather_sum(rows, pos.int(), weight)
    with pytest.raises(RuntimeError, match="float32 CPU tensor"):
        kernels.gather_sum(rows, pos, weight.double())
    with pytest.raises(RuntimeError, match="match pos in shape"):
        kernels.gather_sum(rows, pos, weight[:, :-1].contiguous())
    with pytest.raises(RuntimeError, match="dtype and row width"):
        kernels.unpermute_backward(rows, torch.zeros(300, 24, dtype=torch.bfloat16), pos[0], pos[0], weight.view(-1), True)


@needs_compiler
@pytest.mark.parametrize("num_keys", [1, 9, 4097])
def test_counting_sort_equals_stable_argsort_and_bincount(num_keys):
    kernels = cpu_kernels.load_kernels()
    torch.manual_seed(num_keys)
    key = torch.randint(0, num_keys, (5000,))
    key[:40] = num_keys - 1  # runs of equal keys: stability decides their order
    order, counts = kernels.sort_by_key(key, num_keys)
    assert torch.equal(order, torch.argsort(key, stable=True))
    assert torch.equal(counts, torch.bincount(key, minlength=num_keys))
    empty_order, empty_counts = kernels.sort_by_key(torch.zeros(0, dtype=torch.long), 3)
    assert empty_order.numel() == 0 and empty_counts.tolist() == [0, 0, 0]


@needs_compiler
def test_counting_sort_rejects_keys_out_of_range():
    kernels = cpu_kernels.load_kernels()
    with pytest.raises(RuntimeError, match=r"key 5 at 1 lies outside \[0, 5\)"):
        kernels.sort_by_key(torch.tensor([0, 5, 1]), 5)
    with pytest.raises(RuntimeError, match="int64"):
        kernels.sort_by_key(torch.tensor([0, 1], dtype=torch.int32), 5)


# ----------------------------------------------------------------------------- the layer


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dropless", [True, False])
def test_layer_with_kernels_matches_the_eager_layer(dtype, dropless, monkeypatch):
    """Router, gathers and ReLU through the kernels give the eager layer's output and gradients
    (within the eager path's own bf16 rounding)."""
    from moe_scale import MoELayer

    torch.manual_seed(0)
    layer = MoELayer(32, 8, k=2, activation="relu", dropless=dropless, capacity_factor=1.0,
                     aux_loss=dict(switch=0.01, z=0.001)).to(dtype)
    x = torch.randn(4, 64, 32, dtype=dtype)
    g = torch.randn(x.shape, dtype=dtype)
    runs = []
    for mode in ("auto", "eager"):
        monkeypatch.setenv("MOE_SCALE_CPU_KERNELS", mode)
        layer.zero_grad()
        xi = x.clone().requires_grad_()
        y, stats = layer(xi)
        torch.autograd.backward([y, stats.aux_loss], [g, None])
        runs.append([y, xi.grad] + [p.grad.clone() for p in layer.parameters()])
        assert (int(stats.num_dropped) > 0) != dropless
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
    for got, want in zip(*runs):
        torch.testing.assert_close(got.float(), want.float(), **tol)


@needs_compiler
@pytest.mark.parametrize("capacity", [None, 0, 3, 1000])
@pytest.mark.parametrize("withdrawn", [False, True])
def test_compiled_dispatch_plan_equals_the_eager_plan(capacity, withdrawn, monkeypatch):
    """csrc/dispatch_kernels.cpp's plan_by_position: every field of the plan as the eager sort,
    ranks and masks give it, with drops and withdrawn assignments (GShard's random 2nd expert)."""
    from moe_scale.moe.dispatch import plan_dispatch
    from moe_scale.moe.routing import Routing

    torch.manual_seed(3)
    S, k, E = 50, 2, 7
    routing = Routing(
        token_idx_N=torch.arange(S).repeat(k),
        expert_idx_N=torch.randint(0, E, (k * S,)),
        weight_N=torch.rand(k * S),
        num_tokens=S,
        num_experts=E,
        num_slots=k,
        valid_N=torch.rand(k * S) < 0.7 if withdrawn else None,
    )
    plans = {}
    for mode in ("auto", "eager"):
        monkeypatch.setenv("MOE_SCALE_CPU_KERNELS", mode)
        plans[mode] = plan_dispatch(routing, capacity, "position")
    fused, eager = plans["auto"], plans["eager"]
    for name in ("token_idx_M", "weight_M", "assignment_M", "counts_E", "routed_E", "num_dropped", "pos_kS",
                 "weight_kS"):
        assert torch.equal(getattr(fused, name), getattr(eager, name)), name
    assert fused.capacity == eager.capacity
    if capacity == 3:
        assert int(fused.num_dropped) > 0  # the case exercises drops
