"""AMN: Adaptive Memory Network = liquid time-constant neurons -> LRU -> associative manifold."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from mnnn.layers.associative import AssociativeManifold
from mnnn.layers.liquid import LiquidLayer
from mnnn.layers.lru import LRU
from mnnn.state import TensorState


@dataclasses.dataclass
class AMNState(TensorState):
    liquid: torch.Tensor  # [B, H] liquid neuron potentials
    lru: torch.Tensor  # [B, H] complex LRU state
    manifold: torch.Tensor  # [B, 1, m, H] associative memory


class AMNNetwork(nn.Module):
    """Adaptive Memory Network.

    .. math::
        h_t &= \\text{Liquid}(x_{\\le t}) \\qquad \\text{(input-adaptive time constants)} \\\\
        z_t &= \\text{LRU}(h_{\\le t}) \\\\
        r_t &= \\text{Manifold}(z_{<t}) \\text{ read with } z_t \\\\
        y_t &= W_o (z_t + W_r r_t) + D x_t + c

    Every recurrence is linear in its own state with input-derived coefficients, so the whole
    network trains in parallel (two scans and one chunked decay attention); ``step`` runs the
    same recurrences one step at a time for streaming.
    """

    separate_state = ("manifold",)  # estimators expose it through get_manifold_state

    def __init__(self, input_size: int, hidden_size: int, output_size: int,
                 memory_manifold_size: int = 64, dt: float = 0.1, memory_decay: float = 0.995):
        super().__init__()
        self.hidden_size = hidden_size
        self.liquid = LiquidLayer(input_size, hidden_size, dt=dt)
        self.lru = LRU(hidden_size)
        self.manifold = AssociativeManifold(hidden_size, memory_manifold_size, memory_decay)
        self.read_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        nn.init.zeros_(self.read_proj.weight)  # the manifold starts as a no-op and is learned in
        self.readout = nn.Linear(hidden_size, output_size)
        self.skip = nn.Linear(input_size, output_size, bias=False)
        self.stats: dict[str, float] = {}

    def init_state(self, batch_size: int) -> AMNState:
        return AMNState(
            liquid=self.readout.weight.new_zeros(batch_size, self.hidden_size),
            lru=self.lru.init_state(batch_size),
            manifold=self.manifold.init_state(batch_size),
        )

    def _record(self, tau: torch.Tensor, l: torch.Tensor, M: torch.Tensor) -> None:
        self.stats = {
            "avg_lc_timescale": float(tau.detach().mean()),
            "avg_lru_magnitude": float(l.detach().abs().mean()),
            "avg_manifold_energy": float(M.detach().abs().mean()),
        }

    def forward(self, x: torch.Tensor, state: AMNState | None = None):
        """x: ``[B, T, input_size]`` -> (y ``[B, T, output_size]``, state)."""
        state = self.init_state(x.shape[0]) if state is None else state
        h, h_last, tau = self.liquid(x, state.liquid)
        z, l, l_last = self.lru(h, state.lru)
        r, M = self.manifold(z, state.manifold)
        y = self.readout(z + self.read_proj(r)) + self.skip(x)
        self._record(tau, l, M)
        return y, AMNState(liquid=h_last, lru=l_last, manifold=M)

    def step(self, x_t: torch.Tensor, state: AMNState):
        h, h_last, tau = self.liquid.step(x_t, state.liquid)
        z, l, l_last = self.lru.step(h, state.lru)
        r, M = self.manifold.step(z, state.manifold)
        y = self.readout(z + self.read_proj(r)) + self.skip(x_t)
        self._record(tau, l, M)
        return y, AMNState(liquid=h_last, lru=l_last, manifold=M)

    def memory_vector(self, state: AMNState) -> torch.Tensor:
        return state.lru
