"""Process layout: EP / EDP / node groups, and clear errors on every rank for bad layouts."""

from __future__ import annotations

import pytest
import torch.distributed as dist

from moe_scale.distributed.launch import run_local
from moe_scale.distributed.mesh import ParallelConfig, build_mesh, check_layout
from moe_scale.distributed.parallelize import parallelize
from moe_scale.moe import MoELayer


def test_config_and_layout_validation():
    with pytest.raises(ValueError, match="parallel.ep_size must be >= 1"):
        ParallelConfig(ep_size=0)
    with pytest.raises(ValueError, match="parallel.a2a must be one of"):
        ParallelConfig(a2a="2d")
    with pytest.raises(ValueError, match=r"ep_size=3 must divide the world size 4; use one of \[1, 2, 4\]"):
        check_layout(4, 3, 4)
    with pytest.raises(ValueError, match="covers whole nodes"):
        check_layout(12, 6, 4, "hierarchical")
    with pytest.raises(ValueError, match="straddles two nodes"):
        check_layout(12, 3, 4, "hierarchical")
    check_layout(12, 3, 4, "flat")  # a flat all-to-all does not care about nodes


def _groups_main(rank: int, world: int) -> dict:
    ranks = dist.get_process_group_ranks
    mesh = build_mesh(ep_size=2, ranks_per_node=2)
    flat = dict(ep=ranks(mesh.ep_group), edp=ranks(mesh.edp_group), dp=ranks(mesh.dp_group),
                ep_rank=mesh.ep_rank, edp_rank=mesh.edp_rank, experts=list(mesh.local_experts(8)))
    mesh = build_mesh(ep_size=4, ranks_per_node=2, a2a="hierarchical")
    hier = dict(intra=ranks(mesh.ep_intra_group), inter=ranks(mesh.ep_inter_group), nodes=mesh.ep_nodes)
    return dict(flat=flat, hier=hier)


@pytest.mark.timeout(60)
def test_groups_follow_deepspeed_layout():
    results = run_local(_groups_main, 4, timeout=50)
    assert [r["flat"]["ep"] for r in results] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert [r["flat"]["edp"] for r in results] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    assert all(r["flat"]["dp"] == [0, 1, 2, 3] for r in results)
    assert [r["flat"]["experts"] for r in results] == [[0, 1, 2, 3], [4, 5, 6, 7]] * 2
    assert [r["hier"]["intra"] for r in results] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert [r["hier"]["inter"] for r in results] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    assert all(r["hier"]["nodes"] == 2 for r in results)


def _bad_layout_main(rank: int, world: int) -> list[str]:
    attempts = {
        "ep_size 3 on 4 ranks": lambda: build_mesh(ep_size=3),
        "ranks disagree": lambda: build_mesh(ep_size=2 if rank == 0 else 4),
        "hierarchical over 3-rank nodes": lambda: build_mesh(ep_size=4, ranks_per_node=3, a2a="hierarchical"),
        "6 experts over 4 EP ranks": lambda: parallelize(MoELayer(4, 6, d_hidden=4), build_mesh(ep_size=4)),
    }
    messages = []
    for name, attempt in attempts.items():
        try:
            attempt()
            messages.append(f"{name}: no error")
        except ValueError as err:
            messages.append(str(err))
    return messages


@pytest.mark.timeout(60)
def test_bad_ep_size_raises_a_clear_error_on_every_rank():
    results = run_local(_bad_layout_main, 4, timeout=50, collective_timeout=20)
    for messages in results:
        assert "ep_size=3 must divide the world size 4" in messages[0]
        assert "ranks disagree on ep_size: [2, 4, 4, 4]" in messages[1]
        assert "ranks_per_node=3 must divide the world size 4" in messages[2]
        assert "num_experts=6 must be divisible by ep_size=4" in messages[3]
