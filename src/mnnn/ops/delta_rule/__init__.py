"""The (gated) delta rule: an error-correcting fast-weight memory.

State ``S`` ``[B, H, K, V]`` maps keys to values. Per step, with write strength ``beta_t`` in
(0, 2) and decay ``alpha_t`` in (0, 1] (``alpha = 1``: the plain delta rule of DeltaNet):

.. math::
    S_t = \\alpha_t S_{t-1} + \\beta_t k_t (v_t - \\alpha_t S_{t-1}^\\top k_t)^\\top
        = \\alpha_t (I - \\beta_t k_t k_t^\\top) S_{t-1} + \\beta_t k_t v_t^\\top, \\qquad
    o_t = S_t^\\top q_t

(the write replaces what ``k_t`` retrieved by ``v_t`` instead of adding to it; read after write:
``q_t``, ``k_t``, ``v_t`` all come from position ``t``, so this is causal). With unit keys and
``beta`` in (0, 2), ``I - beta k k^T`` has eigenvalues in (-1, 1], so the state stays bounded.

Chunked form (WY / UT transform; Yang et al. 2024). In a chunk of ``C`` steps with cumulative
decay ``g_t = prod_{s <= t} alpha_s``, ``G_{ij} = g_i / g_j`` (``j <= i``) and
``A = I + tril(diag(beta) (G * K K^T), -1)`` (unit lower triangular):

.. math::
    \\tilde U = A^{-1} \\operatorname{diag}(\\beta) V, \\quad W = A^{-1} \\operatorname{diag}(\\beta g) K,
    \\quad U = \\tilde U - W S_0, \\\\
    O = \\operatorname{diag}(g) Q S_0 + (\\operatorname{tril}(Q K^\\top) * G)\\, U, \\qquad
    S_C = g_C S_0 + (K * g_C / g)^\\top U

``A`` does not depend on the state, so every chunk's triangular solve runs at once; only the
``T / C`` state passes are sequential. Plain PyTorch (``solve_triangular``): it runs on a CPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_MIN_LOG_DECAY = -30.0


def _check(q, k, v, beta, alpha, state, chunk_size=None):
    if q.dim() != 4 or k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"q, k must be [B, T, H, K] and v [B, T, H, V] with matching B, T, H; got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if beta.shape != q.shape[:3]:
        raise ValueError(f"beta must be [B, T, H] = {tuple(q.shape[:3])}, got {tuple(beta.shape)}")
    b = beta.detach()
    if b.numel() and (float(b.min()) <= 0 or float(b.max()) >= 2):
        raise ValueError(f"beta must lie in (0, 2), got values in [{float(b.min()):.3g}, {float(b.max()):.3g}]")
    if alpha is not None:
        if alpha.shape != q.shape[:3]:
            raise ValueError(f"alpha must be [B, T, H] = {tuple(q.shape[:3])}, got {tuple(alpha.shape)}")
        a = alpha.detach()
        if a.numel() and (float(a.min()) <= 0 or float(a.max()) > 1):
            raise ValueError(f"alpha must lie in (0, 1], got values in [{float(a.min()):.3g}, {float(a.max()):.3g}]")
    B, _, H, K = q.shape
    if state is not None and tuple(state.shape) != (B, H, K, v.shape[-1]):
        raise ValueError(f"state must be [B, H, K, V] = {(B, H, K, v.shape[-1])}, got {tuple(state.shape)}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")


def delta_rule_naive(q, k, v, beta, alpha=None, state=None):
    """Loop-over-time reference. q, k ``[B, T, H, K]``, v ``[B, T, H, V]``, beta (and alpha)
    ``[B, T, H]``, state ``[B, H, K, V]`` -> ``(o [B, T, H, V], state)``."""
    _check(q, k, v, beta, alpha, state)
    B, T, H, K = q.shape
    S = q.new_zeros(B, H, K, v.shape[-1]) if state is None else state
    outs = []
    for t in range(T):
        o, S = delta_rule_step(q[:, t], k[:, t], v[:, t], beta[:, t], None if alpha is None else alpha[:, t], S)
        outs.append(o)
    return (torch.stack(outs, 1) if outs else v.new_zeros(B, 0, H, v.shape[-1])), S


def delta_rule_step(q_t, k_t, v_t, beta_t, alpha_t, state):
    """One step: write, then read. q_t, k_t ``[B, H, K]``, v_t ``[B, H, V]``, beta_t / alpha_t
    ``[B, H]`` (alpha_t may be None), state ``[B, H, K, V]``."""
    S = state if alpha_t is None else alpha_t[..., None, None] * state
    retrieved = torch.einsum("bhk,bhkv->bhv", k_t, S)
    S = S + beta_t[..., None, None] * k_t[..., :, None] * (v_t - retrieved)[..., None, :]
    return torch.einsum("bhk,bhkv->bhv", q_t, S), S


def delta_rule(q, k, v, beta, alpha=None, state=None, chunk_size: int = 64):
    """Chunked (WY / UT) form with the contract of :func:`delta_rule_naive`."""
    _check(q, k, v, beta, alpha, state, chunk_size)
    B, T, H, K = q.shape
    Vd = v.shape[-1]
    S = q.new_zeros(B, H, K, Vd) if state is None else state
    if T == 0:
        return v.new_zeros(B, 0, H, Vd), S
    C = min(chunk_size, T)
    pad = (-T) % C
    if alpha is None:
        alpha = torch.ones_like(beta)
    if pad:  # padded steps: k = v = 0, beta 1, alpha 1 -> they change neither outputs nor state
        q, k, v = (F.pad(x, (0, 0, 0, 0, 0, pad)) for x in (q, k, v))
        beta = F.pad(beta, (0, 0, 0, pad), value=1.0)
        alpha = F.pad(alpha, (0, 0, 0, pad), value=1.0)
    N = (T + pad) // C
    q, k, v = (x.reshape(B, N, C, H, -1).permute(0, 3, 1, 2, 4) for x in (q, k, v))  # [B, H, N, C, .]
    beta = beta.reshape(B, N, C, H).permute(0, 3, 1, 2)  # [B, H, N, C]
    log_g = alpha.clamp_min(1e-38).log().clamp_min(_MIN_LOG_DECAY).reshape(B, N, C, H).permute(0, 3, 1, 2).cumsum(-1)
    idx = torch.arange(C, device=q.device)
    lower = idx[:, None] >= idx[None, :]
    G = (log_g[..., :, None] - log_g[..., None, :]).masked_fill(~lower, float("-inf")).exp()  # [B, H, N, C, C]
    strict = (k @ k.transpose(-1, -2)) * G * beta[..., :, None]
    A = torch.eye(C, dtype=q.dtype, device=q.device) + strict.masked_fill(~(idx[:, None] > idx[None, :]), 0.0)
    g = log_g.exp()
    rhs = torch.cat([v * beta[..., None], k * (beta * g)[..., None]], dim=-1)
    sol = torch.linalg.solve_triangular(A, rhs, upper=False, unitriangular=True)
    U_tilde, W = sol[..., :Vd], sol[..., Vd:]
    P = (q @ k.transpose(-1, -2)) * G  # inclusive lower triangle (G is zero above the diagonal)
    qg = q * g[..., None]
    k_end = k * (log_g[..., -1:] - log_g).exp()[..., None]
    g_end = g[..., -1]
    outs = []
    for n in range(N):
        U = U_tilde[:, :, n] - W[:, :, n] @ S
        outs.append(qg[:, :, n] @ S + P[:, :, n] @ U)
        S = g_end[:, :, n, None, None] * S + k_end[:, :, n].transpose(-1, -2) @ U
    o = torch.stack(outs, dim=2).permute(0, 2, 3, 1, 4).reshape(B, N * C, H, Vd)[:, :T]
    return o, S


__all__ = ["delta_rule", "delta_rule_naive", "delta_rule_step"]
