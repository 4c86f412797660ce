"""Rotary position embeddings (Su et al., 2021) by absolute position, so cached keys stay valid."""

from __future__ import annotations

import functools

import torch

# positions below this come from a cached cos/sin table (grown by doubling); beyond it they are computed
TABLE_LIMIT = 1 << 15
_tables: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


@functools.lru_cache(maxsize=32)
def _inv_freq(D: int, base: float, device: str) -> torch.Tensor:
    return base ** (-torch.arange(0, D, 2, device=device, dtype=torch.float64) / D)


def _cos_sin(positions: torch.Tensor, D: int, base: float, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin ``[T, D/2]`` of ``positions [T]`` x ``base^(-2i/D)``, the angle in float64
    (exact at long contexts), cast to ``dtype``."""
    ang = positions.to(torch.float64)[:, None] * _inv_freq(D, base, str(device))[None, :]
    return ang.cos().to(dtype), ang.sin().to(dtype)


def _apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # cos/sin [T, D/2] against x [B, T, ..., D]: one broadcast axis per axis between T and D
    shape = (cos.shape[0],) + (1,) * (x.dim() - 3) + (cos.shape[1],)
    cos, sin = cos.view(shape), sin.view(shape)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)


def rotate(x: torch.Tensor, positions: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Rotate feature pairs of ``x [B, T, ..., D]`` (D even) by ``positions [T]`` x ``base^(-2i/D)``;
    then ``rotate(q, i) . rotate(k, j)`` depends on ``i - j`` only. Traceable (the export path)."""
    return _apply(x, *_cos_sin(positions, x.shape[-1], base, x.dtype, x.device))


def rotate_span(x: torch.Tensor, start: int, base: float = 10000.0) -> torch.Tensor:
    """``rotate(x, arange(start, start + T))`` (bitwise), with cos and sin read from a cached
    table while the span lies below ``TABLE_LIMIT``: the per-token step path then spends no
    operations on the angles. ``x [B, T, ..., D]``; ``start`` a Python int."""
    T, D = x.shape[1], x.shape[-1]
    end = start + T
    if end > TABLE_LIMIT:
        return rotate(x, torch.arange(start, end, device=x.device), base)
    key = (D, float(base), x.dtype, str(x.device))
    table = _tables.get(key)
    if table is None or table[0].shape[0] < end:
        n = max(256, 1 << (end - 1).bit_length())
        table = _cos_sin(torch.arange(n, device=x.device), D, base, x.dtype, x.device)
        _tables[key] = table
    return _apply(x, table[0][start:end], table[1][start:end])
