"""`MoELayer`: router -> dispatch plan -> (comm) -> grouped experts -> (comm) -> combine.

One path for every device. Under autocast the tokens are cast to the experts' compute dtype
before dispatch and the combine sums in float32. Counts and offsets stay on the device; in one
process the layer reads no tensor on the host (it runs on `meta` and compiles with
`fullgraph=True`); under expert parallelism the comm reads the split sizes once per exchange.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from functools import cached_property

import torch
from torch import Tensor, nn

from moe_scale.moe.autocast import compute_dtype
from moe_scale.moe.comm import LocalComm
from moe_scale.moe.config import MoEConfig
from moe_scale.moe.dispatch import DispatchPlan, combine, permute, plan_dispatch, served_tokens
from moe_scale.moe.experts import FusedExpertMLP, GroupedExperts, SharedExperts
from moe_scale.moe.losses import LOSS_NAMES, BalanceWindow, aux_losses, weighted_names, weighted_total
from moe_scale.moe.routing import ROUTERS, RouterStats, capacity_for


@dataclass
class MoEStats:
    """What one MoE layer call did (global expert axis E; tokens of this process).

    tokens_per_expert_E   assignments computed by each expert (after capacity drops)
    routed_per_expert_E   assignments routed to each expert (before drops)
    num_dropped           assignments dropped for capacity (0-dim)
    num_tokens            tokens in the call
    capacity              per-expert capacity used, None when dropless
    aux_loss              weighted sum of the balancing losses: add it to the training loss
    aux_losses            every balancing loss the router supports, unweighted (on first read)
    num_unrouted          tokens with no computed assignment: their output is zero (on first read)
    num_assignments       assignments before drops (0-dim, on first read)
    """

    tokens_per_expert_E: Tensor
    routed_per_expert_E: Tensor
    num_dropped: Tensor
    num_tokens: int
    capacity: int | None
    aux_loss: Tensor
    router_stats: RouterStats = field(repr=False)
    plan: DispatchPlan = field(repr=False)
    weighted_losses: dict[str, Tensor] = field(repr=False)

    @cached_property
    def aux_losses(self) -> dict[str, Tensor]:
        num_experts = self.tokens_per_expert_E.shape[0]
        unweighted = LOSS_NAMES - set(self.weighted_losses)  # the weighted ones are computed already
        return {**self.weighted_losses, **aux_losses(self.router_stats, num_experts, only=unweighted)}

    @cached_property
    def num_unrouted(self) -> Tensor:
        return self.num_tokens - served_tokens(self.plan, self.num_tokens)

    @cached_property
    def num_assignments(self) -> Tensor:
        return self.routed_per_expert_E.sum()

    @property
    def dropped_fraction(self) -> Tensor:
        return self.num_dropped.float() / self.num_assignments.clamp(min=1).float()


@dataclass(frozen=True)
class ComputeBackend:
    """A fused implementation of a step of the layer, chosen once when the layer is built.

    expert_mlp     the expert MLP, or None for the core's grouped GEMMs
    """

    name: str
    expert_mlp: FusedExpertMLP | None = None


def resolve_backend(name: str) -> ComputeBackend:
    """"core", "cpu" (moe/cpu/: the CPU kernels) or "auto" (cpu where it is available)."""
    if name == "core":
        return ComputeBackend("core")
    from moe_scale.moe import cpu

    if name == "auto" and not cpu.available():
        return ComputeBackend("core")
    return ComputeBackend("cpu", expert_mlp=cpu.expert_mlp)


class MoELayer(nn.Module):
    """Sparsely-gated mixture of feed-forward experts.

    `MoELayer(d_model, num_experts, **options)` with the options of `MoEConfig`.
    forward(x `[..., d]`, token_ids `[...]` (hash routing), expert_losses `[..., E]`
    (min-loss routing)) -> (y `[..., d]`, MoEStats). A token whose assignments are all
    dropped gets zero routed output (plus the shared experts'): keep a residual connection
    around the layer. For `[B, T, d]` inputs the B rows are the sequences of the
    sequence-wise balance loss.

    `update_expert_bias(load_E)` applies auxiliary-loss-free balancing after an optimizer
    step, with the step's assignments per expert summed over micro-batches and ranks.
    """

    def __init__(self, d_model: int, num_experts: int, **options):
        super().__init__()
        unknown = set(options) - {f.name for f in fields(MoEConfig)}
        if unknown:
            raise TypeError(f"unknown MoELayer option(s) {sorted(unknown)}; see MoEConfig for the options")
        self.cfg = cfg = MoEConfig(d_model=d_model, num_experts=num_experts, **options)
        self.backend = resolve_backend(cfg.backend)
        self.router_spec = ROUTERS[cfg.router]
        self.router = self.router_spec.build(cfg)
        self.experts = GroupedExperts(
            num_experts, d_model, cfg.d_hidden, cfg.activation, bias=cfg.expert_bias, method=cfg.grouped_gemm,
            fused=self.backend.expert_mlp,
        )
        self.shared_experts = None
        if cfg.num_shared_experts:
            self.shared_experts = SharedExperts(d_model, cfg.num_shared_experts * cfg.d_hidden, cfg.activation,
                                                gated=cfg.shared_expert_gate)
        self.comm = LocalComm()
        # Global-batch statistics: without a data-parallel group the window sums micro-batches only.
        self.balance_window = BalanceWindow() if cfg.balance_scope == "global" else None

    @classmethod
    def from_config(cls, cfg: MoEConfig) -> "MoELayer":
        options = {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name not in ("d_model", "num_experts")}
        return cls(cfg.d_model, cfg.num_experts, **options)

    def update_expert_bias(self, load_E: Tensor) -> None:
        """Move the selection bias against `load_E` (see `TopKRouter.update_bias`); no-op for a
        layer without bias balancing."""
        if self.cfg.bias_update_rate > 0:
            self.router.update_bias(load_E, self.cfg.bias_update_rate)

    def capacity(self, num_tokens: int) -> int:
        cf = self.cfg.capacity_factor if self.training else self.cfg.eval_capacity_factor
        return capacity_for(num_tokens, self.cfg.num_experts, self.cfg.experts_per_token, cf, self.cfg.min_capacity)

    def _router_inputs(self, x: Tensor, capacity: int, token_ids: Tensor | None,
                       expert_losses: Tensor | None) -> dict:
        num_sequences = math.prod(x.shape[:-2]) if x.dim() >= 3 else 1
        available = {"token_ids": token_ids, "expert_losses": expert_losses, "capacity": capacity,
                     "num_sequences": num_sequences}
        if "positions" in self.router_spec.inputs:
            positions = None
            if x.dim() >= 3 and token_ids is None:
                positions = torch.arange(x.shape[-2], device=x.device).expand(x.shape[:-1]).reshape(-1)
            available["positions"] = positions
        return {name: available[name] for name in self.router_spec.inputs}

    def forward(
        self, x: Tensor, *, token_ids: Tensor | None = None, expert_losses: Tensor | None = None
    ) -> tuple[Tensor, MoEStats]:
        d = self.cfg.d_model
        if x.shape[-1] != d:
            raise ValueError(f"MoELayer(d_model={d}) expects inputs [..., {d}], got {tuple(x.shape)}")
        x_Sd = x if x.dim() == 2 else x.reshape(-1, d)
        S = x_Sd.shape[0]
        capacity = self.capacity(S)
        routing = self.router(x_Sd, **self._router_inputs(x, capacity, token_ids, expert_losses))
        uncapped = self.cfg.dropless or routing.capacity_bound
        plan = plan_dispatch(routing, None if uncapped else capacity, self.cfg.drop_policy)

        x_Nd = permute(x_Sd.to(compute_dtype(x_Sd)), plan)
        x_local, counts_local, handle = self.comm.dispatch(x_Nd, plan.counts_E)
        y_local = self.experts(x_local, counts_local)
        y_Nd = self.comm.combine(y_local, handle)
        y_Sd = combine(y_Nd, plan, S).to(x.dtype)
        if self.shared_experts is not None:
            y_Sd = y_Sd + self.shared_experts(x_Sd).to(x.dtype)

        if self.training and self.balance_window is not None:
            routing.stats = self.balance_window.globalize(routing.stats, S)
        weighted = aux_losses(routing.stats, self.cfg.num_experts, only=weighted_names(self.cfg.aux_loss))
        stats = MoEStats(
            tokens_per_expert_E=plan.counts_E,
            routed_per_expert_E=plan.routed_E,
            num_dropped=plan.num_dropped,
            num_tokens=S,
            capacity=None if uncapped else capacity,
            aux_loss=weighted_total(weighted, self.cfg.aux_loss, y_Sd),
            router_stats=routing.stats,
            plan=plan,
            weighted_losses=weighted,
        )
        return (y_Sd if x.dim() == 2 else y_Sd.reshape(x.shape)), stats
