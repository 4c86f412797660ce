"""PMRC network: a PMRC cell with a linear read-out that may carry its own memory."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from mnnn.layers.memory_cells import PMRCCell, PMRCState
from mnnn.ops.scan import linear_scan
from mnnn.state import TensorState


@dataclasses.dataclass
class PMRCNetworkState(TensorState):
    cell: PMRCState
    out: torch.Tensor  # [B, O] previous output (output-layer memory)


class PMRCNetwork(nn.Module):
    """:class:`~mnnn.layers.PMRCCell` followed by the read-out

    .. math::
        o_t = V h_t + c + \\beta_o\\, o_{t-1} \\quad (\\beta_o = \\text{output\\_beta if use\\_output\\_memory else } 0)

    The output recurrence is linear and runs as a scan.
    """

    def __init__(self, input_size: int, hidden_size: int, output_size: int, beta: float = 0.3,
                 alpha: float = 0.1, output_beta: float = 0.2, use_recurrent: bool = True,
                 use_learnable_gates: bool = False, use_output_memory: bool = False):
        super().__init__()
        self.cell = PMRCCell(input_size, hidden_size, beta=beta, alpha=alpha,
                             use_recurrent=use_recurrent, use_learnable_gates=use_learnable_gates)
        self.readout = nn.Linear(hidden_size, output_size)
        self.output_size = output_size
        self.output_beta = float(output_beta)
        self.use_output_memory = use_output_memory

    def init_state(self, batch_size: int) -> PMRCNetworkState:
        out = self.readout.weight.new_zeros(batch_size, self.output_size)
        return PMRCNetworkState(cell=self.cell.init_state(batch_size), out=out)

    def forward(self, x: torch.Tensor, state: PMRCNetworkState | None = None):
        """x: ``[B, T, input_size]`` -> (y ``[B, T, output_size]``, state)."""
        state = self.init_state(x.shape[0]) if state is None else state
        h, cell_state = self.cell(x, state.cell)
        y = self.readout(h)
        if self.use_output_memory:
            decay = y.new_full((1, 1, 1), self.output_beta)
            y, last = linear_scan(decay, y, state.out)
        else:
            last = y[:, -1]
        return y, PMRCNetworkState(cell=cell_state, out=last)

    def step(self, x_t: torch.Tensor, state: PMRCNetworkState):
        h, cell_state = self.cell.step(x_t, state.cell)
        y = self.readout(h)
        if self.use_output_memory:
            y = y + self.output_beta * state.out
        return y, PMRCNetworkState(cell=cell_state, out=y)

    def memory_vector(self, state: PMRCNetworkState) -> torch.Tensor:
        return state.cell.m
