"""Rotary position embeddings (Su et al., 2021) by absolute position, so cached keys stay valid."""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=32)
def _inv_freq(D: int, base: float, device: str) -> torch.Tensor:
    return base ** (-torch.arange(0, D, 2, device=device, dtype=torch.float64) / D)


def rotate(x: torch.Tensor, positions: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Rotate feature pairs of ``x [B, T, H, D]`` (D even) by ``positions [T]`` x ``base^(-2i/D)``;
    then ``rotate(q, i) . rotate(k, j)`` depends on ``i - j`` only."""
    inv = _inv_freq(x.shape[-1], base, str(x.device))
    ang = positions.to(torch.float64)[:, None] * inv[None, :]  # float64: exact at long contexts
    cos, sin = ang.cos().to(x.dtype)[:, None, :], ang.sin().to(x.dtype)[:, None, :]
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)
