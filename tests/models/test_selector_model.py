"""Selector model: hard-EM routing, copy mechanism, decoding."""

from pathlib import Path

import pytest
import torch

from moe_scale.data.selector import EOS, Example, Vocab, collate
from moe_scale.data.selector_sources import load_cnndm, load_squad_qg, offline_qg
from moe_scale.models.selector import (
    GeneratorConfig, Generator, Selector, SelectorConfig, SelectorSeq2Seq, beam_generate, sample_generate,
)
from moe_scale.models.selector.decoding import beam_search, sample_or_greedy
from moe_scale.models.selector.selector import masked_bce_BK
from moe_scale.moe.routing import MinLossRouter


@pytest.fixture(scope="module")
def data():
    examples = offline_qg(6, seed=0, targets_per_source=None)
    vocab = Vocab.build([ex.source for ex in examples] + [ex.target for ex in examples], min_freq=2)
    return examples, vocab, collate(examples[:8], vocab)


def small(vocab, **kw):
    return dict(vocab_size=len(vocab), embed_dim=16, hidden_dim=24, dropout=0.0, **kw)


def test_e_step_picks_the_argmin_expert_via_min_loss_routing(data):
    _, vocab, batch = data
    torch.manual_seed(0)
    sel = Selector(SelectorConfig(num_experts=4, expert_dim=8, **small(vocab)))
    assert isinstance(sel.router, MinLossRouter)
    out = sel.hard_em_loss(batch.src_BS, batch.src_mask_BS, batch.focus_BS, batch.answer_BS)
    # reference: BCE of every expert's full focus, computed independently
    logits_BKS = sel(batch.src_BS, batch.src_mask_BS, batch.answer_BS)
    ref_BK = masked_bce_BK(logits_BKS, batch.focus_BS, batch.src_mask_BS)
    torch.testing.assert_close(out.expert_bce_BK, ref_BK.detach())
    chosen = out.routing.expert_idx_N[out.routing.token_idx_N.argsort()]
    assert chosen.tolist() == ref_BK.argmin(1).tolist()
    assert not out.expert_bce_BK.requires_grad
    assert out.wins_K.tolist() == torch.bincount(chosen, minlength=4).tolist()
    # M-step loss = mean BCE of the chosen expert over real tokens
    mask = batch.src_mask_BS.float()
    per_token = torch.nn.functional.binary_cross_entropy_with_logits(
        logits_BKS[torch.arange(len(chosen)), chosen], batch.focus_BS, reduction="none"
    )
    torch.testing.assert_close(out.loss, (per_token * mask).sum() / mask.sum())


def test_m_step_trains_only_the_chosen_expert(data):
    _, vocab, batch = data
    torch.manual_seed(0)
    sel = Selector(SelectorConfig(num_experts=5, expert_dim=8, **small(vocab)))
    one = collate([data[0][0]], vocab)
    out = sel.hard_em_loss(one.src_BS, one.src_mask_BS, one.focus_BS)
    out.loss.backward()
    winner = out.routing.expert_idx_N.item()
    grad = sel.experts.weight.grad
    assert grad[winner].abs().sum() > 0
    others = [e for e in range(5) if e != winner]
    assert torch.equal(grad[others], torch.zeros_like(grad[others]))
    # over a batch: exactly the experts that won some example get a gradient
    sel.zero_grad()
    out = sel.hard_em_loss(batch.src_BS, batch.src_mask_BS, batch.focus_BS)
    out.loss.backward()
    has_grad = (sel.experts.weight.grad.abs().sum(1) > 0).tolist()
    assert has_grad == (out.wins_K > 0).tolist()


def test_copy_distribution_is_normalised_and_reaches_oov_words(data):
    _, vocab, _ = data
    torch.manual_seed(0)
    gen = Generator(GeneratorConfig(use_focus=False, **small(vocab))).eval()
    batch = collate([Example(["zork", "the", "quux"], ["zork"], [1, 0, 1])], vocab)
    memory = gen.encode(batch.src_BS, batch.src_ext_BS, batch.src_mask_BS, num_oov=batch.num_oov)
    logp, _ = gen.step(torch.tensor([2]), gen.init_state(memory), memory)
    V = len(vocab)
    assert logp.shape == (1, V + 2)
    torch.testing.assert_close(logp.exp().sum(), torch.tensor(1.0))
    assert logp[0, V].exp() > 1e-4 and logp[0, V + 1].exp() > 1e-4


def test_copy_mechanism_learns_to_copy_unseen_oov_tokens():
    """Source 'the name is X .' -> target 'X' where every X is out of vocabulary."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)

    def name():
        return "".join(chr(97 + int(i)) for i in torch.randint(0, 26, (6,), generator=g))

    def make(n):
        out = []
        for _ in range(n):
            x = name()
            words = ["the", "name", "is", x, "."] if torch.rand(1, generator=g) < 0.5 else ["call", x, "now", "."]
            out.append(Example(words, [x], [0] * len(words)))
        return out

    vocab = Vocab.build([["the", "name", "is", "call", "now", "."]])
    gen = Generator(GeneratorConfig(use_focus=False, max_len=4, **small(vocab)))
    opt = torch.optim.Adam(gen.parameters(), lr=1e-2)
    for _ in range(60):
        loss = gen.loss(collate(make(32), vocab))
        opt.zero_grad()
        loss.backward()
        opt.step()
    gen.eval()
    test = make(32)
    batch = collate(test, vocab)
    out = beam_generate(gen, batch, 1)
    decoded = [vocab.decode(out.ids_BKL[b, 0], batch.oovs[b]) for b in range(len(test))]
    correct = sum(d == ex.target for d, ex in zip(decoded, test))
    assert all(ex.target[0] not in vocab.stoi for ex in test)
    assert correct >= 30, decoded


def test_without_copy_oov_targets_become_unk(data):
    _, vocab, batch = data
    gen = Generator(GeneratorConfig(copy=False, **small(vocab)))
    memory = gen.encode(
        batch.src_BS, batch.src_ext_BS, batch.src_mask_BS, focus_BS=batch.focus_BS, num_oov=batch.num_oov
    )
    logp, _ = gen.step(batch.tgt_in_BT[:, 0], gen.init_state(memory), memory)
    assert logp.shape[1] == len(vocab)
    assert torch.isfinite(gen.loss(batch))


def test_selector_generate_returns_k_outputs_sorted_by_score(data):
    examples, vocab, batch = data
    torch.manual_seed(0)
    model = SelectorSeq2Seq(
        SelectorConfig(num_experts=3, expert_dim=8, **small(vocab)), GeneratorConfig(max_len=7, **small(vocab))
    )
    loss, stats = model(batch)
    loss.backward()
    assert stats.wins_K.sum().item() == batch.src_BS.shape[0]
    model.eval()
    out = model.generate(batch)
    B = batch.src_BS.shape[0]
    assert out.ids_BKL.shape[:2] == (B, 3) and out.ids_BKL.shape[2] <= 8
    assert (out.score_BK[:, :-1] >= out.score_BK[:, 1:]).all()
    assert sorted(out.expert_BK[0].tolist()) == [0, 1, 2]
    beam = model.generate(batch, beam_size=2, sample_focus=True)
    assert beam.ids_BKL.shape[:2] == (B, 3)
    # a prior that overwhelmingly favours expert 2 makes its output the top-1
    prior = model.generate(batch, expert_log_prior=torch.tensor([-1e4, -1e4, 0.0]))
    assert prior.expert_BK[:, 0].tolist() == [2] * B
    assert torch.equal(prior.ids_BKL[:, 0], out.ids_BKL[out.expert_BK == 2].view(B, -1))


def test_baselines_return_k_outputs(data):
    _, vocab, batch = data
    torch.manual_seed(0)
    gen = Generator(GeneratorConfig(use_focus=False, max_len=6, **small(vocab))).eval()
    B = batch.src_BS.shape[0]
    beams = beam_generate(gen, batch, 3)
    assert beams.ids_BKL.shape[:2] == (B, 3)
    assert (beams.score_BK[:, :-1] >= beams.score_BK[:, 1:]).all()
    assert all(len({tuple(k.tolist()) for k in beams.ids_BKL[b]}) == 3 for b in range(B))  # beams differ
    for kw in (dict(top_k=5), dict(top_p=0.9)):
        samples = sample_generate(gen, batch, 4, rng=torch.Generator().manual_seed(0), **kw)
        assert samples.ids_BKL.shape[:2] == (B, 4)
        assert (samples.ids_BKL == EOS).any(-1).all()


def test_beam_of_width_one_is_greedy(data):
    _, vocab, batch = data
    torch.manual_seed(1)
    gen = Generator(GeneratorConfig(use_focus=False, max_len=6, **small(vocab))).eval()
    memory = gen.encode(batch.src_BS, batch.src_ext_BS, batch.src_mask_BS, num_oov=batch.num_oov)
    greedy_ids, greedy_score = sample_or_greedy(gen, memory, 6, greedy=True)
    beam_ids, beam_score = beam_search(gen, memory, 1, 6)
    L = min(greedy_ids.shape[1], beam_ids.shape[2])
    torch.testing.assert_close(beam_ids[:, 0, :L], greedy_ids[:, :L])
    torch.testing.assert_close(beam_score[:, 0], greedy_score)


def test_top_k_one_sampling_is_greedy(data):
    _, vocab, batch = data
    gen = Generator(GeneratorConfig(use_focus=False, max_len=6, **small(vocab))).eval()
    memory = gen.encode(batch.src_BS, batch.src_ext_BS, batch.src_mask_BS, num_oov=batch.num_oov)
    greedy_ids, _ = sample_or_greedy(gen, memory, 6, greedy=True)
    sampled_ids, _ = sample_or_greedy(gen, memory, 6, top_k=1, rng=torch.Generator().manual_seed(0))
    assert torch.equal(greedy_ids, sampled_ids)


def test_configs_fail_early_with_the_key():
    with pytest.raises(ValueError, match="hidden_dim"):
        SelectorConfig(vocab_size=10, hidden_dim=7)
    with pytest.raises(ValueError, match="vocab_size"):
        GeneratorConfig(vocab_size=4)
    with pytest.raises(ValueError, match="threshold"):
        SelectorConfig(vocab_size=10, threshold=1.0)
    with pytest.raises(ValueError, match="use_focus"):
        SelectorSeq2Seq(SelectorConfig(vocab_size=10), GeneratorConfig(vocab_size=10, use_focus=False))


def test_model_trains_and_decodes_on_the_real_dataset_formats():
    """SQuAD (answer spans) and CNN/DM (long sources) batches from the local sample files."""
    data = Path(__file__).parents[1] / "data" / "selector"
    for examples in (load_squad_qg(path=data / "squad_tiny.json"), load_cnndm(path=data / "cnndm_tiny.jsonl")):
        vocab = Vocab.build([ex.source for ex in examples] + [ex.target for ex in examples], min_freq=2)
        batch = collate(examples, vocab)
        torch.manual_seed(0)
        model = SelectorSeq2Seq(
            SelectorConfig(num_experts=2, expert_dim=8, **small(vocab)), GeneratorConfig(max_len=5, **small(vocab))
        )
        loss, stats = model(batch)
        loss.backward()
        assert torch.isfinite(loss) and stats.wins_K.sum() == len(examples)
        model.eval()
        assert model.generate(batch).ids_BKL.shape[:2] == (len(examples), 2)
