"""The token exchange the layer calls between its dispatch plan and its experts.

    dispatch(x_Nd, counts_E) -> x_local, local_counts_E, handle
    combine(y_local, handle) -> y_Nd
    bytes_sent                       bytes sent to other processes so far (the one traffic counter)

x_Nd `[N, d]` holds this process's rows sorted by global expert, `counts_E[e]` (a device
tensor) rows for expert e first and rows that no expert computes after them; x_local
`[M_local, d]` the rows this process's experts compute, sorted by local expert with
`local_counts_E` rows each (a device tensor). `LocalComm` is the one-process case; expert
parallelism swaps in `distributed.comm.AllToAllComm` (see distributed/parallelize.py).
"""

from __future__ import annotations

from typing import Any, Protocol

from torch import Tensor


class ExpertComm(Protocol):
    def dispatch(self, x_Nd: Tensor, counts_E: Tensor) -> tuple[Tensor, Tensor, Any]: ...

    def combine(self, y_local: Tensor, handle: Any) -> Tensor: ...

    @property
    def bytes_sent(self) -> int: ...


class LocalComm:
    """All experts live in this process: the exchange is the identity."""

    def dispatch(self, x_Nd: Tensor, counts_E: Tensor) -> tuple[Tensor, Tensor, None]:
        return x_Nd, counts_E, None

    def combine(self, y_local: Tensor, handle: None) -> Tensor:
        return y_local

    @property
    def bytes_sent(self) -> int:
        return 0
