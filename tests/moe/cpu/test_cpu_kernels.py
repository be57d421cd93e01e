"""The CPU kernel backend (moe/cpu/) against the core path it stands in for: the ReLU kernels,
the layer with `backend="cpu"` against `backend="core"`, and the build machinery (a build keyed
by its sources, the build lock).

Tolerances come from the arithmetic, not from one machine's run. Float32 sums are accumulated
in a different order by the kernels (AVX-512 lanes, blocks of rows) than by ATen, and that order
changes with the instruction set, so a kernel is never compared element by element with the
core path at a fixed tolerance. Instead both are compared with a float64 reference of the same
function on the same inputs, and the kernel's error must stay within twice the core path's own
error plus a few units of roundoff of the sums involved (`_assert_as_accurate`).
"""

from __future__ import annotations

import copy
import math
import os
import shutil
import time
import warnings

import pytest
import torch

from moe_scale.moe.cpu import kernels

if not kernels.available():
    pytest.skip("the CPU kernel backend does not run here (needs an AVX-512 x86 CPU, a C++ compiler, no CUDA)",
                allow_module_level=True)

from moe_scale import MoELayer  # noqa: E402

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


def test_kernels_apply_to_cpu_float32_and_bfloat16_only(monkeypatch):
    monkeypatch.setattr(kernels, "load_kernels", lambda: "kernels")
    assert kernels.kernels_for(torch.zeros(2, 2)) == "kernels"
    assert kernels.kernels_for(torch.zeros(2, 2, dtype=torch.bfloat16)) == "kernels"
    assert kernels.kernels_for(torch.zeros(2, 2, dtype=torch.float64)) is None
    assert kernels.kernels_for(torch.zeros(2, 2, dtype=torch.float16)) is None
    assert kernels.kernels_for(torch.zeros(2, 2), torch.zeros(2, dtype=torch.float64)) is None  # every tensor


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
    """Record whether the backend's fused expert MLP ran (returned a result) in each call."""
    ran: list[str] = []
    expert_fused = layer.experts.fused

    def experts(*args):
        out = expert_fused(*args)
        ran.append("experts" if out is not None else "experts-fallback")
        return out

    layer.experts.fused = experts
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
    dropless and with capacity drops; 8 experts take the compiled span loop, 128 small experts
    the padded bmm layout."""
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
    assert ran == ["experts"], ran
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
    assert layer.backend.name == "core" and layer.experts.fused is None


def test_non_float_inputs_fall_back_to_the_core_path():
    """float64 tensors are not the kernels': the cpu layer runs the core path on them, silently."""
    layer = MoELayer(16, 4, backend="cpu").double()
    ran = _spy(layer)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer(torch.randn(8, 16, dtype=torch.float64))
    assert ran == ["experts-fallback"]


def test_a_failed_build_warns_once_and_auto_layers_use_the_core_path(monkeypatch):
    from torch.utils import cpp_extension

    def no_compiler(**_):
        raise RuntimeError("no compiler here")

    kernels.load_kernels.cache_clear()
    monkeypatch.setattr(kernels, "_wait_for_lock", lambda build_dir, wait: True)  # not about the lock
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
def test_a_stale_lock_is_taken_over(tmp_path):
    """A lock in a build folder where nothing changed for `stale_after_seconds` was left by a
    builder that died: it is removed at once."""
    lock = tmp_path / "lock"
    lock.touch()
    (tmp_path / "module.o").touch()
    _age(lock, 10.0)
    _age(tmp_path / "module.o", 10.0)
    started = time.monotonic()
    assert kernels._wait_for_lock(tmp_path, kernels.BuildWait(stale_after_seconds=5.0))
    assert not lock.exists() and time.monotonic() - started < 1.0


@pytest.mark.timeout(60)
def test_an_old_lock_of_a_build_still_writing_is_not_taken_over(tmp_path):
    """An old lock next to a fresh object file is a live (long) build: it is waited on."""
    lock = tmp_path / "lock"
    lock.touch()
    _age(lock, 10.0)
    (tmp_path / "mlp_kernels.o").touch()
    assert not kernels._wait_for_lock(tmp_path, kernels.BuildWait(max_wait_seconds=0.2, stale_after_seconds=5.0))
    assert lock.exists()


@pytest.mark.timeout(60)  # a wait that never ends fails here, not at the suite's limit
def test_a_live_lock_is_waited_on_then_given_up_with_a_warning(tmp_path, monkeypatch):
    """A fresh lock (a live build elsewhere) is waited on for `max_wait_seconds`; then the
    kernels are not loaded, with a warning, the layer runs the core path and the lock is left
    to its owner."""
    from torch.utils import cpp_extension

    wait = kernels.BuildWait(max_wait_seconds=0.2, stale_after_seconds=3600.0)
    lock = tmp_path / "lock"
    lock.touch()
    started = time.monotonic()
    assert not kernels._wait_for_lock(tmp_path, wait)
    assert lock.exists() and time.monotonic() - started >= 0.2

    monkeypatch.setattr(cpp_extension, "_get_build_directory", lambda name, verbose: str(tmp_path))
    with pytest.warns(UserWarning, match="stays locked by another process"):
        assert kernels.build_and_load(wait) is None
    assert lock.exists()


@pytest.mark.timeout(60)  # a wait that never ends fails here, not at the suite's limit
def test_a_lock_released_while_waiting_lets_the_build_go_on(tmp_path):
    import threading

    lock = tmp_path / "lock"
    lock.touch()
    release = threading.Timer(0.3, lock.unlink)
    release.start()
    try:
        started = time.monotonic()
        assert kernels._wait_for_lock(tmp_path, kernels.BuildWait(max_wait_seconds=30.0))
        assert time.monotonic() - started < 10.0
    finally:
        release.cancel()
