"""EP=1, EP=2 and EP=4 on 4 gloo processes compute the one-process function, for every router.

How equality is defined (the layer computes capacity from the tokens of its own process, as
DeepSpeed does, and routing noise is drawn per process):

- Each rank r holds its shard of tokens x_r and seeds the RNG with (case seed + r) just before
  the layer call. The reference is the unsharded layer (all experts local, one process) applied
  to each shard x_r under the same seed, so noisy top-k, jitter and GShard's random second
  expert draw the same numbers on every layout, and capacity drops hit the same assignments.
- Output on rank r == reference output of shard r. Router gradient on rank r (a replicated,
  not yet reduced parameter) == reference gradient of shard r. Expert gradient of the block
  held by rank r == sum over the shards of r's EP group of the reference expert gradients.
- EP=4 with the hierarchical all-to-all (2 simulated nodes x 2 ranks) is bitwise equal to the
  flat EP=4 run.
- Dropless routers without noise must also match the reference applied once to the full batch
  (all shards concatenated): outputs row for row, and expert gradients after the EDP sum.

All to fp32 rounding (the expert GEMMs see the same rows in a different grouping).
"""

from __future__ import annotations

import copy
import zlib

import pytest
import torch
import torch.distributed as dist

from moe_scale.distributed.launch import run_local
from moe_scale.distributed.mesh import build_mesh
from moe_scale.distributed.parallelize import parallelize
from moe_scale.moe import MoELayer

WORLD, D, E, H = 4, 8, 8, 16
SHARD_TOKENS = [12, 12, 12, 12]

# name -> (MoELayer options, full-batch check)
CASES = {
    "noisy_topk_drop": (dict(router="noisy_topk", k=2, capacity_factor=0.5, aux_loss=dict(importance=0.1, load=0.1)), False),
    "noisy_topk_dropless": (dict(router="noisy_topk", k=2, dropless=True, aux_loss=dict(load=0.1)), False),
    "switch_jitter_drop": (dict(router="switch", k=1, jitter=0.1, capacity_factor=0.75, min_capacity=1, aux_loss=dict(switch=0.01, z=0.01)), False),
    "switch_dropless": (dict(router="switch", k=1, dropless=True, aux_loss=dict(switch=0.01)), True),
    "gshard_top2_random_second_drop": (dict(router="topk", k=2, random_second=True, capacity_factor=0.5, min_capacity=1), False),
    "topk3_probability_drop": (dict(router="topk", k=3, capacity_factor=0.5, drop_policy="probability"), False),
    "topk2_swiglu_bias_dropless": (dict(router="topk", k=2, dropless=True, activation="swiglu", expert_bias=True), True),
    "expert_choice": (dict(router="expert_choice", k=2, capacity_factor=1.0, aux_loss=dict(z=0.01)), False),
    "hash_drop": (dict(router="hash", k=1, capacity_factor=0.5, min_capacity=1), False),
    "hash_dropless": (dict(router="hash", k=1, dropless=True), True),
    "hierarchical_drop": (dict(router="hierarchical", k=1, hierarchical_groups=4, hierarchical_k_groups=2,
                               capacity_factor=0.5, aux_loss=dict(importance=0.1, load=0.1)), False),
    "hierarchical_dropless": (dict(router="hierarchical", k=2, hierarchical_groups=2, dropless=True), False),
    # Every token prefers experts 0-1: on EP=4 ranks 1-3 compute nothing, on EP=2 rank 1 neither.
    "min_loss_skewed_drop": (dict(router="min_loss", k=1, capacity_factor=2.0), False),
    "min_loss_skewed_dropless": (dict(router="min_loss", k=1, dropless=True), True),
}
# Uneven shards with an empty one: that rank sends nothing and still receives tokens.
UNEVEN = {"topk2_uneven_shards_dropless": (dict(router="topk", k=2, dropless=True, aux_loss=dict(switch=0.01)), True)}
UNEVEN_TOKENS = [10, 3, 0, 17]


def _inputs(name: str, shard_tokens: list[int]):
    """Per-shard inputs: x `[S_r, D]` and the router's extra keyword arguments."""
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    shards = []
    for r, S in enumerate(shard_tokens):
        x = torch.randn(S, D, generator=g)
        extra = {}
        if "hash" in name:
            extra["token_ids"] = torch.randint(0, 1000, (S,), generator=g)
        if "min_loss" in name:
            losses = torch.rand(S, E, generator=g) + 1.0
            losses[:, :2] -= 1.0  # experts 0 and 1 always win
            extra["expert_losses"] = losses
        shards.append((x, extra))
    return shards


def _build(options: dict) -> MoELayer:
    torch.manual_seed(0)
    layer = MoELayer(D, E, d_hidden=H, **options)
    with torch.no_grad():  # zero-initialised gates (noisy top-k, hierarchical) would tie
        for name, p in layer.router.named_parameters():
            p.normal_(0.0, 0.5)
    return layer.train()


def _probe(S: int) -> torch.Tensor:
    return torch.linspace(-1.0, 1.0, S * D).view(S, D)


def _run(layer: MoELayer, x: torch.Tensor, extra: dict, seed: int):
    """One forward/backward; returns the output and the per-parameter gradients."""
    layer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    torch.manual_seed(seed)
    y, stats = layer(x, **extra)
    ((y * _probe(x.shape[0])).sum() + stats.aux_loss).backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
    return y.detach(), grads, x.grad.clone()


def _compare(tag: str, got: torch.Tensor, want: torch.Tensor, failures: list[str]) -> None:
    if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-5, atol=1e-6):
        diff = (got - want).abs().max().item() if got.shape == want.shape else f"shape {got.shape} vs {want.shape}"
        failures.append(f"{tag}: max abs diff {diff}")


def _check_case(rank: int, name: str, options: dict, full_batch: bool, shard_tokens: list[int], failures: list[str]):
    full = _build(options)
    shards = _inputs(name, shard_tokens)
    # Reference: the one-process layer applied to every shard with that shard's seed.
    refs = [_run(full, x, extra, seed=100 + r) for r, (x, extra) in enumerate(shards)]
    x, extra = shards[rank]
    flat_ep4 = None
    for ep, a2a in ((1, "flat"), (2, "flat"), (4, "flat"), (4, "hierarchical")):
        mesh = build_mesh(ep_size=ep, ranks_per_node=2, a2a=a2a)  # hierarchical: 2 nodes x 2 ranks
        layer = parallelize(copy.deepcopy(full), mesh)
        y, grads, gx = _run(layer, x, extra, seed=100 + rank)
        tag = f"{name} EP={ep} {a2a} rank {rank}"
        if ep == 4 and a2a == "flat":
            flat_ep4 = (y, grads, gx)
        if a2a == "hierarchical":  # the same rows in the same order: bitwise equal to flat
            same = torch.equal(y, flat_ep4[0]) and torch.equal(gx, flat_ep4[2])
            same = same and all(torch.equal(g, flat_ep4[1][n]) for n, g in grads.items())
            if not same:
                failures.append(f"{tag}: hierarchical differs from flat")
        _compare(f"{tag} output", y, refs[rank][0], failures)
        _compare(f"{tag} input grad", gx, refs[rank][2], failures)
        group = range(rank - mesh.ep_rank, rank - mesh.ep_rank + ep)
        block = mesh.local_experts(E)
        for pname, g in grads.items():
            if pname.startswith("experts."):
                want = sum(refs[r][1][pname] for r in group)[block.start:block.stop]
            else:
                want = refs[rank][1][pname]
            _compare(f"{tag} grad {pname}", g, want, failures)
        if full_batch:
            _check_full_batch(full, layer, mesh, shards, rank, y, grads, tag, failures)


def _check_full_batch(full, layer, mesh, shards, rank, y, grads, tag, failures):
    """Dropless without noise: the sharded run equals one call on the concatenated batch."""
    ref = copy.deepcopy(full)
    xs = torch.cat([x for x, _ in shards])
    extra = {k: torch.cat([e[k] for _, e in shards]) for k in shards[0][1]}
    probe = torch.cat([_probe(x.shape[0]) for x, _ in shards])
    y_full, _ = ref(xs, **extra)
    (y_full * probe).sum().backward()
    start = sum(x.shape[0] for x, _ in shards[:rank])
    _compare(f"{tag} full-batch output", y, y_full[start : start + y.shape[0]].detach(), failures)
    block = mesh.local_experts(E)
    for pname, p in ref.named_parameters():
        if pname.startswith("experts."):
            g = grads[pname].clone()
            dist.all_reduce(g, group=mesh.edp_group)
            _compare(f"{tag} full-batch grad {pname}", g, p.grad[block.start : block.stop], failures)


def _rank_main(rank: int, world: int, cases: dict, shard_tokens: list[int]) -> list[str]:
    failures: list[str] = []
    for name, (options, full_batch) in cases.items():
        _check_case(rank, name, options, full_batch, shard_tokens, failures)
    return failures


@pytest.mark.timeout(150)
def test_ep_1_2_4_match_one_process_for_every_router():
    results = run_local(_rank_main, WORLD, CASES, SHARD_TOKENS, timeout=140)
    failures = [f for per_rank in results for f in per_rank]
    assert not failures, "\n".join(failures[:40])


@pytest.mark.timeout(60)
def test_ep_uneven_shards_with_an_empty_rank():
    results = run_local(_rank_main, WORLD, UNEVEN, UNEVEN_TOKENS, timeout=50)
    failures = [f for per_rank in results for f in per_rank]
    assert not failures, "\n".join(failures[:40])
