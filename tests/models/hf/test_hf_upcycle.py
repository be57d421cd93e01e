"""Sparse upcycling (`model.upcycle_from`): a dense Llama / Qwen2 checkpoint becomes an MoE model
whose experts are copies of the dense FFN. With renormalised top-k weights (summing to one) and
no noise, the MoE model's logits at step 0 are transformers' dense logits."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from moe_scale.convert import from_hf  # noqa: E402
from moe_scale.models.lm.hf.start import load_start_weights  # noqa: E402
from moe_scale.models.lm.task import build_model  # noqa: E402
from moe_scale.train.config import ConfigError, load_config  # noqa: E402
from moe_scale.train.runs import RunReader  # noqa: E402
from moe_scale.train.trainer import Trainer  # noqa: E402
from tests.models.hf.hf_tiny import hf_logits, sample_ids, save_tiny  # noqa: E402
from tests.trainer_utils import CONFIGS, HF_CACHE  # noqa: E402

TOL = 1e-4
LLAMA = ["model.rope_theta=5.0e+5", "model.norm_eps=1.0e-6"]  # hf_tiny's Llama
QWEN2 = ["model.rope_theta=1.0e+4", "model.norm_eps=1.0e-6", "model.qkv_bias=true"]  # hf_tiny's Qwen2


def _config(source, run_dir, *extra):
    return load_config(CONFIGS / "finetune_debug.yaml", [
        "model.init_from=null", f"model.upcycle_from={source}", f"train.run_dir={run_dir}",
        f"data.cache_dir={HF_CACHE}", "train.max_steps=2", "optim.warmup_steps=1", "train.eval_every=0",
        "checkpoint.every=0", "logging.progress=false", *extra])


def _upcycled(cfg):
    model = build_model(cfg)
    assert load_start_weights(model, cfg, RunReader()) is not None
    return model.eval()


def _logits(model, ids_BT):
    with torch.no_grad():
        return model(ids_BT)[0]


def test_upcycled_llama_computes_the_dense_logits(tmp_path):
    hf = save_tiny("llama", tmp_path / "hf")
    ids_BT = sample_ids()
    want_BTV = hf_logits(hf, ids_BT)
    model = _upcycled(_config(hf, tmp_path / "run", *LLAMA))
    experts = model.blocks[0].ffn.experts
    assert torch.equal(experts.w1[0], experts.w1[3]) and experts.w1.shape == (4, 64, 96)
    assert (_logits(model, ids_BT) - want_BTV).abs().max() < TOL
    used = model(ids_BT)[1][0].tokens_per_expert_E
    assert int((used > 0).sum()) >= 3  # the fresh router spreads tokens: equality is not one expert's

    noisy = _upcycled(_config(hf, tmp_path / "run", *LLAMA, "model.upcycle_noise=0.05"))
    w1 = noisy.blocks[0].ffn.experts.w1
    assert not torch.equal(w1[0], w1[1]) and (w1[0] - experts.w1[0]).std() < 0.05 * experts.w1[0].std() * 1.5
    assert (_logits(noisy, ids_BT) - want_BTV).abs().max() > TOL


def test_upcycling_a_converted_dense_qwen2_run(tmp_path):
    """Source: a moe_scale dense run (q/k/v bias), converted from transformers' Qwen2."""
    hf = save_tiny("qwen2", tmp_path / "hf")
    from_hf(hf, tmp_path / "dense")
    ids_BT = sample_ids()
    model = _upcycled(_config(tmp_path / "dense", tmp_path / "run", *QWEN2))
    assert (_logits(model, ids_BT) - hf_logits(hf, ids_BT)).abs().max() < TOL


def test_the_trainer_starts_from_the_upcycled_model_and_refuses_a_mismatch(tmp_path):
    hf = save_tiny("llama", tmp_path / "hf")
    trainer = Trainer(_config(hf, tmp_path / "run", *LLAMA))
    ids_BT = sample_ids()
    trainer.model.eval()
    assert (_logits(trainer.model, ids_BT) - hf_logits(hf, ids_BT)).abs().max() < TOL
    trainer.fit()
    assert trainer.step == 2
    with pytest.raises(ConfigError, match="moe.d_hidden=64 but .* has 96"):
        _upcycled(_config(hf, tmp_path / "run2", *LLAMA, "moe.d_hidden=64"))
    with pytest.raises(ConfigError, match="model.rope_theta=1000000.0 but .* has 500000.0"):
        _upcycled(_config(hf, tmp_path / "run2"))
    moe_hf = save_tiny("mixtral", tmp_path / "moe")
    with pytest.raises(ConfigError, match="upcycling starts from a dense one"):
        _upcycled(_config(moe_hf, tmp_path / "run3", *LLAMA))
