"""`parallel.backend: fsdp`: FSDP2 over the EP mesh trains like the DDP backend, shards memory, and
its DCP checkpoint loads under the torch backend at another EP size.

4 gloo ranks, EP=2 x EDP=2: dense parameters sharded over all 4 ranks, each expert block over
its 2 EDP replicas. Same seed, same batches, dropless routing: after several AdamW steps the
parameters equal those of the torch (DDP + EDP all-reduce) backend to float32 rounding.
"""

from __future__ import annotations

import pytest
import torch

from moe_scale.distributed.launch import run_local
from moe_scale.moe import GroupedExperts
from moe_scale.train.config import load_config
from moe_scale.validation import ConfigError
from moe_scale.train.runtime import Runtime
from moe_scale.train.trainer import Trainer
from tests.trainer_utils import CONFIGS, tiny

STEPS = 4
SAME_ROUTING = ("moe.dropless=true", "moe.aux_loss.switch=0", "train.deterministic=true", f"train.max_steps={STEPS}",
                "parallel.ep_size=2", "parallel.timeout_s=60", "checkpoint.save_final=false", "moe.num_experts=8")


def _trainer(run_dir, *extra: str, rank: int, world: int) -> Trainer:
    cfg = load_config(str(CONFIGS / "lm_cpu_multirank.yaml"), tiny(run_dir, *SAME_ROUTING, *extra))
    return Trainer(cfg, runtime=Runtime(rank, world, rank, torch.device("cpu")))


def _full(p: torch.Tensor) -> torch.Tensor:
    """A parameter as this rank's module sees it unsharded (an EP block for experts)."""
    return (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()


def _param_bytes(t: Trainer) -> dict[str, int]:
    """Bytes held by this rank (local shards) and unsharded, dense and expert parameters apart."""
    experts = {id(p) for m in t.model.modules() if isinstance(m, GroupedExperts) for p in m.parameters()}
    out = {"dense_local": 0, "dense_full": 0, "expert_local": 0, "expert_full": 0}
    for p in t.model.parameters():
        kind = "expert" if id(p) in experts else "dense"
        local = p.to_local() if hasattr(p, "to_local") else p
        out[f"{kind}_local"] += local.numel() * local.element_size()
        out[f"{kind}_full"] += p.numel() * p.element_size()
    return out


def _train(rank: int, world: int, run_dir: str, backend: str) -> dict:
    t = _trainer(run_dir, f"parallel.backend={backend}", f"checkpoint.save_final={backend == 'fsdp'}", rank=rank,
                 world=world)
    sizes = _param_bytes(t)
    t.fit()
    return {"sizes": sizes, "params": {n: _full(p) for n, p in t.model.named_parameters()}}


def _resume_fsdp(rank: int, world: int, run_dir: str, saved: str, ep: int) -> dict:
    t = _trainer(run_dir, "parallel.backend=fsdp", f"parallel.ep_size={ep}", f"checkpoint.resume={saved}", rank=rank,
                 world=world)
    t.metrics.close()
    return {"step": t.step, "params": {n: _full(p) for n, p in t.model.named_parameters()}}


def test_fsdp_at_ep2_x_edp2_trains_like_ddp_and_shards_parameters(tmp_path):
    ddp = run_local(_train, 4, str(tmp_path / "ddp"), "torch", timeout=300)
    fsdp = run_local(_train, 4, str(tmp_path / "fsdp"), "fsdp", timeout=300)
    saved = tmp_path / "fsdp" / "checkpoints" / f"step_{STEPS:08d}"
    one = _trainer(tmp_path / "ep1", "parallel.ep_size=1", f"checkpoint.resume={saved}", rank=0, world=1)
    one.metrics.close()
    assert one.step == STEPS
    for name, p in one.model.named_parameters():  # the FSDP checkpoint loads under DDP at EP=1
        want = torch.cat([fsdp[r]["params"][name] for r in range(2)]) if ".experts." in name else fsdp[0]["params"][name]
        assert torch.equal(p.detach(), want), name
    again = run_local(_resume_fsdp, 4, str(tmp_path / "fsdp_ep4"), str(saved), 4, timeout=300)
    for r, got in enumerate(again):  # and under FSDP at EP=4 (every expert block on one rank)
        assert got["step"] == STEPS
        for name, p in one.model.named_parameters():
            want = p.detach()[r * 2 : (r + 1) * 2] if ".experts." in name else p.detach()
            assert torch.equal(got["params"][name], want), (r, name)
    for rank in range(4):
        want, got = ddp[rank]["params"], fsdp[rank]["params"]
        assert want.keys() == got.keys()
        for name, a in want.items():
            b = got[name]
            assert a.shape == b.shape, name
            assert (a - b).abs().max() <= 1e-5 * a.abs().max(), (rank, name, float((a - b).abs().max()))
        assert any(not torch.equal(want[n], ddp[0]["params"][n]) for n in want) or rank % 2 == 0  # EP blocks differ
    for r in fsdp:
        s = r["sizes"]
        # dense: 1/4 of it per rank (FSDP pads each tensor to a multiple of the world: a few bytes)
        assert s["dense_full"] / 4 <= s["dense_local"] <= 1.02 * s["dense_full"] / 4, s
        # experts: this EP rank's block, halved over the 2 EDP replicas
        assert s["expert_local"] == s["expert_full"] // 2, s
    for r in ddp:
        assert r["sizes"]["dense_local"] == r["sizes"]["dense_full"]


def _bf16(rank: int, world: int, run_dir: str) -> dict:
    t = _trainer(run_dir, "parallel.backend=fsdp", "parallel.fsdp_precision=bf16", "parallel.ep_size=1",
                 "train.max_steps=3", rank=rank, world=world)
    seen = set()
    t.model.register_forward_pre_hook(lambda m, args: seen.add(m.lm_head.weight.dtype))  # unsharded, cast
    result = t.fit()
    master = {p.dtype for g in t.optimizer.param_groups for p in g["params"]}  # the sharded weights AdamW steps
    return {"loss": result["loss"], "param_dtypes": master, "compute": seen}


def test_fsdp_bf16_policy_computes_in_bf16_and_keeps_float32_weights(tmp_path):
    for r in run_local(_bf16, 2, str(tmp_path / "bf16"), timeout=300):
        assert r["param_dtypes"] == {torch.float32} and torch.isfinite(torch.tensor(r["loss"]))
        assert r["compute"] == {torch.bfloat16}, r


def test_fsdp_precision_without_fsdp_is_a_config_error():
    with pytest.raises(ConfigError, match="parallel.fsdp_precision=bf16 applies to parallel.backend=fsdp only"):
        load_config(str(CONFIGS / "lm_cpu_multirank.yaml"), ["parallel.fsdp_precision=bf16"])
