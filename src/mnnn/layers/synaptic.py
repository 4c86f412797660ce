"""Plastic synaptic fast-weight memory layer (the SSMN "memory hub")."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mnnn.ops.synaptic import synaptic_memory, synaptic_step


class SynapticMemory(nn.Module):
    """Fast weights written during the forward pass and read by later positions.

    .. math::
        k_t = \\frac{W_k x_t}{\\|W_k x_t\\|}, \\; v_t = \\tanh(W_v x_t)/\\sqrt{d}, \\;
        q_t = \\frac{W_q x_t}{\\|W_q x_t\\|}, \\; g_t = \\sigma(w_g x_t + b_g) \\text{ (gated) or } 1 \\\\
        W_t = (1 - g_t \\lambda) W_{t-1} + g_t \\eta\\, v_t k_t^T, \\qquad
        r^{(0)}_t = W_{t-1} q_t, \\quad r^{(i+1)}_t = W_{t-1} \\frac{W_r r^{(i)}_t}{\\|W_r r^{(i)}_t\\|}

    ``W_{t-1}``: a position reads only what earlier positions wrote. The ``reread_iterations``
    re-reads are the seed's "internal chat" (the network re-reads its own synaptic state); each is
    one more pass of the chunked op over the same writes. ``eta`` and ``lam`` may change between
    calls; ``eta = 0`` switches plasticity off. Output: ``W_o r``.
    """

    def __init__(self, d_model: int, num_heads: int, eta: float = 0.01, lam: float = 0.001,
                 gated: bool = False, reread_iterations: int = 0, chunk_size: int = 64):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, d_model // num_heads
        self.eta, self.lam = float(eta), float(lam)
        self.gated, self.reread_iterations, self.chunk_size = gated, reread_iterations, chunk_size
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.gate = nn.Linear(d_model, num_heads) if gated else None
        self.reread = nn.Linear(self.head_dim, self.head_dim, bias=False) if reread_iterations else None
        self.out = nn.Linear(d_model, d_model)
        self.stats: dict[str, float] = {}

    def init_state(self, batch_size: int) -> torch.Tensor:
        return self.out.weight.new_zeros(batch_size, self.num_heads, self.head_dim, self.head_dim)

    def _project(self, x: torch.Tensor):
        shape = x.shape[:-1] + (3, self.num_heads, self.head_dim)
        q, k, v = self.qkv(x).view(shape).unbind(-3)
        gate = torch.sigmoid(self.gate(x)) if self.gated else x.new_ones(x.shape[:-1] + (self.num_heads,))
        return F.normalize(q, dim=-1), F.normalize(k, dim=-1), torch.tanh(v) / self.head_dim**0.5, gate

    def forward(self, x: torch.Tensor, state: torch.Tensor | None = None):
        """x ``[B, T, d]`` -> (``[B, T, d]``, state ``[B, H, K, V]``)."""
        state = self.init_state(x.shape[0]) if state is None else state
        q, k, v, g = self._project(x)
        r, new_state = synaptic_memory(q, k, v, g, self.eta, self.lam, state, self.chunk_size)
        for _ in range(self.reread_iterations):
            r, _ = synaptic_memory(F.normalize(self.reread(r), dim=-1), k, v, g, self.eta, self.lam, state,
                                   self.chunk_size)
        self._record(new_state, k[:, -1], v[:, -1], g[:, -1])
        return self.out(r.flatten(2)), new_state

    def step(self, x_t: torch.Tensor, state: torch.Tensor):
        q, k, v, g = self._project(x_t)
        r, new_state = synaptic_step(q, k, v, g, self.eta, self.lam, state)
        for _ in range(self.reread_iterations):
            r = torch.einsum("bhk,bhkv->bhv", F.normalize(self.reread(r), dim=-1), state)
        self._record(new_state, k, v, g)
        return self.out(r.flatten(1)), new_state

    @torch.no_grad()
    def _record(self, W: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor) -> None:
        # the last update dW_T = W_T - W_{T-1} = -g lam W_{T-1} + g eta k v^T, with W_{T-1} recovered
        write = (g * self.eta)[..., None, None] * k[..., :, None] * v[..., None, :]
        decay = (1.0 - g * self.lam)[..., None, None]
        prev = (W - write) / decay
        self.stats = {"synaptic_energy": float(W.pow(2).mean()),
                      "synaptic_update_magnitude": float((W - prev).pow(2).mean().sqrt()),
                      "gate_mean": float(g.mean())}
