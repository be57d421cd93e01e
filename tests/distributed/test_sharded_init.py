"""Sharded initialisation: each rank makes only its own experts, and every EP size starts alike.

The trainer builds the model with its expert weights on the meta device and each rank makes
its EP block on its device, initialised expert by expert under a seed of the global expert
index (`distributed/parallelize.py`). Byte counts are measured from the parameters the ranks
hold at step 0, never computed from the config.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from moe_scale.distributed.launch import run_local
from moe_scale.distributed.parallelize import experts_on_meta, materialize_experts
from moe_scale.moe import GroupedExperts
from moe_scale.train.config import load_config
from moe_scale.train.runtime import Runtime
from moe_scale.train.trainer import Trainer
from tests.trainer_utils import CONFIGS, tiny

E = 8


def _built(run_dir, *extra: str, rank: int = 0, world: int = 1) -> Trainer:
    cfg = load_config(str(CONFIGS / "lm_cpu_multirank.yaml"),
                      tiny(run_dir, f"moe.num_experts={E}", "parallel.timeout_s=60", "train.max_steps=3", *extra))
    t = Trainer(cfg, runtime=Runtime(rank, world, rank, torch.device("cpu")))
    t.metrics.close()
    return t


def _step0(t: Trainer) -> dict:
    """Bytes of the distinct parameter tensors this rank holds, split dense / expert, and the values."""
    experts = {id(p) for m in t.model.modules() if isinstance(m, GroupedExperts) for p in m.parameters()}
    dense = expert = 0
    for p in {id(p): p for p in t.model.parameters()}.values():  # tied weights once
        nbytes = p.numel() * p.element_size()
        if id(p) in experts:
            expert += nbytes
        else:
            dense += nbytes
    return {"dense": dense, "expert": expert,
            "params": {n: p.detach().clone() for n, p in t.model.named_parameters()}}


def _rank(rank: int, world: int, run_dir: str, ep: int) -> dict:
    return _step0(_built(run_dir, f"parallel.ep_size={ep}", rank=rank, world=world))


def test_ep4_ranks_hold_a_quarter_of_the_experts_and_the_same_model_as_ep1(tmp_path):
    one = _step0(_built(tmp_path / "ep1"))
    four = run_local(_rank, 4, str(tmp_path / "ep4"), 4, timeout=150)
    assert one["expert"] > one["dense"] > 0
    for r in four:
        assert r["dense"] == one["dense"]
        assert r["expert"] == one["expert"] // 4  # E/4 experts, measured from the parameters
    for name, full in one["params"].items():
        if ".experts." in name:  # joined on the global expert axis: the EP=1 weights, bitwise
            assert torch.equal(torch.cat([r["params"][name] for r in four]), full), name
        else:
            assert all(torch.equal(r["params"][name], full) for r in four), name


def test_ep2_ranks_start_from_the_ep1_function(tmp_path):
    """Same first batch, same loss: EP=2 over 2 ranks computes what the EP=1 model computes."""
    one = _built(tmp_path / "ep1", "moe.dropless=true")
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = one.model(x)[0]
    got = run_local(_logits_at_ep2, 2, str(tmp_path / "ep2"), x, timeout=120)
    for logits in got:
        torch.testing.assert_close(logits, want, rtol=1e-5, atol=1e-6)


def _logits_at_ep2(rank: int, world: int, run_dir: str, x: torch.Tensor) -> torch.Tensor:
    t = _built(run_dir, "parallel.ep_size=2", "moe.dropless=true", rank=rank, world=world)
    with torch.no_grad():
        return t.model(x)[0]


class _TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = GroupedExperts(4, 8, 16)
        self.b = GroupedExperts(4, 8, 16)
        for experts in (self.a, self.b):
            nn.init.normal_(experts.w2, std=0.5)  # the model's own init after the layer's


def test_recorded_init_is_replayed_per_expert_and_the_full_weights_never_exist():
    with experts_on_meta() as init:
        model = _TwoLayers()
    assert all(p.is_meta for p in model.parameters())
    materialize_experts(model, init, device="cpu", init_seed=3)
    assert not any(p.is_meta for p in model.parameters())
    assert 0.4 < float(model.a.w2.detach().std()) < 0.6  # the model's init, not the layer's uniform one
    assert float(model.a.w1.detach().abs().max()) <= 8**-0.5  # the layer's own: U(+-1/sqrt(d))
    assert not torch.equal(model.a.w1, model.b.w1)  # layers differ
    assert not torch.equal(model.a.w1[0], model.a.w1[1])  # experts differ
