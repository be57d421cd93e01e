"""Peak memory of routing + dispatch at thousands of experts (ARCHITECTURE.md: no [S, E, C]).

Dispatch is O(S * k * d). The router's `[S, E]` tensors are counted from how each path works:

    core (plain ops)   forward holds the logits and the probabilities; backward the kept
                       probabilities, their gradient and the logits' gradient: 4 * S*E*4 at
                       the peak. The log-sum-exp for the z-loss comes from the top logit and
                       its probability, so no logsumexp keeps the logits.
    + 16 * S*k*d*4     x, its gradient, permuted rows, combined rows, upstream grad...
    + 32 MiB           allocator and thread-pool noise

CPU torch has no allocator statistics, so a fresh interpreter measures the growth of its peak
RSS over one forward + backward: it resets the kernel's high-water mark (`/proc/self/clear_refs`,
5) and reads `VmHWM` after the step. `getrusage().ru_maxrss` cannot serve: a child started from
pytest inherits the parent's peak RSS through fork/exec as a floor. The child runs with
MALLOC_MMAP_THRESHOLD_=128 KiB so glibc returns freed tensor memory at once and RSS follows
live tensors, not blocks the allocator keeps cached.

A control run swaps in textbook autograd softmax + topk + logsumexp, which keeps more `[S, E]`
tensors, and must break the core's bound: the test can tell the two apart.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

S, E, D, K = 16384, 4096, 64, 2
MIB = 1 << 20

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")


def bound_bytes(dense_tensors: int) -> int:
    return S * E * 4 * dense_tensors + 16 * S * K * D * 4 + 32 * MIB


def _measure(mode: str) -> int:
    root = str(Path(__file__).resolve().parents[2])  # the repository, for `import tests`
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(1 << 17), OMP_NUM_THREADS="2")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, os.path.abspath(__file__), mode]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if "skip" in result:
        pytest.skip(result["skip"])
    return result["peak_bytes"]


@pytest.mark.timeout(120)
def test_core_router_peak_memory_is_four_probability_sized_tensors():
    peak, bound = _measure("core"), bound_bytes(4)
    assert peak <= bound, f"core router peak {peak / MIB:.0f} MiB > bound {bound / MIB:.0f} MiB"
    assert peak >= 0.9 * S * E * 4, "the measurement must at least see the probabilities"


@pytest.mark.timeout(120)
def test_bound_catches_a_router_that_keeps_more_dense_tensors():
    """Control: textbook autograd softmax + topk + logsumexp must break the core's bound."""
    peak, bound = _measure("naive"), bound_bytes(4)
    assert peak > bound, f"autograd softmax+topk peak {peak / MIB:.0f} MiB should exceed {bound / MIB:.0f} MiB"


def _naive_router(x_Sd, w_dE, k, renormalize):
    """Textbook autograd: logits kept by logsumexp, probabilities by softmax and the gather."""
    import torch

    logits = x_Sd @ w_dE
    prob = torch.softmax(logits, dim=-1)
    top_val, index = torch.topk(logits, k, dim=-1)
    weight = torch.softmax(top_val, dim=-1) if renormalize else prob.gather(1, index)
    return weight, index, prob.sum(0), torch.logsumexp(logits, dim=-1)


def _vm_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _run(mode: str) -> None:
    import torch

    from moe_scale.moe import routing
    from moe_scale.moe.dispatch import combine, permute, plan_dispatch
    from moe_scale.moe.losses import aux_losses

    if mode == "naive":
        routing.softmax_topk = _naive_router

    def step(num_tokens, num_experts, router, x, g):
        r = router(x)
        plan = plan_dispatch(r, None)
        y = combine(permute(x, plan), plan, num_tokens)
        losses = aux_losses(r.stats, num_experts)
        ((y * g).sum() + losses["switch"] + losses["z"]).backward()

    torch.manual_seed(0)
    small = routing.TopKRouter(D, 64, k=K)
    step(256, 64, small, torch.randn(256, D, requires_grad=True), torch.randn(256, D))  # thread pools

    router = routing.TopKRouter(D, E, k=K)
    x = torch.randn(S, D, requires_grad=True)
    g = torch.randn(S, D)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak RSS to the current RSS
    except OSError as err:
        print(json.dumps({"skip": f"cannot reset the peak RSS here: {err}"}))
        return
    before = _vm_kib("VmRSS")
    step(S, E, router, x, g)
    print(json.dumps({"peak_bytes": (_vm_kib("VmHWM") - before) * 1024, "rss_before_kib": before}))


if __name__ == "__main__":
    _run(sys.argv[1])
