"""The router's top-k over thousands of experts (segmented row maxima) is an exact top-k,
ties going to the lowest expert index, as a stable descending sort orders them."""

from __future__ import annotations

import pytest
import torch

from moe_scale.moe.topk_softmax import _SEGMENT, _top_k


def _reference(block: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    values, index = torch.sort(block, dim=-1, descending=True, stable=True)
    return values[:, :k], index[:, :k]


def _blocks(E: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(E)
    ties = torch.zeros(64, E)
    ties[:, E - 1] = 1.0  # the top-1 is last; the top-2 is a tie of every other expert
    ties[::2, 3] = 1.0  # ... or a tie for the top-1 itself, across segments
    second_in_earlier_segment = torch.full((64, E), -1.0)
    second_in_earlier_segment[:, E - 2] = 5.0
    second_in_earlier_segment[:, 1] = 4.0
    return {
        "gaussian": torch.randn(64, E, generator=g),
        "few-values": torch.randint(0, 3, (64, E), generator=g).float(),
        "ties": ties,
        "second-in-earlier-segment": second_in_earlier_segment,
        "top-two-in-one-segment": torch.arange(E, dtype=torch.float32).repeat(64, 1),
    }


@pytest.mark.parametrize("E", [4 * _SEGMENT, 4096, 8192 + _SEGMENT])
@pytest.mark.parametrize("k", [1, 2])
def test_top_k_is_exact_with_lowest_index_ties(E, k):
    for name, block in _blocks(E).items():
        values, index = _top_k(block.clone(), k)
        want_values, want_index = _reference(block, k)
        assert torch.equal(index, want_index), name
        assert torch.equal(values, want_values), name


def test_top_k_leaves_the_block_unchanged():
    block = torch.randn(8, 1024)
    before = block.clone()
    _top_k(block, 2)
    assert torch.equal(block, before)
