"""Chunked parallel form of linear attention with a scalar per-step decay."""

from __future__ import annotations

import torch
import torch.nn.functional as F

_MIN_LOG_DECAY = -30.0  # exp(-30) ~ 1e-13: a decay below that is treated as a full reset


def decay_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    decay: torch.Tensor,
    state: torch.Tensor | None = None,
    inclusive: bool = True,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as :func:`mnnn.ops.decay_attention.naive.decay_attention_naive`.

    Within a chunk, with the cumulative log decay :math:`\\Lambda_t = \\sum_{s \\le t} \\log a_s`,

    .. math::
        o_t = e^{\\Lambda_t} q_t S_0 + \\sum_{s \\le t} e^{\\Lambda_t - \\Lambda_s} (q_t \\cdot k_s) v_s,
        \\qquad
        S_C = e^{\\Lambda_C} S_0 + \\sum_{s} e^{\\Lambda_C - \\Lambda_s} k_s^T v_s

    (for ``inclusive=False`` read :math:`\\Lambda_{t-1}` and :math:`s < t`). The intra-chunk part is
    a masked ``[C, C]`` matmul, the inter-chunk part passes ``S`` once per chunk: O(T C) work and
    T / C sequential steps. Every exponent is <= 0, so nothing overflows.
    """
    B, T, H, K = k.shape
    Vd = v.shape[-1]
    if state is None:
        state = q.new_zeros(B, H, K, Vd)
    C = max(1, min(chunk_size, T))
    pad = (-T) % C
    if pad:
        # Padding steps have k = v = 0 and decay 1: they change neither outputs nor the state.
        q, k, v = (F.pad(x, (0, 0, 0, 0, 0, pad)) for x in (q, k, v))
        decay = F.pad(decay, (0, 0, 0, pad), value=1.0)
    N = (T + pad) // C
    # [B, H, N, C, .]
    q, k, v = (x.reshape(B, N, C, H, -1).permute(0, 3, 1, 2, 4) for x in (q, k, v))
    log_a = decay.clamp_min(1e-38).log().clamp_min(_MIN_LOG_DECAY)
    log_a = log_a.reshape(B, N, C, H).permute(0, 3, 1, 2)  # [B, H, N, C]
    lam = log_a.cumsum(-1)  # Lambda_t, inclusive
    lam_read = lam if inclusive else lam - log_a  # Lambda_t or Lambda_{t-1}
    idx = torch.arange(C, device=q.device)
    mask = idx[:, None] >= idx[None, :] if inclusive else idx[:, None] > idx[None, :]
    diff = (lam_read[..., :, None] - lam[..., None, :]).masked_fill(~mask, float("-inf"))
    intra = (q @ k.transpose(-1, -2)) * diff.exp()  # [B, H, N, C, C]
    o_intra = intra @ v  # [B, H, N, C, V]
    # Contribution of each chunk's own inputs to its end state, before decay from earlier chunks.
    w_end = (lam[..., -1:] - lam).exp()  # [B, H, N, C]
    chunk_kv = (k * w_end[..., None]).transpose(-1, -2) @ v  # [B, H, N, K, V]
    chunk_decay = lam[..., -1].exp()  # [B, H, N]
    outs = []
    S = state
    for n in range(N):
        outs.append((q[:, :, n] * lam_read[:, :, n, :, None].exp()) @ S)
        S = chunk_decay[:, :, n, None, None] * S + chunk_kv[:, :, n]
    o = o_intra + torch.stack(outs, dim=2)
    o = o.permute(0, 2, 3, 1, 4).reshape(B, N * C, H, Vd)[:, :T]
    return o, S
