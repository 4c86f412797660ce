"""KV memory read: the base's own attention extended over retrieved keys and values of earlier
segments (Memorizing Transformers' kNN attention), in one softmax with the local keys.

For head ``h`` and position ``t`` with local keys ``k_s`` (``s <= t``) and retrieved entries
``(K_j, V_j)`` of earlier segments, the read is the attention the base would compute over both
sets at once, with a learned log-weight ``b_h`` on the memory side and a learned query map for it::

    a_t  = sum_s softmax_s(q_t . k_s * c) v_s                    (the base's local output)
    m_t  = sum_j softmax_j(q'_t . K_j * c) V_j,   q'_t = q_t + A_h q_t
    z_l  = logsumexp_s(q_t . k_s * c),            z_m = logsumexp_j(q'_t . K_j * c) + b_h
    out  = a_t + sigmoid(z_m - z_l) (m_t - a_t)

which equals ``softmax`` over the concatenated logits ``[q k_s c, q' K_j c + b_h]`` times the
concatenated values. ``A_h`` starts at zero and ``b_h`` at zero: untrained, a position attends to
its retrieved entries as if they were earlier tokens of its own context. ``b_h = -inf`` closes
the read (the base, bitwise).

Without gradients on the CPU, both log-sum-exps and ``m_t`` come from PyTorch's fused attention
kernel (``_scaled_dot_product_flash_attention_for_cpu``, which returns the log-sum-exp beside its
output): the local ``z_l`` is recomputed by it instead of materialising the ``[B, H, T, T]``
logits, and the memory side is one call with the picks as its mask. The explicit form above is
the one that trains (and the reference the fused path is tested against).
"""

from __future__ import annotations

import torch
from torch import nn


class KVMemoryRead(nn.Module):
    """Per-head memory log-weight ``bias [H]`` and query map ``query_adapter [H, D, D]``."""

    def __init__(self, heads: int, head_dim: int):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.bias = nn.Parameter(torch.zeros(heads))
        self.query_adapter = nn.Parameter(torch.zeros(heads, head_dim, head_dim))

    @property
    def closed(self) -> bool:
        """True when every head's memory weight is ``-inf``: the read returns its input unchanged."""
        return bool(torch.isneginf(self.bias).all())

    def memory_query(self, q: torch.Tensor) -> torch.Tensor:
        """``q [B, T, H, D]`` -> ``q + A_h q``, the query the memory side scores with."""
        return q + torch.einsum("bthe,hef->bthf", q, self.query_adapter.to(q.dtype))

    def forward(self, a: torch.Tensor, q: torch.Tensor, k: torch.Tensor, mem_k: torch.Tensor, mem_v: torch.Tensor,
                picked: torch.Tensor, scale: float, key_mask: torch.Tensor | None = None,
                score_bias: torch.Tensor | None = None) -> torch.Tensor:
        """``a [B, T, H D]`` the base's merged local attention output; ``q, k [B, T, H, D]`` its local
        queries and keys; ``mem_k, mem_v [B, N, H, D]`` a stream's stored keys and values;
        ``picked [B, T, N]`` which entries each position reads; ``scale`` the base's logit scale;
        ``key_mask [B, T]`` False at padded local keys; ``score_bias [B, T, N]`` added to the memory
        logits of every head (a learned retrieval score). Returns ``[B, T, H D]``."""
        if self.closed:
            return a
        if _FUSED is not None and not torch.is_grad_enabled() and q.device.type == "cpu":
            return self._fused(a, q, k, mem_k, mem_v, picked, scale, key_mask, score_bias)
        B, T, H, D = q.shape
        dt = a.dtype
        qm = self.memory_query(q)
        s = torch.einsum("bthe,bnhe->bhtn", qm, mem_k.to(dt)) * scale  # [B, H, T, N]
        if score_bias is not None:
            s = s + score_bias.to(dt)[:, None]
        has = picked.any(-1)  # [B, T]
        s = s.masked_fill(~picked[:, None], float("-inf")).masked_fill(~has[:, None, :, None], 0.0)
        z_mem = torch.logsumexp(s, -1) + self.bias.to(dt)[None, :, None]  # [B, H, T]
        local = torch.einsum("bthe,bshe->bhts", q, k) * scale
        hidden = _hidden_keys(T, key_mask, q.device)
        # a finite floor, not -inf: a padded query that sees no key gets finite gradients (w ~ 1)
        z_local = torch.logsumexp(local.masked_fill(hidden, torch.finfo(local.dtype).min), -1)
        w = torch.where(has[:, None], torch.sigmoid(z_mem - z_local), torch.zeros((), dtype=dt, device=a.device))
        m = torch.softmax(s, -1) @ mem_v.to(dt).transpose(1, 2)  # [B, H, T, D]
        local_out = a.view(B, T, H, D).transpose(1, 2)
        out = local_out + w[..., None] * (m - local_out)
        return out.transpose(1, 2).reshape(B, T, H * D)


    def _fused(self, a, q, k, mem_k, mem_v, picked, scale, key_mask, score_bias):
        """The forward through the fused attention kernel (no gradients): see the module docstring."""
        B, T, H, D = q.shape
        dt = a.dtype
        qh, kh = q.transpose(1, 2), k.transpose(1, 2)
        if key_mask is None:
            _, z_local = _FUSED(qh, kh, kh, 0.0, True, scale=scale)
        else:  # causal and padded keys hidden, with the explicit form's finite floor
            hidden = _hidden_keys(T, key_mask, q.device)
            floor = torch.zeros(hidden.shape, dtype=dt, device=q.device).masked_fill(hidden, torch.finfo(dt).min)
            _, z_local = _FUSED(qh, kh, kh, 0.0, False, attn_mask=floor, scale=scale)
        bias = torch.zeros((), dtype=dt, device=q.device) if score_bias is None else score_bias.to(dt)
        mem_mask = torch.where(picked, bias, torch.full((), float("-inf"), dtype=dt, device=q.device))[:, None]
        m, z_mem = _FUSED(self.memory_query(q).transpose(1, 2), mem_k.to(dt).transpose(1, 2),
                          mem_v.to(dt).transpose(1, 2), 0.0, False, attn_mask=mem_mask, scale=scale)
        has = picked.any(-1)[:, None]  # [B, 1, T]
        w = torch.sigmoid(z_mem + self.bias.to(dt)[None, :, None] - z_local)
        local_out = a.view(B, T, H, D).transpose(1, 2)
        out = torch.where(has[..., None], local_out + w[..., None] * (m - local_out), local_out)
        return out.transpose(1, 2).reshape(B, T, H * D)


def _hidden_keys(T: int, key_mask: torch.Tensor | None, device) -> torch.Tensor:
    """``[B or 1, 1, T, T]`` True where a local query may not see a key: the future, and padded keys."""
    hidden = torch.ones(T, T, dtype=torch.bool, device=device).triu(1)[None, None]
    if key_mask is not None:
        hidden = hidden | ~key_mask.bool()[:, None, None, :]
    return hidden


# PyTorch's fused CPU attention, which also returns each row's log-sum-exp (None where absent)
_FUSED = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def kv_read_reference(reader: KVMemoryRead, q, k, v, mem_k, mem_v, picked, scale, key_mask=None, score_bias=None):
    """Loop over streams, heads and positions: one softmax over the position's visible local keys
    and its picked entries (memory logits with the adapted query, ``score_bias`` and ``bias_h``).
    Returns the merged output ``[B, T, H D]`` (local attention included, so it is compared with
    ``reader(local_attention(q, k, v), ...)``)."""
    B, T, H, D = q.shape
    qm = reader.memory_query(q)
    rows = []
    for b in range(B):
        per_t = []
        for t in range(T):
            heads = []
            local = torch.arange(t + 1)
            if key_mask is not None:
                local = local[key_mask[b, : t + 1].bool()]
            mem = picked[b, t].nonzero().squeeze(1)
            for h in range(H):
                logits = [k[b, local, h] @ q[b, t, h] * scale]
                values = [v[b, local, h]]
                if mem.numel() and not torch.isneginf(reader.bias[h]):
                    extra = mem_k[b, mem, h] @ qm[b, t, h] * scale + reader.bias[h]
                    if score_bias is not None:
                        extra = extra + score_bias[b, t, mem]
                    logits.append(extra)
                    values.append(mem_v[b, mem, h])
                heads.append(torch.softmax(torch.cat(logits), 0) @ torch.cat(values))
            per_t.append(torch.cat(heads))
        rows.append(torch.stack(per_t))
    return torch.stack(rows)


def local_attention(q, k, v, scale, key_mask=None):
    """Causal attention within the segment, merged heads ``[B, T, H D]`` (test helper)."""
    B, T, H, D = q.shape
    s = torch.einsum("bthe,bshe->bhts", q, k) * scale
    out = torch.softmax(s.masked_fill(_hidden_keys(T, key_mask, q.device), torch.finfo(s.dtype).min), -1) @ v.transpose(1, 2)
    return out.transpose(1, 2).reshape(B, T, H * D)
