"""One-layer bidirectional GRU over padded sequences, shared by the selector and the generator."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence


class BiGRUEncoder(nn.Module):
    """x_BSi, mask_BS -> (h_BSH outputs, zero on padding; final_BH = [forward last; backward first])."""

    def __init__(self, input_dim: int, hidden_dim: int):
        super().__init__()
        self.rnn = nn.GRU(input_dim, hidden_dim // 2, batch_first=True, bidirectional=True)

    def forward(self, x_BSi: Tensor, mask_BS: Tensor) -> tuple[Tensor, Tensor]:
        lengths_B = mask_BS.sum(1).clamp(min=1).cpu()
        packed = pack_padded_sequence(x_BSi, lengths_B, batch_first=True, enforce_sorted=False)
        out, final_2BH = self.rnn(packed)
        h_BSH, _ = pad_packed_sequence(out, batch_first=True, total_length=x_BSi.shape[1])
        return h_BSH, torch.cat([final_2BH[0], final_2BH[1]], dim=-1)
