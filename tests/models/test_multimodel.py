"""MultiModel: modality nets (shapes, masking), causal decoder, task token, one training step per task."""

from __future__ import annotations

import pytest
import torch

from moe_scale.models.multimodel import EOS_ID, MultiModel, MultiModelConfig
from moe_scale.models.multimodel.layers import ConvBlock, ExpertsBlock, FeedForward, timing_signal
from moe_scale.models.multimodel.modalities import (
    AudioInput,
    CategoricalOutput,
    ImageInput,
    LanguageInput,
    LanguageOutput,
)
from moe_scale.moe import MoELayer

torch.set_num_threads(1)
D = 32


def tiny_config(**overrides) -> MultiModelConfig:
    base = dict(
        d_model=D, num_heads=2, dropout=0.0, vocab_size=50, num_target_spaces=4, class_heads={"digits": 10},
        image_stem_filters=(8, 16), image_block_filters=(16,), audio_bins=12, audio_block_filters=(4, 8),
        categorical_filters=(16, 16, 24), num_experts=4, moe_k=2, moe_hidden=32,
    )
    return MultiModelConfig.debug(**{**base, **overrides})


def padded(lengths: list[int], total: int) -> torch.Tensor:
    return torch.arange(total)[None, :] < torch.tensor(lengths)[:, None]


# ---- modality nets -------------------------------------------------------------------------


def test_language_input_scales_and_masks_padding():
    net = LanguageInput(20, D)
    tokens = torch.tensor([[5, 6, 7], [8, 0, 0]])
    x, mask = net(tokens)
    assert x.shape == (2, 3, D)
    assert mask.tolist() == [[True, True, True], [True, False, False]]
    assert torch.all(x[1, 1:] == 0)
    torch.testing.assert_close(x[0, 0], net.embedding.weight[5] * D**0.5)


@pytest.mark.parametrize(
    "channels,stem_stride,blocks,size,out_len",
    [(1, 1, (16,), (8, 8), 16), (1, 1, (16,), (8, 16), 32), (3, 2, (16, 24), (32, 32), 16)],
)
def test_image_input_shapes(channels, stem_stride, blocks, size, out_len):
    net = ImageInput(channels, D, (8, 16), blocks, stem_stride)  # stem stride, then stride-2 blocks
    x, mask = net(torch.rand(3, *size, channels))
    assert x.shape == (3, out_len, D) and mask is None


@pytest.mark.parametrize("bins", [12, 1])  # spectrogram, waveform
def test_audio_input_strides_time_only_and_masks_padding(bins):
    torch.manual_seed(0)
    net = AudioInput(bins, D, (4, 8)).eval()
    lengths = [37, 21, 8]
    audio = torch.randn(3, 37, bins)
    x, mask = net(audio, padded(lengths, 37))
    assert x.shape == (3, 10, D)  # ceil(ceil(37 / 2) / 2)
    assert mask.sum(1).tolist() == [10, 6, 2]
    for i, n in enumerate(lengths):  # each padded row computes what it computes alone
        alone, _ = net(audio[i : i + 1, :n], None)
        torch.testing.assert_close(x[i, : alone.shape[1]], alone[0], atol=1e-5, rtol=1e-5)


def test_language_output_loss_ignores_padding():
    net = LanguageOutput(D, 30, label_smoothing=0.1)
    x = torch.randn(2, 4, D)
    logits = net(x)
    assert logits.shape == (2, 4, 30)
    targets = torch.tensor([[3, 4, EOS_ID, 0], [5, EOS_ID, 0, 0]])
    changed = logits.clone()
    changed[targets == 0] += 100.0
    torch.testing.assert_close(net.loss(logits, targets), net.loss(changed, targets))


def test_categorical_output_shapes_and_masked_pooling():
    torch.manual_seed(0)
    net = CategoricalOutput(D, 7, (16, 16, 24)).eval()
    x = torch.randn(3, 9, D)
    lengths = [9, 5, 2]
    logits = net(x, padded(lengths, 9))
    assert logits.shape == (3, 7)
    for i, n in enumerate(lengths):
        torch.testing.assert_close(logits[i], net(x[i : i + 1, :n])[0], atol=1e-5, rtol=1e-5)


# ---- body --------------------------------------------------------------------------------------


def test_timing_signal_is_sinusoidal():
    sig = timing_signal(5, 8)
    assert sig.shape == (5, 8)
    torch.testing.assert_close(sig[0], torch.tensor([0.0] * 4 + [1.0] * 4))


def test_causal_conv_block_never_reads_the_future():
    torch.manual_seed(0)
    block = ConvBlock(D, 7, 2, 0.0, causal=True)
    x = torch.randn(2, 12, D)
    y = block(x)
    x2 = x.clone()
    x2[:, 6:] = torch.randn(2, 6, D)
    torch.testing.assert_close(block(x2)[:, :6], y[:, :6])


def test_experts_block_routes_real_tokens_only():
    moe = MoELayer(D, 4, k=2, router="noisy_topk", dropless=True, aux_loss=dict(importance=0.01, load=0.01))
    block = ExpertsBlock(D, moe, 0.0)
    x = torch.randn(2, 5, D)
    y, stats = block(x, padded([5, 2], 5))
    assert y.shape == x.shape and stats.num_tokens == 7
    _, none = ExpertsBlock(D, FeedForward(D, 16), 0.0)(x, None)
    assert none is None


def test_encoder_masking_matches_unpadded_input():
    torch.manual_seed(0)
    model = MultiModel(tiny_config()).eval()
    tokens = torch.tensor([[4, 5, 6, 7, 8], [9, 10, 11, 0, 0]])
    enc, mask, _ = model.encode(tokens, "language")
    alone, _, _ = model.encode(tokens[1:, :3], "language")
    torch.testing.assert_close(enc[1, :3], alone[0], atol=1e-5, rtol=1e-5)


# ---- whole model -------------------------------------------------------------------------------


def test_decoder_is_causal():
    torch.manual_seed(0)
    model = MultiModel(tiny_config()).eval()
    inputs = torch.randint(3, 50, (2, 6))
    targets = torch.randint(3, 50, (2, 8))
    space = torch.tensor([1, 2])
    logits = model(inputs, input_modality="language", target_space_B=space, targets_BT=targets).logits
    for t in (1, 4, 7):
        changed = targets.clone()
        changed[:, t:] = torch.randint(3, 50, (2, 8 - t))
        again = model(inputs, input_modality="language", target_space_B=space, targets_BT=changed).logits
        # position p predicts targets[p] from targets[:p]: positions <= t see no change
        torch.testing.assert_close(again[:, : t + 1], logits[:, : t + 1], atol=1e-5, rtol=1e-5)
        assert not torch.allclose(again[:, t + 1 :], logits[:, t + 1 :]) or t == 7


def test_task_token_changes_the_output():
    torch.manual_seed(0)
    model = MultiModel(tiny_config()).eval()
    inputs = torch.randint(3, 50, (2, 6))
    targets = torch.randint(3, 50, (2, 5))
    out = [
        model(inputs, input_modality="language", target_space_B=torch.full((2,), s), targets_BT=targets).logits
        for s in (1, 2)
    ]
    assert (out[0][:, 0] - out[1][:, 0]).abs().max() > 1e-3


def test_greedy_decode_stops_at_eos_and_pads_after():
    torch.manual_seed(0)
    model = MultiModel(tiny_config()).eval()
    with torch.no_grad():
        model.language_out.proj.bias[EOS_ID] = 100.0  # EOS wins at every step
    out = model.greedy_decode(torch.randint(3, 50, (3, 4)), input_modality="language",
                              target_space_B=torch.ones(3, dtype=torch.long), max_len=6)
    assert out.tolist() == [[EOS_ID]] * 3


@pytest.mark.parametrize(
    "modality,inputs,mask,target",
    [
        ("language", torch.randint(3, 50, (4, 7)), None, "language"),
        ("image", torch.rand(4, 8, 16, 1), None, "language"),
        ("image", torch.rand(4, 8, 8, 1), None, "class:digits"),
        ("audio", torch.randn(4, 30, 12), padded([30, 25, 17, 9], 30), "language"),
    ],
)
@pytest.mark.parametrize("use_moe", [True, False])
def test_one_training_step_per_modality_pair(modality, inputs, mask, target, use_moe):
    torch.manual_seed(0)
    model = MultiModel(tiny_config(use_moe=use_moe)).train()
    language = target == "language"
    targets = torch.randint(3, 50, (4, 6)) if language else torch.randint(0, 10, (4,))
    if language:
        targets[:, -1] = EOS_ID
        targets[1, 3:] = 0
    out = model(inputs, input_modality=modality, target_space_B=torch.ones(4, dtype=torch.long),
                targets_BT=targets if language else None, target_modality=target, input_mask=mask)
    task_loss = model.task_loss(out, targets, target)
    loss = task_loss + out.aux_loss
    assert torch.isfinite(loss) and 0 < float(task_loss.detach()) < 10
    loss.backward()
    expert_blocks = [model.encoder.experts] + ([model.decoder.experts] if language else [])
    for block in expert_blocks:
        grads = [p.grad for p in block.moe.parameters() if p.requires_grad]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        if use_moe:
            assert block.moe.experts.w1.grad.abs().sum() > 0  # gradient reaches the experts
    assert len(out.moe_stats) == (len(expert_blocks) if use_moe else 0)
    if modality != "language":
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.inputs[modality].parameters())


@pytest.fixture(scope="module")
def standin_tasks():
    from moe_scale.data.multimodel.standins import standin_sources
    from moe_scale.data.multimodel.tasks import build_tasks

    return build_tasks(standin_sources())


STANDIN_NAMES = ["digits_cls", "digits_caption", "translate_en_de", "translate_de_en", "translate_en_fr",
                 "translate_fr_en", "parse_arith", "speech_numbers"]


@pytest.mark.parametrize("name", STANDIN_NAMES)
def test_one_training_step_per_task(standin_tasks, name):
    from moe_scale.data.multimodel.sampler import JointSampler
    from moe_scale.data.multimodel.tasks import TARGET_SPACES

    task = next(t for t in standin_tasks if t.name == name)
    torch.manual_seed(0)
    cfg = tiny_config(vocab_size=len(task.vocab), num_target_spaces=len(TARGET_SPACES), audio_bins=40)
    model = MultiModel(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = JointSampler([task], 6, seed=0).batch_from(0)
    loss, task_loss, out = model.loss(batch)
    assert torch.isfinite(loss) and 0 < float(task_loss.detach()) < 10
    opt.zero_grad()
    loss.backward()
    assert model.encoder.experts.moe.experts.w1.grad.abs().sum() > 0
    opt.step()
    again, _, _ = model.loss(batch)
    assert torch.isfinite(again)


def test_a_few_steps_fit_one_batch():
    torch.manual_seed(0)
    model = MultiModel(tiny_config()).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    inputs, targets = torch.randint(3, 50, (8, 5)), torch.randint(3, 50, (8, 5))
    targets[:, -1] = EOS_ID
    space = torch.ones(8, dtype=torch.long)
    losses = []
    for _ in range(12):
        out = model(inputs, input_modality="language", target_space_B=space, targets_BT=targets)
        loss = model.task_loss(out, targets, "language") + out.aux_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.7 * losses[0]


def test_config_is_validated_early():
    with pytest.raises(ValueError, match="unknown MultiModelConfig key"):
        MultiModelConfig.from_dict({"d_model": 64, "experts": 8})
    with pytest.raises(ValueError, match="divisible"):
        MultiModelConfig(d_model=30, num_heads=4)
    with pytest.raises(ValueError, match="exceeds num_experts"):
        MultiModelConfig.debug(num_experts=2, moe_k=4)
    with pytest.raises(ValueError, match="class head"):
        MultiModelConfig.debug(class_heads={"digits": 1})
    model = MultiModel(tiny_config())
    with pytest.raises(ValueError, match="unknown target modality"):
        model(torch.rand(1, 8, 8, 1), input_modality="image", target_space_B=torch.zeros(1, dtype=torch.long),
              target_modality="class:imagenet")
    assert MultiModelConfig().moe_config().k == 4  # the paper's top-4 noisy gating by default
