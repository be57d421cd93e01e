"""Token exchange between the dispatch plan and the experts.

`LocalComm` is the one-process case: every expert is local and the exchange is the identity.
Expert parallelism swaps in a comm with the same two methods (see distributed/parallelize.py).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor


class LocalComm:
    """All experts live in this process."""

    def dispatch(self, x_Md: Tensor, counts_E: Tensor) -> tuple[Tensor, list[int], Any]:
        """Rows grouped by global expert -> rows grouped by local expert, local counts, handle."""
        return x_Md, counts_E.tolist(), None

    def combine(self, y_Md: Tensor, handle: Any) -> Tensor:
        """Inverse of `dispatch`: local expert outputs back in the caller's row order."""
        return y_Md
