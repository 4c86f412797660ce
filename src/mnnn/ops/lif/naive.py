"""Reference loop for leaky integrate-and-fire neurons (autograd through every step)."""

from __future__ import annotations

import torch

from mnnn.ops.lif.surrogates import spike


def lif_naive(
    current: torch.Tensor,
    u0: torch.Tensor | None = None,
    beta: float = 0.95,
    threshold: float = 1.0,
    spike_grad: str = "fast_sigmoid",
    reset: str = "subtract",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LIF over time with the reset taken from the previous membrane (snnTorch's Leaky):

    .. math::
        r_t = H(u_{t-1} - \\theta) \\ (\\text{no gradient}), \\quad
        u_t = \\beta u_{t-1} + I_t - r_t \\theta \\ (\\text{subtract}) \\ \\text{or} \\
        u_t = \\beta (1 - r_t) u_{t-1} + I_t \\ (\\text{zero}), \\quad
        s_t = H(u_t - \\theta)

    Args: current ``[B, T, F]``; u0 ``[B, F]``.
    Returns ``(spikes [B, T, F], membranes [B, T, F], u_T)``.
    """
    u = torch.zeros_like(current[:, 0]) if u0 is None else u0
    spikes, mems = [], []
    for t in range(current.shape[1]):
        r = (u > threshold).to(u.dtype)
        if reset == "subtract":
            u = beta * u + current[:, t] - r * threshold
        else:
            u = beta * (1.0 - r) * u + current[:, t]
        spikes.append(spike(u - threshold, spike_grad))
        mems.append(u)
    return torch.stack(spikes, 1), torch.stack(mems, 1), u
