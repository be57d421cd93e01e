"""The byte-level MoE LM: shapes, MoE placement, causality, activation checkpointing."""

from __future__ import annotations

import pytest
import torch

from moe_scale.models.lm import MoELM, lm_loss
from moe_scale.moe import MoEConfig, MoELayer


def make(moe_every=1, n_layers=4, **moe):
    torch.manual_seed(0)
    cfg = MoEConfig(d_model=32, num_experts=4, **{"aux_loss": dict(switch=0.01), **moe})
    return MoELM(d_model=32, n_layers=n_layers, n_heads=2, max_seq_len=16, moe_every=moe_every,
                 moe=cfg if moe_every else None)


@pytest.mark.parametrize("moe_every, expected", [(1, [0, 1, 2, 3]), (2, [1, 3]), (0, [])])
def test_moe_placement_and_stats(moe_every, expected):
    model = make(moe_every)
    placed = [i for i, b in enumerate(model.blocks) if isinstance(b.ffn, MoELayer)]
    assert placed == expected
    idx = torch.randint(0, 256, (3, 16))
    logits, stats = model(idx)
    assert logits.shape == (3, 16, 256)
    assert len(stats) == len(expected)
    for s in stats:
        assert int(s.tokens_per_expert_E.sum()) + int(s.num_dropped) == s.num_assignments == 3 * 16 * 2


def assert_causal(model) -> None:
    """Changing tokens 10.. leaves the logits of tokens 0..9 as they were (and changes the rest)."""
    idx = torch.randint(0, 256, (2, 16))
    changed = idx.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % 256
    with torch.no_grad():
        a, _ = model(idx)
        b, _ = model(changed)
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_causal():
    # Eval capacity is generous enough that no token is dropped, so earlier positions cannot see later ones.
    assert_causal(make().eval())


def test_activation_checkpointing_gives_the_same_gradients():
    idx = torch.randint(0, 256, (2, 16))
    grads = []
    for ckpt in (False, True):
        model = make(router="noisy_topk", aux_loss=dict(importance=0.1, load=0.1))
        model.activation_checkpointing = ckpt
        torch.manual_seed(1)  # the router noise is re-drawn identically when recomputed
        logits, stats = model(idx)
        (lm_loss(logits[:, :-1], idx[:, 1:]) + sum(s.aux_loss for s in stats)).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], msg=name)


def test_hash_router_routes_by_byte():
    model = make(router="hash", k=1, aux_loss=dict())
    idx = torch.full((1, 16), 65)
    _, stats = model(idx)
    assert all(int((s.routed_per_expert_E > 0).sum()) == 1 for s in stats)


def test_tied_embeddings_and_errors():
    model = make()
    assert model.lm_head.weight is model.tok_emb.weight
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="needs an MoEConfig"):
        MoELM(moe_every=1, moe=None)


def test_model_holds_no_process_group():
    import inspect

    import moe_scale.models.lm.model as mod

    assert "torch.distributed" not in inspect.getsource(mod)


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_experts_start_at_the_scale_of_the_dense_ffn_they_replace(activation):
    """Experts get GPT-2's init like the dense FFN (fc: std 0.02, proj: 0.02 / sqrt(2 L)), not nn.Linear's
    U(+-1/sqrt(fan_in)), whose outputs would dwarf the residual stream; biases start at zero."""
    model = make(n_layers=4, d_hidden=256, activation=activation, expert_bias=True)
    dense = make(moe_every=0, n_layers=4)
    experts = model.blocks[0].ffn.experts
    out_std = 0.02 / (2 * 4) ** 0.5
    for w, std in ((experts.w1, 0.02), (experts.w3, 0.02), (experts.w2, out_std)):
        if w is not None:
            assert float(w.std()) == pytest.approx(std, rel=0.05)
    assert float(dense.blocks[0].ffn.proj.weight.std()) == pytest.approx(out_std, rel=0.05)
    assert not experts.b1.any() and not experts.b2.any()
