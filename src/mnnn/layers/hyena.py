"""Hyena operator (Poli et al., 2023): short convolution + implicit long convolution + gating."""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from mnnn.ops.longconv import long_conv_fft
from mnnn.state import TensorState


@dataclasses.dataclass
class HyenaState(TensorState):
    short: torch.Tensor  # [B, K-1, 3D] last projected inputs for the short convolution
    long: torch.Tensor  # [B, L-1, D] last gated inputs z for the long convolution


class Hyena(nn.Module):
    """Order-2 Hyena operator.

    .. math::
        (q, k, v) = \\text{ShortConv}(W x), \\quad z_t = k_t \\odot v_t, \\quad
        y_t = W_o \\big(q_t \\odot \\sum_{s < L} h_s z_{t-s}\\big), \\quad
        h_s = \\text{FFN}(\\text{PE}(s)) \\, e^{-\\alpha s}

    The long filter ``h`` (support ``max_len``) is implicit: a small network of sinusoidal
    position features, windowed by a per-channel exponential decay. Causal: ``y_t`` depends on
    ``x_{\\le t}`` only. The state keeps the last inputs of both convolutions, so chunks (and
    single tokens) give the same result as the whole sequence.
    """

    def __init__(self, d_model: int, max_len: int = 1024, filter_order: int = 64, short_kernel: int = 3,
                 num_freqs: int = 8):
        super().__init__()
        self.d_model, self.max_len, self.short_kernel = d_model, max_len, short_kernel
        self.in_proj = nn.Linear(d_model, 3 * d_model)
        self.short = nn.Conv1d(3 * d_model, 3 * d_model, short_kernel, groups=3 * d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        self.num_freqs = num_freqs
        self.register_buffer("pos", torch.empty(max_len, 1 + 2 * num_freqs), persistent=False)
        # decay rates spread so that some channels see ~10 steps and others ~max_len
        self.register_buffer("alpha", torch.empty(d_model), persistent=False)
        self.reset_buffers()
        self.filter = nn.Sequential(nn.Linear(self.pos.shape[1], filter_order), nn.SiLU(),
                                    nn.Linear(filter_order, filter_order), nn.SiLU(),
                                    nn.Linear(filter_order, d_model))
        self._filter_cache: tuple[tuple, torch.Tensor] | None = None

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """Compute the fixed (non-saved) buffers in place: positional features and decay rates.
        Loaders that materialise modules from empty tensors (transformers' from_pretrained) call it."""
        max_len, device = self.max_len, self.pos.device
        t = torch.arange(max_len, device=device).float()[:, None]
        freqs = torch.arange(1, self.num_freqs + 1, device=device).float()[None] * math.pi / max_len
        self.pos.copy_(torch.cat([t / max_len, torch.sin(t * freqs), torch.cos(t * freqs)], 1))
        self.alpha.copy_(torch.logspace(math.log10(3.0 / max_len), math.log10(0.3), self.d_model, device=device))

    def long_filter(self, reversed_taps: bool = False) -> torch.Tensor:
        """``[max_len, d_model]`` (``reversed_taps``: ``h_{L-1}, ..., h_0``, the order a step dots
        with the history). Without autograd (evaluation, streaming) both are computed once and
        reused until a parameter or buffer they depend on changes (an optimizer step,
        ``load_state_dict`` and ``.to()`` all change the key: tensor versions and storages)."""
        cacheable = not torch.is_grad_enabled() and not torch.compiler.is_compiling() and not torch.jit.is_tracing()
        if cacheable:
            deps = (*self.filter.parameters(), self.pos, self.alpha)
            key = tuple((t._version, t.data_ptr(), t.dtype) for t in deps)
            if self._filter_cache is not None and self._filter_cache[0] == key:
                return self._filter_cache[2 if reversed_taps else 1]
        t = torch.arange(self.max_len, device=self.alpha.device, dtype=self.alpha.dtype)[:, None]
        h = self.filter(self.pos) * torch.exp(-self.alpha[None] * t)
        if cacheable:
            self._filter_cache = (key, h, h.flip(0))
        return h.flip(0) if reversed_taps else h

    def init_state(self, batch_size: int) -> HyenaState:
        w = self.out_proj.weight
        return HyenaState(short=w.new_zeros(batch_size, self.short_kernel - 1, 3 * self.d_model),
                          long=w.new_zeros(batch_size, self.max_len - 1, self.d_model))

    def forward(self, x: torch.Tensor, state: HyenaState | None = None):
        """x ``[B, T, D]`` -> (y ``[B, T, D]``, state)."""
        state = self.init_state(x.shape[0]) if state is None else state
        p = torch.cat([state.short, self.in_proj(x)], dim=1)  # [B, K-1+T, 3D]
        if x.shape[1] == 1:
            # one step (streaming): both convolutions are dot products of their taps with the history
            u = torch.einsum("bkc,ck->bc", p, self.short.weight[:, 0])[:, None] + self.short.bias
            q, k, v = u.chunk(3, dim=-1)
            z = k * v
            window = torch.cat([state.long, z], dim=1)  # [B, max_len, D], oldest first
            y = q * (window * self.long_filter(reversed_taps=True)).sum(1, keepdim=True)
            long_hist = window[:, 1:]
        else:
            u = self.short(p.transpose(1, 2)).transpose(1, 2)  # valid conv: [B, T, 3D]
            q, k, v = u.chunk(3, dim=-1)
            z = k * v
            y = q * long_conv_fft(z, self.long_filter(), state.long)
            long_hist = torch.cat([state.long, z], dim=1)[:, -(self.max_len - 1):]
        return self.out_proj(y), HyenaState(short=p[:, -(self.short_kernel - 1):], long=long_hist)
