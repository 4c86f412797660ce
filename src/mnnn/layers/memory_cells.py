"""AMRC and PMRC cells: the recurrences of the seed's "MNNN API" (seeds/003), trained by BPTT.

Both are non-linear in their state, so they loop over time; each step is a few batched matmuls.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from mnnn.state import TensorState


@dataclasses.dataclass
class AMRCState(TensorState):
    h: torch.Tensor  # [B, H] output with echo, h_{t-1}
    m: torch.Tensor  # [B, H] stateful-neuron memory, m_{t-1}


class AMRCCell(nn.Module):
    """Adaptive Memory Recurrent Cell.

    .. math::
        n_t = \\tanh(W x_t + b + m_{t-1}), \\quad
        h_t = n_t + \\beta h_{t-1}, \\quad
        m_t = (1 - \\alpha) m_{t-1} + \\alpha n_t

    The echo term is the documented :math:`h_{t-1}` (the seed's C code echoes :math:`h_{t-2}`).
    ``beta`` and ``alpha`` are plain floats that may be changed between calls.
    """

    def __init__(self, input_size: int, hidden_size: int, beta: float = 0.3, alpha: float = 0.1):
        super().__init__()
        self.input_size, self.hidden_size = input_size, hidden_size
        self.beta, self.alpha = float(beta), float(alpha)
        self.W = nn.Linear(input_size, hidden_size)

    def init_state(self, batch_size: int) -> AMRCState:
        z = self.W.weight.new_zeros(batch_size, self.hidden_size)
        return AMRCState(h=z, m=z.clone())

    def step(self, x_t: torch.Tensor, state: AMRCState) -> tuple[torch.Tensor, AMRCState]:
        return self._step(self.W(x_t), state)

    def _step(self, wx_t: torch.Tensor, state: AMRCState) -> tuple[torch.Tensor, AMRCState]:
        n = torch.tanh(wx_t + state.m)
        h = n + self.beta * state.h
        m = (1.0 - self.alpha) * state.m + self.alpha * n
        return h, AMRCState(h=h, m=m)

    def forward(
        self, x: torch.Tensor, state: AMRCState | None = None
    ) -> tuple[torch.Tensor, AMRCState]:
        """x: ``[B, T, input_size]`` -> (h: ``[B, T, hidden_size]``, final state)."""
        state = self.init_state(x.shape[0]) if state is None else state
        wx = self.W(x)  # input projection for all steps at once
        outs = []
        for t in range(x.shape[1]):
            h, state = self._step(wx[:, t], state)
            outs.append(h)
        return torch.stack(outs, dim=1), state


@dataclasses.dataclass
class PMRCState(TensorState):
    h: torch.Tensor  # [B, H] output with echo
    m: torch.Tensor  # [B, H] memory
    g: torch.Tensor  # [B, H] last memory gate (ones' complement of alpha when gates are off)


class PMRCCell(nn.Module):
    """Persistent Memory Recurrent Cell: AMRC with recurrence and learnable memory gates.

    .. math::
        n_t &= \\tanh(W x_t + b + U h_{t-1} + m_{t-1}) \\quad (U \\text{ if use\\_recurrent}) \\\\
        h_t &= n_t + \\beta h_{t-1} \\\\
        g_t &= \\sigma(W_g x_t + U_g m_{t-1} + b_g), \\quad c_t = \\tanh(W_c x_t + b_c), \\quad
        m_t = g_t c_t + (1 - g_t) m_{t-1} \\quad (\\text{use\\_learnable\\_gates}) \\\\
        m_t &= (1 - \\alpha) m_{t-1} + \\alpha n_t \\quad (\\text{otherwise})
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        beta: float = 0.3,
        alpha: float = 0.1,
        use_recurrent: bool = True,
        use_learnable_gates: bool = False,
    ):
        super().__init__()
        self.input_size, self.hidden_size = input_size, hidden_size
        self.beta, self.alpha = float(beta), float(alpha)
        self.use_recurrent, self.use_learnable_gates = use_recurrent, use_learnable_gates
        self.W = nn.Linear(input_size, hidden_size)
        self.U = nn.Linear(hidden_size, hidden_size, bias=False) if use_recurrent else None
        if use_learnable_gates:
            self.W_g = nn.Linear(input_size, hidden_size)
            self.U_g = nn.Linear(hidden_size, hidden_size, bias=False)
            self.W_c = nn.Linear(input_size, hidden_size)
            nn.init.constant_(self.W_g.bias, -2.0)  # start close to a slow memory, as alpha does

    def init_state(self, batch_size: int) -> PMRCState:
        z = self.W.weight.new_zeros(batch_size, self.hidden_size)
        return PMRCState(h=z, m=z.clone(), g=z.clone())

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.use_learnable_gates:
            return self.W(x), self.W_g(x), torch.tanh(self.W_c(x))
        return (self.W(x),)

    def _step(self, proj: tuple[torch.Tensor, ...], state: PMRCState) -> tuple[torch.Tensor, PMRCState]:
        a = proj[0] + state.m
        if self.U is not None:
            a = a + self.U(state.h)
        n = torch.tanh(a)
        h = n + self.beta * state.h
        if self.use_learnable_gates:
            g = torch.sigmoid(proj[1] + self.U_g(state.m))
            m = g * proj[2] + (1.0 - g) * state.m
        else:
            g = torch.full_like(n, self.alpha)
            m = (1.0 - self.alpha) * state.m + self.alpha * n
        return h, PMRCState(h=h, m=m, g=g)

    def step(self, x_t: torch.Tensor, state: PMRCState) -> tuple[torch.Tensor, PMRCState]:
        return self._step(self._project(x_t), state)

    def forward(
        self, x: torch.Tensor, state: PMRCState | None = None
    ) -> tuple[torch.Tensor, PMRCState]:
        """x: ``[B, T, input_size]`` -> (h: ``[B, T, hidden_size]``, final state)."""
        state = self.init_state(x.shape[0]) if state is None else state
        proj = self._project(x)
        outs = []
        for t in range(x.shape[1]):
            h, state = self._step(tuple(p[:, t] for p in proj), state)
            outs.append(h)
        return torch.stack(outs, dim=1), state
