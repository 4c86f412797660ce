"""Surrogate gradients for the Heaviside spike function, x = u - threshold.

| name | forward | surrogate derivative |
|---|---|---|
| fast_sigmoid (slope 25) | H(x) | 1 / (slope |x| + 1)^2  (Zenke & Ganguli 2018) |
| atan (alpha 2) | H(x) | (alpha / 2) / (1 + (pi alpha x / 2)^2)  (Fang et al. 2021) |
| sigmoid (slope 25) | H(x) | slope s (1 - s), s = sigmoid(slope x) |
| triangular | H(x) | max(0, 1 - |x|)  (Esser et al. 2016; Bellec et al. 2018) |

H(x) = 1 if x > 0 else 0 (as snnTorch).
"""

from __future__ import annotations

import math
from typing import Callable, Literal

import torch

SurrogateName = Literal["fast_sigmoid", "atan", "sigmoid", "triangular"]


def _fast_sigmoid(x: torch.Tensor) -> torch.Tensor:
    return 1.0 / (25.0 * x.abs() + 1.0) ** 2


def _atan(x: torch.Tensor) -> torch.Tensor:
    alpha = 2.0
    return (alpha / 2.0) / (1.0 + (math.pi / 2.0 * alpha * x) ** 2)


def _sigmoid(x: torch.Tensor) -> torch.Tensor:
    s = torch.sigmoid(25.0 * x)
    return 25.0 * s * (1.0 - s)


def _triangular(x: torch.Tensor) -> torch.Tensor:
    return (1.0 - x.abs()).clamp_min(0.0)


SURROGATES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "fast_sigmoid": _fast_sigmoid,
    "atan": _atan,
    "sigmoid": _sigmoid,
    "triangular": _triangular,
}


def surrogate_derivative(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if name not in SURROGATES:
        raise ValueError(f"spike_grad must be one of {sorted(SURROGATES)}, got {name!r}")
    return SURROGATES[name]


class _Spike(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, name):
        ctx.save_for_backward(x)
        ctx.name = name
        return (x > 0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * SURROGATES[ctx.name](x), None


def spike(x: torch.Tensor, name: str = "fast_sigmoid") -> torch.Tensor:
    """Heaviside forward, surrogate derivative ``name`` backward."""
    surrogate_derivative(name)
    return _Spike.apply(x, name)
