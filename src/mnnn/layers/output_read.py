"""CMR's output read: retrieved entries vote for the token that followed them.

For position ``t`` with query ``q_t`` (its hidden state at the read layer) and retrieved entries
``i`` (states ``k_i`` of earlier segments, each stored with the token ``y_i`` that followed it):

.. math::
    w_{t,i} = \\mathrm{softmax}_i(\\theta \\cos(W (q_t - c), W (k_i - c))), \\qquad
    p_{mem}(w) = \\sum_{i: y_i = w} w_{t,i}, \\qquad
    \\lambda_t = \\sigma(g^\\top \\widehat{W (q_t - c)} + b), \\\\
    p(w) = (1 - \\lambda_t)\\, p_{LM}(w) + \\lambda_t\\, p_{mem}(w)

Grave et al. 2017's continuous cache and kNN-LM's mixture, over CMR's own buffer: the same
entries the reweaving reads, picked by the same retrieval strategy. It returns exact
log-probabilities (computed in log space), so they stand in for the base's logits: a softmax
or cross-entropy over them is the mixture's. A position with no readable entry keeps ``p_LM``
exactly. ``c`` is the stream's mean entry when the caller centres (CMR does with
``center_keys``, as its retrieval does), else 0. ``W`` (``proj``, a ``D x D`` map that starts as
the identity, so the untrained read is the plain cosine), ``theta``, ``g`` and ``b`` are the only
parameters (``lambda`` starts at ``lambda_init``). ``W`` lets the read learn which part of a
state to match on: in the planted-recall probe (facts two segments back, budget 32, 500 steps)
the read at the last block answered 0.21 with the plain centred cosine and 0.57 with ``W``, at
block 0 0.26 and 0.79. The entries are mapped once per stream (``O(B N D^2)``), then gathered.
Cost: one ``log_softmax`` over the vocabulary plus two more ``[B, T, V]``
tensors; the memory side is ``O(B T k^2)`` (p_mem is only ever non-zero at the k picked tokens).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

_TINY = 1e-30  # p_mem where no retrieved entry holds the token: a finite stand-in for 0


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
        self.gate = nn.Linear(dim, 1)
        nn.init.zeros_(self.gate.weight)
        nn.init.constant_(self.gate.bias, math.log(lambda_init / (1 - lambda_init)))

    @property
    def theta(self) -> float:
        return float(self.log_theta.detach().exp())

    def forward(self, logits: torch.Tensor, query: torch.Tensor, states: torch.Tensor, next_token: torch.Tensor,
                idx: torch.Tensor, valid: torch.Tensor,
                center: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``logits [B, T, V]`` of the base; ``query [B, T, D]``; the stream's entries ``states
        [B, N, D]`` and ``next_token [B, N]`` (-1: unknown); the retrieval's picks ``idx [B, T, k]``
        into them and ``valid [B, T, k]``; ``center [B, 1, D]`` (optional) is subtracted from the
        query and the entries before the cosine. Returns the mixture's log-probabilities
        ``[B, T, V]`` and ``lambda_t [B, T]`` (0 where nothing was readable)."""
        B, T, k = idx.shape
        flat = idx.reshape(B, T * k)
        tokens = next_token.gather(1, flat).reshape(B, T, k)
        ok = valid & (tokens >= 0)
        if center is not None:
            query, states = query - center, states - center
        query, states = self.proj(query), self.proj(states)  # the stream's entries once, then gathered
        keys = F.normalize(states.gather(1, flat[..., None].expand(-1, -1, states.shape[-1])).reshape(B, T, k, -1),
                           dim=-1)
        q = F.normalize(query, dim=-1)
        cos = torch.einsum("btd,btkd->btk", q.to(keys.dtype), keys)
        w = torch.softmax((self.log_theta.exp() * cos).masked_fill(~ok, float("-inf")), -1)
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
        log_keep = torch.where(has, F.logsigmoid(-z), torch.zeros_like(z))  # log(1 - lambda); 0: p_LM alone
        log_lam = F.logsigmoid(z)
        # dense part: (1 - lambda) p_LM everywhere; sparse part: + lambda p_mem at the picked tokens,
        # added as a correction so each [B, T, V] tensor is made once (log_softmax, shift, scatter)
        out = torch.log_softmax(logits, -1) + log_keep[..., None].to(logits.dtype)
        kept = out.gather(-1, tok)
        mixed = torch.logaddexp(kept, (log_lam[..., None] + torch.log(mass + _TINY)).to(logits.dtype))
        delta = torch.where(first, mixed - kept, torch.zeros_like(kept))
        return out.scatter_add(-1, tok, delta), torch.where(has, log_lam.exp(), torch.zeros_like(log_lam))
