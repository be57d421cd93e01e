"""The layer's device path, proved without a GPU.

- `meta`: every op that reads tensor data (`.item()`, `.tolist()`, `bool(t)`, `bincount`,
  `nonzero`, boolean-mask indexing: each a host sync on a GPU) fails on the meta device, so a
  forward + backward there shows the layer reads none, for every router, dropless and capped.
- `torch.compile(fullgraph=True)`: no graph break, same outputs and gradients as eager.
- Host reads counted on real tensors: none at EP=1, exactly one per all-to-all (the split
  sizes) under expert parallelism on gloo ranks, forward and backward together.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from moe_scale.distributed.launch import run_local
from moe_scale.distributed.mesh import build_mesh
from moe_scale.distributed.parallelize import parallelize
from moe_scale.moe import MoELayer

D, E, H = 16, 8, 32  # 16-byte rows in bf16 and float32: the grouped GEMM's rules hold

# router -> options (aux losses where the router defines them)
ROUTER_CASES = {
    "topk": dict(router="topk", k=2, aux_loss=dict(switch=0.01, z=0.001, importance=0.1)),
    "switch": dict(router="switch", k=1, aux_loss=dict(switch=0.01, z=0.001)),
    "noisy_topk": dict(router="noisy_topk", k=2, aux_loss=dict(importance=0.1, load=0.1)),
    "expert_choice": dict(router="expert_choice", k=2, aux_loss=dict(z=0.001)),
    "hash": dict(router="hash", k=1),
    "hierarchical": dict(router="hierarchical", k=1, hierarchical_groups=2, hierarchical_k_groups=2,
                         aux_loss=dict(importance=0.1, load=0.1)),
    "min_loss": dict(router="min_loss", k=1),
}
CASES = [(name, dropless) for name in ROUTER_CASES for dropless in (False, True)
         if not (name == "expert_choice" and dropless)]
IDS = [f"{name}-{'dropless' if dropless else 'capacity'}" for name, dropless in CASES]


def _layer(name: str, dropless: bool, **extra) -> MoELayer:
    options = dict(ROUTER_CASES[name], dropless=dropless, d_hidden=H, backend="core", **extra)
    if not dropless:
        options.update(capacity_factor=0.75, min_capacity=1)  # some assignments are dropped
    layer = MoELayer(D, E, **options)
    if not any(p.is_meta for p in layer.parameters()):
        with torch.no_grad():
            for p in layer.router.parameters():  # the noisy gates start at zero
                p.normal_(0.0, 0.5)
    return layer


def _inputs(name: str, device: str, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 12, D, generator=g).to(device=device, dtype=dtype)
    extra = {}
    if name == "min_loss":
        extra["expert_losses"] = torch.rand(2, 12, E, generator=g).to(device)
    if name == "hash":
        extra["token_ids"] = torch.randint(0, 1000, (2, 12), generator=g).to(device)
    return x, extra


def _loss(y, stats):
    return y.float().pow(2).mean() + stats.aux_loss


@pytest.mark.parametrize("name,dropless", CASES, ids=IDS)
def test_forward_and_backward_run_on_meta(name, dropless):
    with torch.device("meta"):
        layer = _layer(name, dropless).to(torch.bfloat16).train()
    x, extra = _inputs(name, "meta", torch.bfloat16)
    x.requires_grad_()
    y, stats = layer(x, **extra)
    _loss(y, stats).backward()
    assert y.shape == x.shape and y.is_meta and x.grad.is_meta
    assert all(p.grad is not None for n, p in layer.named_parameters() if "noise" not in n or name == "noisy_topk")
    # every statistic the trainer logs is a device tensor too
    for value in (stats.tokens_per_expert_E, stats.num_dropped, stats.num_unrouted, stats.dropped_fraction,
                  *stats.aux_losses.values()):
        assert value.is_meta


def test_meta_catches_a_host_read():
    """Control: the meta device does refuse the ops the layer must not use."""
    t = torch.zeros(4, dtype=torch.long, device="meta")
    for read in (lambda: t.tolist(), lambda: t.sum().item(), lambda: bool(t.any()), lambda: torch.bincount(t),
                 lambda: t.nonzero()):
        with pytest.raises((NotImplementedError, RuntimeError)):
            read()


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name,dropless", CASES, ids=IDS)
def test_compiled_layer_matches_eager(name, dropless):
    """bf16 on CPU (the grouped GEMM compiles in bf16). Eval mode for the noisy gates (their
    noise comes from another generator when compiled); training mode for the others."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = _layer(name, dropless).to(torch.bfloat16).train(name not in ("noisy_topk", "hierarchical"))
    x, extra = _inputs(name, "cpu", torch.bfloat16)

    def step(x, **kw):
        y, stats = layer(x, **kw)
        return y, stats.aux_loss

    compiled = torch.compile(step, fullgraph=True)
    results = []
    for fn in (step, compiled):
        layer.zero_grad()
        xi = x.clone().requires_grad_()
        y, aux = fn(xi, **extra)
        (y.float().pow(2).mean() + aux).backward()
        grads = [xi.grad] + [p.grad for p in layer.parameters() if p.grad is not None]
        results.append((y, aux, grads))
    (y0, a0, g0), (y1, a1, g1) = results
    # bf16 rounding: the compiled graph fuses and orders some sums differently, so allow a
    # few bf16 ulps of the largest value; a routing or dispatch error is O(1) off.
    ulp = torch.finfo(torch.bfloat16).eps

    def close(a, b):
        return (a.float() - b.float()).abs().max().item() <= 8 * ulp * (b.float().abs().max().item() + 1e-3)

    assert close(y1, y0)
    assert close(a1, a0)
    assert len(g0) == len(g1) and all(close(a, b) for a, b in zip(g1, g0))


class _CountHostReads(TorchDispatchMode):
    """Counts the reads of tensor data by the host: `aten._local_scalar_dense` (item, bool, int,
    float), ops whose output size depends on the data, and `Tensor.tolist` (which reads CPU
    tensors without dispatching)."""

    DATA_DEPENDENT = {"nonzero", "bincount", "masked_select", "unique", "_unique2", "repeat_interleave"}

    def __init__(self):
        super().__init__()
        self.reads: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name == "_local_scalar_dense" or name in self.DATA_DEPENDENT and not (
                name == "repeat_interleave" and kwargs.get("output_size") is not None):
            self.reads.append(name)
        if name == "index" and any(t is not None and t.dtype == torch.bool for t in args[1]):
            self.reads.append("boolean-mask index")
        return func(*args, **kwargs)


@contextlib.contextmanager
def count_host_reads():
    counter = _CountHostReads()
    real_tolist = torch.Tensor.tolist

    def tolist(self):
        counter.reads.append("tolist")
        return real_tolist(self)

    torch.Tensor.tolist = tolist
    try:
        with counter:
            yield counter.reads
    finally:
        torch.Tensor.tolist = real_tolist


@pytest.mark.parametrize("name,dropless", CASES, ids=IDS)
def test_one_process_layer_reads_nothing_on_the_host(name, dropless):
    layer = _layer(name, dropless)
    x, extra = _inputs(name, "cpu", torch.float32)
    x.requires_grad_()
    with count_host_reads() as reads:
        y, stats = layer(x, **extra)
        _loss(y, stats).backward()
    assert reads == []


def test_the_counter_sees_host_reads():
    """Control: a layer whose GEMMs fall back to the loop (odd sizes) reads the offsets once per
    GEMM call, and the counter sees each read."""
    layer = MoELayer(6, 4, d_hidden=10, k=2, dropless=True, backend="core")
    x = torch.randn(8, 6, requires_grad=True)
    with count_host_reads() as reads:
        y, _ = layer(x)
        y.sum().backward()
    assert reads == ["tolist"] * 2  # the up and down GEMMs; their backwards reuse the read


def _ep_host_reads(rank: int, world: int, name: str, dropless: bool) -> dict:
    mesh = build_mesh(ep_size=world)
    torch.manual_seed(0)
    layer = parallelize(_layer(name, dropless), mesh)
    x, extra = _inputs(name, "cpu", torch.float32, seed=rank)
    x.requires_grad_()
    with count_host_reads() as reads:
        y, stats = layer(x, **extra)
        _loss(y, stats).backward()
    return {"reads": list(reads), "a2a_calls": layer.comm.counters.calls}


@pytest.mark.timeout(240)
@pytest.mark.parametrize("name,dropless", [("topk", True), ("topk", False), ("expert_choice", False),
                                           ("hierarchical", False)])
def test_expert_parallel_layer_reads_the_split_sizes_once(name, dropless):
    for result in run_local(_ep_host_reads, 2, name, dropless, timeout=200):
        assert result["reads"] == ["tolist"], result
        assert result["a2a_calls"] == 5  # counts, rows forward, rows back, and both again in backward


@pytest.mark.parametrize("name,dropless", CASES, ids=IDS)
def test_an_empty_batch_gives_zero_losses(name, dropless):
    """A rank with no tokens (an empty shard under expert parallelism) must not make the step's
    loss NaN: every balancing loss is zero, the output empty, the backward runs."""
    layer = _layer(name, dropless)
    x = torch.zeros(0, D, requires_grad=True)
    extra = {"expert_losses": torch.zeros(0, E)} if name == "min_loss" else {}
    y, stats = layer(x, **extra)
    (y.sum() + stats.aux_loss).backward()
    assert y.shape == (0, D) and stats.aux_loss.item() == 0.0
    assert all(v.item() == 0.0 for v in stats.aux_losses.values())
    assert stats.num_unrouted.item() == 0 and stats.tokens_per_expert_E.sum().item() == 0
