"""Token exchange between the dispatch plan and the experts.

`LocalComm` is the one-process case: every expert is local and the exchange is the identity.
`AllToAllComm` is expert parallelism over an EP group of R ranks, rank i holding the global
experts [i * E_local, (i + 1) * E_local). `parallelize` swaps it in; the layer only ever calls

    dispatch(x_Md, counts_E) -> x_local, local_counts, handle
    combine(y_local, handle) -> y_Md

where x_Md `[M, d]` are this rank's kept assignments sorted by global expert, counts_E `[E]`
their count per expert, and x_local `[M_local, d]` the rows this rank's experts must compute,
sorted by local expert (within an expert: by source rank, then in the source's order).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from moe_scale.distributed.a2a import A2ACounters, BlockTranspose, FlatExchange, HierarchicalExchange


class LocalComm:
    """All experts live in this process."""

    def dispatch(self, x_Md: Tensor, counts_E: Tensor) -> tuple[Tensor, list[int], Any]:
        """Rows grouped by global expert -> rows grouped by local expert, local counts, handle."""
        return x_Md, counts_E.tolist(), None

    def combine(self, y_Md: Tensor, handle: Any) -> Tensor:
        """Inverse of `dispatch`: local expert outputs back in the caller's row order."""
        return y_Md


# Every rank sends every other rank a header before the counts: [status, d, dtype, detail, detail].
_HEADER = 5
_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_OK, _BAD_LEN, _NEGATIVE, _BAD_SUM, _BAD_DIM, _BAD_DTYPE = range(6)


@dataclass
class _Handle:
    plan: Any
    by_expert: BlockTranspose  # (source rank, local expert) -> (local expert, source rank)
    rows: int
    d: int


class DispatchError(ValueError):
    """Raised on every rank of an EP group when any of them passed an inconsistent dispatch."""


class AllToAllComm:
    """Expert-parallel exchange: counts first (fixed size), then rows (variable size, autograd).

    The header sent with the counts carries each rank's own consistency check, so a rank that
    would make the split sizes disagree (wrong number of counts, counts that do not sum to its
    rows, another d or dtype) makes every rank raise `DispatchError` before any variable-size
    message is sent: gloo aborts the process on a split mismatch, and NCCL hangs.

    counters accumulates bytes, seconds and calls of every all-to-all (forward and backward).
    """

    def __init__(self, num_local_experts: int, group=None, *, intra_group=None, inter_group=None):
        """Flat over `group`, or hierarchical over `intra_group` (this node) x `inter_group` (across)."""
        self.num_local_experts = num_local_experts
        self.counters = A2ACounters()
        if intra_group is not None:
            self.exchange = HierarchicalExchange(intra_group, inter_group, self.counters)
            self.ep_size = self.exchange.N * self.exchange.L
        else:
            self.exchange = FlatExchange(group, self.counters)
            self.ep_size = self.exchange.size

    @classmethod
    def from_mesh(cls, mesh, num_local_experts: int) -> "AllToAllComm":
        if mesh.a2a == "hierarchical":
            return cls(num_local_experts, mesh.ep_group, intra_group=mesh.ep_intra_group, inter_group=mesh.ep_inter_group)
        return cls(num_local_experts, mesh.ep_group)

    def dispatch(self, x_Md: Tensor, counts_E: Tensor) -> tuple[Tensor, list[int], _Handle]:
        """x_Md `[M, d]` sorted by global expert, counts_E `[E]` -> x_local `[M_local, d]`, counts, handle."""
        send_RH = self._header_and_counts(x_Md, counts_E)
        recv_RH, plan = self.exchange.exchange_counts(send_RH, _HEADER)
        self._check(recv_RH, x_Md)
        recv_RE = recv_RH[:, _HEADER:]
        by_expert = BlockTranspose(recv_RE, x_Md.device)
        x_local = by_expert.forward(self.exchange.forward(x_Md, plan))
        return x_local, recv_RE.sum(0).tolist(), _Handle(plan, by_expert, x_local.shape[0], x_Md.shape[-1])

    def combine(self, y_local: Tensor, handle: _Handle) -> Tensor:
        """y_local `[M_local, d]` in `dispatch`'s output order -> y_Md `[M, d]` in its input order."""
        if tuple(y_local.shape) != (handle.rows, handle.d):
            raise DispatchError(
                f"combine expects the experts' output [{handle.rows}, {handle.d}] (one row per dispatched "
                f"row), got {tuple(y_local.shape)}"
            )
        return self.exchange.reverse(handle.by_expert.reverse(y_local), handle.plan)

    def _header_and_counts(self, x_Md: Tensor, counts_E: Tensor) -> Tensor:
        R, El = self.ep_size, self.num_local_experts
        send_RH = torch.zeros(R, _HEADER + El, dtype=torch.int64, device=counts_E.device)
        status, detail = _OK, (0, 0)
        rows = x_Md.shape[0] if x_Md.dim() == 2 else -1
        if x_Md.dim() != 2:
            status, detail = _BAD_DIM, (x_Md.dim(), 0)
        elif x_Md.dtype not in _DTYPES:
            status = _BAD_DTYPE
        elif counts_E.numel() != R * El:
            status, detail = _BAD_LEN, (counts_E.numel(), R * El)
        elif bool((counts_E < 0).any()):
            status = _NEGATIVE
        elif int(counts_E.sum()) != rows:
            status, detail = _BAD_SUM, (int(counts_E.sum()), rows)
        dtype_code = _DTYPES.index(x_Md.dtype) if x_Md.dtype in _DTYPES else -1
        d = x_Md.shape[-1] if x_Md.dim() else 0
        send_RH[:, :_HEADER] = torch.tensor([status, d, dtype_code, *detail])
        if status == _OK:
            send_RH[:, _HEADER:] = counts_E.reshape(R, El)
        return send_RH

    def _check(self, recv_RH: Tensor, x_Md: Tensor) -> None:
        """Raise the same DispatchError on every rank if any rank's header is bad or differs."""
        header = recv_RH[:, :_HEADER].tolist()
        problems = []
        for src, (status, d, dtype_code, a, b) in enumerate(header):
            if status == _BAD_LEN:
                problems.append(f"EP rank {src}: counts_E has {a} entries, expected num_experts={b}")
            elif status == _NEGATIVE:
                problems.append(f"EP rank {src}: counts_E has negative entries")
            elif status == _BAD_SUM:
                problems.append(f"EP rank {src}: counts_E sums to {a} but x_Md has {b} rows (split-size mismatch)")
            elif status == _BAD_DIM:
                problems.append(f"EP rank {src}: x_Md must be 2-D [M, d], got {a} dims")
            elif status == _BAD_DTYPE:
                problems.append(f"EP rank {src}: unsupported dtype (supported: {_DTYPES})")
        if not problems:
            ds = {d for _, d, *_ in header}
            dtypes = {code for _, _, code, *_ in header}
            if len(ds) > 1:
                problems.append(f"ranks disagree on d_model: {[h[1] for h in header]} (EP rank order)")
            if len(dtypes) > 1:
                problems.append(f"ranks disagree on dtype: {[_DTYPES[h[2]] for h in header]} (EP rank order)")
        if problems:
            rank = dist.get_rank()
            raise DispatchError(
                f"expert-parallel dispatch refused on every rank of the EP group (seen from global rank {rank}): "
                + "; ".join(problems)
            )
