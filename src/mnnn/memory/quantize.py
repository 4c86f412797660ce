"""Symmetric per-row quantization without wrap-around (int8, or int4 packed two per byte).

q = clamp(round(x / s), -Q, Q) with s = max|x_row| / Q and Q = 2^(bits-1) - 1, so every
element is reconstructed within s / 2 and nothing wraps (the seed cast values above 127 to int8).
"""

from __future__ import annotations

import torch


def _qmax(bits: int) -> int:
    if bits not in (4, 8):
        raise ValueError(f"quantization_bits must be 4 or 8, got {bits!r}")
    return 2 ** (bits - 1) - 1


def quantize_rows(x: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """x ``[N, D]`` float -> (codes, scales ``[N]``). int8 codes are ``[N, D]`` int8; int4 codes are
    ``[N, ceil(D/2)]`` uint8 holding two offset nibbles each."""
    Q = _qmax(bits)
    scale = x.detach().abs().amax(dim=1).clamp_min(1e-12) / Q
    q = torch.round(x.detach() / scale[:, None]).clamp_(-Q, Q).to(torch.int8)
    if bits == 8:
        return q, scale.float()
    nib = (q.to(torch.int16) + 8).to(torch.uint8)  # [-7, 7] -> [1, 15]
    if nib.shape[1] % 2:
        nib = torch.cat([nib, torch.full_like(nib[:, :1], 8)], dim=1)
    return nib[:, 0::2] | (nib[:, 1::2] << 4), scale.float()


def dequantize_rows(codes: torch.Tensor, scale: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Inverse of :func:`quantize_rows`, float32 ``[N, dim]``."""
    if bits == 8:
        return codes.float() * scale[:, None]
    _qmax(bits)
    low = (codes & 0x0F).to(torch.int16) - 8
    high = (codes >> 4).to(torch.int16) - 8
    q = torch.stack([low, high], dim=2).reshape(codes.shape[0], -1)[:, :dim]
    return q.float() * scale[:, None]


def bytes_per_row(dim: int, bits: int | None) -> int:
    """Storage of one row: float32 when ``bits`` is None, else codes plus a float32 scale."""
    if bits is None:
        return 4 * dim
    return (dim if bits == 8 else (dim + 1) // 2) + 4
