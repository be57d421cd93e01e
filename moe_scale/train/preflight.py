"""Checks a training job passes before it joins a process group, makes its run dir or reads data.

    preflight(cfg)                      device exists, ranks fit parallel.ep_size, model fits memory
    check_same_config(cfg, runtime)     every rank was launched with the same resolved config
    with dataset_errors(cfg): ...       a dataset that cannot be read names data.dataset

Each failure is a `ConfigError` naming the key and the fix: the CLI prints it as one line.
The memory check compares `moe-scale plan`'s per-rank estimate (`train.plan`) with the memory
of the device a rank will use: the GPU's, or on CPU the host's RAM (or its cgroup limit)
divided among the ranks of this host. It refuses only what cannot fit, since the estimate is
a rough one; the LM is the client the plan sizes, the others are not checked.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from moe_scale.train.config import Config
from moe_scale.validation import ConfigError
from moe_scale.train.runtime import Runtime, launcher_ranks

GiB = 1024**3


def preflight(cfg: Config, runtime: Runtime | None = None) -> None:
    """Refuse what cannot run, from the config and the launcher's environment alone."""
    if cfg.train.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but CUDA is not available on this machine; "
                          "set train.device=cpu (or auto)")
    ranks = launcher_ranks()
    world = runtime.world_size if runtime is not None else (ranks[1] if ranks else 1)
    ep = cfg.parallel.ep_size
    if world % ep:
        raise ConfigError(f"parallel.ep_size={ep} needs a multiple of {ep} ranks, this job has {world}; launch "
                          f"{ep} (or a multiple of {ep}) processes, e.g. torchrun --nproc_per_node={ep}, "
                          f"or set parallel.ep_size=1")
    check_memory(cfg, world, local_rank=ranks[2] if ranks else 0)


def check_memory(cfg: Config, world_size: int, local_rank: int = 0) -> None:
    """Refuse a model whose per-rank memory estimate exceeds the memory of the rank's device."""
    if cfg.model.name != "lm":
        return
    from moe_scale.train.plan import plan

    estimate = plan(cfg, nodes=1, gpus_per_node=world_size)
    available, what = device_memory(cfg.train.device, local_rank)
    if estimate.total_bytes <= available:
        return
    m, moe, d = cfg.model, cfg.moe, cfg.data
    sizes = (f"model.d_model={m.d_model}, model.n_layers={m.n_layers}, model.vocab_size={m.vocab_size}, "
             f"moe.num_experts={moe.num_experts}, moe.d_hidden={moe.d_hidden}, data.batch_size={d.batch_size}, "
             f"data.seq_len={d.seq_len}")
    raise ConfigError(
        f"this model needs about {estimate.total_bytes / GiB:,.1f} GiB per rank (weights "
        f"{estimate.weights_bytes / GiB:,.1f}, gradients {estimate.grads_bytes / GiB:,.1f}, AdamW "
        f"{estimate.optimizer_bytes / GiB:,.1f}, activations {estimate.activation_bytes / GiB:,.1f} GiB; "
        f"see moe-scale plan), more than the {available / GiB:,.1f} GiB of {what}; lower the sizes ({sizes}) "
        f"or raise parallel.ep_size")


def device_memory(device: str, local_rank: int = 0) -> tuple[float, str]:
    """(bytes, description) of the memory one rank may use on the device `train.device` picks."""
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        index = local_rank % torch.cuda.device_count()
        props = torch.cuda.get_device_properties(index)
        return float(props.total_memory), f"GPU {index} ({props.name})"
    total = float(_host_memory())
    ranks_here = max(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), 1)
    share = f" (a share of {total / GiB:,.1f} GiB among {ranks_here} ranks)" if ranks_here > 1 else ""
    return total / ranks_here, f"host memory{share}"


def _host_memory() -> int:
    """Physical RAM, or the cgroup's memory limit when that is lower (a container)."""
    try:
        import psutil

        total = int(psutil.virtual_memory().total)
    except ImportError:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        with contextlib.suppress(OSError, ValueError):
            total = min(total, int(Path(limit_file).read_text().strip()))  # "max" (no limit) is a ValueError
    return total


def config_digest(cfg: Config) -> str:
    return hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True, default=str).encode()).hexdigest()


def check_same_config(cfg: Config, runtime: Runtime) -> None:
    """Stop every rank when ranks resolved different configs (a per-rank override, a stale file).

    Ranks compare a hash of their resolved config; only when the hashes differ are the configs
    themselves gathered, to name the keys that differ.
    """
    if runtime.world_size == 1 or not dist.is_initialized():
        return
    digests: list[Any] = [None] * runtime.world_size
    dist.all_gather_object(digests, config_digest(cfg))
    if len(set(digests)) == 1:
        return
    configs: list[Any] = [None] * runtime.world_size
    dist.all_gather_object(configs, cfg.to_dict())
    rank = next(r for r, d in enumerate(digests) if d != digests[0])
    diffs = _differences(configs[0], configs[rank])
    shown = "; ".join(f"{key}: {a!r} on rank 0, {b!r} on rank {rank}" for key, a, b in diffs[:5])
    more = f" (and {len(diffs) - 5} more)" if len(diffs) > 5 else ""
    raise ConfigError(f"the ranks were launched with different configs: {shown}{more}; launch every rank with "
                      f"the same config file and overrides")


def _differences(a: Any, b: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b), key=str):
            out += _differences(a.get(key), b.get(key), f"{prefix}{key}.")
        return out
    return [] if a == b else [(prefix.rstrip("."), a, b)]


@contextlib.contextmanager
def dataset_errors(cfg: Config) -> Iterator[None]:
    """Turn a dataset that cannot be found or read into a message naming the data section's key."""
    try:
        yield
    except OSError as err:  # FileNotFoundError, PermissionError, ConnectionError (hub unreachable, offline)
        name = getattr(cfg.data, "dataset", None)
        key = f"data.dataset={name!r}" if name is not None else "the data section"
        raise ConfigError(f"{key} cannot be read: {err}; give an existing local path, or a hub dataset "
                          f"name that is reachable (or cached when offline)") from None
