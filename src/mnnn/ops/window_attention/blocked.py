"""Blocked causal sliding-window attention: O(T w) work, no Python loop over time."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mnnn.ops.window_attention.cache import WindowCache


def window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    cache: WindowCache | None = None,
    block_size: int | None = None,
) -> tuple[torch.Tensor, WindowCache]:
    """Same contract as :func:`mnnn.ops.window_attention.naive.window_attention_naive`.

    The keys are laid out as ``[window-1 cached keys (zero-padded) ; T new keys]``; query i sits at
    position ``i + window - 1`` and sees positions ``i .. i + window - 1``. Queries are cut into
    blocks of ``C`` (default ``min(window, T)``); block n needs keys ``nC .. nC + C + window - 2``,
    gathered for all blocks at once with ``unfold``. Work per query is ``C + window - 1 <= 2 window``
    dot products, so the cost is O(T window), not O(T^2).
    """
    B, T, H, K = k.shape
    Vd = v.shape[-1]
    w = window
    if cache is None:
        cache = WindowCache.empty(B, w, H, K, Vd, k)
    pk, pv, n_prev = cache.chronological()
    C = max(1, min(block_size or w, T))
    N = -(-T // C)
    pad_end = N * C - T
    keys = torch.cat([pk[:, 1:], k], dim=1)  # [B, w-1+T, H, K]
    vals = torch.cat([pv[:, 1:], v], dim=1)
    keys = F.pad(keys, (0, 0, 0, 0, 0, pad_end))
    vals = F.pad(vals, (0, 0, 0, 0, 0, pad_end))
    span = C + w - 1
    kw = keys.unfold(1, span, C)  # [B, N, H, K, span]
    vw = vals.unfold(1, span, C)  # [B, N, H, V, span]
    qb = F.pad(q, (0, 0, 0, 0, 0, pad_end)).reshape(B, N, C, H, K)
    s = torch.einsum("bnchk,bnhks->bnhcs", qb, kw) / math.sqrt(K)  # [B, N, H, C, span]
    a = torch.arange(C, device=q.device)[:, None]
    b = torch.arange(span, device=q.device)[None, :]
    in_window = (b >= a) & (b <= a + w - 1)  # [C, span]
    block_start = torch.arange(N, device=q.device)[:, None, None] * C
    valid_key = (block_start + b) >= (w - 1 - n_prev)  # not a zero pad before the first key
    mask = in_window[None] & valid_key  # [N, C, span]
    s = s.masked_fill(~mask[None, :, None], float("-inf"))
    p = torch.softmax(s, dim=-1)
    o = torch.einsum("bnhcs,bnhvs->bnchv", p, vw).reshape(B, N * C, H, Vd)[:, :T]
    total = int(cache.count) + T
    lk = torch.cat([pk, k], dim=1)[:, -w:]
    lv = torch.cat([pv, v], dim=1)[:, -w:]
    return o, WindowCache.from_chronological(lk, lv, total)


def window_attention_step(
    q_t: torch.Tensor, k_t: torch.Tensor, v_t: torch.Tensor, cache: WindowCache, return_probs: bool = False
):
    """One token: write ``k_t, v_t`` into slot ``count % window`` of the ring buffer, then attend
    over the valid slots (order does not matter to softmax attention). O(window) per token.

    The cache's ``k``/``v`` buffers are updated in place (callers that need the old state clone
    it first, as :class:`mnnn.models.ssmn.SSMNCore` does once per step for all blocks).
    ``return_probs``: also return the attention weights ``[B, H, n]`` over the valid slots."""
    w = cache.k.shape[1]
    c = int(cache.count)
    slot = c % w
    cache.k[:, slot], cache.v[:, slot] = k_t, v_t
    n = min(c + 1, w)
    k, v = (cache.k, cache.v) if n == w else (cache.k[:, :n], cache.v[:, :n])
    # elementwise products over the [B, n, H, K] ring: no permuted copy of the cache per token
    s = (k * q_t[:, None]).sum(-1) / math.sqrt(q_t.shape[-1])  # [B, n, H]
    p = torch.softmax(s, dim=1)
    o = (p[..., None] * v).sum(1)
    new = WindowCache(k=cache.k, v=cache.v, count=cache.count + 1)
    return (o, new, p.transpose(1, 2)) if return_probs else (o, new)
