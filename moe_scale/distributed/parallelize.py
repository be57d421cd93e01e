"""`parallelize(model, mesh)`: turn a one-process MoE model into an expert-parallel one.

For every `MoELayer` in the model:
    experts   the stacked weights `[E, ...]` are cut to this EP rank's block `[E_local, ...]`
              (global expert e lives on EP rank e // E_local)
    router    untouched: replicated, averaged over the whole data-parallel world like any
              dense parameter
    comm      `AllToAllComm` over the EP group (flat or hierarchical as the mesh says);
              with ep_size 1 the `LocalComm` stays
    tags      every expert parameter gets
                  moe_expert = True                 (moe_scale's gradient sync)
                  allreduce = False, group_name     (DeepSpeed: `is_moe_param`, and its
                                                     expert-data-parallel group "ep_size_{N}")
                  expert_offset, global_experts     (where the block sits on the global axis)

Sharded initialisation. A model built inside `experts_on_meta()` holds its expert weights on
the meta device (nothing allocated) while the in-place init ops the model applies to them
(`GroupedExperts.reset_parameters`, then e.g. the LM's GPT-2 init) are recorded. `parallelize`
creates only this rank's block on `device` and replays those ops expert by expert, each expert
`e` under a seed of (init_seed, layer name, global index e). So an expert's initial weights do
not depend on the EP size, on which rank holds it or on the device count: EP=1 and EP=N start
from the same function, and EDP replicas agree. The dense parameters are built as usual, by the
model's own init under the run's seed, identically on every rank. A model built under
`torch.device("meta")` as a whole gets its experts initialised the same way, with the ops of
`GroupedExperts.reset_parameters`; its other meta parameters are left to the caller.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from moe_scale.distributed.comm import AllToAllComm
from moe_scale.distributed.determinism import expert_seed
from moe_scale.distributed.mesh import MoEMesh, check_experts
from moe_scale.moe.config import MoEConfig
from moe_scale.moe.experts import GroupedExperts
from moe_scale.moe.layer import MoELayer

_EXPERT_PARAMS = ("w1", "w2", "w3", "b1", "b2")


def moe_layers(model: nn.Module) -> list[tuple[str, MoELayer]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoELayer)]


class ExpertInit(TorchDispatchMode):
    """The in-place ops applied to meta expert parameters, per parameter, in order (see module doc)."""

    def __init__(self):
        super().__init__()
        self.ops: dict[int, list] = {}

    def watch(self, p: nn.Parameter) -> None:
        self.ops[id(p)] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        # In-place ops only: an alias (`w.data`, a view) is not the parameter, and replaying a
        # view op would initialise nothing.
        if args and isinstance(args[0], torch.Tensor) and id(args[0]) in self.ops and func._schema.name.endswith("_"):
            self.ops[id(args[0])].append((func, args[1:], kwargs))
        return func(*args, **kwargs)

    def ops_of(self, experts: GroupedExperts) -> dict[str, list]:
        """name -> recorded ops of each expert parameter of `experts` (those of the layer's own
        `reset_parameters` where nothing was recorded: a model built under `torch.device("meta")`)."""
        recorded = {name: self.ops.get(id(getattr(experts, name))) for name in _EXPERT_PARAMS
                    if getattr(experts, name) is not None}
        if all(recorded.values()):
            return recorded
        return _reset_parameters_ops(experts)


def _reset_parameters_ops(experts: GroupedExperts) -> dict[str, list]:
    rec = ExpertInit()
    params = {name: getattr(experts, name) for name in _EXPERT_PARAMS if getattr(experts, name) is not None}
    with torch.device("meta"):
        probe = {name: nn.Parameter(torch.empty(p.shape, dtype=p.dtype)) for name, p in params.items()}
    for name, p in probe.items():
        rec.watch(p)
        setattr(experts, name, p)
    try:
        with rec, torch.no_grad():
            experts.reset_parameters()
    finally:
        for name, p in params.items():
            setattr(experts, name, p)
    return {name: rec.ops[id(p)] for name, p in probe.items()}


@contextlib.contextmanager
def experts_on_meta() -> Iterator[ExpertInit]:
    """Inside: every `GroupedExperts` gets meta parameters and their init ops are recorded."""
    init = ExpertInit()
    register = nn.Module.register_parameter

    def register_on_meta(module, name, param):
        if isinstance(module, GroupedExperts) and param is not None and not param.is_meta:
            param = nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=param.requires_grad)
            init.watch(param)
        register(module, name, param)

    nn.Module.register_parameter = register_on_meta
    try:
        with init:
            yield init
    finally:
        nn.Module.register_parameter = register


def parallelize(model: nn.Module, mesh: MoEMesh, *, device: torch.device | str = "cpu", init_seed: int = 0,
                init: ExpertInit | None = None) -> nn.Module:
    """Shard the experts of every MoELayer over `mesh`'s EP group, in place; returns `model`."""
    layers = moe_layers(model)
    for _, layer in layers:
        check_experts(layer.cfg.num_experts, mesh.ep_size)
    for name, layer in layers:
        shard_experts(layer.experts, mesh.ep_rank, mesh.ep_size, device=device, init_seed=init_seed,
                      init=init, name=f"{name}.experts" if name else "experts")
        tag_expert_params(layer.experts, mesh.expert_group_name)
        if mesh.ep_size > 1:
            layer.comm = AllToAllComm.from_mesh(mesh, layer.experts.num_experts)
    return model


def materialize_experts(model: nn.Module, init: ExpertInit | None, *, device: torch.device | str,
                        init_seed: int = 0) -> nn.Module:
    """Every meta `GroupedExperts` of `model` whole on `device`, initialised per expert (EP=1)."""
    for name, experts in model.named_modules():
        if isinstance(experts, GroupedExperts) and any(p.is_meta for p in experts.parameters()):
            shard_experts(experts, 0, 1, device=device, init_seed=init_seed, init=init, name=name)
    return model


def shard_experts(
    experts: GroupedExperts, ep_rank: int, ep_size: int, *, device: torch.device | str = "cpu", init_seed: int = 0,
    init: ExpertInit | None = None, name: str = "",
) -> None:
    """Keep experts [ep_rank * E_local, (ep_rank + 1) * E_local) of `experts`, in place."""
    E = experts.num_experts
    check_experts(E, ep_size)
    n = E // ep_size
    block = slice(ep_rank * n, (ep_rank + 1) * n)
    on_meta = any(p.is_meta for p in experts.parameters())
    ops = (init or ExpertInit()).ops_of(experts) if on_meta else {}
    for pname in _EXPERT_PARAMS:
        full = getattr(experts, pname)
        if full is None:
            continue
        if on_meta:
            local = torch.empty((n,) + tuple(full.shape[1:]), dtype=full.dtype, device=device)
        else:
            local = full.detach()[block].clone()
        setattr(experts, pname, nn.Parameter(local, requires_grad=full.requires_grad))
    experts.num_experts = n
    experts.expert_offset = ep_rank * n
    experts.global_experts = E
    if on_meta:
        _init_per_expert(experts, ops, range(block.start, block.stop), init_seed, name)


@torch.no_grad()
def _init_per_expert(experts: GroupedExperts, ops: dict[str, list], global_ids: range, init_seed: int,
                     layer_name: str) -> None:
    """Replay the recorded init ops on each local expert's slice under that expert's own seed."""
    device = experts.w1.device
    for pname, recorded in ops.items():
        for func, args, kwargs in recorded:
            if any(isinstance(a, torch.Tensor) for a in (*args, *kwargs.values())):
                raise ValueError(f"{layer_name}.{pname} is initialised by {func}, which reads another tensor; "
                                 f"expert init must be in-place ops (normal_, uniform_, zero_, ...) to be sharded")
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for i, e in enumerate(global_ids):
            torch.manual_seed(expert_seed(init_seed, layer_name, e))
            for pname, recorded in ops.items():
                w = getattr(experts, pname)[i]
                for func, args, kwargs in recorded:
                    func(w, *args, **kwargs)


def tag_expert_params(experts: GroupedExperts, group_name: str) -> None:
    """Mark the expert parameters for moe_scale's and DeepSpeed's gradient reduction."""
    for name in _EXPERT_PARAMS:
        p = getattr(experts, name)
        if p is None:
            continue
        p.moe_expert = True
        p.allreduce = False
        p.group_name = group_name
        p.expert_offset = getattr(experts, "expert_offset", 0)
        p.global_experts = getattr(experts, "global_experts", experts.num_experts)


def expert_param_names(model: nn.Module) -> set[str]:
    """Names of the expert parameters: those of every `GroupedExperts` (stacked weights with a
    global expert axis, sharded or not), and any parameter tagged as an expert's (`moe_expert`,
    or DeepSpeed's `allreduce = False`, which `tag_expert_params` sets on the shards)."""
    names = {n for n, p in model.named_parameters()
             if is_expert_param(p) or getattr(p, "allreduce", True) is False}
    for mod_name, module in model.named_modules():
        if isinstance(module, GroupedExperts):
            names.update(f"{mod_name}.{p}" if mod_name else p for p, _ in module.named_parameters())
    return names


def is_expert_param(p: torch.Tensor) -> bool:
    return bool(getattr(p, "moe_expert", False))


def hierarchical_placement(cfg: MoEConfig, mesh: MoEMesh) -> str:
    """Where the experts of each primary-gate group of a hierarchical router live.

    Group g holds experts [g*b, (g+1)*b). "rank": every group lies inside one EP rank's block
    (E_local % b == 0), so a token whose primary gate picks one group goes to one rank and the
    secondary gate picks among experts there. "node": every group lies inside one node's part
    of the EP group, so such a token crosses to one node. "split": groups straddle nodes;
    routing is still correct but the primary gate no longer picks a destination.
    """
    if cfg.router != "hierarchical":
        raise ValueError(f"hierarchical_placement needs router='hierarchical', got {cfg.router!r}")
    b = cfg.num_experts // cfg.hierarchical_groups
    e_local = cfg.num_experts // mesh.ep_size
    if e_local % b == 0:
        return "rank"
    if (e_local * mesh.ep_ranks_per_node) % b == 0:
        return "node"
    return "split"


def apply_fsdp(model: nn.Module, dense_mesh, expert_mesh, *, bf16: bool = False) -> nn.Module:
    """FSDP2 over `model`, in place: experts on `expert_mesh` (their EDP group), the rest on `dense_mesh`.

    Units: every `GroupedExperts` (its own EDP mesh, as torchtitan shards MoE experts), every
    element of a top-level `nn.ModuleList` (the blocks), then the root for what is left.
    FSDP averages a unit's gradients over its mesh: right for the dense units (the world); an
    expert unit's average over EDP is ep_size times the gradient of `grad_sync.py`'s rule (EDP
    sum / world), which the caller scales back (`FSDPBackend`; a divide factor would need
    NCCL's PREMUL_SUM, which gloo lacks).
    bf16: parameters cast to bf16 for forward and backward, gradients reduced in float32.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    options = {}
    if bf16:
        options["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for module in model.modules():
        if isinstance(module, GroupedExperts):
            fully_shard(module, mesh=expert_mesh, **options)
    for child in model.children():
        if isinstance(child, nn.ModuleList):
            for block in child:
                fully_shard(block, mesh=dense_mesh, **options)
    fully_shard(model, mesh=dense_mesh, **options)
    return model
