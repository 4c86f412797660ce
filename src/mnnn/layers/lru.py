"""Linear Recurrent Unit (Orvieto et al., 2023, "Resurrecting Recurrent Neural Networks")."""

from __future__ import annotations

import math

import torch
from torch import nn

from mnnn.ops.scan import linear_scan


class LRU(nn.Module):
    """Complex diagonal linear recurrence with ring initialisation and input normalisation.

    .. math::
        \\lambda = \\exp(-e^{\\nu} + i e^{\\theta}), \\qquad
        l_t = \\lambda \\odot l_{t-1} + \\gamma \\odot (B x_t), \\qquad
        y_t = \\operatorname{Re}(C l_t) + D \\odot x_t

    :math:`|\\lambda| = e^{-e^{\\nu}} < 1` by construction (stable for every parameter value);
    :math:`|\\lambda|` starts uniform on the ring ``[r_min, r_max]`` and the normalisation
    :math:`\\gamma = \\sqrt{1 - |\\lambda|^2}` keeps the state variance independent of
    :math:`|\\lambda|`. ``forward`` runs the parallel scan, ``step`` the recurrence.
    """

    def __init__(
        self,
        d_model: int,
        d_state: int | None = None,
        r_min: float = 0.4,
        r_max: float = 0.99,
        max_phase: float = math.pi,
    ):
        super().__init__()
        d_state = d_state or d_model
        self.d_model, self.d_state = d_model, d_state
        u1, u2 = torch.rand(d_state), torch.rand(d_state)
        nu = -0.5 * torch.log(u1 * (r_max**2 - r_min**2) + r_min**2)
        self.nu_log = nn.Parameter(torch.log(nu))
        self.theta_log = nn.Parameter(torch.log(max_phase * u2 + 1e-4))
        scale = 1.0 / math.sqrt(2 * d_model)
        self.B_re = nn.Parameter(torch.randn(d_state, d_model) * scale)
        self.B_im = nn.Parameter(torch.randn(d_state, d_model) * scale)
        self.C_re = nn.Parameter(torch.randn(d_model, d_state) / math.sqrt(d_state))
        self.C_im = nn.Parameter(torch.randn(d_model, d_state) / math.sqrt(d_state))
        self.D = nn.Parameter(torch.randn(d_model))

    def lambda_(self) -> torch.Tensor:
        return torch.exp(torch.complex(-self.nu_log.exp(), self.theta_log.exp()))

    def _input(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lam = self.lambda_()
        gamma = torch.sqrt(1.0 - lam.abs() ** 2)
        B = torch.complex(self.B_re, self.B_im) * gamma[:, None]
        return lam, x.to(B.dtype) @ B.transpose(0, 1)

    def _output(self, l: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        C = torch.complex(self.C_re, self.C_im)
        return (l @ C.transpose(0, 1)).real + self.D * x

    def init_state(self, batch_size: int) -> torch.Tensor:
        dtype = torch.complex128 if self.D.dtype == torch.float64 else torch.complex64
        return torch.zeros(batch_size, self.d_state, dtype=dtype, device=self.D.device)

    def forward(self, x: torch.Tensor, l0: torch.Tensor | None = None):
        """x: ``[B, T, d_model]`` -> (y ``[B, T, d_model]``, states ``[B, T, d_state]`` complex, l_T)."""
        lam, bx = self._input(x)
        l, l_last = linear_scan(lam, bx, l0)
        return self._output(l, x), l, l_last

    def step(self, x_t: torch.Tensor, l: torch.Tensor):
        lam, bx = self._input(x_t)
        l = lam * l + bx
        return self._output(l, x_t), l, l
