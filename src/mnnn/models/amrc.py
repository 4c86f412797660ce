"""AMRC network: an AMRC cell with a linear read-out (regression)."""

from __future__ import annotations

import torch
from torch import nn

from mnnn.layers.memory_cells import AMRCCell, AMRCState


class AMRCNetwork(nn.Module):
    """:class:`~mnnn.layers.AMRCCell` followed by ``y_t = V h_t + c``.

    The read-out is linear: the seed's ``tanh`` output cannot reach targets outside ``[-1, 1]``.
    """

    def __init__(self, input_size: int, hidden_size: int, output_size: int, beta: float = 0.3,
                 alpha: float = 0.1):
        super().__init__()
        self.cell = AMRCCell(input_size, hidden_size, beta=beta, alpha=alpha)
        self.readout = nn.Linear(hidden_size, output_size)

    def init_state(self, batch_size: int) -> AMRCState:
        return self.cell.init_state(batch_size)

    def forward(self, x: torch.Tensor, state: AMRCState | None = None):
        """x: ``[B, T, input_size]`` -> (y ``[B, T, output_size]``, state)."""
        h, state = self.cell(x, state)
        return self.readout(h), state

    def step(self, x_t: torch.Tensor, state: AMRCState):
        h, state = self.cell.step(x_t, state)
        return self.readout(h), state

    def memory_vector(self, state: AMRCState) -> torch.Tensor:
        return state.m
