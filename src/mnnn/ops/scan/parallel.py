"""Parallel (Hillis-Steele) scan for the diagonal linear recurrence h_t = a_t * h_{t-1} + b_t."""

from __future__ import annotations

import torch


def linear_scan(
    a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inclusive scan over time in ``ceil(log2 T)`` vectorised steps; same contract as
    :func:`mnnn.ops.scan.naive.linear_scan_naive`.

    The pairs ``(a_t, b_t)`` compose associatively, ``(a2, b2) o (a1, b1) = (a2 a1, a2 b1 + b2)``;
    after the step with offset ``d`` every position holds the composition of the last ``2d``
    inputs. The initial state is folded into the first input, ``b_0 <- a_0 h0 + b_0``. Every step
    is out of place, so autograd differentiates through it (O(T log T) work, no Python per step).
    """
    a = a.expand_as(b)
    if h0 is not None:
        b = torch.cat([b[:, :1] + a[:, :1] * h0.to(b.dtype).unsqueeze(1), b[:, 1:]], dim=1)
    T = b.shape[1]
    d = 1
    while d < T:
        b = torch.cat([b[:, :d], b[:, d:] + a[:, d:] * b[:, :-d]], dim=1)
        if 2 * d < T:  # the decays are only needed for the next round
            a = torch.cat([a[:, :d], a[:, d:] * a[:, :-d]], dim=1)
        d *= 2
    return b, b[:, -1]
