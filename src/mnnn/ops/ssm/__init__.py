"""Diagonal state-space model (S4D, Gu et al. 2022) with zero-order-hold discretisation.

.. math::
    h_t = \\bar A h_{t-1} + \\bar B u_t, \\qquad y_t = 2\\,\\operatorname{Re}(C h_t) + D u_t, \\qquad
    \\bar A = e^{\\Delta A}, \\; \\bar B = (\\bar A - 1) A^{-1} B

per channel with N/2 complex modes (the conjugate half is implicit, hence the 2 Re). The
convolution form is ``y = K * u + D u`` with the kernel ``K_l = 2 Re(C Abar^l Bbar)`` built by a
Vandermonde product and applied by FFT; an initial state contributes ``2 Re(C Abar^{t+1} h_0)``
and the final state is ``sum_s Abar^{T-1-s} Bbar u_s + Abar^T h_0``, so chunks with a carried
state equal the whole sequence.

* :func:`s4d_naive` — the recurrence, a loop over time (reference).
* :func:`s4d_fft` — FFT convolution (training form), O(T log T).
"""

from __future__ import annotations

import torch


def discretize(log_dt: torch.Tensor, A_re: torch.Tensor, A_im: torch.Tensor, B: torch.Tensor, C: torch.Tensor):
    """Return (Abar [H, N], Bbar*C folded: CB [H, N], Bbar [H, N]) as complex tensors.

    log_dt [H]; A_re, A_im [H, N] (A = -exp(A_re) + i A_im); B, C [H, N] complex."""
    dt = log_dt.exp()[:, None]
    A = torch.complex(-A_re.exp(), A_im)
    Abar = torch.exp(dt * A)
    Bbar = (Abar - 1.0) / A * B
    return Abar, Bbar, C


def s4d_naive(u: torch.Tensor, Abar, Bbar, C, D, h0: torch.Tensor | None = None):
    """u ``[B, T, H]`` -> (y ``[B, T, H]``, h_T ``[B, H, N]`` complex)."""
    Bsz, T, H = u.shape
    h = torch.zeros(Bsz, H, Abar.shape[-1], dtype=Abar.dtype, device=u.device) if h0 is None else h0
    ys = []
    for t in range(T):
        h = Abar * h + Bbar * u[:, t, :, None]
        ys.append(2.0 * (h * C).sum(-1).real + D * u[:, t])
    return torch.stack(ys, 1), h


def s4d_fft(u: torch.Tensor, Abar, Bbar, C, D, h0: torch.Tensor | None = None):
    """Same contract as :func:`s4d_naive`, by FFT convolution. The three products with the
    Vandermonde matrix (kernel, final state, initial state's contribution) run as real batched
    matmuls over its real and imaginary halves: a complex einsum with a real operand costs
    several times more, forward and backward."""
    Bsz, T, H = u.shape
    N = Abar.shape[-1]
    # [H, 2N, T] Vandermonde Abar^t = |Abar|^t e^{i t arg Abar}, real part over imaginary part
    z = torch.log(Abar)[:, :, None]
    t = torch.arange(T, device=u.device, dtype=z.real.dtype)
    mag, ang = torch.exp(z.real * t), z.imag * t
    powers = torch.cat([mag * torch.cos(ang), mag * torch.sin(ang)], dim=1)

    def re_dot(a: torch.Tensor) -> torch.Tensor:  # Re(sum_n a_n Abar_n^t): a [H, M, N] -> [H, M, T]
        return torch.cat([a.real, -a.imag], dim=-1) @ powers

    K = 2.0 * re_dot((C * Bbar)[:, None])[:, 0]  # [H, T]
    n = 2 * T
    y = torch.fft.irfft(torch.fft.rfft(u.transpose(1, 2), n=n) * torch.fft.rfft(K, n=n), n=n)[..., :T]  # [B, H, T]
    # (operands with a unit stride in their matrices: a batched matmul copies any other view
    # matrix by matrix, forward and backward)
    if h0 is not None:  # + 2 Re(C Abar^{t+1} h0)
        y = y + 2.0 * re_dot((C * Abar * h0).transpose(0, 1)).transpose(0, 1)
    y = y.transpose(1, 2) + D * u
    # final state: sum_s Abar^{T-1-s} Bbar u_s  (+ Abar^T h0)
    s = powers.flip(-1) @ u.permute(2, 1, 0).to(powers.dtype).contiguous()  # [H, 2N, B]
    hT = torch.complex(s[:, :N], s[:, N:]).permute(2, 0, 1) * Bbar
    if h0 is not None:
        hT = hT + (Abar ** T) * h0
    return y, hT


__all__ = ["discretize", "s4d_fft", "s4d_naive"]
