"""LIF over time as one autograd Function with a hand-written backward pass.

Autograd through the naive loop records ~6 nodes per step; here the forward loop runs without a
graph and the backward is one reverse loop of three element-wise ops per step:

.. math::
    g^u_t = g^s_t\\, \\sigma'(u_t - \\theta) + c_{t+1} g^u_{t+1}, \\qquad
    g^I_t = g^u_t, \\qquad g^{u_0} = c_0 g^u_0

with :math:`c_t = \\beta` (subtract reset) or :math:`\\beta (1 - r_t)` (reset to zero); the reset
carries no gradient, as in snnTorch. Checked against :func:`mnnn.ops.lif.naive.lif_naive` and by
float64 ``gradcheck``.
"""

from __future__ import annotations

import torch

from mnnn.ops.lif.surrogates import surrogate_derivative


class _LIF(torch.autograd.Function):
    @staticmethod
    def forward(ctx, current, u0, beta, threshold, spike_grad, reset):
        T = current.shape[1]
        mems = torch.empty_like(current)
        u = u0
        for t in range(T):
            r = (u > threshold).to(u.dtype)
            if reset == "subtract":
                u = beta * u + current[:, t] - r * threshold
            else:
                u = beta * (1.0 - r) * u + current[:, t]
            mems[:, t] = u
        spikes = (mems > threshold).to(current.dtype)
        ctx.save_for_backward(mems, u0)
        ctx.cfg = (beta, threshold, spike_grad, reset)
        return spikes, mems, u

    @staticmethod
    def backward(ctx, g_spikes, g_mems, g_last):
        mems, u0 = ctx.saved_tensors
        beta, threshold, spike_grad, reset = ctx.cfg
        T = mems.shape[1]
        g_spikes = torch.zeros_like(mems) if g_spikes is None else g_spikes
        g_total = surrogate_derivative(spike_grad)(mems - threshold) * g_spikes
        if g_mems is not None:
            g_total = g_total + g_mems
        if reset == "subtract":
            carry = torch.full_like(mems, beta)
        else:
            prev = torch.cat([u0[:, None], mems[:, :-1]], dim=1)
            carry = beta * (prev <= threshold).to(mems.dtype)  # c_t = beta (1 - r_t)
        g_current = torch.empty_like(mems)
        g = torch.zeros_like(u0) if g_last is None else g_last.clone()
        for t in range(T - 1, -1, -1):
            g = g_total[:, t] + g
            g_current[:, t] = g
            g = carry[:, t] * g  # gradient flowing into u_{t-1}
        return g_current, g, None, None, None, None


def lif(
    current: torch.Tensor,
    u0: torch.Tensor | None = None,
    beta: float = 0.95,
    threshold: float = 1.0,
    spike_grad: str = "fast_sigmoid",
    reset: str = "subtract",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Same contract as :func:`mnnn.ops.lif.naive.lif_naive`."""
    surrogate_derivative(spike_grad)
    if reset not in ("subtract", "zero"):
        raise ValueError(f"reset must be 'subtract' or 'zero', got {reset!r}")
    u0 = torch.zeros_like(current[:, 0]) if u0 is None else u0
    return _LIF.apply(current, u0, float(beta), float(threshold), spike_grad, reset)
