"""Deterministic mode: the same seed gives bitwise identical outputs and gradients run to run.

What makes an expert-parallel step reproducible here:
- received rows are placed by (source rank, local expert) offsets computed from the exchanged
  counts, never in arrival order, and every reordering is an index gather (comm.py, a2a.py);
- `torch.use_deterministic_algorithms(True)`: CPU kernels are deterministic already; on CUDA
  this selects the deterministic `index_add` / scatter used by combine and its backward;
- RNG: parameters are initialised from `seed` on every rank (replicas agree), then each rank
  reseeds with `rank_seed(seed, rank)` so routing noise (noisy top-k, jitter, GShard's random
  second expert) differs between ranks' tokens but not between runs.
Collective reductions (gloo ring all-reduce, NCCL with a fixed algorithm) sum in a fixed order
for a fixed world size; the result can change with the world size, not from run to run.
"""

from __future__ import annotations

import os
import random

import torch


def set_deterministic(seed: int) -> None:
    """Seed python and torch with `seed` and switch torch to deterministic kernels."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    random.seed(seed)
    torch.manual_seed(seed)


def rank_seed(seed: int, rank: int) -> int:
    """The per-rank stream for data-dependent randomness (routing noise), after model init."""
    return seed * 1_000_003 + 7919 * (rank + 1)
