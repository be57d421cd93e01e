"""The CPU kernel backend: fused C++ kernels (csrc/) for the expert MLP on CPU tensors.

    expert_mlp     the expert MLP's span loop, one group of experts per thread, with a native
                   bf16 GEMM on AVX512-BF16 CPUs (grouped_mlp.py; csrc/mlp_kernels.cpp,
                   bf16_gemm.cpp, activation_kernels.cpp)
    CPUTuning      how it runs: buckets, groups, splits, which loop and GEMM (tuning.py);
                   `with use_tuning(...)` runs a block with another one

A layer built with `backend="cpu"` (or "auto" where `kernels.available()`) hands this step to
this package; everything else, and every tensor that is not a float32 / bfloat16 CPU
tensor or is being traced by torch.compile, runs the core path, which is the reference the
tests hold these kernels to. The counts are read on the host here: CPU tensors have no device
to sync with.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from moe_scale.moe.cpu import grouped_mlp
from moe_scale.moe.cpu.kernels import available, kernels_for
from moe_scale.moe.cpu.layouts import choose_layout
from moe_scale.moe.cpu.tuning import CPUTuning, current_tuning, use_tuning

__all__ = ["CPUTuning", "available", "current_tuning", "expert_mlp", "use_tuning"]


def expert_mlp(experts, x_Md: Tensor, counts_E: Tensor) -> Tensor | None:
    """`GroupedExperts.forward` on the span loop, or None where the kernels do not apply:
    x_Md `[M, d]` rows sorted by expert, counts_E `[E]` rows per expert; run with `current_tuning()`."""
    if kernels_for(x_Md) is None:
        return None
    counts = counts_E.tolist()
    kept = sum(counts)
    w1, w2, w3, b1, b2 = experts.weights(x_Md.dtype)
    y = grouped_mlp.grouped_mlp(x_Md[:kept], w1, w2, w3, b1, b2, counts, choose_layout(counts), experts.activation)
    return y if kept == x_Md.shape[0] else F.pad(y, (0, 0, 0, x_Md.shape[0] - kept))
