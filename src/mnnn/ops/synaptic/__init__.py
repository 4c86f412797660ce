"""The SSMN synaptic (fast-weight) memory: a gated instance of ``ops.decay_attention``.

.. math::
    W_t = (1 - g_t \\lambda) W_{t-1} + g_t \\eta\\, v_t k_t^T, \\qquad o_t = W_{t-1} q_t

(read before write: position t sees only writes from positions < t). In the decay-attention
layout ``S = W^T`` with decay ``a_t = 1 - g_t lambda`` and values ``g_t eta v_t``.

Stability: W_t is an exponentially weighted sum of rank-one writes, so
``||W_t||_2 <= (eta / lambda) max_s ||v_s|| ||k_s||`` whatever the input; with unit keys and
``||v|| <= 1`` the memory is bounded by ``eta / lambda`` and its spectral radius is below 1
whenever ``eta < lambda``. At the seed's defaults (eta 0.01, lambda 0.001) the bound is 10: the
memory stays bounded but is not forced to be contracting; ``analyze_synaptic_state`` reports it.
"""

from __future__ import annotations

import torch

from mnnn.ops.decay_attention import decay_attention, decay_attention_naive


def _prep(v, gate, eta, lam):
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"decay_lambda must be in [0, 1], got {lam!r}")
    return v * (gate * eta)[..., None], 1.0 - gate * lam


def synaptic_memory(q, k, v, gate, eta: float, lam: float, state=None, chunk_size: int = 64):
    """Chunked form. q, k ``[B, T, H, K]``, v ``[B, T, H, V]``, gate ``[B, T, H]`` in [0, 1];
    state ``[B, H, K, V]`` (``W^T``). Returns ``(o [B, T, H, V], state)``."""
    vv, decay = _prep(v, gate, eta, lam)
    return decay_attention(q, k, vv, decay, state, inclusive=False, chunk_size=chunk_size)


def synaptic_memory_naive(q, k, v, gate, eta: float, lam: float, state=None):
    """Loop-over-time reference with the same contract."""
    vv, decay = _prep(v, gate, eta, lam)
    return decay_attention_naive(q, k, vv, decay, state, inclusive=False)


def synaptic_step(q_t, k_t, v_t, gate_t, eta: float, lam: float, state):
    """One step: read ``o_t = q_t S_{t-1}``, then write. q_t, k_t ``[B, H, K]``, gate_t ``[B, H]``."""
    o = torch.einsum("bhk,bhkv->bhv", q_t, state)
    decay = (1.0 - gate_t * lam)[..., None, None]
    state = decay * state + (gate_t * eta)[..., None, None] * k_t[..., :, None] * v_t[..., None, :]
    return o, state


__all__ = ["synaptic_memory", "synaptic_memory_naive", "synaptic_step"]
