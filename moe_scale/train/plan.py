"""Size a job before submitting it: parameters, memory per rank, all-to-all traffic.

    moe-scale plan configs/lm_gpu_1node.yaml --nodes 1 --gpus-per-node 8

Parameter counts are exact: the model is built on the meta device (no memory) and its
parameters are counted, experts apart. Memory and traffic are estimates from the shapes:

weights, grads      fp32 (autocast keeps fp32 master weights); experts / ep_size per rank
optimizer           AdamW, two fp32 states per parameter; DeepSpeed ZeRO-1/2 partitions them
                    (and ZeRO-2 the gradients) over the data-parallel ranks of each group
activations         tensors kept for backward per micro-batch, per layer: attention block
                    ~7 x [b, s, d], dense FFN [b, s, d] + 2 x [b, s, d_ff], MoE FFN [b, s, d] +
                    router logits [b, s, E] + the dispatched rows k x [b, s] x (2d + 2h) scaled
                    by the capacity factor; plus fp32 logits and their gradient. With activation
                    checkpointing only each block's input is kept, plus one block recomputed.
all-to-all          rows leaving a rank: k x tokens x (ep-1)/ep x d elements per MoE layer,
                    twice (dispatch, combine) forward and twice backward (three times forward
                    with activation checkpointing), per micro-batch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from moe_scale.distributed.parallelize import expert_param_names
from moe_scale.train.config import Config
from moe_scale.train.tasks import get_task
from moe_scale.validation import ConfigError

GiB = 1024**3


@dataclass
class Plan:
    world_size: int
    ep_size: int
    edp_size: int
    total_params: int
    expert_params: int
    dense_params: int
    active_params: int
    tokens_per_step: int
    weights_bytes: float
    grads_bytes: float
    optimizer_bytes: float
    activation_bytes: float
    a2a_bytes_per_step: float
    zero_stage: int

    @property
    def total_bytes(self) -> float:
        return self.weights_bytes + self.grads_bytes + self.optimizer_bytes + self.activation_bytes


def count_params(cfg: Config) -> tuple[int, int]:
    """(dense, expert) parameter counts of the configured model, built on the meta device."""
    build_model = get_task(cfg.model.name).build_model
    if build_model is None:
        raise ConfigError(f"model.name={cfg.model.name} takes its shape from the data; moe-scale plan cannot size it")
    with torch.device("meta"):
        model = build_model(cfg)
    experts = expert_param_names(model)
    dense = expert = 0
    for name, p in model.named_parameters():  # tied weights are listed once
        if name in experts:
            expert += p.numel()
        else:
            dense += p.numel()
    return dense, expert


def _zero_stage(cfg: Config) -> int:
    if cfg.parallel.backend != "deepspeed" or not cfg.parallel.deepspeed_config:
        return 0
    try:
        with open(cfg.parallel.deepspeed_config) as f:
            return int(json.load(f).get("zero_optimization", {}).get("stage", 0))
    except OSError as err:
        raise ConfigError(f"parallel.deepspeed_config: cannot read {cfg.parallel.deepspeed_config} ({err})") from None


def plan(cfg: Config, nodes: int = 1, gpus_per_node: int = 8) -> Plan:
    if nodes < 1 or gpus_per_node < 1:
        raise ConfigError("--nodes and --gpus-per-node must be >= 1")
    if cfg.model.name != "lm":
        raise ConfigError(f"moe-scale plan sizes the LM (model.name=lm); model.name={cfg.model.name} is not covered")
    world = nodes * gpus_per_node
    ep = cfg.parallel.ep_size
    if world % ep:
        raise ConfigError(f"parallel.ep_size={ep} must divide the world size {world} "
                          f"({nodes} nodes x {gpus_per_node} GPUs)")
    edp = world // ep
    m, d, t = cfg.model, cfg.data, cfg.train
    dense, expert = count_params(cfg)
    moe_layers = m.num_moe_layers
    E = cfg.moe.num_experts
    k = cfg.moe_config().experts_per_token if moe_layers else 0
    active = dense + (expert * k // E if moe_layers else 0)

    zero = _zero_stage(cfg)
    local_params = dense + expert / ep
    weights = 4.0 * local_params
    grads = 4.0 * (dense / world + expert / ep / edp if zero >= 2 else local_params)
    optimizer = 8.0 * (dense / world + expert / ep / edp if zero >= 1 else local_params)

    bf16 = t.precision == "bf16" or (t.precision == "auto" and t.device != "cpu")
    e = 2 if bf16 else 4
    b, s, dm = d.batch_size, d.seq_len, m.d_model
    d_ff = m.dense_hidden
    h = cfg.moe.d_hidden or 4 * dm
    cf = 1.0 if cfg.moe.dropless else min(cfg.moe.capacity_factor, float(E))
    tokens = b * s
    attn = 7 * tokens * dm * e
    dense_ffn = tokens * (dm + 2 * d_ff) * e
    moe_ffn = tokens * dm * e + tokens * E * 4 + k * tokens * cf * (2 * dm + 2 * h) * e
    ffns = [moe_ffn if m.is_moe_layer(i) else dense_ffn for i in range(m.n_layers)]
    logits = 2 * tokens * m.vocab_size * 4
    block_input = tokens * dm * e  # what a recomputed sublayer keeps: its input
    mode = t.activation_checkpointing
    if mode == "full":
        activations = m.n_layers * block_input + attn + max(ffns) + logits
    elif mode == "attention":
        activations = m.n_layers * block_input + attn + sum(ffns) + logits
    elif mode == "moe":
        dense_kept = sum(f for i, f in enumerate(ffns) if not m.is_moe_layer(i))
        activations = (m.n_layers * attn + dense_kept + moe_layers * block_input + (moe_ffn if moe_layers else 0)
                       + logits)
    else:
        activations = m.n_layers * attn + sum(ffns) + logits

    passes = 6 if mode in ("full", "moe") else 4  # a recomputed MoE layer exchanges its tokens again
    a2a = moe_layers * passes * k * tokens * cf * (ep - 1) / ep * dm * e * t.grad_accum
    return Plan(world, ep, edp, dense + expert, expert, dense, active, tokens * t.grad_accum * world,
                weights, grads, optimizer, activations, a2a, zero)


def _human(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


def format_plan(p: Plan) -> str:
    gib = lambda x: f"{x / GiB:,.2f} GiB" if x >= GiB / 4 else f"{x / 2**20:,.2f} MiB"  # noqa: E731
    zero = f"DeepSpeed ZeRO-{p.zero_stage}" if p.zero_stage else "no optimizer sharding"
    rows = [
        ("ranks", f"{p.world_size} = EP {p.ep_size} x EDP {p.edp_size}"),
        ("parameters, total", f"{_human(p.total_params)} ({_human(p.expert_params)} in experts)"),
        ("parameters, active per token", _human(p.active_params)),
        ("tokens per optimizer step", f"{p.tokens_per_step:,}"),
        ("memory per rank: weights", gib(p.weights_bytes)),
        ("memory per rank: gradients", gib(p.grads_bytes)),
        (f"memory per rank: AdamW states ({zero})", gib(p.optimizer_bytes)),
        ("memory per rank: activations (estimate)", gib(p.activation_bytes)),
        ("memory per rank: total (estimate)", gib(p.total_bytes)),
        ("all-to-all per rank per step (sent)", gib(p.a2a_bytes_per_step)),
    ]
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)

