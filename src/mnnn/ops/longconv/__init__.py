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


def fft_size(n: int) -> int:
    """The smallest ``m >= n`` whose only prime factors are 2, 3 and 5: pocketfft runs such
    sizes several times faster than one with a large prime factor (639 = 9 x 71, say)."""
    best = 1 << max(n - 1, 0).bit_length()
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            m = p35
            while m < n:
                m *= 2
            best = min(best, m)
            p35 *= 3
        p5 *= 5
    return best


def long_conv_fft(z: torch.Tensor, h: torch.Tensor, history: torch.Tensor | None = None) -> torch.Tensor:
    P = 0 if history is None else history.shape[1]
    if history is not None:
        z = torch.cat([history, z], dim=1)
    T = z.shape[1]
    L = min(h.shape[0], T)
    # a circular convolution of length n is exact at outputs t >= P once n >= T + L - 1 - P (the
    # wrapped terms land on the history's positions, which are dropped)
    n = fft_size(max(T, T + L - 1 - P))
    y = torch.fft.irfft(torch.fft.rfft(z.transpose(1, 2), n=n) * torch.fft.rfft(h[:L].T, n=n), n=n)[..., P:T]
    return y.transpose(1, 2)


__all__ = ["fft_size", "long_conv_fft", "long_conv_naive"]
