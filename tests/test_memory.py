"""Peak memory of routing + dispatch at thousands of experts (ARCHITECTURE.md: no [S, E, C]).

The top-k router keeps at most one `[S, E]` float32 tensor (the probabilities) for backward
and rebuilds the logit gradient in chunks of tokens; dispatch is O(S * k * d). The bound below
is derived from that:

    S*E*4                  the probabilities
    + S*E*4 / 2            chunk transients of the forward / backward loops: a few chunks, each
                           a small fraction of the tokens (16 MiB at E=4096 against 256 MiB)
    + 16 * S*k*d*4         x, its gradient, permuted rows, weighted rows, y, upstream grad...
    + 32 MiB               allocator and thread-pool noise

With the fused CPU kernels a `[S, E]` this large is not kept at all (backward recomputes each
chunk's logits): the bound drops the first term. The eager path (MOE_SCALE_CPU_KERNELS=eager)
is held to the full bound, and the measurement must see its `[S, E]` tensor.

CPU torch has no allocator statistics, so a fresh interpreter measures the growth of its peak
RSS over one forward + backward: it resets the kernel's high-water mark (`/proc/self/clear_refs`,
5) and reads `VmHWM` after the step. `getrusage().ru_maxrss` cannot serve: a child started from
pytest inherits the parent's peak RSS through fork/exec as a floor, so under a full test run its
delta undercounts (seen: 206 MiB for a step that holds a 256 MiB tensor). The child runs with
MALLOC_MMAP_THRESHOLD_=128 KiB so glibc returns freed tensor memory at once and RSS follows
live tensors, not blocks the allocator keeps cached (without it: 483 MiB instead of 338).

A control run swaps in plain autograd softmax + topk, which keeps probabilities and their
gradients (several more `[S, E]` tensors), and must break the bound: the test can tell the
two apart.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

S, E, D, K = 16384, 4096, 64, 2
MIB = 1 << 20

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")


def bound_bytes(keeps_probabilities: bool = True) -> int:
    return S * E * 4 * (3 if keeps_probabilities else 1) // 2 + 16 * S * K * D * 4 + 32 * MIB


def _measure(naive: bool, kernels: str = "auto") -> int:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(1 << 17), OMP_NUM_THREADS="2", MOE_SCALE_CPU_KERNELS=kernels)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, os.path.abspath(__file__)] + (["naive"] if naive else [])
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if "skip" in result:
        pytest.skip(result["skip"])
    return result["peak_bytes"]


@pytest.mark.timeout(120)
def test_routing_and_dispatch_peak_memory_is_one_probability_tensor_on_the_eager_path():
    peak, bound = _measure(naive=False, kernels="eager"), bound_bytes()
    assert peak <= bound, f"eager router peak {peak / MIB:.0f} MiB > bound {bound / MIB:.0f} MiB"
    assert peak >= 0.9 * S * E * 4, "the measurement must at least see the probabilities"


@pytest.mark.timeout(120)
def test_fused_router_keeps_no_experts_by_tokens_tensor():
    from moe_scale.moe.cpu_kernels import load_kernels

    if load_kernels() is None:
        pytest.skip("no fused CPU kernels here")
    peak, bound = _measure(naive=False), bound_bytes(keeps_probabilities=False)
    assert peak <= bound, f"fused router peak {peak / MIB:.0f} MiB > bound {bound / MIB:.0f} MiB"
    assert peak < S * E * 4 / 2, "a [S, E] float32 tensor would not fit under this peak"


@pytest.mark.timeout(120)
def test_bound_catches_a_router_that_keeps_more_dense_tensors():
    """Control: autograd softmax + topk on the same problem must break the bound."""
    peak, bound = _measure(naive=True), bound_bytes()
    assert peak > bound, f"autograd softmax+topk peak {peak / MIB:.0f} MiB should exceed {bound / MIB:.0f} MiB"


def _naive_router(x_Sd, w_dE, k, renormalize, flat=False):
    """Plain autograd: keeps logits, probabilities and their gradients at full [S, E] size."""
    import torch

    logits = x_Sd @ w_dE
    prob = torch.softmax(logits, dim=-1)
    top_val, index = torch.topk(logits, k, dim=-1)
    weight = torch.softmax(top_val, dim=-1) if renormalize else prob.gather(1, index)
    lse = torch.logsumexp(logits, dim=-1)
    return weight.t().reshape(-1) if flat else weight, index, prob.sum(0), (lse * lse).sum(), None


def _vm_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _run(naive: bool) -> None:
    import torch

    from moe_scale.moe import routing
    from moe_scale.moe.dispatch import permute, plan_dispatch, unpermute
    from moe_scale.moe.losses import aux_losses

    if naive:
        routing.topk_softmax_router = _naive_router

    def step(num_tokens, num_experts, router, x, g):
        r = router(x)
        plan = plan_dispatch(r, None)
        y = unpermute(permute(x, plan), plan, num_tokens)
        losses = aux_losses(r.stats, num_experts)
        ((y * g).sum() + losses["switch"] + losses["z"]).backward()

    torch.manual_seed(0)
    small = routing.TopKSoftmaxRouter(D, 64, k=K)
    step(256, 64, small, torch.randn(256, D, requires_grad=True), torch.randn(256, D))  # load kernels, pools

    router = routing.TopKSoftmaxRouter(D, E, k=K)
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
    _run(naive=sys.argv[1:] == ["naive"])
