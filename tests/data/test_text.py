"""The LM text pipeline: offline stdlib corpus via HF datasets, deterministic split, resumable order."""

from __future__ import annotations

import zlib

import pytest
import torch

from moe_scale.data.text import BlockSampler, TextBlocks, is_validation, load_documents
from tests.trainer_utils import HF_CACHE


@pytest.fixture(scope="module")
def data():
    return TextBlocks.load(max_documents=40, seq_len=32, batch_size=4, cache_dir=str(HF_CACHE), seed=3)


def test_blocks_are_shifted_byte_sequences(data):
    x, y = data.next_train_batch()
    assert x.shape == y.shape == (4, 32) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert 0 <= int(x.min()) and int(x.max()) < 256


def test_split_is_deterministic_and_disjoint():
    docs = load_documents(max_documents=40, cache_dir=str(HF_CACHE))
    texts = docs["text"]
    val = [t for t in texts if is_validation(t, 0.05)]
    train = [t for t in texts if not is_validation(t, 0.05)]
    assert val and train and len(val) + len(train) == len(texts)
    assert {zlib.crc32(t.encode()) for t in val}.isdisjoint({zlib.crc32(t.encode()) for t in train})
    again = load_documents(max_documents=40, cache_dir=str(HF_CACHE))["text"]
    assert again == texts  # same files, same order, every time


def test_validation_batches_are_fixed(data):
    a = [x for x, _ in data.val_batches(2)]
    b = [x for x, _ in data.val_batches(2)]
    assert all(torch.equal(p, q) for p, q in zip(a, b))


def test_sampler_resumes_exactly():
    s = BlockSampler(50, batch_size=4, seed=7)
    for _ in range(15):  # crosses an epoch boundary (12 batches per epoch)
        s.next_indices()
    state = s.state_dict()
    expected = [s.next_indices() for _ in range(5)]
    t = BlockSampler(50, batch_size=4, seed=7)
    t.load_state_dict(state)
    assert [t.next_indices() for _ in range(5)] == expected


def test_ranks_see_disjoint_blocks_that_make_up_the_single_process_batch():
    one = BlockSampler(64, batch_size=8, seed=1).next_indices()
    r0 = BlockSampler(64, batch_size=4, rank=0, world=2, seed=1).next_indices()
    r1 = BlockSampler(64, batch_size=4, rank=1, world=2, seed=1).next_indices()
    assert set(r0).isdisjoint(r1) and set(r0) | set(r1) == set(one)


def test_too_little_data_is_a_clear_error():
    with pytest.raises(ValueError, match="too few for 2 rank"):
        BlockSampler(10, batch_size=8, world=2)
