"""SpikingLayer: linear input, leaky integrate-and-fire over time, optional episodic read."""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
from torch import nn

from mnnn.memory.episodic import Memory
from mnnn.ops.lif import lif, surrogate_derivative
from mnnn.ops.lif.surrogates import spike
from mnnn.state import TensorState


@dataclasses.dataclass
class SpikingState(TensorState):
    u: torch.Tensor  # [B, out_features] membrane potential


class SpikingLayer(nn.Module):
    """Leaky integrate-and-fire layer (seeds/000) with surrogate gradients.

    .. math::
        I_t = W x_t + b \\; [+\\, W_m \\operatorname{Memory.get\\_memory}(x_t)], \\qquad
        u_t = \\beta u_{t-1} + I_t - H(u_{t-1} - \\theta)\\,\\theta, \\qquad
        s_t = H(u_t - \\theta)

    (reset ``'zero'``: :math:`u_t = \\beta (1 - H(u_{t-1} - \\theta)) u_{t-1} + I_t`). The spike's
    backward uses ``spike_grad``: 'fast_sigmoid' (slope 25), 'atan', 'sigmoid' or 'triangular'
    (see :mod:`mnnn.ops.lif.surrogates`). The time loop is :func:`mnnn.ops.lif.lif` (fused, hand-written
    backward). The episodic read needs ``in_features == memory.embedding_dim``; it is fused into
    the membrane input through ``W_m`` (initialised to zero, so a fresh layer ignores memory).

    ``forward(x, state) -> (spikes, state)`` follows the library's state contract (the seed's
    ``forward(x) -> Tensor`` returned spikes only). Spike statistics accumulate over calls until
    :meth:`reset_state`.
    """

    def __init__(self, in_features: int, out_features: int, memory: Memory | None = None,
                 beta: float = 0.95, threshold: float = 1.0, spike_grad: str = "fast_sigmoid",
                 reset: Literal["subtract", "zero"] = "subtract", memory_top_k: int = 5,
                 init_hidden: bool = False, check_finite: bool = True):
        super().__init__()
        self.init_hidden = bool(init_hidden)
        # refuse NaN/inf input (a NaN membrane never spikes again); a model whose trainer handles
        # non-finite losses itself turns it off (one reduction less per call)
        self.check_finite = bool(check_finite)
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1], got {beta!r}")
        if not threshold > 0:
            raise ValueError(f"threshold must be > 0, got {threshold!r}")
        surrogate_derivative(spike_grad)
        if reset not in ("subtract", "zero"):
            raise ValueError(f"reset must be 'subtract' or 'zero', got {reset!r}")
        if memory is not None and memory.embedding_dim != in_features:
            raise ValueError(f"memory.embedding_dim ({memory.embedding_dim}) must equal in_features ({in_features})")
        self.in_features, self.out_features = in_features, out_features
        self.beta, self.threshold, self.spike_grad, self.reset = float(beta), float(threshold), spike_grad, reset
        self.fc = nn.Linear(in_features, out_features)
        self.memory = memory
        self.memory_top_k = memory_top_k
        if memory is not None:
            self.mem_proj = nn.Linear(memory.value_dim, out_features, bias=False)
            nn.init.zeros_(self.mem_proj.weight)
        self.reset_state()

    def init_state(self, batch_size: int) -> SpikingState:
        return SpikingState(u=self.fc.weight.new_zeros(batch_size, self.out_features))

    def reset_state(self) -> None:
        """Clear the accumulated spike statistics and (``init_hidden``) the kept membrane."""
        self._hidden: SpikingState | None = None
        self._spike_sum = None  # [out] spikes per neuron
        self._steps = 0  # time steps x batch seen
        # running sums, not a list per call: statistics take O(1) memory however long a stream runs
        self._first_sum, self._first_count = 0.0, 0

    def input_current(self, x: torch.Tensor) -> torch.Tensor:
        current = self.fc(x)
        if self.memory is not None and len(self.memory) > 0:
            flat = x.reshape(-1, self.in_features)
            read = self.memory.get_memory(flat, self.memory_top_k)
            current = current + self.mem_proj(read.to(current.dtype)).view(*x.shape[:-1], self.out_features)
        return current

    def forward(self, x: torch.Tensor, state: SpikingState | None = None,
                extra_current: torch.Tensor | None = None):
        """x ``[B, T, in_features]`` -> (spikes ``[B, T, out_features]``, state); x ``[B, in_features]``
        is one time step (spikes ``[B, out_features]``). ``extra_current`` (same leading shape,
        ``out_features``) is added to the membrane input (how a model fuses its own read).

        With ``init_hidden=True`` (snnTorch's behaviour, the seed's stateful layer) a call without
        ``state`` continues from the membrane the previous call left (``reset_state()`` clears
        it); otherwise it starts from zero. An explicit ``state`` always wins."""
        if x.dim() == 2 and x.shape[-1] == self.in_features:
            extra = None if extra_current is None else extra_current[:, None]
            spikes, state = self.forward(x[:, None], state, extra)
            return spikes[:, 0], state
        if x.dim() != 3 or x.shape[-1] != self.in_features:
            raise ValueError(f"expected x of shape [B, T, {self.in_features}] or [B, {self.in_features}], "
                             f"got {tuple(x.shape)}")
        if self.check_finite and not torch.isfinite(x).all():
            raise ValueError("x contains NaN or infinity: a membrane fed NaN never spikes and stays NaN")
        keep = state is None and self.init_hidden
        if state is None:
            hidden = self._hidden if keep else None
            state = hidden if hidden is not None and hidden.u.shape[0] == x.shape[0] else self.init_state(x.shape[0])
        current = self.input_current(x)
        if extra_current is not None:
            current = current + extra_current
        spikes, _, u = lif(current, state.u, self.beta, self.threshold, self.spike_grad, self.reset)
        self._accumulate(spikes.detach())
        if keep:
            self._hidden = SpikingState(u=u)
        return spikes, SpikingState(u=u)

    def step(self, x_t: torch.Tensor, state: SpikingState):
        current = self.input_current(x_t[:, None])[:, 0]
        r = (state.u > self.threshold).to(current.dtype)
        if self.reset == "subtract":
            u = self.beta * state.u + current - r * self.threshold
        else:
            u = self.beta * (1.0 - r) * state.u + current
        s = spike(u - self.threshold, self.spike_grad)
        self._accumulate(s.detach()[:, None])
        return s, SpikingState(u=u)

    @torch.no_grad()
    def _accumulate(self, spikes: torch.Tensor) -> None:
        B, T, _ = spikes.shape
        total = spikes.sum(dim=(0, 1))
        self._spike_sum = total if self._spike_sum is None else self._spike_sum + total
        self._steps += B * T
        fired = spikes.any(dim=1)  # [B, F]
        first = spikes.argmax(dim=1).float()
        self._first_sum += float(first[fired].sum())
        self._first_count += int(fired.sum())

    def get_stats(self) -> dict[str, object]:
        """spike_rate (spikes per neuron per step), per-neuron rate quantiles, first_spike_time
        (mean step of a neuron's first spike in a call, over neurons that fired), spikes_per_token
        (spikes of the whole layer per time step), silent_fraction (neurons that never fired)."""
        if self._spike_sum is None:
            return {"spike_rate": 0.0, "spikes_per_token": 0.0, "silent_fraction": 1.0, "steps": 0,
                    "first_spike_time": float("nan"), "rate_quantiles": {}}
        rates = self._spike_sum / self._steps
        qs = torch.quantile(rates.float(), torch.tensor([0.1, 0.5, 0.9], dtype=torch.float32))
        return {
            "spike_rate": float(rates.mean()),
            "rate_quantiles": {"p10": float(qs[0]), "p50": float(qs[1]), "p90": float(qs[2])},
            "first_spike_time": self._first_sum / self._first_count if self._first_count else float("nan"),
            "spikes_per_token": float(self._spike_sum.sum() / self._steps),
            "silent_fraction": float((self._spike_sum == 0).float().mean()),
            "steps": self._steps,
        }
