"""Plastic synaptic fast-weight memory layer (the SSMN "memory hub")."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mnnn.ops.delta_rule import delta_rule, delta_rule_step
from mnnn.ops.synaptic import synaptic_memory, synaptic_step

RULES = ("hebbian", "delta", "gated_delta")
GATE_FLOOR = 1e-6


class SynapticMemory(nn.Module):
    """Fast weights written during the forward pass and read by later positions.

    .. math::
        k_t = \\frac{W_k x_t}{\\|W_k x_t\\|}, \\; v_t = \\tanh(W_v x_t)/\\sqrt{d}, \\;
        q_t = \\frac{W_q x_t}{\\|W_q x_t\\|}, \\; g_t = \\sigma(w_g x_t + b_g) \\text{ (gated) or } 1 \\\\
        W_t = (1 - g_t \\lambda) W_{t-1} + g_t \\eta\\, v_t k_t^T, \\qquad
        r^{(0)}_t = W_{t-1} q_t, \\quad r^{(i+1)}_t = W_{t-1} \\frac{W_r r^{(i)}_t}{\\|W_r r^{(i)}_t\\|}

    ``W_{t-1}``: a position reads only what earlier positions wrote. The ``reread_iterations``
    re-reads are the seed's "internal chat" (the network re-reads its own synaptic state); each is
    one more pass of the chunked op over the same writes. ``eta`` and ``lam`` may change between
    calls; ``eta = 0`` switches plasticity off. Output: ``W_o r``.

    ``plasticity_rule='delta'`` / ``'gated_delta'`` replace the Hebbian write by the
    error-correcting delta rule (:mod:`mnnn.ops.delta_rule`, DeltaNet / Gated DeltaNet): q, k, v
    pass a causal depthwise convolution of ``conv_size`` steps (each key sees the previous
    tokens) and SiLU, q and k are L2-normalised per head, the write strength
    ``beta_t = sigmoid(w_b x_t)`` and (gated) the decay ``alpha_t = sigmoid(w_a x_t + b_a)`` are
    learned; read after write, ``o_t = S_t^T q_t``. ``lam``, ``gated`` and ``reread_iterations``
    belong to the Hebbian rule and are not used there; of ``eta`` only the switch is: ``eta = 0``
    stops every write (the state is read as it is), any other value leaves the learned beta_t as it is. The state is ``(S, conv)``: the fast
    weights and the last ``conv_size - 1`` projected inputs (empty for Hebbian).
    """

    def __init__(self, d_model: int, num_heads: int, eta: float = 0.01, lam: float = 0.001,
                 gated: bool = False, reread_iterations: int = 0, chunk_size: int = 64,
                 plasticity_rule: str = "hebbian", conv_size: int = 4):
        super().__init__()
        if plasticity_rule not in RULES:
            raise ValueError(f"plasticity_rule must be one of {RULES}, got {plasticity_rule!r}")
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
        if isinstance(conv_size, bool) or not isinstance(conv_size, int) or conv_size < 1:
            raise ValueError(f"conv_size must be a positive int, got {conv_size!r}")
        self.rule = plasticity_rule
        self.conv_size = conv_size if plasticity_rule != "hebbian" else 1
        self.num_heads, self.head_dim = num_heads, d_model // num_heads
        self.eta, self.lam = float(eta), float(lam)
        self.gated, self.reread_iterations, self.chunk_size = gated, reread_iterations, chunk_size
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        # importance gates and re-reads belong to the Hebbian rule (the delta rules learn beta_t)
        hebbian = plasticity_rule == "hebbian"
        self.gate = nn.Linear(d_model, num_heads) if gated and hebbian else None
        self.reread = nn.Linear(self.head_dim, self.head_dim, bias=False) if reread_iterations and hebbian else None
        self.out = nn.Linear(d_model, d_model)
        if plasticity_rule != "hebbian":
            self.conv = nn.Parameter(torch.zeros(3 * d_model, conv_size))
            with torch.no_grad():
                self.conv[:, -1] = 1.0  # starts as the identity: each position its own input
                self.conv[:, :-1].normal_(0, 0.1)
            self.beta = nn.Linear(d_model, num_heads)
            self.alpha = nn.Linear(d_model, num_heads) if plasticity_rule == "gated_delta" else None
            if self.alpha is not None:
                nn.init.constant_(self.alpha.bias, 4.0)  # alpha ~ 0.98: a long memory to start from
        self._stats: dict[str, float] = {}
        self._pending: tuple | None = None

    @property
    def stats(self) -> dict[str, float]:
        """synaptic_energy, synaptic_update_magnitude and gate_mean of the last call's last
        update; computed when read, so the step path spends nothing on them per token."""
        if self._pending is not None:
            fn, args = self._pending
            self._pending = None
            with torch.no_grad():
                self._stats = fn(*args)
        return self._stats

    def init_state(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.out.weight
        return (w.new_zeros(batch_size, self.num_heads, self.head_dim, self.head_dim),
                w.new_zeros(batch_size, self.conv_size - 1, 3 * self.num_heads * self.head_dim))

    def _delta_inputs(self, x: torch.Tensor, conv_state: torch.Tensor):
        """x ``[B, T, d]`` -> q, k, v ``[B, T, H, K]``, beta, alpha ``[B, T, H]``, new conv state."""
        B, T, _ = x.shape
        raw = torch.cat([conv_state, self.qkv(x)], dim=1)  # [B, c-1+T, 3d]
        windows = raw.unfold(1, self.conv_size, 1)  # [B, T, 3d, c]
        mixed = F.silu((windows * self.conv).sum(-1))
        new_conv = raw[:, raw.shape[1] - (self.conv_size - 1):] if self.conv_size > 1 else conv_state
        q, k, v = mixed.view(B, T, 3, self.num_heads, self.head_dim).unbind(2)
        beta, alpha = self.gates(x)
        return F.normalize(q, dim=-1), F.normalize(k, dim=-1), v, beta, alpha, new_conv

    def gates(self, x: torch.Tensor):
        """beta_t in [1e-6, 1] and (gated) alpha_t in [1e-6, 1]: a sigmoid kept off 0, which
        float32 reaches once a pre-activation passes ~ -104 and the delta-rule op refuses."""
        beta = GATE_FLOOR + (1.0 - GATE_FLOOR) * torch.sigmoid(self.beta(x))
        alpha = None if self.alpha is None else GATE_FLOOR + (1.0 - GATE_FLOOR) * torch.sigmoid(self.alpha(x))
        return beta, alpha

    def _delta_forward(self, x: torch.Tensor, state):
        S, conv = state
        q, k, v, beta, alpha, conv = self._delta_inputs(x, conv)
        if self.eta == 0:  # the memory switch: no writes; reads see the fast weights as they are
            self._record_delta(S, S, beta.new_zeros(beta.shape[:1] + beta.shape[2:]))
            return self.out(torch.einsum("bthk,bhkv->bthv", q, S).flatten(2)), (S, conv)
        T = x.shape[1]
        if T == 1:  # the step path
            o_last, S_new = delta_rule_step(q[:, 0], k[:, 0], v[:, 0], beta[:, 0],
                                            None if alpha is None else alpha[:, 0], S)
            self._record_delta(S_new, S, beta[:, 0])
            return self.out(o_last.flatten(1))[:, None], (S_new, conv)
        a = (lambda sl: None) if alpha is None else (lambda sl: alpha[:, sl])
        # the last step runs alone so that the statistics see the last update exactly
        o_head, S_prev = delta_rule(q[:, : T - 1], k[:, : T - 1], v[:, : T - 1], beta[:, : T - 1],
                                    a(slice(0, T - 1)), S, self.chunk_size)
        o_last, S_new = delta_rule_step(q[:, -1], k[:, -1], v[:, -1], beta[:, -1],
                                        None if alpha is None else alpha[:, -1], S_prev)
        self._record_delta(S_new, S_prev, beta[:, -1])
        r = torch.cat([o_head, o_last[:, None]], dim=1)
        return self.out(r.flatten(2)), (S_new, conv)

    def _record_delta(self, S, S_prev, beta) -> None:
        self._pending = (_delta_stats, (S.detach(), S_prev.detach(), beta.detach()))

    def _project(self, x: torch.Tensor):
        shape = x.shape[:-1] + (3, self.num_heads, self.head_dim)
        q, k, v = self.qkv(x).view(shape).unbind(-3)
        gate = torch.sigmoid(self.gate(x)) if self.gated else x.new_ones(x.shape[:-1] + (self.num_heads,))
        return F.normalize(q, dim=-1), F.normalize(k, dim=-1), torch.tanh(v) / self.head_dim**0.5, gate

    def forward(self, x: torch.Tensor, state: torch.Tensor | None = None):
        """x ``[B, T, d]`` -> (``[B, T, d]``, state ``(S [B, H, K, V], conv)``)."""
        state = self.init_state(x.shape[0]) if state is None else state
        if self.rule != "hebbian":
            return self._delta_forward(x, state)
        state, conv = state
        q, k, v, g = self._project(x)
        r, new_state = synaptic_memory(q, k, v, g, self.eta, self.lam, state, self.chunk_size)
        for _ in range(self.reread_iterations):
            r, _ = synaptic_memory(F.normalize(self.reread(r), dim=-1), k, v, g, self.eta, self.lam, state,
                                   self.chunk_size)
        self._record(new_state, k[:, -1], v[:, -1], g[:, -1])
        return self.out(r.flatten(2)), (new_state, conv)

    def step(self, x_t: torch.Tensor, state):
        if self.rule != "hebbian":
            out, state = self._delta_forward(x_t[:, None], state)
            return out[:, 0], state
        state, conv = state
        q, k, v, g = self._project(x_t)
        r, new_state = synaptic_step(q, k, v, g, self.eta, self.lam, state)
        for _ in range(self.reread_iterations):
            r = torch.einsum("bhk,bhkv->bhv", F.normalize(self.reread(r), dim=-1), state)
        self._record(new_state, k, v, g)
        return self.out(r.flatten(1)), (new_state, conv)

    def _record(self, W: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor) -> None:
        self._pending = (_hebbian_stats, (W.detach(), k.detach(), v.detach(), g.detach(), self.eta, self.lam))


def _delta_stats(S: torch.Tensor, S_prev: torch.Tensor, beta: torch.Tensor) -> dict[str, float]:
    return {"synaptic_energy": float(S.pow(2).mean()),
            "synaptic_update_magnitude": float((S - S_prev).pow(2).mean().sqrt()),
            "gate_mean": float(beta.mean())}


def _hebbian_stats(W, k, v, g, eta: float, lam: float) -> dict[str, float]:
    # the last update dW_T = W_T - W_{T-1} = -g lam W_{T-1} + g eta k v^T, with W_{T-1} recovered
    write = (g * eta)[..., None, None] * k[..., :, None] * v[..., None, :]
    prev = (W - write) / (1.0 - g * lam)[..., None, None]
    return {"synaptic_energy": float(W.pow(2).mean()),
            "synaptic_update_magnitude": float((W - prev).pow(2).mean().sqrt()),
            "gate_mean": float(g.mean())}
