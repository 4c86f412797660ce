"""Baselines run beside the memory-native models in benchmarks: LSTM and GRU regressors."""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
from torch import nn

from mnnn.state import TensorState


@dataclasses.dataclass
class RNNState(TensorState):
    h: torch.Tensor  # [layers, B, H]
    c: torch.Tensor  # [layers, B, H] (zeros, unused, for a GRU)


class RNNNetwork(nn.Module):
    """``torch.nn.LSTM`` / ``torch.nn.GRU`` with a linear read-out, under the mnnn state contract."""

    def __init__(self, input_size: int, hidden_size: int, output_size: int,
                 kind: Literal["lstm", "gru"] = "lstm", num_layers: int = 1):
        super().__init__()
        if kind not in ("lstm", "gru"):
            raise ValueError(f"kind must be 'lstm' or 'gru', got {kind!r}")
        self.kind, self.hidden_size, self.num_layers = kind, hidden_size, num_layers
        cls = nn.LSTM if kind == "lstm" else nn.GRU
        self.rnn = cls(input_size, hidden_size, num_layers=num_layers, batch_first=True)
        self.readout = nn.Linear(hidden_size, output_size)

    def init_state(self, batch_size: int) -> RNNState:
        z = self.readout.weight.new_zeros(self.num_layers, batch_size, self.hidden_size)
        return RNNState(h=z, c=z.clone())

    def forward(self, x: torch.Tensor, state: RNNState | None = None):
        state = self.init_state(x.shape[0]) if state is None else state
        if self.kind == "lstm":
            h, (hn, cn) = self.rnn(x, (state.h, state.c))
        else:
            h, hn = self.rnn(x, state.h)
            cn = state.c
        return self.readout(h), RNNState(h=hn, c=cn)

    def step(self, x_t: torch.Tensor, state: RNNState):
        y, state = self.forward(x_t.unsqueeze(1), state)
        return y.squeeze(1), state

    def memory_vector(self, state: RNNState) -> torch.Tensor:
        return state.h[-1]
