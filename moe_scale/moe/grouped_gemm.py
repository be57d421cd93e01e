"""Grouped matrix multiplication over rows sorted by group, with device-side offsets.

`x_Mk` holds M rows sorted by group; `ends_G` (int32, on x's device) is the cumulative row
count, so group g owns rows [ends_G[g-1], ends_G[g]) and is multiplied by `w_Gkn[g]`. Rows at
or past `ends_G[-1]` belong to no group (capacity drops parked at the end of a static-size
buffer): their output and their input gradient are exactly zero.

Two implementations, chosen once per (device, dtype, shape) by `grouped_mm_supported`:

    grouped_mm  `torch._grouped_mm`: one kernel for all groups, the offsets never leave the
                device. Its rules: row strides a multiple of 16 bytes (d and n multiples of 8
                in bf16, of 4 in float32); on CUDA bfloat16 on compute capability 9.x / 10.x
                only (elsewhere torch's own fallback copies the offsets to the host); on CPU
                float32 and bfloat16 (bfloat16 under torch.compile); on `meta` bfloat16.
    loop        one `mm` per non-empty group. It reads the offsets on the host: one sync per
                call, the price of shapes `_grouped_mm` does not take.

Both give exactly zero weight gradients for empty groups, whatever the kernel does with them
(upstream CUDA kernels have left non-zero values there), and never read the rows past the end.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

METHODS = ("auto", "grouped_mm", "loop")


@functools.cache
def cuda_capability(index: int) -> tuple[int, int]:
    """(major, minor) of CUDA device `index`, asked once per process: the layer asks every call."""
    return torch.cuda.get_device_capability(index)


def grouped_mm_supported(device: torch.device, dtype: torch.dtype, *dims: int) -> bool:
    """Whether `torch._grouped_mm` runs these products on `device` without a host sync.

    dims: every inner and outer dimension of the products (each row stride must be a multiple
    of 16 bytes).
    """
    if not hasattr(torch, "_grouped_mm"):
        return False
    itemsize = torch.empty((), dtype=dtype).element_size()
    if any(d * itemsize % 16 for d in dims):
        return False
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, _ = cuda_capability(index)
        return dtype == torch.bfloat16 and major in (9, 10)
    if device.type == "cpu":  # torch.compile traces it with the meta rules below
        return dtype == torch.bfloat16 or (dtype == torch.float32 and not torch.compiler.is_compiling())
    if device.type == "meta":  # its shape function follows the CUDA kernel's rules
        return dtype == torch.bfloat16
    return False


def choose_method(device: torch.device, dtype: torch.dtype, dims: tuple[int, ...], method: str = "auto") -> str:
    """"grouped_mm" where its rules hold (or when asked for), else "loop"."""
    if method not in METHODS:
        raise ValueError(f"grouped GEMM method must be one of {METHODS}, got {method!r}")
    if method == "auto":
        return "grouped_mm" if grouped_mm_supported(device, dtype, *dims) else "loop"
    return method


def group_ends(counts_G: Tensor) -> Tensor:
    """Cumulative row counts as the int32 offsets `_grouped_mm` takes (built once per layer call)."""
    return torch.cumsum(counts_G, 0, dtype=torch.int32)


def rows_in_groups(ends_G: Tensor, num_rows: int) -> Tensor:
    """`[M, 1]` bool: row m belongs to a group (m < ends_G[-1])."""
    return (torch.arange(num_rows, device=ends_G.device) < ends_G[-1:])[:, None]


def row_groups(ends_G: Tensor, num_rows: int) -> Tensor:
    """Group of each row `[M]` (int64; rows past the end get the last group's index)."""
    rows = torch.arange(num_rows, device=ends_G.device, dtype=ends_G.dtype)
    return torch.searchsorted(ends_G, rows, right=True).clamp_(max=ends_G.numel() - 1)


def _mm_grouped(x_Mk: Tensor, w_Gkn: Tensor, ends_G: Tensor) -> Tensor:
    return torch._grouped_mm(x_Mk, w_Gkn, offs=ends_G)


def _wgrad_grouped(x_Mk: Tensor, g_Mn: Tensor, ends_G: Tensor) -> Tensor:
    return torch._grouped_mm(x_Mk.t(), g_Mn, offs=ends_G)


def _mm_loop(x_Mk: Tensor, w_Gkn: Tensor, ends: list[int]) -> Tensor:
    out = x_Mk.new_zeros(x_Mk.shape[0], w_Gkn.shape[-1])
    start = 0
    for g, end in enumerate(ends):
        if end > start:
            torch.mm(x_Mk[start:end], w_Gkn[g], out=out[start:end])
        start = end
    return out


def _wgrad_loop(x_Mk: Tensor, g_Mn: Tensor, ends: list[int]) -> Tensor:
    out = x_Mk.new_zeros(len(ends), x_Mk.shape[-1], g_Mn.shape[-1])
    start = 0
    for g, end in enumerate(ends):
        if end > start:
            torch.mm(x_Mk[start:end].t(), g_Mn[start:end], out=out[g])
        start = end
    return out


class _GroupedMM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_Mk: Tensor, w_Gkn: Tensor, ends_G: Tensor, method: str):
        ctx.save_for_backward(x_Mk, w_Gkn, ends_G)
        ctx.method = method
        if method == "loop":
            ctx.ends = ends_G.tolist()  # the loop's one host read, reused by the backward
            return _mm_loop(x_Mk, w_Gkn, ctx.ends)
        in_group = rows_in_groups(ends_G, x_Mk.shape[0])
        return torch.where(in_group, _mm_grouped(x_Mk, w_Gkn, ends_G), 0)

    @staticmethod
    def backward(ctx, g_Mn: Tensor):
        x_Mk, w_Gkn, ends_G = ctx.saved_tensors
        grad_x = grad_w = None
        if ctx.method == "loop":
            if ctx.needs_input_grad[0]:
                grad_x = _mm_loop(g_Mn, w_Gkn.transpose(-2, -1), ctx.ends)
            if ctx.needs_input_grad[1]:
                grad_w = _wgrad_loop(x_Mk, g_Mn, ctx.ends)
            return grad_x, grad_w, None, None
        g_Mn = g_Mn.contiguous()
        if ctx.needs_input_grad[0]:
            in_group = rows_in_groups(ends_G, x_Mk.shape[0])
            grad_x = torch.where(in_group, _mm_grouped(g_Mn, w_Gkn.transpose(-2, -1), ends_G), 0)
        if ctx.needs_input_grad[1]:
            counts_G = torch.diff(ends_G, prepend=ends_G.new_zeros(1))
            grad_w = torch.where((counts_G > 0)[:, None, None], _wgrad_grouped(x_Mk, g_Mn, ends_G), 0)
        return grad_x, grad_w, None, None


def grouped_linear(x_Mk: Tensor, w_Gkn: Tensor, ends_G: Tensor, method: str = "auto") -> Tensor:
    """`[M, k]` rows sorted by group times per-group `[k, n]` weights -> `[M, n]`.

    ends_G: int32 cumulative row counts on x's device (`group_ends`); rows past `ends_G[-1]`
    give zero rows. `x_Mk` and `w_Gkn` must have the same dtype.
    """
    if ends_G.shape != (w_Gkn.shape[0],):
        raise ValueError(f"ends_G must have one entry per group ({w_Gkn.shape[0]}), got {tuple(ends_G.shape)}")
    if x_Mk.shape[-1] != w_Gkn.shape[1]:
        raise ValueError(f"rows have {x_Mk.shape[-1]} columns, the weights expect {w_Gkn.shape[1]}")
    method = choose_method(x_Mk.device, x_Mk.dtype, tuple(w_Gkn.shape[1:]), method)
    return _GroupedMM.apply(x_Mk.contiguous(), w_Gkn, ends_G, method)
