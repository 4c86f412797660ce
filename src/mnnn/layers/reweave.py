"""Reweaving: cross-attention from current hidden states to retrieved memories, gated from zero."""

from __future__ import annotations

import torch
from torch import nn


class ReweaveLayer(nn.Module):
    """``h' = h + tanh(g) W_o MHA(LN h, M, M)`` with the gate ``g`` initialised to 0, so an
    untrained layer returns ``h`` exactly. Rows without memories get no update."""

    def __init__(self, dim: int, heads: int = 4):
        super().__init__()
        heads = heads if dim % heads == 0 else 1
        self.norm = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.gate = nn.Parameter(torch.zeros(()))

    def forward(self, h: torch.Tensor, memory: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """h ``[B, T, d]``; memory ``[B, K, d]``; mask ``[B, K]`` True where a memory exists."""
        has = mask.any(1)
        if not bool(has.any()):
            return h
        safe = mask | ~has[:, None]  # rows with nothing attend to padding, then are zeroed
        out, _ = self.attn(self.norm(h), memory.to(h.dtype), memory.to(h.dtype), key_padding_mask=~safe,
                           need_weights=False)
        return h + torch.tanh(self.gate) * out * has[:, None, None].to(h.dtype)
