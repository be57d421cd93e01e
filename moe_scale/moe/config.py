"""`MoEConfig`: every option of an MoE layer, validated when it is built."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from moe_scale.moe.dispatch import DROP_POLICIES
from moe_scale.moe.experts import ACTIVATIONS
from moe_scale.moe.grouped_gemm import METHODS
from moe_scale.moe.losses import AuxLossWeights, check_supported
from moe_scale.moe.routing import ROUTERS, SCORE_FUNCS
from moe_scale.validation import check_choice

BACKENDS = ("auto", "core", "cpu")
BALANCE_SCOPES = ("micro_batch", "global")


@dataclass
class MoEConfig:
    """Options of one `MoELayer`.

    router                  a name in ROUTERS (moe/routing.py); "switch" is top-1 with the full
                            softmax gate, "topk" renormalises over the k kept experts (GShard top-2)
    k                       experts per token (expert choice: average experts per token)
    capacity_factor         train capacity = ceil(k * S / E * capacity_factor)
    eval_capacity_factor    the same in eval mode
    min_capacity            lower bound on the capacity
    drop_policy             "position" (first come) or "probability" (highest gate kept)
    dropless                no capacity: every assignment is computed
    jitter                  switch input jitter eps (training only)
    random_second           GShard: keep the 2nd expert with probability 2*g2 (training only)
    hierarchical_groups     hierarchical router: number of groups a (E = a * b)
    hierarchical_k_groups   groups chosen per token by the primary gate
    aux_loss                weights of the balancing losses (importance, load, switch, z)
    grouped_gemm            expert GEMMs: auto (`torch._grouped_mm` where its rules hold, else a
                            loop), grouped_mm, loop (see moe/grouped_gemm.py)
    score_func              topk router: "softmax" or "sigmoid" (DeepSeek-V3) scores
    renormalize             topk router: divide the kept scores by their sum (None: yes for k > 1
                            with softmax and for sigmoid; OLMoE / Qwen3-MoE set False)
    route_scale             topk router: factor on the combine weights (DeepSeek-V3)
    num_groups, topk_groups topk router: group-limited routing, each token picks among the
                            experts of its topk_groups best of num_groups groups (one group per
                            EP rank or node bounds the ranks a token reaches)
    bias_update_rate        topk router: > 0 turns on auxiliary-loss-free balancing, a per-expert
                            selection bias moved by this much per step against the load
    num_shared_experts      always-on experts of width d_hidden beside the routed ones (a dense
                            SwiGLU / activation MLP of width num_shared_experts * d_hidden)
    shared_expert_gate      scale the shared experts' output per token by a learned sigmoid
                            gate, sigmoid(x w_gate) (Qwen2-MoE)
    balance_scope           "micro_batch": balancing losses from this call's tokens; "global":
                            from statistics summed over data-parallel ranks and the step's
                            micro-batches (`losses.BalanceWindow`; the trainer connects it)
    backend                 core (default: plain PyTorch, every device), cpu (the CPU kernels of
                            moe/cpu/ for CPU tensors; built on first use), auto (cpu where
                            `moe.cpu.kernels.available()`: an AVX-512 CPU with a compiler and no
                            CUDA; else core)
    """

    d_model: int
    num_experts: int
    d_hidden: int | None = None
    k: int = 2
    router: str = "topk"
    activation: str = "gelu"
    expert_bias: bool = False
    capacity_factor: float = 1.25
    eval_capacity_factor: float = 2.0
    min_capacity: int = 4
    drop_policy: str = "position"
    dropless: bool = False
    jitter: float = 0.0
    random_second: bool = False
    hierarchical_groups: int = 0
    hierarchical_k_groups: int = 1
    aux_loss: AuxLossWeights = field(default_factory=AuxLossWeights)
    grouped_gemm: str = "auto"
    backend: str = "core"
    score_func: str = "softmax"
    renormalize: bool | None = None
    route_scale: float = 1.0
    num_groups: int = 0
    topk_groups: int = 0
    bias_update_rate: float = 0.0
    num_shared_experts: int = 0
    shared_expert_gate: bool = False
    balance_scope: str = "micro_batch"

    def __post_init__(self):
        if isinstance(self.aux_loss, dict):
            self.aux_loss = AuxLossWeights(**self.aux_loss)
        if self.d_hidden is None:
            self.d_hidden = 4 * self.d_model
        _positive(d_model=self.d_model, num_experts=self.num_experts, d_hidden=self.d_hidden, k=self.k)
        check_choice("router", self.router, tuple(ROUTERS))
        check_choice("activation", self.activation, ACTIVATIONS)
        check_choice("drop_policy", self.drop_policy, DROP_POLICIES)
        check_choice("grouped_gemm", self.grouped_gemm, METHODS)
        check_choice("backend", self.backend, BACKENDS)
        spec = ROUTERS[self.router]
        if self.k > self.num_experts:
            raise ValueError(f"k={self.k} exceeds num_experts={self.num_experts}; lower k or add experts")
        if spec.fixed_k is not None and self.k != spec.fixed_k:
            raise ValueError(f"the {self.router} router is top-{spec.fixed_k}: set k={spec.fixed_k}")
        defaults = {"jitter": 0.0, "random_second": False, "hierarchical_groups": 0, "hierarchical_k_groups": 1,
                    "renormalize": None, "score_func": "softmax", "route_scale": 1.0, "num_groups": 0,
                    "topk_groups": 0, "bias_update_rate": 0.0}
        for option, default in defaults.items():
            if getattr(self, option) != default and option not in spec.options:
                users = sorted(name for name, s in ROUTERS.items() if option in s.options)
                raise ValueError(f"{option} applies to the {users} router(s), not {self.router!r}; "
                                 f"leave it at {default!r}")
        check_supported(self.aux_loss, spec.stats, self.router)
        check_choice("score_func", self.score_func, SCORE_FUNCS)
        check_choice("balance_scope", self.balance_scope, BALANCE_SCOPES)
        if not (self.route_scale > 0 and math.isfinite(self.route_scale)):
            raise ValueError(f"route_scale must be a positive number, got {self.route_scale}")
        if not (self.bias_update_rate >= 0 and math.isfinite(self.bias_update_rate)):
            raise ValueError(f"bias_update_rate must be >= 0, got {self.bias_update_rate}")
        if self.num_shared_experts < 0:
            raise ValueError(f"num_shared_experts must be >= 0, got {self.num_shared_experts}")
        if self.shared_expert_gate and not self.num_shared_experts:
            raise ValueError("shared_expert_gate gates the shared experts: set num_shared_experts >= 1, "
                             "or shared_expert_gate=False")
        if self.num_groups > 1:
            G, M = self.num_groups, self.topk_groups
            if self.num_experts % G:
                raise ValueError(f"num_groups={G} must divide num_experts={self.num_experts}")
            if not 1 <= M <= G:
                raise ValueError(f"topk_groups must be in [1, num_groups={G}], got {M}")
            if self.k > M * (self.num_experts // G):
                raise ValueError(f"k={self.k} exceeds the experts of topk_groups={M} groups "
                                 f"({M * (self.num_experts // G)}); raise topk_groups or lower k")
        elif self.topk_groups:
            raise ValueError("topk_groups needs num_groups > 1 (group-limited routing)")
        for name in ("capacity_factor", "eval_capacity_factor"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)} (use dropless=True for no capacity)")
        if self.min_capacity < 0:
            raise ValueError(f"min_capacity must be >= 0, got {self.min_capacity}")
        if not 0 <= self.jitter < 1:
            raise ValueError(f"jitter must be in [0, 1), got {self.jitter}")
        if self.random_second and self.k != 2:
            raise ValueError("random_second is GShard's top-2 option: use router='topk', k=2")
        if self.router == "expert_choice" and self.dropless:
            raise ValueError("expert_choice routing has a fixed capacity per expert; set dropless=False")
        if self.router == "hierarchical":
            a = self.hierarchical_groups
            if a < 1 or self.num_experts % a:
                raise ValueError(
                    f"hierarchical_groups={a} must be >= 1 and divide num_experts={self.num_experts}"
                )
            if not 1 <= self.hierarchical_k_groups <= a:
                raise ValueError(f"hierarchical_k_groups must be in [1, {a}], got {self.hierarchical_k_groups}")
            if self.k > self.num_experts // a:
                raise ValueError(f"k={self.k} exceeds the experts per group ({self.num_experts // a})")

    @property
    def experts_per_token(self) -> int:
        """Assignments per token before drops (the k in the capacity formula)."""
        if self.router == "hierarchical":
            return self.k * self.hierarchical_k_groups
        return self.k


def _positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
