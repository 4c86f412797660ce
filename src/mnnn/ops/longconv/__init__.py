"""Causal long convolution of each channel with its own filter (the Hyena operator's core).

    y_t = sum_{s=0}^{min(t, L-1)} h_s z_{t-s}        z: [B, T, D], h: [L, D]

* :func:`long_conv_naive` — direct sum over the filter taps (reference).
* :func:`long_conv_fft` — FFT, O(T log T); an optional ``history`` (the last L-1 inputs of
  earlier chunks) makes chunked calls equal one whole call.
"""

from __future__ import annotations

import torch


def long_conv_naive(z: torch.Tensor, h: torch.Tensor, history: torch.Tensor | None = None) -> torch.Tensor:
    L = h.shape[0]
    if history is not None:
        z = torch.cat([history, z], dim=1)
    P = 0 if history is None else history.shape[1]
    T = z.shape[1] - P
    out = []
    for t in range(P, P + T):
        taps = min(t + 1, L)
        window = z[:, t - taps + 1 : t + 1].flip(1)  # z_t, z_{t-1}, ...
        out.append((window * h[:taps]).sum(1))
    return torch.stack(out, 1)


def long_conv_fft(z: torch.Tensor, h: torch.Tensor, history: torch.Tensor | None = None) -> torch.Tensor:
    P = 0 if history is None else history.shape[1]
    if history is not None:
        z = torch.cat([history, z], dim=1)
    T = z.shape[1]
    L = min(h.shape[0], T)
    n = T + L
    y = torch.fft.irfft(torch.fft.rfft(z.transpose(1, 2), n=n) * torch.fft.rfft(h[:L].T, n=n), n=n)[..., :T]
    return y.transpose(1, 2)[:, P:]


__all__ = ["long_conv_fft", "long_conv_naive"]
