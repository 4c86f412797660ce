"""CMR's output read: retrieved entries vote for the token that followed them.

For position ``t`` with query ``q_t`` (its hidden state at the read layer) and retrieved entries
``i`` (states ``k_i`` of earlier segments, each stored with the token ``y_i`` that followed it):

.. math::
    w_{t,i} = \\mathrm{softmax}_i(\\theta \\cos(W (q_t - c), W (k_i - c)) + s\\, r_{t,i}), \\qquad
    p_{mem}(w) = \\sum_{i: y_i = w} w_{t,i}, \\qquad
    \\lambda_t = \\sigma(g^\\top \\widehat{W (q_t - c)} + b), \\\\
    p(w) = (1 - \\lambda_t)\\, p_{LM}(w) + \\lambda_t\\, p_{mem}(w)

Grave et al. 2017's continuous cache and kNN-LM's mixture, over CMR's own buffer: the same
entries the reweaving reads, picked by the same retrieval strategy. It returns the mixture as
logits: the base's logits, changed only at the picked tokens, such that their softmax is exactly
``p`` (a softmax, log-softmax or cross-entropy over them is the mixture's; a position with no
readable entry, or a closed gate, keeps the base's logits bitwise). For a picked token ``w`` with
base logit ``l_w`` and ``Z = sum_v exp(l_v)``: ``l_w <- log(exp(l_w) + Z lambda_t p_mem(w) /
(1 - lambda_t))``; every other logit is shifted by the same ``log(1 - lambda_t) - log Z`` in the
mixture, so it stays as it is. ``r_{t,i}`` is a learned retrieval score of the pick (the contextual
scorer's; 0 for the other rules) and ``s = softplus(raw) > 0`` its learned scale (0.0025 at the
start). ``c`` is the
stream's mean entry when the caller centres (CMR does with ``center_keys``, as its retrieval does),
else 0. ``W`` (``proj``, a ``D x D`` map that starts as the identity, so the untrained read is the
plain cosine), ``theta``, ``g``, ``b`` and ``s`` are the only parameters (``lambda`` starts at
``lambda_init``). ``W`` lets the read learn which part of a state to match on: in the
planted-recall probe (facts two segments back, budget 32, 500 steps) the read at the last block
answered 0.21 with the plain centred cosine and 0.57 with ``W``, at block 0 0.26 and 0.79.

Cost: one log-sum-exp over the vocabulary (in blocks of rows that stay in cache) and, without
gradients, nothing else of size ``[B, T, V]``: the logits are corrected in place (with gradients,
one copy). The entries are mapped and normalised once per stream (``O(B N D^2)``; :meth:`keys`
lets a caller reuse them, e.g. over the steps of a generation), every position's cosine to all
of its stream's entries is one ``[B, T, N]`` product, and the mixture is ``O(B T k^2)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

_TINY = 1e-30  # p_mem where no retrieved entry holds the token: a finite stand-in for 0
_RAW_SCALE_INIT = -6.0  # softplus(-6) = 0.0025: the score scale's start


class OutputRead(nn.Module):
    """See the module docstring. ``dim``: the query and entry size; ``theta``: initial inverse
    temperature of the cosine scores; ``lambda_init``: initial mixture weight, in (0, 1)."""

    def __init__(self, dim: int, theta: float = 10.0, lambda_init: float = 0.05):
        super().__init__()
        if not (isinstance(theta, (int, float)) and math.isfinite(theta) and theta > 0):
            raise ValueError(f"output_theta must be a finite number > 0, got {theta!r}")
        if not (isinstance(lambda_init, (int, float)) and 0 < lambda_init < 1):
            raise ValueError(f"output_lambda_init must be in (0, 1), got {lambda_init!r}")
        self.log_theta = nn.Parameter(torch.tensor(math.log(theta)))
        self.proj = nn.Linear(dim, dim, bias=False)  # W: identity at the start (the plain cosine)
        nn.init.eye_(self.proj.weight)
        # how much a learned retrieval score (the contextual scorer's) adds to the read's logits:
        # s = softplus(raw) > 0, about 0.0025 at the start (an untrained scorer changes almost
        # nothing), learned with the rest. Kept positive: left free, s turned negative in the
        # planted-recall probe (the read learned to avoid what its scorer ranked first) and the
        # contextual read fell to chance (git dd7a905)
        self.raw_score_scale = nn.Parameter(torch.tensor(_RAW_SCALE_INIT))
        self.register_load_state_dict_pre_hook(_identity_for_old_checkpoints)
        self.gate = nn.Linear(dim, 1)
        nn.init.zeros_(self.gate.weight)
        nn.init.constant_(self.gate.bias, math.log(lambda_init / (1 - lambda_init)))

    @property
    def score_scale(self) -> torch.Tensor:
        """``s``: the weight of the learned retrieval score in the read's logits (``> 0``)."""
        return F.softplus(self.raw_score_scale)

    @property
    def theta(self) -> float:
        return float(self.log_theta.detach().exp())

    def keys(self, states: torch.Tensor, center: torch.Tensor | None = None) -> torch.Tensor:
        """The entries as the read scores them: ``W (k_i - c)``, normalised, ``[B, N, D]``."""
        if center is not None:
            states = states - center
        return F.normalize(self.proj(states), dim=-1)

    def forward(self, logits: torch.Tensor, query: torch.Tensor, states: torch.Tensor | None, next_token: torch.Tensor,
                idx: torch.Tensor, valid: torch.Tensor, center: torch.Tensor | None = None,
                keys: torch.Tensor | None = None,
                score_bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``logits [B, T, V]`` of the base; ``query [B, T, D]``; the stream's entries ``states
        [B, N, D]`` and ``next_token [B, N]`` (-1: unknown); the retrieval's picks ``idx [B, T, k]``
        into them and ``valid [B, T, k]``; ``center [B, 1, D]`` (optional) is subtracted from the
        query and the entries before the cosine; ``keys``: :meth:`keys` of ``states`` and ``center``
        computed before (``states`` is then not read); ``score_bias [B, T, k]``: a learned
        retrieval score of each pick (the contextual scorer's), added to the logits of the weights
        times the learned ``score_scale``, so the scorer learns from the loss. Returns the
        mixture's logits ``[B, T, V]`` (see the module docstring; without gradients they are
        ``logits`` itself, corrected in place) and ``lambda_t [B, T]`` (0 where nothing was
        readable)."""
        B, T, k = idx.shape
        tokens = next_token.gather(1, idx.reshape(B, T * k)).reshape(B, T, k)
        ok = valid & (tokens >= 0)
        if keys is None:
            keys = self.keys(states, center)
        if center is not None:
            query = query - center
        q = F.normalize(self.proj(query), dim=-1)
        cos = (q.to(keys.dtype) @ keys.transpose(1, 2)).gather(-1, idx)  # [B, T, k]: one product, then the picks
        scores = self.log_theta.exp() * cos
        if score_bias is not None:
            scores = scores + self.score_scale * score_bias.to(scores.dtype)
        w = torch.softmax(scores.masked_fill(~ok, float("-inf")), -1)
        has = ok.any(-1)
        w = torch.where(has[..., None], w, torch.zeros_like(w))  # an empty row's softmax is NaN
        tok = tokens.clamp_min(0)
        # p_mem at each pick's token (the mass of every readable pick holding it), and whether the
        # pick is the first readable one with its token: only those write, so no token is written twice
        same = (tok[..., :, None] == tok[..., None, :]) & ok[..., None, :]  # [B, T, k, k]
        mass = (same.to(w.dtype) * w[..., None, :]).sum(-1)
        earlier = torch.ones(k, k, dtype=torch.bool, device=idx.device).tril(-1)
        first = ok & ~(same & earlier).any(-1)
        z = self.gate(q).squeeze(-1)
        # log(lambda / (1 - lambda)) + log Z: the memory's share against the logits' own scale
        log_odds = (z + logsumexp_rows(logits)).to(logits.dtype)
        kept = logits.gather(-1, tok)
        mixed = torch.logaddexp(kept, log_odds[..., None] + torch.log(mass + _TINY).to(logits.dtype))
        delta = torch.where(first, mixed - kept, torch.zeros_like(kept))
        if torch.is_grad_enabled() and (logits.requires_grad or delta.requires_grad):
            out = logits.scatter_add(-1, tok, delta)
        else:  # nothing to differentiate: correct the k picked logits of each row in place
            out = logits.scatter_add_(-1, tok, delta)
        return out, torch.where(has, torch.sigmoid(z), torch.zeros_like(z))


def _identity_for_old_checkpoints(module, state_dict, prefix, *args) -> None:
    """A state saved before the read had ``W`` loads with ``W`` = identity, as the read it was. A
    state with the score scale ``s`` itself (before it was kept positive as ``softplus(raw)``)
    loads ``raw = softplus^{-1}(s)`` for ``s > 0``, and the starting ``raw`` for ``s = 0`` or
    no scale (the starting value then: ``s`` only weighs the contextual scorer's score, and a
    read that never trained it had 0). A negative ``s`` has no positive equivalent: refused."""
    if prefix + "log_theta" not in state_dict:  # not this read's state: leave the error to load_state_dict
        return
    weight = module.proj.weight
    state_dict.setdefault(prefix + "proj.weight", torch.eye(weight.shape[0], dtype=weight.dtype))
    old = state_dict.pop(prefix + "score_scale", None)
    if prefix + "raw_score_scale" in state_dict:
        return
    s = 0.0 if old is None else float(old)
    if not s >= 0:
        raise ValueError(f"{prefix}score_scale: this state's output read learned a score scale of {s:g}; the read "
                         "now keeps it positive (softplus) and cannot load a negative one: retrain the read")
    raw = _RAW_SCALE_INIT if s == 0 else s + math.log(-math.expm1(-s))  # softplus^{-1}(s) = log(e^s - 1)
    state_dict[prefix + "raw_score_scale"] = torch.tensor(raw, dtype=module.raw_score_scale.dtype)


def logsumexp_rows(x: torch.Tensor, rows: int = 32) -> torch.Tensor:
    """``logsumexp`` over the last dim of ``x [..., V]``, ``rows`` rows at a time: each block's
    temporaries stay in cache (for GPT-2's 50,257-token vocabulary about 2.5x faster than one
    call over 512 rows, and with no ``[..., V]`` temporary)."""
    flat = x.reshape(-1, x.shape[-1])
    if flat.shape[0] <= rows:  # one block, or none (torch.cat of no blocks would fail)
        return torch.logsumexp(x, -1)
    return torch.cat([torch.logsumexp(flat[i : i + rows], -1) for i in range(0, flat.shape[0], rows)]).reshape(
        x.shape[:-1])
