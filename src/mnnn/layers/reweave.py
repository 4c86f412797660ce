"""Reweaving: cross-attention from current hidden states to retrieved memories, gated from zero."""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from torch import nn


class ReweaveLayer(nn.Module):
    """``h' = h + tanh(g) W_o MHA(LN h, LN' M, LN' M)`` with the output projection ``W_o`` (and its
    bias) initialised to zero and the gate ``g`` to 1, so an untrained layer returns ``h`` exactly
    while ``W_o`` receives gradients from the first step (a zero gate would block them: in the
    planted-recall probe a zero-initialised gate reached 0.06 accuracy after 250 steps, a zero
    ``W_o`` 0.53). Rows without memories get no update. The memories are normalised on their own
    (``LN'``): stored residual-stream states vary widely in norm."""

    _scratch = threading.local()  # per thread, shared by every layer: reused gather buffers
    # forward_tokens scores the whole store when it holds at most this many entries per pick
    # (N <= dense_ratio * k): one GEMM per stream beats k-row gathers and B T tiny matmuls there
    dense_ratio = 4

    def __init__(self, dim: int, heads: int = 4):
        super().__init__()
        heads = heads if dim % heads == 0 else 1
        self.norm = nn.LayerNorm(dim)
        self.norm_memory = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        nn.init.zeros_(self.attn.out_proj.weight)
        nn.init.zeros_(self.attn.out_proj.bias)
        self.gate = nn.Parameter(torch.ones(()))
        self.similarity_scale = nn.Parameter(torch.tensor(10.0))  # for a retrieval cosine given as bias

    def forward(self, h: torch.Tensor, memory: torch.Tensor, mask: torch.Tensor,
                weights: torch.Tensor | None = None, memory_values: torch.Tensor | None = None) -> torch.Tensor:
        """h ``[B, T, d]``; memory ``[B, K, d]`` (keys); mask ``[B, K]`` True where a memory exists;
        optional ``weights [B, K]`` scale each memory's value (a trainable retrieval scorer);
        ``memory_values [B, K, d]`` (default: the keys) are what the attention reads."""
        has = mask.any(1)
        if not bool(has.any()):
            return h
        safe = mask | ~has[:, None]  # rows with nothing attend to padding, then are zeroed
        memory = self.norm_memory(memory.to(h.dtype))
        values = memory if memory_values is None else self.norm_memory(memory_values.to(h.dtype))
        values = values if weights is None else values * weights[..., None].to(h.dtype)
        out, _ = self.attn(self.norm(h), memory, values, key_padding_mask=~safe,
                           need_weights=False)
        return h + torch.tanh(self.gate) * out * has[:, None, None].to(h.dtype)

    @classmethod
    def _gather(cls, table: torch.Tensor, rows: torch.Tensor, slot: int) -> torch.Tensor:
        """``table.index_select(0, rows)``; without autograd into a buffer kept between calls: the
        picked rows are ``B T k d`` floats (50 MB for GPT-2 small at T = 512, k = 32), and a fresh
        tensor that size costs more in page faults than the copy itself (8x here)."""
        if torch.is_grad_enabled() and table.requires_grad:
            return table.index_select(0, rows)
        bufs = getattr(cls._scratch, "bufs", None)
        if bufs is None:
            bufs = cls._scratch.bufs = {}
        n, d = rows.numel(), table.shape[1]
        buf = bufs.get(slot)
        if buf is None or buf.numel() < n * d or buf.dtype != table.dtype or buf.device != table.device:
            buf = bufs[slot] = torch.empty(n * d, dtype=table.dtype, device=table.device)
        return torch.index_select(table, 0, rows, out=buf[: n * d].view(n, d))

    def forward_tokens(self, h: torch.Tensor, memory: torch.Tensor, idx: torch.Tensor, valid: torch.Tensor,
                       bias: torch.Tensor | None = None, memory_values: torch.Tensor | None = None,
                       similarity: torch.Tensor | None = None) -> torch.Tensor:
        """Per-position reweaving: position t attends only to its own retrieved entries.

        h ``[B, T, d]``; memory ``[B, N, d]`` (a stream's entries); idx ``[B, T, k]`` into N;
        valid ``[B, T, k]``; optional ``bias [B, T, k]`` added to the attention logits (a learned
        retrieval score); ``similarity [B, T, k]`` a retrieval cosine, added times the learned
        ``similarity_scale`` (initially 10, as the continuous cache's theta); ``memory_values
        [B, N, d]`` what is read (default: ``memory``). The same parameters as :meth:`forward` (one cross-attention, two modes).
        The entries are normalised once, then gathered per position (O(B T k d), no loop over t);
        a store of at most ``dense_ratio * k`` entries is instead scored whole, one GEMM per stream,
        and read through the attention weights scattered onto it: the same sums, faster there.
        """
        B, T, d = h.shape
        k = idx.shape[-1]
        heads = self.attn.num_heads
        hd = d // heads
        w_q, w_k, w_v = self.attn.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.attn.in_proj_bias.chunk(3)
        mem = self.norm_memory(memory.to(h.dtype))
        N = mem.shape[1]
        vals = mem if memory_values is None else self.norm_memory(memory_values.to(h.dtype))
        # keys folded into the query: q_h . (W_k,h m + b_k,h) = (W_k,h^T q_h) . m + q_h . b_k,h
        q = F.linear(self.norm(h), w_q, b_q).view(B * T, heads, hd)
        q_mem = torch.einsum("nhe,hed->nhd", q, w_k.view(heads, hd, d))  # [B T, heads, d]
        dense = N <= self.dense_ratio * k
        if dense:  # a small store: score every entry in one batched GEMM, then take the k columns
            cols = idx[:, :, None, :].expand(B, T, heads, k).reshape(B, T * heads, k)
            dots = torch.bmm(q_mem.reshape(B, T * heads, d), mem.transpose(1, 2)).gather(-1, cols)
            dots = dots.view(B * T, heads, k)
        else:  # a large store: gather the k entries of every position (O(B T k d), no N factor)
            rows = (idx + N * torch.arange(B, device=idx.device)[:, None, None]).reshape(-1)  # whole-row copies
            picked = self._gather(mem.reshape(B * N, d), rows, 0).view(B * T, k, d)
            picked_values = (picked if memory_values is None
                             else self._gather(vals.reshape(B * N, d), rows, 1).view(B * T, k, d))
            dots = torch.bmm(q_mem, picked.transpose(1, 2))
        logits = (dots + (q * b_k.view(heads, hd)).sum(-1, keepdim=True)) / hd ** 0.5  # [B T, heads, k]
        if bias is not None:
            logits = logits + bias.to(logits.dtype).reshape(B * T, 1, k)
        if similarity is not None:
            logits = logits + self.similarity_scale * similarity.to(logits.dtype).reshape(B * T, 1, k)
        has = valid.any(-1)  # [B, T]
        logits = logits.masked_fill(~(valid | ~has[..., None]).reshape(B * T, 1, k), float("-inf"))
        attn = torch.softmax(logits, dim=-1)
        # values after the mixing: sum_k a_k (W_v,h m_k + b_v,h) = W_v,h (sum_k a_k m_k) + b_v,h
        if dense:  # the weights scattered onto the store (an entry picked twice adds up), one GEMM
            weights = attn.new_zeros(B, T * heads, N).scatter_add(-1, cols, attn.view(B, T * heads, k))
            mixed = torch.bmm(weights, vals).view(B * T, heads, d)
        else:
            mixed = torch.bmm(attn, picked_values)  # [B T, heads, d]
        out = (torch.einsum("nhd,hed->nhe", mixed, w_v.view(heads, hd, d)) + b_v.view(heads, hd)).reshape(B, T, d)
        out = self.attn.out_proj(out)
        return h + torch.tanh(self.gate) * out * has[..., None].to(h.dtype)
