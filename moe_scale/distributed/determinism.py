"""Deterministic mode: the same seed gives bitwise identical outputs and gradients run to run.

What makes an expert-parallel step reproducible here:
- received rows are placed by (source rank, local expert) offsets computed from the exchanged
  counts, never in arrival order, and every reordering is an index gather (comm.py, a2a.py);
- `torch.use_deterministic_algorithms(True)`: CPU kernels are deterministic already; on CUDA
  this selects the deterministic `index_add` / scatter used by combine and its backward;
- RNG: parameters are initialised from `seed` on every rank (replicas agree; expert e of a
  layer from `expert_seed`, whichever rank holds it), then each rank
  reseeds with `rank_seed(seed, rank)` so routing noise (noisy top-k, jitter, GShard's random
  second expert) differs between ranks' tokens but not between runs.
Collective reductions (gloo ring all-reduce, NCCL with a fixed algorithm) sum in a fixed order
for a fixed world size; the result can change with the world size, not from run to run.
"""

from __future__ import annotations

import os
import random
import zlib

import torch


def seed_everything(seed: int, deterministic: bool = False, warn_only: bool = True) -> None:
    """Seed python and torch (CPU and CUDA generators) with `seed`; in deterministic mode also pick
    deterministic kernels (`warn_only`: an op without one warns instead of raising)."""
    random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=warn_only)
        torch.backends.cudnn.benchmark = False


def rank_seed(seed: int, rank: int) -> int:
    """The per-rank stream for data-dependent randomness (dropout, routing noise), after model init."""
    return seed * 1_000_003 + 7919 * (rank + 1)


def expert_seed(init_seed: int, layer_name: str, expert: int) -> int:
    """The seed of global expert `expert` of the `GroupedExperts` at module path `layer_name`: its
    initial weights do not depend on which rank makes them."""
    return (init_seed * 1_000_003 + zlib.crc32(layer_name.encode()) * 65_537 + expert) % 2**63
