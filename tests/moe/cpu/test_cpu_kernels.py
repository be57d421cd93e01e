"""The CPU kernel backend (moe/cpu/) against the core path it stands in for: the fused softmax
top-k router and ReLU kernels, the layer with `backend="cpu"` against `backend="core"`, and the
build machinery (a build keyed by its sources, the build lock).

Tolerances come from the arithmetic, not from one machine's run. Float32 sums are accumulated
in a different order by the kernels (AVX-512 lanes, blocks of rows) than by ATen, and that order
changes with the instruction set, so a kernel is never compared element by element with the
core path at a fixed tolerance. Instead both are compared with a float64 reference of the same
function on the same inputs, and the kernel's error must stay within twice the core path's own
error plus a few units of roundoff of the sums involved (`_assert_as_accurate`).
"""

from __future__ import annotations

import copy
import importlib
import math
import os
import shutil
import time
import warnings

import pytest
import torch
import torch.nn.functional as F

from moe_scale.moe.cpu import kernels

if not kernels.available():
    pytest.skip("the CPU kernel backend does not run here (needs an AVX-512 x86 CPU, a C++ compiler, no CUDA)",
                allow_module_level=True)

from moe_scale import MoELayer  # noqa: E402
from moe_scale.moe import routing  # noqa: E402

# The package re-exports a function of the same name: the module itself from sys.modules.
cpu_router = importlib.import_module("moe_scale.moe.cpu.router")

U32 = 2.0**-24  # unit roundoff of float32: one rounding moves a value by at most this, relatively
U_BF16 = 2.0**-8  # unit roundoff of bfloat16 (8 significant bits)


def _unit_roundoff(dtype: torch.dtype) -> float:
    return {torch.float32: U32, torch.bfloat16: U_BF16}[dtype]


def _error_norm(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.double() - ref).detach().norm())


def _assert_as_accurate(name: str, got: torch.Tensor, ref_got: torch.Tensor, core: torch.Tensor,
                        ref_core: torch.Tensor, terms: int) -> None:
    """`got` (kernel) is as close to its float64 reference as `core` is to its own, up to a factor
    of 2, plus float32 summation slack and one rounding to the output dtype.

    A sum of n float32 terms computed in any order is off by at most n * u32 * sum|terms| (and
    in practice by about sqrt(n) * u32 * |sum| with random signs); the results are then rounded
    to their dtype once (u_out relative). Measured in the 2-norm of the whole tensor: a wrong
    row, tile, tail or stride moves it by the size of the values themselves, far beyond this.
    """
    scale = float(ref_got.detach().norm())
    slack = (4 * math.sqrt(terms) * U32 + _unit_roundoff(got.dtype)) * scale
    err_got, err_core = _error_norm(got, ref_got), _error_norm(core, ref_core)
    assert err_got <= 2 * err_core + slack, (
        f"{name}: error {err_got:.3g} vs the core path's {err_core:.3g} (slack {slack:.3g}, norm {scale:.3g})")


# ----------------------------------------------------------------------------- the router


def _kernel_router(x, w, k, renormalize):
    out = cpu_router.fused_softmax_topk(x, w, k, renormalize)
    assert out is not None, "the fused router did not run"
    weight_N, index_Sk, prob_sum_E, lse_sq, top1_E = out
    return weight_N.view(k, x.shape[0]).t(), index_Sk, prob_sum_E, lse_sq, top1_E


def _core_router(x, w, k, renormalize):
    weight_Sk, index_Sk, prob_sum_E, lse_S = routing.softmax_topk(x, w, k, renormalize)
    return weight_Sk, index_Sk, prob_sum_E, (lse_S * lse_S).sum(), None


def _reference_router(index_Sk, renormalize):
    """The router's function in float64 with the experts chosen as `index_Sk` (the choice is
    not differentiable): each implementation is held to the reference of its own choice, so an
    exact or near tie that two implementations break differently is not an error."""

    def route(x, w, k, _renormalize):
        logits = x.double() @ w.double()
        prob = torch.softmax(logits, -1)
        top = prob.gather(1, index_Sk)
        weight = top / top.sum(-1, keepdim=True) if renormalize else top
        lse = torch.logsumexp(logits, -1)
        return weight, index_Sk, prob.sum(0), (lse * lse).sum(), None

    return route


def _run_router(route, x, w, k, renormalize, need=("x", "w")):
    """Outputs and the gradients of the inputs in `need` for fixed random output gradients."""
    x = x.detach().clone().requires_grad_("x" in need)
    w = w.detach().clone().requires_grad_("w" in need)
    weight, index, prob_sum, lse_sq, top1 = route(x, w, k, renormalize)
    gen = torch.Generator().manual_seed(1)
    g_weight = torch.randn(weight.shape, generator=gen, dtype=torch.float64)
    g_prob = torch.randn(prob_sum.shape, generator=gen, dtype=torch.float64)
    loss = (weight * g_weight.to(weight.dtype)).sum() + (prob_sum * g_prob.to(prob_sum.dtype)).sum() + 0.3 * lse_sq
    loss.backward()
    return dict(weight=weight, index=index, prob_sum=prob_sum, lse_sq=lse_sq, top1=top1, grad_x=x.grad,
                grad_w=w.grad)


def _logit_error_bound(x, w) -> torch.Tensor:
    """Per token, a bound on how far any implementation's logits may be from the exact ones:
    d * u32 * sum|x_i w_i| for a float32 dot product of d terms in any order, plus one rounding
    of the logit to the input dtype (bf16 logits are rounded as the core's bf16 GEMM rounds them)."""
    x64, w64 = x.double(), w.double()
    bound = x.shape[1] * U32 * (x64.abs() @ w64.abs())
    if x.dtype != torch.float32:
        bound = bound + _unit_roundoff(x.dtype) * (x64 @ w64).abs()
    return 2 * bound.amax(-1, keepdim=True)


def _check_router(x, w, k, renormalize, need=("x", "w"), expect_top1=None):
    S, d = x.shape
    E = w.shape[1]
    got = _run_router(_kernel_router, x, w, k, renormalize, need)
    core = _run_router(_core_router, x, w, k, renormalize, need)
    ref_got = _run_router(_reference_router(got["index"], renormalize), x, w, k, renormalize, need)
    ref_core = _run_router(_reference_router(core["index"], renormalize), x, w, k, renormalize, need)

    # The kernel's choices: k distinct experts, best first, each a true top-k logit within the
    # logits' own rounding.
    index = got["index"]
    assert index.dtype == torch.long and index.shape == (S, k)
    assert bool((index.sort(-1).values.diff(dim=-1) > 0).all()), "an expert chosen twice"
    logits = x.double() @ w.double()
    chosen, best = logits.gather(1, index), logits.topk(k, -1).values
    tol = _logit_error_bound(x, w)
    assert bool(((best - chosen).abs() <= tol).all()), "a choice is not among the k largest logits"
    assert bool((chosen[:, :-1] >= chosen[:, 1:] - tol).all()), "choices not best first"
    if expect_top1 is not None:
        assert (got["top1"] is not None) == expect_top1
    if got["top1"] is not None:
        assert got["top1"].dtype == torch.float32
        assert torch.equal(got["top1"], torch.bincount(index[:, 0], minlength=E).float())

    terms = max(S, d, E)
    for name in ("weight", "prob_sum", "lse_sq", "grad_x", "grad_w"):
        assert (got[name] is None) == (core[name] is None), name
        if got[name] is None:
            continue
        assert got[name].dtype == core[name].dtype and got[name].shape == core[name].shape, name
        _assert_as_accurate(name, got[name], ref_got[name], core[name], ref_core[name], terms)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_experts", [8, 100, 1024])
@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("recompute", [False, True], ids=["saved-probs", "recomputed-probs"])
def test_fused_router_is_as_accurate_as_the_core_router(dtype, num_experts, k, renormalize, recompute,
                                                        monkeypatch):
    """Up to 16 experts with k <= 2 the kernels run the router's GEMMs too; otherwise ATen's
    GEMM feeds them, and backward keeps the probabilities or recomputes them."""
    monkeypatch.setattr(cpu_router, "_RECOMPUTE_MIN_BYTES", 0 if recompute else 1 << 60)
    torch.manual_seed(num_experts + k)
    x = torch.randn(300, 32, dtype=dtype)
    w = torch.randn(32, num_experts, dtype=dtype)
    w[:, 5] = w[:, 3]  # exact ties between experts 3 and 5 in every row
    in_kernel = num_experts <= cpu_router._GEMM_IN_KERNEL_MAX_EXPERTS and k <= 2
    _check_router(x, w, k, renormalize, expect_top1=in_kernel)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("recompute", [False, True], ids=["saved-probs", "recomputed-probs"])
def test_fused_router_in_chunks(dtype, recompute, monkeypatch):
    """Several token chunks, a ragged last one, the weight gradient accumulated across them."""
    monkeypatch.setattr(cpu_router, "_RECOMPUTE_MIN_BYTES", 0 if recompute else 1 << 60)
    monkeypatch.setattr(cpu_router, "_CHUNK_ELEMENTS", 64 * 100)  # 64 tokens a chunk: 5 chunks
    assert len(cpu_router._token_chunks(300, 100)) == 5
    torch.manual_seed(5)
    _check_router(torch.randn(300, 32, dtype=dtype), torch.randn(32, 100, dtype=dtype), 2, True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d", [32, 37, 200])
@pytest.mark.parametrize("num_experts,k", [(1, 1), (5, 1), (5, 2), (16, 1), (16, 2)])
@pytest.mark.parametrize("need", [("x", "w"), ("x",), ("w",)], ids=["both", "x-only", "w-only"])
@pytest.mark.parametrize("gemm_in_kernel", [True, False], ids=["gemm-in-kernel", "aten-gemm"])
def test_router_with_few_experts(dtype, d, num_experts, k, need, gemm_in_kernel, monkeypatch):
    """With up to 16 experts the kernels run the router GEMMs themselves (VDPBF16PS pairs for
    bf16 with even d, float32 FMAs otherwise; d padded to whole vectors; a partial last block
    of 16 rows) and count the first choices; or ATen's GEMMs feed them."""
    if not gemm_in_kernel:
        monkeypatch.setattr(cpu_router, "_GEMM_IN_KERNEL_MAX_EXPERTS", 0)
    torch.manual_seed(d + num_experts + k)
    x = torch.randn(300, d, dtype=dtype)
    w = torch.randn(d, num_experts, dtype=dtype) / d**0.5
    if num_experts > 3:
        w[:, 3] = w[:, 1]  # exact ties between experts 1 and 3 in every row
    _check_router(x, w, k, True, need, expect_top1=gemm_in_kernel)


def test_router_gemm_in_kernel_rejects_what_it_does_not_take():
    ext = kernels.load_kernels()
    x = torch.randn(8, 4)
    with pytest.raises(RuntimeError, match="at most 16 experts"):
        ext.router_forward_gemm(x, torch.randn(4, 17), 2, True)
    with pytest.raises(RuntimeError, match="in x's dtype"):
        ext.router_forward_gemm(x, torch.randn(4, 8, dtype=torch.bfloat16), 2, True)
    with pytest.raises(RuntimeError, match="k in"):
        ext.router_forward_gemm(x, torch.randn(4, 8), 3, True)


def _router_forward(ext, logits, k, renormalize=False, keep_prob=True):
    C = logits.shape[0]
    prob = torch.empty_like(logits) if keep_prob else None
    weight, index, lse = torch.empty(C, k), torch.empty(C, k, dtype=torch.long), torch.empty(C)
    prob_sum = ext.router_forward(logits, prob, weight, index, lse, k, renormalize)
    return prob, weight, index, lse, prob_sum


@pytest.mark.parametrize("k", [1, 2, 3])
def test_fused_top_k_breaks_ties_to_the_lowest_index(k):
    """k <= 2 with few experts takes the 16-rows-at-once path, k = 3 the row path."""
    ext = kernels.load_kernels()
    logits = torch.tensor([[0.0, 2.0, 1.0, 2.0, 2.0, -1.0], [3.0, 3.0, 3.0, 3.0, 3.0, 3.0]])
    prob, weight, index, lse, prob_sum = _router_forward(ext, logits, k)
    assert index.tolist() == [[1, 3, 4][:k], [0, 1, 2][:k]]
    p = torch.softmax(logits.double(), -1)
    tol = dict(rtol=16 * U32, atol=0.0)  # a softmax over 6 terms: a few roundings
    torch.testing.assert_close(prob.double(), p, **tol)
    torch.testing.assert_close(weight.double(), p.gather(1, index), **tol)
    torch.testing.assert_close(lse.double(), torch.logsumexp(logits.double(), -1), **tol)
    torch.testing.assert_close(prob_sum.double(), p.sum(0), **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_experts", [2, 7, 64, 65])
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("rows", [1, 16, 37])
def test_fused_router_forward_equals_float64(dtype, num_experts, k, renormalize, rows):
    """The 16-rows-at-once path (up to 64 experts) and the row path (65) on given logits against
    float64: a partial last block of rows, renormalized and full-softmax weights.

    The logits are exact inputs, so the only errors are the kernel's float32 exp (a few ulps)
    and its sums over the E experts (E terms: at most E * u32 relatively) and over the rows."""
    ext = kernels.load_kernels()
    torch.manual_seed(num_experts * rows + k)
    logits = (3 * torch.randn(rows, num_experts)).to(dtype)
    prob, weight, index, lse, prob_sum = _router_forward(ext, logits, k, renormalize)
    ref = logits.double()
    p = torch.softmax(ref, -1)
    # the k largest logits (bf16 logits tie: torch.topk has no tie rule, the kernel takes the
    # lowest index, so compare the values and check the indices are distinct)
    assert torch.equal(ref.gather(1, index), torch.topk(ref, k, -1).values)
    assert k == 1 or bool((index[:, 0] != index[:, 1]).all())
    top = ref.gather(1, index)
    want_weight = torch.softmax(top, -1) if renormalize else p.gather(1, index)
    rel = 4 * (num_experts + rows + 8) * U32  # sums of E (and, for prob_sum, of rows) terms, exp's ulps
    torch.testing.assert_close(weight.double(), want_weight, rtol=rel, atol=0.0)
    # lse = max + log(sum): an absolute error of the sum's relative one, plus a rounding of |lse|
    lse_want = torch.logsumexp(ref, -1)
    torch.testing.assert_close(lse.double(), lse_want, rtol=4 * U32, atol=rel)
    torch.testing.assert_close(prob_sum.double(), p.sum(0), rtol=rel, atol=rel * rows * U32)
    if dtype == torch.float32:
        torch.testing.assert_close(prob.double(), p, rtol=rel, atol=0.0)
    else:  # the probabilities are written in the logits' dtype: one bf16 rounding more
        torch.testing.assert_close(prob.double(), p, rtol=U_BF16 + rel, atol=0.0)


def test_kernels_apply_to_cpu_float32_and_bfloat16_only(monkeypatch):
    monkeypatch.setattr(kernels, "load_kernels", lambda: "kernels")
    assert kernels.kernels_for(torch.zeros(2, 2)) == "kernels"
    assert kernels.kernels_for(torch.zeros(2, 2, dtype=torch.bfloat16)) == "kernels"
    assert kernels.kernels_for(torch.zeros(2, 2, dtype=torch.float64)) is None
    assert kernels.kernels_for(torch.zeros(2, 2, dtype=torch.float16)) is None
    assert kernels.kernels_for(torch.zeros(2, 2), torch.zeros(2, dtype=torch.float64)) is None  # every tensor
    assert cpu_router.fused_softmax_topk(torch.zeros(4, 2, dtype=torch.float64), torch.zeros(2, 3), 1, False) is None


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_relu_kernels_equal_aten_on_special_values(dtype):
    ext = kernels.load_kernels()
    x = _special_values(dtype)
    assert torch.isnan(x).sum() == 2 and torch.signbit(x[torch.isnan(x)]).tolist() == [False, True]
    got = x.clone()
    ext.relu_(got)
    assert _same(got, torch.relu(x))
    g = torch.randn(x.shape, dtype=torch.float32).to(dtype)
    for saved in (torch.relu(x), x):  # relu's output (what the layer saves) or its input
        got = g.clone()
        ext.relu_backward_(got, saved)
        assert _same(got, torch.ops.aten.threshold_backward(g, saved, 0))


def test_relu_kernels_reject_other_dtypes_and_layouts():
    ext = kernels.load_kernels()
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        ext.relu_(torch.zeros(4, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="contiguous"):
        ext.relu_(torch.zeros(4, 4).t())
    with pytest.raises(RuntimeError, match="match in shape and dtype"):
        ext.relu_backward_(torch.zeros(4), torch.zeros(5))


# ----------------------------------------------------------------------------- the layer


def _spy(layer: MoELayer) -> list[str]:
    """Record which of the backend's fused steps ran (returned a result) in each call."""
    ran: list[str] = []
    router_fused, expert_fused = layer.router.fused, layer.experts.fused

    def router(*args):
        out = router_fused(*args)
        ran.append("router" if out is not None else "router-fallback")
        return out

    def experts(*args):
        out = expert_fused(*args)
        ran.append("experts" if out is not None else "experts-fallback")
        return out

    layer.router.fused, layer.experts.fused = router, experts
    return ran


def _layer_case(num_experts: int, d: int, S: int, dtype: torch.dtype, seed: int = 0):
    """Inputs whose routing no rounding can change: the router weight is 8 times the identity
    on the first E features, so token s's logits are exactly 8 * x[s, :E] in every dtype and
    summation order (one nonzero product per sum), and those features are distinct multiples of
    1/4 in each row (no ties; gaps of 2 between logits). Every implementation, float64
    included, then routes and drops the same assignments, and the outputs differ only by the
    arithmetic of the experts and the combine."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(S, d, generator=gen)
    x[:, :num_experts] = torch.stack([torch.randperm(num_experts, generator=gen) for _ in range(S)]) * 0.25 \
        - num_experts / 8
    w_gate = torch.zeros(d, num_experts)
    w_gate[:num_experts] = 8 * torch.eye(num_experts)
    return x.to(dtype), w_gate, torch.randn(S, d, generator=gen).to(dtype)


def _layer_run(layer: MoELayer, x: torch.Tensor, g: torch.Tensor):
    layer.zero_grad()
    x = x.detach().clone().requires_grad_()
    y, stats = layer(x)
    torch.autograd.backward([y, stats.aux_loss], [g.to(y.dtype), None])
    grads = {"y": y, "grad_x": x.grad}
    grads.update({name: p.grad for name, p in layer.named_parameters()})
    return grads, stats


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dropless", [True, False], ids=["dropless", "capacity"])
@pytest.mark.parametrize("num_experts,d,d_hidden,activation", [(8, 32, 128, "relu"), (8, 32, 96, "swiglu"),
                                                              (128, 128, 32, "gelu")])
def test_layer_with_cpu_backend_is_as_accurate_as_the_core_layer(dtype, dropless, num_experts, d, d_hidden,
                                                                  activation):
    """`MoELayer(backend="cpu")` against `backend="core"` with the same weights: output and every
    gradient (input, router, experts) as close to the float64 core layer as the core layer is,
    dropless and with capacity drops; 8 experts take the compiled span loop (and the router's
    GEMMs in the kernel), 128 small experts the padded bmm layout."""
    torch.manual_seed(0)
    opts = dict(k=2, activation=activation, dropless=dropless, capacity_factor=1.0, d_hidden=d_hidden,
                aux_loss=dict(switch=0.01, z=0.001))
    core = MoELayer(d, num_experts, backend="core", **opts)
    cpu = MoELayer(d, num_experts, backend="cpu", **opts)
    assert core.backend.name == "core" and cpu.backend.name == "cpu"
    S = 256
    x, w_gate, g = _layer_case(num_experts, d, S, dtype)
    with torch.no_grad():
        core.router.w_gate.copy_(w_gate)
    cpu.load_state_dict(core.state_dict())
    exact = copy.deepcopy(core).double()
    core, cpu = core.to(dtype), cpu.to(dtype)
    ran = _spy(cpu)

    got, got_stats = _layer_run(cpu, x, g)
    want, want_stats = _layer_run(core, x, g)
    ref, ref_stats = _layer_run(exact, x.double(), g.double())
    assert ran == ["router", "experts"], ran
    for stats in (got_stats, want_stats):
        assert torch.equal(stats.tokens_per_expert_E, ref_stats.tokens_per_expert_E)
        assert torch.equal(stats.plan.kept_N, ref_stats.plan.kept_N)
        assert torch.equal(stats.plan.row_token_N, ref_stats.plan.row_token_N)
    assert (int(ref_stats.num_dropped) > 0) != dropless  # the case exercises drops
    terms = max(d, d_hidden, S)
    for name in ref:
        assert got[name].dtype == want[name].dtype and got[name].shape == want[name].shape, name
        _assert_as_accurate(name, got[name], ref[name], want[name], ref[name], terms)


def test_auto_backend_is_cpu_here_and_core_on_request():
    assert MoELayer(16, 4, backend="auto").backend.name == "cpu"
    layer = MoELayer(16, 4, backend="core")
    assert layer.backend.name == "core" and layer.router.fused is None and layer.experts.fused is None


def test_non_float_inputs_fall_back_to_the_core_path():
    """float64 tensors are not the kernels': the cpu layer runs the core path on them, silently."""
    layer = MoELayer(16, 4, backend="cpu").double()
    ran = _spy(layer)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer(torch.randn(8, 16, dtype=torch.float64))
    assert ran == ["router-fallback", "experts-fallback"]


def test_a_failed_build_warns_once_and_auto_layers_use_the_core_path(monkeypatch):
    from torch.utils import cpp_extension

    def no_compiler(**_):
        raise RuntimeError("no compiler here")

    kernels.load_kernels.cache_clear()
    monkeypatch.setattr(kernels, "_wait_for_lock", lambda build_dir: True)  # not about the lock
    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    try:
        with pytest.warns(UserWarning, match="CPU kernels unavailable"):
            assert not kernels.available()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # warned once, not on every call
            assert kernels.kernels_for(torch.zeros(2, 2)) is None
            assert MoELayer(16, 4, backend="auto").backend.name == "core"
    finally:
        kernels.load_kernels.cache_clear()


# ----------------------------------------------------------------------------- the build


@pytest.fixture
def csrc_copy(tmp_path, monkeypatch):
    """kernels.CSRC pointing at a copy of the sources."""
    copy_dir = tmp_path / "csrc"
    shutil.copytree(kernels.CSRC, copy_dir)
    monkeypatch.setattr(kernels, "CSRC", copy_dir)
    return copy_dir


def test_build_name_is_keyed_by_every_source(csrc_copy, monkeypatch):
    original = kernels.build_name()
    assert original.startswith("moe_scale_cpu_")
    names = {original}
    for source in sorted(csrc_copy.iterdir()):
        text = source.read_bytes()
        source.write_bytes(text + b"\n// an edit\n")
        names.add(kernels.build_name())
        source.write_bytes(text)
        assert kernels.build_name() == original  # the same sources, the same build
    assert len(names) == 1 + len(list(csrc_copy.iterdir()))  # every edited file, its own build
    (csrc_copy / "new_kernels.h").write_text("// a new header\n")
    assert kernels.build_name() not in names
    (csrc_copy / "new_kernels.h").unlink()
    monkeypatch.setattr(kernels, "cpu_flags", lambda: {"avx512f", "sse2"})  # another CPU
    assert kernels.build_name() != original


def _age(path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


@pytest.mark.timeout(60)  # a wait that never ends fails here, not at the suite's limit
def test_a_stale_lock_is_taken_over(tmp_path, monkeypatch):
    """A lock in a build folder where nothing changed for STALE_LOCK_SECONDS was left by a
    builder that died: it is removed at once."""
    monkeypatch.setattr(kernels, "STALE_LOCK_SECONDS", 5.0)
    lock = tmp_path / "lock"
    lock.touch()
    (tmp_path / "module.o").touch()
    _age(lock, 10.0)
    _age(tmp_path / "module.o", 10.0)
    started = time.monotonic()
    assert kernels._wait_for_lock(tmp_path)
    assert not lock.exists() and time.monotonic() - started < 1.0


@pytest.mark.timeout(60)
def test_an_old_lock_of_a_build_still_writing_is_not_taken_over(tmp_path, monkeypatch):
    """An old lock next to a fresh object file is a live (long) build: it is waited on."""
    monkeypatch.setattr(kernels, "STALE_LOCK_SECONDS", 5.0)
    monkeypatch.setattr(kernels, "LOCK_WAIT_SECONDS", 0.2)
    lock = tmp_path / "lock"
    lock.touch()
    _age(lock, 10.0)
    (tmp_path / "router_kernels.o").touch()
    assert not kernels._wait_for_lock(tmp_path)
    assert lock.exists()


@pytest.mark.timeout(60)  # a wait that never ends fails here, not at the suite's limit
def test_a_live_lock_is_waited_on_then_given_up_with_a_warning(tmp_path, monkeypatch):
    """A fresh lock (a live build elsewhere) is waited on for LOCK_WAIT_SECONDS; then the
    kernels are not loaded, with a warning, the layer runs the core path and the lock is left
    to its owner."""
    from torch.utils import cpp_extension

    monkeypatch.setattr(kernels, "LOCK_WAIT_SECONDS", 0.2)
    monkeypatch.setattr(kernels, "STALE_LOCK_SECONDS", 3600.0)
    lock = tmp_path / "lock"
    lock.touch()
    started = time.monotonic()
    assert not kernels._wait_for_lock(tmp_path)
    assert lock.exists() and time.monotonic() - started >= 0.2

    monkeypatch.setattr(cpp_extension, "_get_build_directory", lambda name, verbose: str(tmp_path))
    kernels.load_kernels.cache_clear()
    try:
        with pytest.warns(UserWarning, match="stays locked by another process"):
            assert kernels.load_kernels() is None
        assert lock.exists()
    finally:
        kernels.load_kernels.cache_clear()


@pytest.mark.timeout(60)  # a wait that never ends fails here, not at the suite's limit
def test_a_lock_released_while_waiting_lets_the_build_go_on(tmp_path, monkeypatch):
    import threading

    monkeypatch.setattr(kernels, "LOCK_WAIT_SECONDS", 30.0)
    lock = tmp_path / "lock"
    lock.touch()
    release = threading.Timer(0.3, lock.unlink)
    release.start()
    try:
        started = time.monotonic()
        assert kernels._wait_for_lock(tmp_path)
        assert time.monotonic() - started < 10.0
    finally:
        release.cancel()
