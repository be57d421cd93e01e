"""parallelize: expert slicing and tags (DeepSpeed-compatible), hierarchical groups on ranks."""

from __future__ import annotations

import pytest
import torch

from moe_scale.distributed.launch import run_local
from moe_scale.distributed.mesh import MoEMesh, build_mesh
from moe_scale.distributed.parallelize import hierarchical_placement, parallelize
from moe_scale.moe import MoEConfig, MoELayer


def _fake_mesh(ep_size: int, ranks_per_node: int, ep_rank: int = 0) -> MoEMesh:
    """A mesh without process groups, for the functions that only read the layout."""
    return MoEMesh(rank=ep_rank, world_size=ep_size, ep_size=ep_size, edp_size=1, ranks_per_node=ranks_per_node,
                   ep_rank=ep_rank, edp_rank=0, ep_group=None, edp_group=None, dp_group=None, device_mesh=None)


def test_hierarchical_groups_map_to_ranks_or_nodes():
    cfg = lambda a: MoEConfig(d_model=4, num_experts=64, router="hierarchical", k=1, hierarchical_groups=a)
    mesh = _fake_mesh(ep_size=8, ranks_per_node=4)  # 8 experts per rank, 32 per node
    assert hierarchical_placement(cfg(8), mesh) == "rank"  # one group per EP rank
    assert hierarchical_placement(cfg(16), mesh) == "rank"  # two groups per EP rank
    assert hierarchical_placement(cfg(2), mesh) == "node"  # one group per node
    assert hierarchical_placement(cfg(4), mesh) == "node"  # a group = 2 ranks of one node
    with pytest.raises(ValueError, match="needs router='hierarchical'"):
        hierarchical_placement(MoEConfig(d_model=4, num_experts=64), mesh)


def test_hierarchical_primary_gate_sends_each_token_to_one_rank():
    """With groups placed on ranks and k_groups=1, every assignment of a token is on one EP rank."""
    torch.manual_seed(0)
    layer = MoELayer(8, 16, router="hierarchical", k=2, hierarchical_groups=4, hierarchical_k_groups=1).eval()
    with torch.no_grad():
        for p in layer.router.parameters():
            p.normal_()
    assert hierarchical_placement(layer.cfg, _fake_mesh(ep_size=4, ranks_per_node=4)) == "rank"
    routing = layer.router(torch.randn(32, 8))
    dest_rank = routing.expert_idx_N // 4
    for s in range(32):
        assert dest_rank[routing.token_idx_N == s].unique().numel() == 1


def _tags_main(rank: int, world: int) -> dict:
    from deepspeed.moe.utils import is_moe_param, split_params_into_different_moe_groups_for_optimizer

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), MoELayer(8, 4, d_hidden=8, expert_bias=True))
    full_w1 = model[1].experts.w1.detach().clone()
    parallelize(model, build_mesh(ep_size=2))
    experts = model[1].experts
    groups = split_params_into_different_moe_groups_for_optimizer({"name": "all", "params": list(model.parameters())})
    return dict(
        sliced=torch.equal(experts.w1, full_w1[rank * 2 : rank * 2 + 2]),
        shapes={n: tuple(p.shape) for n, p in model.named_parameters()},
        moe=sorted(n for n, p in model.named_parameters() if is_moe_param(p)),
        groups=[(g["name"], g.get("moe", False), len(g["params"])) for g in groups],
        comm=type(model[1].comm).__name__,
    )


@pytest.mark.peers
@pytest.mark.timeout(90)
def test_expert_params_sliced_and_tagged_for_deepspeed_groups():
    for rank, r in enumerate(run_local(_tags_main, 2, timeout=80)):
        assert r["sliced"] and r["comm"] == "AllToAllComm"
        assert r["shapes"]["1.experts.w1"] == (2, 8, 8) and r["shapes"]["1.router.w_gate"] == (8, 4)
        assert r["moe"] == ["1.experts.b1", "1.experts.b2", "1.experts.w1", "1.experts.w2"]
        # DeepSpeed puts them in their own group, reduced over its "ep_size_2" expert-data-parallel group.
        assert r["groups"] == [("all", False, 3), ("ep_size_2", True, 4)]
