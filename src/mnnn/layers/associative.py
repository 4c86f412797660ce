"""Associative memory manifold: a decaying slot x feature matrix, written and read by attention."""

from __future__ import annotations

import torch
from torch import nn

from mnnn.ops.decay_attention import decay_attention


class AssociativeManifold(nn.Module):
    """A bounded associative memory ``M`` of ``num_slots x d_model`` (the AMN "whiteboard").

    .. math::
        k_t = \\operatorname{softmax}(K z_t), \\quad v_t = \\tanh(V z_t), \\quad
        M_t = \\delta M_{t-1} + (1 - \\delta)\\, k_t v_t^T \\\\
        q_t = \\operatorname{softmax}(Q z_t), \\qquad r_t = M_{t-1}^T q_t

    ``delta`` is ``memory_decay``. Writes are convex (softmax address, ``(1-delta)`` step, tanh
    values), so every entry of ``M`` stays in ``[-1, 1]``: bounded by construction instead of the
    seed's clipping. Reads see only earlier steps (``M_{t-1}``). The recurrence is linear in ``M``,
    so training uses the chunked form of :func:`mnnn.ops.decay_attention`.
    """

    def __init__(self, d_model: int, num_slots: int = 64, memory_decay: float = 0.995):
        super().__init__()
        self.d_model, self.num_slots = d_model, num_slots
        self.memory_decay = float(memory_decay)
        self.K = nn.Linear(d_model, num_slots)
        self.Q = nn.Linear(d_model, num_slots)
        self.V = nn.Linear(d_model, d_model)

    def init_state(self, batch_size: int) -> torch.Tensor:
        return self.V.weight.new_zeros(batch_size, 1, self.num_slots, self.d_model)

    def _qkv(self, z: torch.Tensor):
        q = torch.softmax(self.Q(z), dim=-1).unsqueeze(-2)  # [..., 1, m]
        k = torch.softmax(self.K(z), dim=-1).unsqueeze(-2)
        v = ((1.0 - self.memory_decay) * torch.tanh(self.V(z))).unsqueeze(-2)  # [..., 1, d]
        return q, k, v

    def forward(self, z: torch.Tensor, M0: torch.Tensor | None = None, chunk_size: int = 64):
        """z: ``[B, T, d]`` -> (reads ``[B, T, d]``, M_T ``[B, 1, m, d]``)."""
        q, k, v = self._qkv(z)
        decay = z.new_full(z.shape[:2] + (1,), self.memory_decay)
        r, M = decay_attention(q, k, v, decay, M0, inclusive=False, chunk_size=chunk_size)
        return r.squeeze(-2), M

    def step(self, z_t: torch.Tensor, M: torch.Tensor):
        q, k, v = self._qkv(z_t)
        r = torch.einsum("bhm,bhmd->bhd", q, M).squeeze(-2)
        M = self.memory_decay * M + k.unsqueeze(-1) * v.unsqueeze(-2)
        return r, M
