"""Ring-buffer KV cache of the last ``window`` keys and values."""

from __future__ import annotations

import dataclasses

import torch

from mnnn.state import TensorState


@dataclasses.dataclass
class WindowCache(TensorState):
    """Slot ``p % window`` holds the key/value of absolute position ``p``; ``count`` is the number
    of positions seen so far (a 0-dim long tensor)."""

    k: torch.Tensor  # [B, W, H, K]
    v: torch.Tensor  # [B, W, H, V]
    count: torch.Tensor  # [] long

    @classmethod
    def empty(cls, batch: int, window: int, heads: int, k_dim: int, v_dim: int, like: torch.Tensor) -> "WindowCache":
        return cls(k=like.new_zeros(batch, window, heads, k_dim), v=like.new_zeros(batch, window, heads, v_dim),
                   count=torch.zeros((), dtype=torch.long, device=like.device))

    def chronological(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Keys/values oldest first, left-padded with zeros while fewer than ``window`` were seen;
        returns (k, v, number of valid entries)."""
        w = self.k.shape[1]
        c = int(self.count)
        shift = (w - c % w) % w
        return torch.roll(self.k, shift, dims=1), torch.roll(self.v, shift, dims=1), min(c, w)

    @classmethod
    def from_chronological(cls, k: torch.Tensor, v: torch.Tensor, count: int) -> "WindowCache":
        w = k.shape[1]
        shift = (w - count % w) % w
        return cls(k=torch.roll(k, -shift, dims=1), v=torch.roll(v, -shift, dims=1),
                   count=torch.tensor(count, dtype=torch.long, device=k.device))
