"""The token exchange on real gloo processes: flat vs hierarchical, zero-token ranks, errors."""

from __future__ import annotations

import pytest
import torch

from moe_scale.distributed.a2a import transpose_blocks_index
from moe_scale.distributed.comm import AllToAllComm, DispatchError
from moe_scale.distributed.launch import run_local
from moe_scale.distributed.mesh import build_mesh

WORLD, E_LOCAL, D = 4, 3, 5


def test_transpose_blocks_index_matches_python():
    g = torch.Generator().manual_seed(0)
    for A, B in ((1, 1), (2, 3), (4, 1), (3, 5)):
        sizes = torch.randint(0, 4, (A, B), generator=g)
        blocks, start = {}, 0
        for a in range(A):
            for b in range(B):
                blocks[a, b] = list(range(start, start + int(sizes[a, b])))
                start += int(sizes[a, b])
        want = [i for b in range(B) for a in range(A) for i in blocks[a, b]]
        index = transpose_blocks_index(sizes)
        assert index.tolist() == want
        assert index[transpose_blocks_index(sizes.t().contiguous())].tolist() == list(range(start))


def _counts(rank: int) -> torch.Tensor:
    """Rows rank `rank` sends to each global expert; rank 3 sends none, expert 4 gets none."""
    counts = torch.randint(0, 4, (WORLD * E_LOCAL,), generator=torch.Generator().manual_seed(rank))
    counts[4] = 0
    return counts * 0 if rank == 3 else counts


def _rows(rank: int) -> torch.Tensor:
    """x_Md whose row encodes (source rank, global expert, position): row = [r, e, i, r+e, i*r]."""
    rows = [[rank, e, i, rank + e, i * rank] for e, c in enumerate(_counts(rank).tolist()) for i in range(c)]
    return torch.tensor(rows, dtype=torch.float32).view(-1, D)


def _expected_local(ep_rank: int) -> torch.Tensor:
    """What EP rank `ep_rank` must receive: for each local expert, every source's rows in rank order."""
    rows = []
    for e in range(ep_rank * E_LOCAL, (ep_rank + 1) * E_LOCAL):
        for src in range(WORLD):
            rows += [[src, e, i, src + e, i * src] for i in range(int(_counts(src)[e]))]
    return torch.tensor(rows, dtype=torch.float32).view(-1, D)


def _exchange_main(rank: int, world: int) -> dict:
    out = {}
    for a2a in ("flat", "hierarchical"):
        mesh = build_mesh(ep_size=WORLD, ranks_per_node=2, a2a=a2a)
        comm = AllToAllComm.from_mesh(mesh, E_LOCAL)
        x = _rows(rank).requires_grad_()
        x_local, local_counts, handle = comm.dispatch(x, _counts(rank))
        assert torch.equal(x_local, _expected_local(rank)), f"{a2a}: wrong rows received"
        assert local_counts.tolist() == [int(sum(_counts(s)[e] for s in range(WORLD))) for e in mesh.local_experts(WORLD * E_LOCAL)]
        assert torch.equal(comm.combine(x_local.detach(), handle), x.detach()), f"{a2a}: combine is not the inverse"
        scale = torch.arange(1, x_local.shape[0] + 1, dtype=torch.float32)[:, None]
        y = comm.combine(x_local * scale, handle)
        y.pow(2).sum().backward()
        out[a2a] = (y.detach(), x.grad.clone(), comm.counters.bytes_sent, comm.counters.inter_bytes)
    flat, hier = out["flat"], out["hierarchical"]
    assert torch.equal(flat[0], hier[0]) and torch.equal(flat[1], hier[1]), "flat and hierarchical differ"
    assert flat[3] == 0 and hier[3] > 0
    return {"rows": int(_rows(rank).shape[0]), "received": int(_expected_local(rank).shape[0]),
            "inter_bytes": hier[3]}


@pytest.mark.timeout(60)
def test_flat_and_hierarchical_exchange_agree_bitwise_with_zero_token_ranks():
    results = run_local(_exchange_main, WORLD, timeout=50)
    assert results[3]["rows"] == 0 and results[3]["received"] > 0  # sends nothing, still receives
    assert all(r["inter_bytes"] > 0 for r in results[:3])


def _mismatch_main(rank: int, world: int, a2a: str) -> list[str]:
    mesh = build_mesh(ep_size=WORLD, ranks_per_node=2, a2a=a2a)
    comm = AllToAllComm.from_mesh(mesh, E_LOCAL)
    messages = []
    bad_inputs = {
        "sum": lambda x, c: (x, c + (rank == 1)),  # rank 1's counts claim one row per expert too many
        "d": lambda x, c: (x[:, :4] if rank == 2 else x, c),
        "length": lambda x, c: (x, c[:-1] if rank == 0 else c),
        "dtype": lambda x, c: (x.double() if rank == 3 else x, c),
    }
    for name, corrupt in bad_inputs.items():
        x, counts = corrupt(_rows(rank), _counts(rank))
        try:
            comm.dispatch(x, counts)
            messages.append(f"{name}: no error")
        except DispatchError as err:
            messages.append(f"{name}: {err}")
        # The refused dispatch sent no data: the comm is still usable.
        x_local, _, _ = comm.dispatch(_rows(rank), _counts(rank))
        assert torch.equal(x_local, _expected_local(rank))
    return messages


@pytest.mark.timeout(60)
@pytest.mark.parametrize("a2a", ["flat", "hierarchical"])
def test_split_mismatch_raises_on_every_rank(a2a):
    results = run_local(_mismatch_main, WORLD, a2a, timeout=50, collective_timeout=20)
    expected = {
        "sum": ["EP rank 1", "split-size mismatch"],
        "d": ["disagree on d_model"],
        "length": ["EP rank 0", "counts_E has 11 entries, expected num_experts=12"],
        "dtype": ["disagree on dtype"],
    }
    for rank, messages in enumerate(results):
        for (name, needles), message in zip(expected.items(), messages):
            assert all(n in message for n in needles), f"rank {rank}: {message}"
