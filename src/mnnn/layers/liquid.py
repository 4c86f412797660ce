"""Liquid time-constant (LTC) neurons with a semi-implicit step, computed by a parallel scan."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mnnn.ops.scan import linear_scan


class LiquidLayer(nn.Module):
    """Liquid time-constant neurons (Hasani et al., 2021), driven by the input only.

    .. math::
        f_t = \\tanh(W x_t + b), \\qquad
        \\frac{dh}{dt} = -(A + B |f_t|) \\odot h + B \\odot f_t

    with :math:`A, B > 0` (softplus), so the time constant
    :math:`\\tau_t = 1 / (A + B |f_t|)` shortens when the input is strong. One semi-implicit
    (fused) Euler step of size ``dt``,

    .. math::
        h_t = \\frac{h_{t-1} + dt\\, B f_t}{1 + dt (A + B |f_t|)},

    is stable for every ``dt > 0`` and keeps :math:`|h| < 1`. Because :math:`f_t` depends on the input
    alone, the step is linear in :math:`h` and runs as a parallel scan over time.
    """

    def __init__(self, input_size: int, hidden_size: int, dt: float = 0.1):
        super().__init__()
        self.hidden_size, self.dt = hidden_size, float(dt)
        self.inp = nn.Linear(input_size, hidden_size)
        self.A_raw = nn.Parameter(torch.full((hidden_size,), -1.0))  # softplus(-1) = 0.31
        self.B_raw = nn.Parameter(torch.full((hidden_size,), 0.5))

    def coefficients(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return (decay a_t, input b_t, time constant tau_t) for ``h_t = a_t h_{t-1} + b_t``."""
        f = torch.tanh(self.inp(x))
        A, B = F.softplus(self.A_raw), F.softplus(self.B_raw)
        rate = A + B * f.abs()
        denom = 1.0 + self.dt * rate
        return 1.0 / denom, self.dt * B * f / denom, 1.0 / rate

    def forward(self, x: torch.Tensor, h0: torch.Tensor | None = None):
        """x: ``[B, T, I]`` -> (h ``[B, T, H]``, h_T, tau ``[B, T, H]``)."""
        a, b, tau = self.coefficients(x)
        h, h_last = linear_scan(a, b, h0)
        return h, h_last, tau

    def step(self, x_t: torch.Tensor, h: torch.Tensor):
        a, b, tau = self.coefficients(x_t)
        h = a * h + b
        return h, h, tau
