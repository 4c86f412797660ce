"""Reference loop for linear attention with a scalar per-step decay (a fast-weight memory)."""

from __future__ import annotations

import torch


def decay_attention_naive(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    decay: torch.Tensor,
    state: torch.Tensor | None = None,
    inclusive: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain loop over time.

    .. math::
        S_t = a_t S_{t-1} + k_t^T v_t, \\qquad
        o_t = q_t S_t \\ (\\text{inclusive}) \\quad\\text{or}\\quad o_t = q_t S_{t-1}

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``; decay ``a``: ``[B, T, H]`` in (0, 1].
        state: ``S_{-1}``, ``[B, H, K, V]`` (zeros when None).
        inclusive: read after the write of step t (True) or before it (False).

    Returns:
        ``(o, S_T)`` with ``o`` of shape ``[B, T, H, V]``.
    """
    B, T, H, K = k.shape
    S = q.new_zeros(B, H, K, v.shape[-1]) if state is None else state
    outs = []
    for t in range(T):
        S_new = decay[:, t, :, None, None] * S + k[:, t, :, :, None] * v[:, t, :, None, :]
        read = S_new if inclusive else S
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t], read))
        S = S_new
    return torch.stack(outs, dim=1), S
