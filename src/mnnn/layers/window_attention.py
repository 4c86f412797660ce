"""Multi-head causal sliding-window attention layer with rotary positions."""

from __future__ import annotations

import torch
from torch import nn

from mnnn.layers.rotary import rotate_span
from mnnn.ops.window_attention import WindowCache, window_attention, window_attention_step


class WindowAttention(nn.Module):
    """Each position attends to the ``window`` most recent positions (itself included):
    O(T w) for a sequence, O(w) per streamed token. Keys are rotated by absolute position
    (RoPE) before caching, so attention sees relative order."""

    def __init__(self, d_model: int, num_heads: int, window: int):
        super().__init__()
        if d_model % num_heads or (d_model // num_heads) % 2:
            raise ValueError(f"d_model ({d_model}) must split into num_heads ({num_heads}) even-sized heads")
        self.d_model, self.num_heads, self.window = d_model, num_heads, window
        self.head_dim = d_model // num_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)
        self._entropy = float("nan")
        self._pending_probs: torch.Tensor | None = None

    @property
    def last_entropy(self) -> float:
        """Entropy (nats) of the newest position's attention over the window, mean over heads;
        computed when read (the step path keeps only the weights it used)."""
        if self._pending_probs is not None:
            p, self._pending_probs = self._pending_probs, None
            self._entropy = float(-(p * p.clamp_min(1e-30).log()).sum(-1).mean())
        return self._entropy

    def init_state(self, batch_size: int) -> WindowCache:
        return WindowCache.empty(batch_size, self.window, self.num_heads, self.head_dim, self.head_dim,
                                 self.out.weight)

    def _qkv(self, x: torch.Tensor, start: int):
        B, T, _ = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.num_heads, self.head_dim)
        q, k = rotate_span(qkv[:, :, :2], start).unbind(2)  # q and k in one rotation
        return q, k, qkv[:, :, 2]

    def forward(self, x: torch.Tensor, cache: WindowCache | None = None):
        cache = self.init_state(x.shape[0]) if cache is None else cache
        q, k, v = self._qkv(x, int(cache.count))
        o, cache = window_attention(q, k, v, self.window, cache)
        self._record_entropy(q[:, -1], cache)
        return self.out(o.flatten(2)), cache

    def step(self, x_t: torch.Tensor, cache: WindowCache):
        q, k, v = self._qkv(x_t[:, None], int(cache.count))
        o, cache, p = window_attention_step(q[:, 0], k[:, 0], v[:, 0], cache, return_probs=True)
        self._pending_probs = p.detach()  # the weights just used: no second attention pass, no work until read
        return self.out(o.flatten(1)), cache

    @torch.no_grad()
    def _record_entropy(self, q_last: torch.Tensor, cache: WindowCache) -> None:
        """Entropy (nats) of the newest position's attention over the window, mean over heads."""
        n = min(int(cache.count), self.window)
        keys = cache.k if n == self.window else cache.k[:, :n]
        self._pending_probs = torch.softmax(torch.einsum("bhk,bjhk->bhj", q_last, keys) / self.head_dim**0.5, dim=-1)
