"""Generation with a KV cache: the same tokens and logits as rerunning the whole sequence; the CLI."""

from __future__ import annotations

import pytest
import torch

from moe_scale.models.lm import KVCache, MoELM
from moe_scale.models.lm.generate import generate, sample_next
from moe_scale.moe import MoEConfig
from tests.trainer_utils import CONFIGS, cli, tiny


def model_of(arch: str) -> MoELM:
    torch.manual_seed(0)
    # dropless: a capacity would depend on how many tokens a call routes, which the cache changes
    moe = MoEConfig(d_model=32, num_experts=4, k=2, d_hidden=16, activation="swiglu", dropless=True,
                    num_shared_experts=1 if arch == "llama" else 0)
    extra = dict(n_kv_heads=2, qk_norm=True, n_dense_layers=1) if arch == "llama" else {}
    return MoELM(arch=arch, d_model=32, n_layers=3, n_heads=4, max_seq_len=32, moe=moe, **extra).eval()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_greedy_decoding_with_the_cache_equals_decoding_without_it(arch):
    model = model_of(arch)
    with torch.no_grad():  # a sharper distribution than the init's, so greedy choices are not near-ties
        model.lm_head.weight.mul_(20)
    prompt = torch.randint(1, 256, (2, 5))
    cached, logits_c = generate(model, prompt, 12, temperature=0, use_cache=True, return_logits=True)
    full, logits_f = generate(model, prompt, 12, temperature=0, use_cache=False, return_logits=True)
    assert cached.shape == (2, 17)
    assert torch.equal(cached, full)
    torch.testing.assert_close(logits_c, logits_f, atol=1e-4, rtol=1e-4)


def test_a_cached_chunk_sees_the_prefix_and_is_causal_within_itself():
    model = model_of("llama")
    idx = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        full, _ = model(idx)
        cache = KVCache.empty(3)
        model(idx[:, :6], cache=cache)
        chunk, _ = model(idx[:, 6:], cache=cache)
    assert cache.length == 9
    torch.testing.assert_close(chunk, full[:, 6:], atol=1e-5, rtol=1e-4)


def test_generation_stops_at_eos_and_at_max_seq_len():
    model = model_of("gpt2")
    prompt = torch.randint(1, 256, (1, 30))
    assert generate(model, prompt, 10, temperature=0).shape == (1, 32)  # max_seq_len 32
    first = int(generate(model, prompt[:, :5], 1, temperature=0)[0, -1])
    assert generate(model, prompt[:, :5], 10, temperature=0, eos_id=first).shape == (1, 6)


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = {int(sample_next(logits, 1.0, 0.7, g)) for _ in range(200)}
    assert draws == {0, 1}  # 0.5 < 0.7 <= 0.5 + 0.3: the two most likely tokens
    assert int(sample_next(logits, 0.0, 1.0, g)) == 0


def test_cli_generates_from_a_trained_bpe_run(tmp_path):
    from moe_scale.train.config import load_config
    from moe_scale.train.trainer import Trainer

    run = tmp_path / "run"
    cfg = load_config(CONFIGS / "lm_debug.yaml", tiny(
        run, "model.arch=llama", "model.n_kv_heads=1", "model.vocab_size=320", "data.tokenizer=bpe",
        "moe.activation=swiglu", "train.max_steps=3"))
    Trainer(cfg).fit()
    assert (run / "tokenizer.json").is_file()
    args = ("generate", str(run), "--prompt", "def ", "--max-new-tokens", "12", "--temperature", "0.8", "--seed", "3")
    one, two = cli(*args), cli(*args)
    assert one.returncode == 0, one.stderr
    assert one.stdout.startswith("def ") and one.stdout == two.stdout  # seeded sampling repeats
    bad = cli("generate", str(tmp_path / "nowhere"))
    assert bad.returncode == 2 and "config.yaml" in bad.stderr
