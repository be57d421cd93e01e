"""The CPU backend's own bfloat16 GEMM (moe/cpu/csrc/bf16_gemm.cpp, AVX512-BF16) against float64
products, edge tiles and fused epilogues included, and the span loop (moe/cpu/grouped_mlp.py)
with it against the span loop on ATen's GEMMs and the float64 per-expert reference.

Bounds come from the arithmetic: a product of k terms accumulated in float32 in any order is
off by at most k * u32 * sum|a_i w_i|, and its rounding to bfloat16 by at most u_bf16 = 2^-8
of the value (`_assert_within_bf16_rounding`); the span loop is held to the error of the same
loop on ATen's GEMMs against float64 (which differs from one instruction set to another).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from moe_scale.moe.cpu import CPUTuning, grouped_mlp, kernels

if not kernels.available():
    pytest.skip("the CPU kernel backend does not run here (needs an AVX-512 x86 CPU, a C++ compiler, no CUDA)",
                allow_module_level=True)

BF16 = torch.bfloat16
U32 = 2.0**-24  # unit roundoff of float32
U_BF16 = 2.0**-8  # unit roundoff of bfloat16 (8 significant bits)


def _native_kernels():
    ext = kernels.load_kernels()
    probe = torch.zeros(1, 2, 2, dtype=BF16)
    if not ext.can_run_native_bf16_gemm(probe[0], probe):
        pytest.skip("the native bf16 GEMM is not built for this CPU (needs AVX512-BF16)")
    return ext


def _assert_within_bf16_rounding(got: torch.Tensor, want: torch.Tensor, abs_terms: torch.Tensor, k: int) -> None:
    """Every element within one bf16 rounding of the float64 value plus the float32
    accumulation bound of its k-term sum (`abs_terms`: the sum of the terms' magnitudes, in
    float64): |got - want| <= u_bf16 * |want| + (1 + u_bf16) * 2k * u32 * abs_terms. A wrong
    tile, tail or stride is off by the size of the values themselves."""
    want = want.double()
    err = (got.double() - want).abs()
    bound = U_BF16 * want.abs() + (1 + U_BF16) * 2 * max(k, 1) * U32 * abs_terms + 1e-30
    bad = err > bound
    assert not bad.any(), f"{int(bad.sum())} of {bad.numel()} elements off, worst {float((err - bound).max()):.3g}"


# Row counts around the 6-row micro tile and the 48-row block, columns around the 64-column
# tile, reductions down to one pair.
SHAPES = [(1, 16, 2), (5, 64, 30), (6, 70, 128), (7, 130, 8), (13, 64, 128), (49, 200, 64), (100, 512, 128)]


@pytest.mark.parametrize("m,n,k", SHAPES)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("relu", [False, True])
def test_native_mm_equals_float64(m, n, k, bias, relu):
    ext = _native_kernels()
    torch.manual_seed(m * n + k)
    wide = torch.randn(m, k + 6, dtype=BF16)
    a = wide[:, 2 : k + 2]  # a row stride wider than the row
    w = torch.randn(k, n, dtype=BF16)
    b = torch.randn(n, dtype=BF16) if bias else None
    out = torch.full((m, n), 7.0, dtype=BF16)
    ext.bf16_mm(out, a, w, b, relu)
    want = a.double() @ w.double() + (b.double() if bias else 0)
    abs_terms = a.double().abs() @ w.double().abs() + (b.double().abs() if bias else 0)
    _assert_within_bf16_rounding(out, want.relu() if relu else want, abs_terms, k + bias)


@pytest.mark.parametrize("m,n,k", SHAPES)
@pytest.mark.parametrize("keep", [False, True])
@pytest.mark.parametrize("accumulate", [False, True])
def test_native_mm_t_equals_float64(m, n, k, keep, accumulate):
    ext = _native_kernels()
    torch.manual_seed(m + n * k)
    g = torch.randn(m, k, dtype=BF16)
    w = torch.randn(n, k, dtype=BF16)
    mask = torch.randn(m, n, dtype=BF16) if keep else None
    out = torch.randn(m, n, dtype=BF16)
    before = out.double()
    ext.bf16_mm_t(out, g, w, mask, accumulate)
    want = g.double() @ w.double().t() + (before if accumulate else 0)
    abs_terms = g.double().abs() @ w.double().abs().t() + (before.abs() if accumulate else 0)
    if keep:
        want = torch.where(mask.double() > 0, want, 0.0)
    _assert_within_bf16_rounding(out, want, abs_terms, k + accumulate)


@pytest.mark.parametrize("rows", [1, 2, 7, 64, 301])
@pytest.mark.parametrize("m,n", [(16, 64), (30, 130), (128, 512), (512, 128)])
def test_native_weight_gradient_equals_float64(rows, m, n):
    """u^T v summed over rows, an odd last row paired with zero."""
    ext = _native_kernels()
    torch.manual_seed(rows + m + n)
    u = torch.randn(rows, m, dtype=BF16)
    v = torch.randn(rows, n, dtype=BF16)
    out = torch.empty(m, n, dtype=BF16)
    ext.bf16_wgrad(out, u, v)
    _assert_within_bf16_rounding(out, u.double().t() @ v.double(), u.double().abs().t() @ v.double().abs(), rows)


def test_native_relu_and_its_backward_treat_nan_and_zero_as_aten_does():
    """ReLU keeps NaN; its backward keeps the gradient where the activation is > 0 or NaN and
    zeroes it at +0 and -0 (threshold_backward)."""
    ext = _native_kernels()
    a = torch.tensor([[1.0, 0.0]], dtype=BF16)
    w = torch.tensor([[float("nan"), -1.0, 2.0, 0.0], [0.0, 0.0, 0.0, 0.0]], dtype=BF16)
    out = torch.empty(1, 4, dtype=BF16)
    ext.bf16_mm(out, a, w, None, True)
    assert torch.equal(out.isnan(), torch.relu(a @ w).isnan())
    assert out[0, 1] == 0 and out[0, 2] == 2

    g = torch.ones(1, 2, dtype=BF16)
    w_t = torch.ones(6, 2, dtype=BF16)
    act = torch.tensor([[1.0, 0.0, -0.0, float("nan"), -3.0, 0.0]], dtype=BF16)
    act.view(torch.int16)[0, 5] = -64  # 0xFFC0: a NaN with the sign bit set
    assert act[0, 5].isnan()
    grad = torch.empty(1, 6, dtype=BF16)
    ext.bf16_mm_t(grad, g, w_t, act, False)
    want = torch.ops.aten.threshold_backward(g @ w_t.t(), act, 0)
    assert torch.equal(grad, want)


def test_native_products_reject_what_they_cannot_compute():
    ext = _native_kernels()
    with pytest.raises(RuntimeError, match="even k"):
        ext.bf16_mm(torch.empty(2, 4, dtype=BF16), torch.randn(2, 4, dtype=BF16)[:, :3],
                        torch.randn(3, 4, dtype=BF16), None, False)
    with pytest.raises(RuntimeError, match="bfloat16"):
        ext.bf16_wgrad(torch.empty(3, 4), torch.randn(5, 3), torch.randn(5, 4))
    with pytest.raises(RuntimeError, match=r"out \[m, n\]"):
        ext.bf16_mm_t(torch.empty(2, 3, dtype=BF16), torch.randn(2, 4, dtype=BF16),
                          torch.randn(5, 4, dtype=BF16), None, False)


def _mlp_grads(counts, activation, params, tuning: CPUTuning):
    """[y, then the gradients], and the fused node that ran (it records the native GEMM choice
    and the span schedule)."""
    x, w1, w2, w3, b1, b2, up = params
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, w1, w2, w3, b1, b2)]
    y = grouped_mlp.grouped_mlp(*leaves, counts, "loop", activation, tuning)
    node = y.grad_fn
    grads = torch.autograd.grad(y, [t for t in leaves if t is not None], up)
    return [y, *grads], node


def _reference(counts, activation, params):
    x, w1, w2, w3, b1, b2, up = params
    leaves = [t.detach().double().requires_grad_() if t is not None else None for t in (x, w1, w2, w3, b1, b2)]
    x64, w164, w264, w364, b164, b264 = leaves
    outs = []
    for e, x_e in enumerate(torch.split(x64, counts)):
        h = x_e @ w164[e] + (b164[e] if b164 is not None else 0)
        a = {"relu": F.relu, "gelu": F.gelu}[activation](h) if w364 is None else F.silu(h) * (x_e @ w364[e])
        outs.append(a @ w264[e] + (b264[e] if b264 is not None else 0))
    y = torch.cat(outs)
    grads = torch.autograd.grad(y, [t for t in leaves if t is not None], up.double())
    return [y, *grads]


@pytest.mark.parametrize("groups", [1, 2, 3, "2-split"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("activation", ["relu", "gelu", "swiglu"])
def test_span_loop_with_native_gemm_is_as_exact_as_aten(activation, bias, groups):
    """The expert MLP in bf16 with the native GEMM (exact spans, fused ReLU) and with ATen's
    (bucketed spans): each output and gradient as close to the float64 reference as ATen's,
    up to a factor of 1.25 and 2^-10 of its norm (a quarter of bf16's relative spacing: the
    two paths round their intermediate products at different points).
    "2-split": two groups made equal by splitting an expert across them, its weight gradients
    summed from float32 partials."""
    _native_kernels()
    split = groups == "2-split"
    groups = 2 if split else groups
    tuning = CPUTuning(fused_backward=True, expert_groups=groups, span_loop="compiled",
                       split_min_rows=0 if split else CPUTuning.split_min_rows)
    torch.manual_seed(groups)
    counts = [70, 0, 133, 1, 64, 97, 0, 12]
    E, d, h = len(counts), 32, 96
    params = [
        torch.randn(sum(counts), d, dtype=BF16),
        (torch.randn(E, d, h) / d**0.5).to(BF16),
        (torch.randn(E, h, d) / h**0.5).to(BF16),
        (torch.randn(E, d, h) / d**0.5).to(BF16) if activation == "swiglu" else None,
        torch.randn(E, h, dtype=BF16) if bias else None,
        torch.randn(E, d, dtype=BF16) if bias else None,
        torch.randn(sum(counts), d, dtype=BF16),
    ]
    native, native_node = _mlp_grads(counts, activation, params, replace(tuning, bf16_gemm="native"))
    aten, aten_node = _mlp_grads(counts, activation, params, replace(tuning, bf16_gemm="aten"))
    assert native_node.native_gemm and not aten_node.native_gemm
    assert (native_node.gemms.schedule.num_parts > 0) == split
    ref = _reference(counts, activation, params)
    for got, other, want in zip(native, aten, ref):
        err = (got.double() - want).norm() / want.norm()
        assert err <= 1.25 * (other.double() - want).norm() / want.norm() + 2**-10


def test_gemm_mode_comes_from_the_tuning_else_the_environment(monkeypatch):
    ext = _native_kernels()
    x, w1 = torch.zeros(4, 2, dtype=BF16), torch.zeros(3, 2, 2, dtype=BF16)
    monkeypatch.setenv(kernels.GEMM_ENV, "aten")
    assert not kernels.use_native_bf16_gemm(ext, x, w1)
    assert kernels.use_native_bf16_gemm(ext, x, w1, "native")
    monkeypatch.delenv(kernels.GEMM_ENV)
    assert kernels.use_native_bf16_gemm(ext, x, w1)
    assert not kernels.use_native_bf16_gemm(ext, x, w1, "aten")
    monkeypatch.setenv(kernels.GEMM_ENV, "onednn")
    with pytest.raises(ValueError, match="MOE_SCALE_BF16_GEMM must be one of"):
        kernels.use_native_bf16_gemm(object(), torch.zeros(1), torch.zeros(1))
