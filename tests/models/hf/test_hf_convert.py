"""`moe-scale convert` against transformers itself: logits of the converted model equal
transformers' to 1e-4 (float32, eval, dropless), and the round trip back gives the same model."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from moe_scale.models.lm.hf.config import ConversionError  # noqa: E402
from moe_scale.convert import from_hf, to_hf  # noqa: E402
from moe_scale.train.runs import load_run  # noqa: E402
from tests.models.hf.hf_tiny import DENSE_FAMILIES, MOE_FAMILIES, hf_logits, sample_ids, save_tiny  # noqa: E402
from tests.trainer_utils import cli  # noqa: E402

TOL = 1e-4  # float32 throughout; the two forwards differ only in summation order (seen: ~3e-7)


def _ours(run_dir, ids_BT):
    model, tokenizer, cfg = load_run(run_dir)
    with torch.no_grad():
        logits_BTV, stats = model(ids_BT)
    return logits_BTV, stats, tokenizer, cfg


@pytest.mark.parametrize("family", MOE_FAMILIES + DENSE_FAMILIES)
def test_converted_model_computes_transformers_logits_and_converts_back(tmp_path, family):
    hf = save_tiny(family, tmp_path / "hf")
    ids_BT = sample_ids()
    want_BTV = hf_logits(hf, ids_BT)
    from_hf(hf, tmp_path / "run")
    got_BTV, stats, tokenizer, cfg = _ours(tmp_path / "run", ids_BT)
    assert (got_BTV - want_BTV).abs().max() < TOL
    assert want_BTV.std() > 0.3  # logits far from zero: the tolerance is not met trivially
    for s in stats:  # dropless, and tokens spread over several experts
        assert int(s.num_dropped) == 0 and int((s.tokens_per_expert_E > 0).sum()) >= 3
    assert cfg.data.tokenizer == "bpe" and tokenizer.vocab_size <= cfg.model.vocab_size

    to_hf(tmp_path / "run", tmp_path / "back")
    assert (hf_logits(tmp_path / "back", ids_BT) - want_BTV).abs().max() < TOL
    assert (tmp_path / "back" / "tokenizer.json").read_bytes() == (hf / "tokenizer.json").read_bytes()
    assert json.loads((tmp_path / "back" / "config.json").read_text())["model_type"] == family


def test_sharded_tied_checkpoint_and_the_cli(tmp_path):
    """Shards listed by model.safetensors.index.json, tied embeddings, both CLI directions."""
    hf = save_tiny("qwen3_moe", tmp_path / "hf", shard=True, tie_word_embeddings=True)
    assert (hf / "model.safetensors.index.json").is_file()
    ids_BT = sample_ids()
    want_BTV = hf_logits(hf, ids_BT)
    proc = cli("convert", "--from-hf", str(hf), "--out", str(tmp_path / "run"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    got_BTV, _, _, cfg = _ours(tmp_path / "run", ids_BT)
    assert cfg.model.tie_embeddings and (got_BTV - want_BTV).abs().max() < TOL
    proc = cli("generate", str(tmp_path / "run"), "--prompt", "def add", "--max-new-tokens", "4", "--temperature", "0")
    assert proc.returncode == 0 and proc.stdout.startswith("def add"), proc.stdout + proc.stderr
    proc = cli("convert", "--to-hf", str(tmp_path / "run"), "--out", str(tmp_path / "back"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (hf_logits(tmp_path / "back", ids_BT) - want_BTV).abs().max() < TOL


def test_fused_expert_layout_of_transformers_5_is_read(tmp_path):
    """transformers 5 holds experts fused in memory (experts.gate_up_proj [E, 2I, d]); a checkpoint
    saved straight from that state dict converts like the per-expert one."""
    from safetensors.torch import save_file

    from tests.models.hf.hf_tiny import tiny_model

    hf = save_tiny("mixtral", tmp_path / "hf")
    model = tiny_model("mixtral")
    fused = {k: v.contiguous() for k, v in model.state_dict().items()}
    assert any(k.endswith("experts.gate_up_proj") for k in fused)
    (hf / "model.safetensors").unlink()
    save_file(fused, str(hf / "model.safetensors"), metadata={"format": "pt"})
    from_hf(hf, tmp_path / "run")
    ids_BT = sample_ids()
    with torch.no_grad():
        want_BTV = model(ids_BT).logits
    assert (_ours(tmp_path / "run", ids_BT)[0] - want_BTV).abs().max() < TOL


def _config(tmp_path, family, **changes):
    hf = save_tiny(family, tmp_path / "hf")
    cfg = json.loads((hf / "config.json").read_text())
    cfg.update(changes)
    (hf / "config.json").write_text(json.dumps(cfg))
    return hf


@pytest.mark.parametrize("family,changes,match", [
    ("mixtral", {"model_type": "deepseek_v3"}, "multi-head latent attention"),
    ("mixtral", {"sliding_window": 16}, "sliding-window"),
    ("qwen2_moe", {"use_sliding_window": True}, "sliding-window"),
    ("olmoe", {"clip_qkv": 8.0}, "clip_qkv"),
    ("mixtral", {"hidden_act": "gelu"}, "hidden_act=gelu"),
    ("llama", {"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}}, "rope_type=llama3"),
    ("qwen2_moe", {"shared_expert_intermediate_size": 48}, "shared_expert_intermediate_size=48"),
    ("qwen3_moe", {"mlp_only_layers": [1]}, "mlp_only_layers"),
])
def test_what_cannot_be_reproduced_is_refused_by_name(tmp_path, family, changes, match):
    hf = _config(tmp_path, family, **changes)
    with pytest.raises(ConversionError, match=match):
        from_hf(hf, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_pickled_weights_and_stray_tensors_are_refused(tmp_path):
    hf = save_tiny("llama", tmp_path / "hf")
    (hf / "model.safetensors").rename(hf / "pytorch_model.bin")
    with pytest.raises(ConversionError, match="pickled"):
        from_hf(hf, tmp_path / "run")

    from safetensors.torch import load_file, save_file

    hf = save_tiny("mixtral", tmp_path / "hf2")
    tensors = load_file(str(hf / "model.safetensors"))
    tensors["model.layers.0.block_sparse_moe.experts.4.w1.weight"] = torch.zeros(96, 64)  # a fifth expert
    save_file(tensors, str(hf / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ConversionError, match="experts.4.w1"):
        from_hf(hf, tmp_path / "run2")


def test_a_run_transformers_cannot_compute_is_refused(tmp_path):
    hf = save_tiny("mixtral", tmp_path / "hf")
    from_hf(hf, tmp_path / "run")
    config = tmp_path / "run" / "config.yaml"
    config.write_text(config.read_text().replace("score_func: softmax", "score_func: sigmoid"))
    with pytest.raises(ConversionError, match="moe.score_func=softmax"):
        to_hf(tmp_path / "run", tmp_path / "back")
    assert not (tmp_path / "back").exists()


def test_the_cli_refuses_deepseek_v3_in_one_line(tmp_path):
    hf = _config(tmp_path, "mixtral", model_type="deepseek_v3")
    proc = cli("convert", "--from-hf", str(hf), "--out", str(tmp_path / "run"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "moe-scale convert: model_type=deepseek_v3: DeepSeek attention is multi-head latent attention" in proc.stderr
