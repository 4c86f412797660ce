"""Reference loop for the diagonal linear recurrence h_t = a_t * h_{t-1} + b_t."""

from __future__ import annotations

import torch


def linear_scan_naive(
    a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain loop over time.

    Args:
        a: decay, ``[B, T, D]`` (real or complex), or broadcastable to ``b``.
        b: input, ``[B, T, D]``.
        h0: initial state ``[B, D]`` (zeros when None).

    Returns:
        ``(h, h_T)``: all states ``[B, T, D]`` and the final state ``[B, D]``.
    """
    a = a.expand_as(b)
    h = torch.zeros_like(b[:, 0]) if h0 is None else h0.to(b.dtype)
    outs = []
    for t in range(b.shape[1]):
        h = a[:, t] * h + b[:, t]
        outs.append(h)
    return torch.stack(outs, dim=1), h
