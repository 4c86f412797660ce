"""Reweaving: cross-attention from current hidden states to retrieved memories, gated from zero."""

from __future__ import annotations

import torch
from torch import nn


class ReweaveLayer(nn.Module):
    """``h' = h + tanh(g) W_o MHA(LN h, LN' M, LN' M)`` with the gate ``g`` initialised to 0, so an
    untrained layer returns ``h`` exactly. Rows without memories get no update. The memories are
    normalised on their own (``LN'``): stored residual-stream states vary widely in norm."""

    def __init__(self, dim: int, heads: int = 4):
        super().__init__()
        heads = heads if dim % heads == 0 else 1
        self.norm = nn.LayerNorm(dim)
        self.norm_memory = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.gate = nn.Parameter(torch.zeros(()))

    def forward(self, h: torch.Tensor, memory: torch.Tensor, mask: torch.Tensor,
                weights: torch.Tensor | None = None) -> torch.Tensor:
        """h ``[B, T, d]``; memory ``[B, K, d]``; mask ``[B, K]`` True where a memory exists;
        optional ``weights [B, K]`` scale each memory's value (a trainable retrieval scorer)."""
        has = mask.any(1)
        if not bool(has.any()):
            return h
        safe = mask | ~has[:, None]  # rows with nothing attend to padding, then are zeroed
        memory = self.norm_memory(memory.to(h.dtype))
        values = memory if weights is None else memory * weights[..., None].to(h.dtype)
        out, _ = self.attn(self.norm(h), memory, values, key_padding_mask=~safe,
                           need_weights=False)
        return h + torch.tanh(self.gate) * out * has[:, None, None].to(h.dtype)
