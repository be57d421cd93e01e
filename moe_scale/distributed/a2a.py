"""All-to-all primitives under `AllToAllComm`: autograd exchange, flat and hierarchical (2DH).

Both exchanges move row blocks between the R ranks of an EP group. Before the exchange every
rank holds its rows sorted by destination rank; after it, the rows it received sorted by
source rank, each source's rows in the order the source sent them. The row counts of every
(source, destination) pair are exchanged first in fixed-size messages, so the variable-size
data exchange always agrees on its split sizes.

flat          one all-to-all over the EP group.
hierarchical  Tutel's 2DH for an EP group of N nodes x L ranks: an all-to-all inside each node
              gathers, on local rank l', every row of the node bound for local rank l' of any
              node; a second all-to-all between the ranks with the same local index crosses the
              nodes. Each rank then sends N-1 inter-node messages instead of R-L, each L times
              larger. The rows arrive in the same order as with `flat`: bitwise the same result.

Every reordering is a block transpose done as a gather (`BlockTranspose`), so both exchanges
are differentiable (the backward runs the inverse exchange) and never depend on arrival order.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup


@dataclass
class A2ACounters:
    """Accumulated all-to-all traffic of one comm (forward and backward, data and counts).

    bytes_sent      bytes this rank sent to other ranks (its own block excluded)
    inter_bytes     the part of bytes_sent that crossed nodes (hierarchical exchange only)
    seconds         host wall time inside all-to-all calls (gloo: the transfer; NCCL: the launch
                    only, the transfer runs on the stream)
    calls           all-to-all calls
    """

    bytes_sent: int = 0
    inter_bytes: int = 0
    seconds: float = 0.0
    calls: int = 0

    def reset(self) -> None:
        self.bytes_sent = self.inter_bytes = self.calls = 0
        self.seconds = 0.0


def all_to_all(
    x: Tensor,
    group: ProcessGroup,
    out_rows: list[int],
    in_rows: list[int],
    counters: A2ACounters | None = None,
    inter_node: bool = False,
) -> Tensor:
    """Send `in_rows[j]` consecutive rows of `x` to group rank j; receive `out_rows[j]` from j.

    x `[sum(in_rows), ...]` -> `[sum(out_rows), ...]`. Not differentiable (see `AllToAll`).
    """
    out = x.new_empty((sum(out_rows),) + tuple(x.shape[1:]))
    start = time.perf_counter()
    dist.all_to_all_single(out, x.contiguous(), out_rows, in_rows, group=group)
    if counters is not None:
        me = dist.get_rank(group)
        sent = (sum(in_rows) - in_rows[me]) * math.prod(x.shape[1:]) * x.element_size()
        counters.seconds += time.perf_counter() - start
        counters.bytes_sent += sent
        counters.inter_bytes += sent if inter_node else 0
        counters.calls += 1
    return out


class AllToAll(torch.autograd.Function):
    """Differentiable `all_to_all`: the backward sends gradients back along the same splits."""

    @staticmethod
    def forward(ctx, x, group, out_rows, in_rows, counters, inter_node):
        ctx.args = (group, in_rows, out_rows, counters, inter_node)
        return all_to_all(x, group, out_rows, in_rows, counters, inter_node)

    @staticmethod
    def backward(ctx, grad_out):
        group, out_rows, in_rows, counters, inter_node = ctx.args
        return all_to_all(grad_out, group, out_rows, in_rows, counters, inter_node), None, None, None, None, None


def exchange(x, group, out_rows, in_rows, counters=None, inter_node=False) -> Tensor:
    """Differentiable `all_to_all` (same arguments)."""
    return AllToAll.apply(x, group, list(out_rows), list(in_rows), counters, inter_node)


def transpose_blocks_index(sizes_AB: Tensor, total: int | None = None) -> Tensor:
    """Row index that reorders blocks stored in (a, b) order into (b, a) order.

    sizes_AB `[A, B]` holds the row count of each block; rows of block (a, b) stay in order.
    `x.index_select(0, index)` applies it; `transpose_blocks_index(sizes_AB.t())` undoes it.
    total: the rows of all blocks, when the caller knows it on the host (on a GPU the index
    is then built without reading the sizes back).
    """
    A, B = sizes_AB.shape
    flat = sizes_AB.reshape(-1)
    starts_AB = (torch.cumsum(flat, 0) - flat).view(A, B)
    sizes_BA = sizes_AB.t().reshape(-1)
    out_starts_BA = torch.cumsum(sizes_BA, 0) - sizes_BA
    shift = torch.repeat_interleave(starts_AB.t().reshape(-1) - out_starts_BA, sizes_BA, output_size=total)
    return torch.arange(shift.numel(), device=sizes_AB.device) + shift


class _ReorderRows(torch.autograd.Function):
    """y = x[index] for a permutation `index`; the backward gathers with its inverse (no scatter)."""

    @staticmethod
    def forward(ctx, x, index, inverse):
        ctx.inverse = inverse
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad_y):
        return grad_y.index_select(0, ctx.inverse), None, None


class BlockTranspose:
    """Reorders rows from blocks in (a, b) order to (b, a) order, and back (differentiable).

    sizes_AB `[A, B]`: rows of each block (on the rows' device), `total` their sum. Identity
    (no copy) when A or B is 1.
    """

    def __init__(self, sizes_AB: Tensor, total: int):
        self.identity = 1 in sizes_AB.shape
        if not self.identity:
            self.index = transpose_blocks_index(sizes_AB, total)
            self.inverse = transpose_blocks_index(sizes_AB.t(), total)

    def forward(self, x: Tensor) -> Tensor:
        return x if self.identity else _ReorderRows.apply(x, self.index, self.inverse)

    def reverse(self, y: Tensor) -> Tensor:
        return y if self.identity else _ReorderRows.apply(y, self.inverse, self.index)


def _rows(counts_XH: Tensor, header: int) -> Tensor:
    """Rows of each block: the sum of its count columns (the first `header` columns are metadata)."""
    return counts_XH[..., header:].sum(-1)


@dataclass
class FlatPlan:
    """Split sizes (host lists, read once) and the received headers.

    send_rows      rows this rank sends to each EP rank
    recv_rows      rows it receives from each EP rank
    recv_headers   the first `header` columns each rank sent this one
    """

    send_rows: list[int]
    recv_rows: list[int]
    recv_headers: list[list[int]]


class FlatExchange:
    """One all-to-all over the EP group."""

    def __init__(self, group: ProcessGroup, counters: A2ACounters):
        self.group, self.counters = group, counters
        self.size = dist.get_world_size(group)

    def exchange_counts(self, send_RH: Tensor, header: int) -> tuple[Tensor, FlatPlan]:
        """send_RH `[R, H]` (row j goes to EP rank j) -> recv_RH `[R, H]` (row i came from EP rank i)."""
        ones = [1] * self.size
        recv_RH = all_to_all(send_RH, self.group, ones, ones, self.counters)
        R = self.size
        # The one host read of the exchange: split sizes both ways and the received headers.
        host = torch.cat([_rows(send_RH, header), _rows(recv_RH, header), recv_RH[:, :header].reshape(-1)]).tolist()
        return recv_RH, FlatPlan(host[:R], host[R:2 * R], _rows_of(host[2 * R:], header))

    def forward(self, x: Tensor, plan: FlatPlan) -> Tensor:
        """Rows sorted by destination rank -> rows sorted by source rank."""
        return exchange(x, self.group, plan.recv_rows, plan.send_rows, self.counters)

    def reverse(self, y: Tensor, plan: FlatPlan) -> Tensor:
        """Inverse of `forward`."""
        return exchange(y, self.group, plan.send_rows, plan.recv_rows, self.counters)


@dataclass
class HierarchicalPlan:
    """Row counts of the blocks at each stage (n: node, l: local rank, in the EP group).

    send_NL    rows this rank sends to (n', l')
    mid_LN     rows held after the intra-node stage: from local rank l, bound for node n'
    recv_NL    rows received from (n, l)
    (host lists, read once), the received headers, and the two reorderings
    """

    send_NL: list[list[int]]
    mid_LN: list[list[int]]
    recv_NL: list[list[int]]
    recv_headers: list[list[int]]
    by_local: BlockTranspose  # (n', l') -> (l', n') before the intra-node stage
    by_node: BlockTranspose  # (l, n') -> (n', l) before the inter-node stage

    @property
    def send_rows(self) -> list[int]:
        return [c for row in self.send_NL for c in row]

    @property
    def recv_rows(self) -> list[int]:
        return [c for row in self.recv_NL for c in row]


class HierarchicalExchange:
    """2DH all-to-all over an EP group of N nodes x L ranks (EP rank = n * L + l)."""

    def __init__(self, intra: ProcessGroup, inter: ProcessGroup, counters: A2ACounters):
        self.intra, self.inter, self.counters = intra, inter, counters
        self.L, self.N = dist.get_world_size(intra), dist.get_world_size(inter)

    def exchange_counts(self, send_RH: Tensor, header: int) -> tuple[Tensor, HierarchicalPlan]:
        """Same contract as `FlatExchange.exchange_counts`, in two fixed-size stages."""
        N, L, H = self.N, self.L, send_RH.shape[-1]
        by_local = send_RH.view(N, L, H).transpose(0, 1).reshape(L * N, H)
        mid_LNH = all_to_all(by_local, self.intra, [N] * L, [N] * L, self.counters).view(L, N, H)
        by_node = mid_LNH.transpose(0, 1).reshape(N * L, H)
        recv_RH = all_to_all(by_node, self.inter, [L] * N, [L] * N, self.counters, inter_node=True)
        send_NL, mid_LN, recv_NL = _rows(send_RH, header).view(N, L), _rows(mid_LNH, header), _rows(recv_RH, header)
        # The one host read of the exchange: every stage's split sizes and the received headers.
        host = torch.cat([send_NL.reshape(-1), mid_LN.reshape(-1), recv_NL.reshape(-1),
                          recv_RH[:, :header].reshape(-1)]).tolist()
        R = N * L
        send_h, mid_h, recv_h = _rows_of(host[:R], L), _rows_of(host[R:2 * R], N), _rows_of(host[2 * R:3 * R], L)
        plan = HierarchicalPlan(
            send_NL=send_h,
            mid_LN=mid_h,
            recv_NL=recv_h,
            recv_headers=_rows_of(host[3 * R:], header),
            by_local=BlockTranspose(send_NL, sum(host[:R])),
            by_node=BlockTranspose(mid_LN, sum(host[R:2 * R])),
        )
        return recv_RH, plan

    def forward(self, x: Tensor, plan: HierarchicalPlan) -> Tensor:
        """Rows sorted by destination rank -> rows sorted by source rank (as `FlatExchange`)."""
        x = plan.by_local.forward(x)
        x = exchange(x, self.intra, _row_sums(plan.mid_LN), _col_sums(plan.send_NL), self.counters)
        x = plan.by_node.forward(x)
        return exchange(
            x, self.inter, _row_sums(plan.recv_NL), _col_sums(plan.mid_LN), self.counters, inter_node=True
        )

    def reverse(self, y: Tensor, plan: HierarchicalPlan) -> Tensor:
        """Inverse of `forward`."""
        y = exchange(
            y, self.inter, _col_sums(plan.mid_LN), _row_sums(plan.recv_NL), self.counters, inter_node=True
        )
        y = plan.by_node.reverse(y)
        y = exchange(y, self.intra, _col_sums(plan.send_NL), _row_sums(plan.mid_LN), self.counters)
        return plan.by_local.reverse(y)


def _rows_of(flat: list[int], cols: int) -> list[list[int]]:
    """A flat host list as rows of `cols` entries."""
    return [flat[i:i + cols] for i in range(0, len(flat), cols)]


def _row_sums(table: list[list[int]]) -> list[int]:
    return [sum(row) for row in table]


def _col_sums(table: list[list[int]]) -> list[int]:
    return [sum(col) for col in zip(*table)]
