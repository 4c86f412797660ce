"""Reference loop for causal sliding-window attention."""

from __future__ import annotations

import math

import torch

from mnnn.ops.window_attention.cache import WindowCache


def window_attention_naive(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, cache: WindowCache | None = None
) -> tuple[torch.Tensor, WindowCache]:
    """Query t attends to the ``window`` most recent keys up to and including t (earlier chunks'
    keys come from ``cache``), softmax(q.k / sqrt(K)). Layout ``[B, T, H, D]``.

    Returns ``(o [B, T, H, V], cache)`` with the cache holding the last ``window`` keys/values.
    """
    B, T, H, K = k.shape
    if cache is None:
        cache = WindowCache.empty(B, window, H, K, v.shape[-1], k)
    pk, pv, n_prev = cache.chronological()
    keys = torch.cat([pk[:, window - n_prev:], k], dim=1)
    vals = torch.cat([pv[:, window - n_prev:], v], dim=1)
    outs = []
    for t in range(T):
        end = n_prev + t + 1
        start = max(0, end - window)
        s = torch.einsum("bhk,bjhk->bhj", q[:, t], keys[:, start:end]) / math.sqrt(K)
        outs.append(torch.einsum("bhj,bjhv->bhv", torch.softmax(s, dim=-1), vals[:, start:end]))
    total = int(cache.count) + T
    lk = torch.cat([pk, k], dim=1)[:, -window:]
    lv = torch.cat([pv, v], dim=1)[:, -window:]
    return torch.stack(outs, dim=1), WindowCache.from_chronological(lk, lv, total)
