"""`AllToAllComm`: the expert-parallel token exchange (the `ExpertComm` of moe/comm.py).

Over an EP group of R ranks, rank i holds the global experts [i * E_local, (i + 1) * E_local).
`parallelize` swaps it in for the layer's `LocalComm`. The counts travel first in a fixed-size
all-to-all on the device; the split sizes of the row exchange are then read on the host once
per dispatch (the one host read of an expert-parallel layer call; the backward reuses them).
The rows a rank's experts receive are sorted by local expert (within an expert: by source
rank, then in the source's order); the local counts stay on the device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from moe_scale.distributed.a2a import A2ACounters, BlockTranspose, FlatExchange, HierarchicalExchange


# Every rank sends every other rank a header before the counts: [status, d, dtype, detail, detail].
_HEADER = 5
_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_OK, _BAD_LEN, _NEGATIVE, _BAD_SUM, _BAD_DIM, _BAD_DTYPE = range(6)


@dataclass
class _Handle:
    plan: Any
    by_expert: BlockTranspose  # (source rank, local expert) -> (local expert, source rank)
    rows: int  # rows received (the experts' input)
    sent: int  # rows sent (the kept rows of the caller's x_Nd)
    total: int  # rows of the caller's x_Nd
    d: int


def _fill(value: int, device: torch.device) -> Tensor:
    return torch.full((1,), value, dtype=torch.int64, device=device)


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

    @property
    def bytes_sent(self) -> int:
        """Bytes this rank sent to the others so far, forward and backward (`counters`)."""
        return self.counters.bytes_sent

    @classmethod
    def from_mesh(cls, mesh, num_local_experts: int) -> "AllToAllComm":
        if mesh.a2a == "hierarchical":
            return cls(num_local_experts, mesh.ep_group, intra_group=mesh.ep_intra_group, inter_group=mesh.ep_inter_group)
        return cls(num_local_experts, mesh.ep_group)

    def dispatch(self, x_Nd: Tensor, counts_E: Tensor) -> tuple[Tensor, Tensor, _Handle]:
        """x_Nd `[N, d]` sorted by global expert, counts_E `[E]` -> x_local `[M_local, d]`,
        local counts `[E_local]` (device), handle."""
        send_RH = self._header_and_counts(x_Nd, counts_E)
        recv_RH, plan = self.exchange.exchange_counts(send_RH, _HEADER)
        self._check(plan.recv_headers)
        recv_RE = recv_RH[:, _HEADER:]
        sent, received = sum(plan.send_rows), sum(plan.recv_rows)
        by_expert = BlockTranspose(recv_RE, received)
        x_local = by_expert.forward(self.exchange.forward(x_Nd[:sent], plan))
        handle = _Handle(plan, by_expert, received, sent, x_Nd.shape[0], x_Nd.shape[-1])
        return x_local, recv_RE.sum(0), handle

    def combine(self, y_local: Tensor, handle: _Handle) -> Tensor:
        """y_local `[M_local, d]` in `dispatch`'s output order -> y_Nd `[N, d]` in its input
        order (zero rows where nothing was sent)."""
        if tuple(y_local.shape) != (handle.rows, handle.d):
            raise DispatchError(
                f"combine expects the experts' output [{handle.rows}, {handle.d}] (one row per dispatched "
                f"row), got {tuple(y_local.shape)}"
            )
        y_sent = self.exchange.reverse(handle.by_expert.reverse(y_local), handle.plan)
        return F.pad(y_sent, (0, 0, 0, handle.total - handle.sent))

    def _header_and_counts(self, x_Nd: Tensor, counts_E: Tensor) -> Tensor:
        """`[R, H + E_local]` on the counts' device: this rank's header (the checks that need
        tensor data are done on the device, so reading their outcome costs no extra sync),
        then the counts bound for each rank."""
        R, El = self.ep_size, self.num_local_experts
        device = counts_E.device
        rows = x_Nd.shape[0] if x_Nd.dim() == 2 else -1
        dtype_code = _DTYPES.index(x_Nd.dtype) if x_Nd.dtype in _DTYPES else -1
        d = x_Nd.shape[-1] if x_Nd.dim() else 0
        send_RH = torch.zeros(R, _HEADER + El, dtype=torch.int64, device=device)
        if x_Nd.dim() != 2:
            header = torch.tensor([_BAD_DIM, d, dtype_code, x_Nd.dim(), 0], device=device)
        elif dtype_code < 0:
            header = torch.tensor([_BAD_DTYPE, d, dtype_code, 0, 0], device=device)
        elif counts_E.numel() != R * El:
            header = torch.tensor([_BAD_LEN, d, dtype_code, counts_E.numel(), R * El], device=device)
        else:  # built on the device from the counts and fills of Python numbers: no copy, no sync
            total = counts_E.sum().reshape(1)
            status = torch.where((counts_E < 0).any(), _NEGATIVE, torch.where(total > rows, _BAD_SUM, _OK))
            header = torch.cat([status.reshape(1), _fill(d, device), _fill(dtype_code, device), total,
                                _fill(rows, device)])
            send_RH[:, _HEADER:] = torch.where(status == _OK, counts_E.reshape(R, El), 0)
        send_RH[:, :_HEADER] = header
        return send_RH

    def _check(self, header: list[list[int]]) -> None:
        """Raise the same DispatchError on every rank if any rank's header is bad or differs."""
        problems = []
        for src, (status, d, dtype_code, a, b) in enumerate(header):
            if status == _BAD_LEN:
                problems.append(f"EP rank {src}: counts_E has {a} entries, expected num_experts={b}")
            elif status == _NEGATIVE:
                problems.append(f"EP rank {src}: counts_E has negative entries")
            elif status == _BAD_SUM:
                problems.append(f"EP rank {src}: counts_E sums to {a} but x_Nd has only {b} rows (split-size mismatch)")
            elif status == _BAD_DIM:
                problems.append(f"EP rank {src}: x_Nd must be 2-D [M, d], got {a} dims")
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
