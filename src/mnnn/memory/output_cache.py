"""Output memory: a per-stream continuous cache mixed into the next-token distribution.

Each stream keeps the last ``memory_size`` pairs (key ``k_i`` = its own feature vector at position
``i``, value = the token that followed, ``x_{i+1}``) in a ring buffer carried in the recurrent
state. At position ``t`` the candidates are the ring's entries and the current segment's positions
``i < t`` (whose next token ``x_{i+1}`` is already an input); with ``q_t`` the feature at ``t``:

.. math::
    w_i \\propto \\exp(\\theta \\cos(q_t, k_i)) \\text{ over the top-}k\\text{ candidates}, \\qquad
    p_{mem}(w) = \\sum_{i: x_{i+1} = w} w_i, \\\\
    \\lambda_t = \\sigma(g^\\top q_t + b), \\qquad
    p(w) = (1 - \\lambda_t)\\, p_{LM}(w) + \\lambda_t\\, p_{mem}(w)

(Grave et al. 2017's continuous cache; kNN-LM's mixture). ``theta``, ``g`` and ``b`` are learned
(``lambda`` starts small); the mixture is computed in log space, so the log-probabilities are
exact. A position with no candidate uses ``p_LM`` alone. Because the cache lives in the state,
streams never see each other, a stream's result does not depend on the batch it is in, and an
evaluation (its own fresh state) never writes into what training reads. Eviction is FIFO: the
oldest entry goes first, which is what a cache of recent context needs.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from mnnn.state import TensorState

_TINY = 1e-30  # log(p_mem) where no candidate holds the token: a finite stand-in for log 0


@dataclasses.dataclass
class CacheState(TensorState):
    keys: torch.Tensor  # [B, M, D] unit keys (ring buffer)
    values: torch.Tensor  # [B, M] next-token ids
    count: torch.Tensor  # [] entries written so far (slot of the next write: count % M)
    last_key: torch.Tensor  # [B, D] key of the previous position, waiting for its next token
    has_last: torch.Tensor  # [] 1 once a previous position exists

    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())


class OutputMemory(nn.Module):
    """See the module docstring. ``dim``: feature size; ``memory_size``: entries per stream;
    ``top_k``: candidates read per position; ``theta``: initial inverse temperature of the cosine
    scores; ``lambda_init``: initial mixture weight."""

    def __init__(self, dim: int, memory_size: int = 2048, top_k: int = 32, theta: float = 10.0,
                 lambda_init: float = 0.05):
        super().__init__()
        for name, value in (("dim", dim), ("memory_size", memory_size), ("top_k", top_k)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not (math.isfinite(theta) and theta > 0):
            raise ValueError(f"theta must be a finite number > 0, got {theta!r}")
        if not 0 < lambda_init < 1:
            raise ValueError(f"lambda_init must be in (0, 1), got {lambda_init!r}")
        self.dim, self.memory_size, self.top_k = dim, memory_size, top_k
        self.log_theta = nn.Parameter(torch.tensor(math.log(theta)))
        self.gate = nn.Linear(dim, 1)
        nn.init.zeros_(self.gate.weight)
        nn.init.constant_(self.gate.bias, math.log(lambda_init / (1 - lambda_init)))
        self.enabled = True
        self.datastore = None  # a persistent Datastore read beside the cache (kNN-LM); see attach_datastore
        self.datastore_lambda, self.datastore_k, self.datastore_theta, self.datastore_search = 0.25, 32, None, "exact"
        self.datastore_lambda_grid: tuple[float, ...] = ()  # other lambdas scored on the same pass (statistics)
        self.reset_stats()

    @property
    def theta(self) -> float:
        return float(self.log_theta.detach().exp())

    def attach_datastore(self, store, lam: float = 0.25, top_k: int = 32, theta: float | None = None,
                         search: str = "exact", lambda_grid: tuple[float, ...] = ()) -> None:
        """Read ``store`` (a :class:`mnnn.memory.datastore.Datastore`) at every position:
        ``p = (1 - lam) p_cache + lam p_ds`` with ``p_ds`` a softmax of ``theta`` x cosine over its
        ``top_k`` entries (``theta`` None: this memory's learned theta). ``lambda_grid``: other
        weights whose NLL the statistics also record on the same pass (a sensitivity sweep; the
        output uses ``lam``). ``store=None`` detaches."""
        if store is None:
            self.datastore = None
            return
        from mnnn.memory.datastore import SEARCHES

        if store.dim != self.dim:
            raise ValueError(f"the datastore's keys have {store.dim} features; this memory's queries have {self.dim}")
        if not (isinstance(lam, (int, float)) and 0 < lam < 1):
            raise ValueError(f"datastore lambda must be in (0, 1), got {lam!r}")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"datastore top_k must be a positive int, got {top_k!r}")
        if theta is not None and not (isinstance(theta, (int, float)) and math.isfinite(theta) and theta > 0):
            raise ValueError(f"datastore theta must be a finite number > 0 or None, got {theta!r}")
        if search not in SEARCHES:
            raise ValueError(f"datastore search must be one of {SEARCHES}, got {search!r}")
        for g in lambda_grid:
            if not (isinstance(g, (int, float)) and 0 < g < 1):
                raise ValueError(f"datastore lambda_grid values must be in (0, 1), got {g!r}")
        self.datastore_lambda_grid = tuple(float(g) for g in lambda_grid)
        self.datastore, self.datastore_lambda, self.datastore_k = store, float(lam), top_k
        self.datastore_theta, self.datastore_search = theta, search

    def init_state(self, batch_size: int) -> CacheState:
        w = self.gate.weight
        zero = torch.zeros((), dtype=torch.long, device=w.device)
        return CacheState(keys=w.new_zeros(batch_size, self.memory_size, self.dim),
                          values=torch.zeros(batch_size, self.memory_size, dtype=torch.long, device=w.device),
                          count=zero, last_key=w.new_zeros(batch_size, self.dim), has_last=zero.clone())

    # ---- statistics --------------------------------------------------------------------------------
    def reset_stats(self) -> None:
        self._stats = dict.fromkeys(("positions", "reads", "hits", "hits_chance", "best", "best_chance",
                                     "lambda", "nll", "nll_lm", "ds_positions", "ds_hits", "ds_hits_chance",
                                     "ds_best", "ds_best_chance", "nll_full", "nll_ds_only"), 0.0)
        self._grid_nll: dict[float, float] = {}

    def get_stats(self) -> dict[str, float]:
        """Over the positions scored with targets since :meth:`reset_stats`:

        - ``hit_rate``: reads whose top-k candidates hold the true next token (recall@k);
          ``hit_rate_chance``: the same for k candidates drawn at random from the read's store;
        - ``retrieval_accuracy``: the best-weighted candidate's token is the true next token;
          ``retrieval_accuracy_chance``: a random candidate's token is;
        - ``memory_gain_nats``: mean NLL without the memory minus with it (same pass);
        - ``mean_lambda``, ``theta``, ``top_k``; ``reads`` (positions with a candidate);
        - with a datastore attached, ``datastore``: its ``hit_rate`` (top-k holds the true next
          token) and ``retrieval_accuracy`` beside their chance levels (k entries, one entry drawn
          at random from the store), and the mean NLL of the four ways to read the same pass:
          ``nll_lm`` (no memory), ``nll_cache`` (the stream's cache only), ``nll_datastore``
          (the datastore only), ``nll_both``."""
        s = self._stats
        reads, n = max(s["reads"], 1.0), max(s["positions"], 1.0)
        extra = {}
        if s["ds_positions"]:
            m = s["ds_positions"]
            extra["datastore"] = {
                "hit_rate": s["ds_hits"] / m, "hit_rate_chance": s["ds_hits_chance"] / m,
                "retrieval_accuracy": s["ds_best"] / m, "retrieval_accuracy_chance": s["ds_best_chance"] / m,
                "nll_lm": s["nll_lm"] / m, "nll_cache": s["nll"] / m, "nll_datastore": s["nll_ds_only"] / m,
                "nll_both": s["nll_full"] / m, "lambda": self.datastore_lambda, "top_k": self.datastore_k,
                "theta": self.datastore_theta or self.theta, "size": self.datastore.size if self.datastore else 0,
                "nll_both_by_lambda": {g: v / m for g, v in sorted(self._grid_nll.items())}}
        return {**extra, "hit_rate": s["hits"] / reads, "hit_rate_chance": s["hits_chance"] / reads,
                "retrieval_accuracy": s["best"] / reads, "retrieval_accuracy_chance": s["best_chance"] / reads,
                "memory_gain_nats": (s["nll_lm"] - s["nll"]) / n, "mean_lambda": s["lambda"] / n,
                "theta": self.theta, "top_k": self.top_k, "reads": int(s["reads"])}

    # ---- the cache ---------------------------------------------------------------------------------
    def _push(self, keys, values, new_k, new_v, count):
        """Write ``new_k [B, n, D]``, ``new_v [B, n]`` at the ring's next slots (out of place)."""
        n, M = new_k.shape[1], self.memory_size
        if n == 0:
            return keys, values, count
        if n > M:
            new_k, new_v, count, n = new_k[:, -M:], new_v[:, -M:], count + (n - M), M
        slots = (count + torch.arange(n, device=keys.device)) % M
        keys = keys.index_copy(1, slots, new_k.to(keys.dtype))
        values = values.index_copy(1, slots, new_v)
        return keys, values, count + n

    def forward(self, feats: torch.Tensor, tokens: torch.Tensor, logits: torch.Tensor | None, state: CacheState,
                targets: torch.Tensor | None = None, nll_lm: torch.Tensor | None = None):
        """feats ``[B, T, D]``, tokens ``[B, T]`` (the inputs), logits ``[B, T, V]`` of the LM.

        Without ``targets``: ``(log_probs [B, T, V], state)`` of the mixture. With ``targets``
        ``[B, T]``: ``((nll, nll_lm) each [B, T], state)`` — the mixture's and the LM's own NLL of
        the targets, without building a second ``[B, T, V]`` tensor. With targets the caller may
        give the LM's own NLL ``nll_lm [B, T]`` instead of the logits (``logits=None``): only the
        targets' probabilities enter the mixture's NLL."""
        if targets is not None and nll_lm is not None:
            dt = torch.promote_types(nll_lm.dtype, torch.float32)
            lp_lm, lp_y = None, -nll_lm.to(dt)
        else:
            if logits is None:
                raise ValueError("output memory: give logits, or targets with the LM's nll_lm")
            dt = torch.promote_types(logits.dtype, torch.float32)  # half logits are mixed in float32
            lp_lm = F.log_softmax(logits.to(dt), dim=-1)
            lp_y = None if targets is None else lp_lm.gather(-1, targets[..., None])[..., 0]
        if not self.enabled:  # reads and writes off: the LM alone, the cache untouched
            if targets is None:
                return lp_lm, state
            return (-lp_y, -lp_y), state
        B, T, D = feats.shape
        if not torch.is_grad_enabled() and not bool(torch.isfinite(feats).all()):
            raise ValueError("output memory: the query/key features hold NaN or infinity")
        q = F.normalize(feats.to(dt), dim=-1)
        keys, values, count = state.keys, state.values, state.count
        if int(state.has_last):  # the previous segment's last position now has its next token
            keys, values, count = self._push(keys, values, state.last_key[:, None], tokens[:, :1], count)
        M = self.memory_size
        c = int(count)  # = absolute position of this segment's first token: entry e is (k_e, x_{e+1})
        filled = min(c, M)
        theta = self.log_theta.exp()
        # candidates: the ring's filled slots, then this segment's positions i < t; position t
        # reads exactly the M entries before it, however the stream is cut into segments
        t = torch.arange(T, device=q.device)
        slot = torch.arange(filled, device=q.device)
        entry = c - 1 - ((c - 1 - slot) % M)  # absolute index held by each ring slot
        ring_ok = t[:, None] <= entry[None, :] + M - c  # [T, filled]
        i = torch.arange(max(T - 1, 0), device=q.device)
        seg_ok = (i[None, :] < t[:, None]) & (t[:, None] - i[None, :] <= M)  # [T, T-1]
        ok = torch.cat([ring_ok, seg_ok], dim=1)  # [T, C], the same for every stream
        cand_values = torch.cat([values[:, :filled], tokens[:, 1:]], dim=1)  # [B, C]
        C = filled + max(T - 1, 0)
        if C == 0:
            out = lp_lm if targets is None else (-lp_y,) * 2
            if targets is not None:
                with torch.no_grad():
                    self._stats["positions"] += B * T
                    self._stats["nll"] += float(out[0].sum())
                    self._stats["nll_lm"] += float(out[1].sum())
        else:
            k = min(self.top_k, C)
            top, idx = _TopKScores.apply(q, keys[:, :filled], ok, k)  # [B, T, k]
            valid = torch.isfinite(top)
            ids = cand_values[:, None, :].expand(B, T, C).gather(-1, idx)
            w = torch.softmax((theta * top.masked_fill(~valid, 0.0)).masked_fill(~valid, -1e4), dim=-1) * valid
            has = valid[..., 0]  # a position with no candidate keeps p_LM alone
            a = self.gate(feats).squeeze(-1).to(dt)
            log_lam, log_1m = F.logsigmoid(a), F.logsigmoid(-a)
            if targets is None:
                # (1 - lambda) p_LM everywhere, and the memory's mass added at the <= k retrieved ids:
                # no second [B, T, V] distribution. An id retrieved twice carries the sum of its
                # weights and is corrected once (at its first slot), so values and gradients agree
                # with the dense mixture.
                same = ids[..., :, None] == ids[..., None, :]  # [B, T, k, k]
                p_ids = (w[..., None, :] * same).sum(-1)
                earlier = torch.ones(k, k, dtype=torch.bool, device=ids.device).tril(-1)
                first = ~(same & earlier).any(-1)
                base = lp_lm + log_1m[..., None]
                b_ids = base.gather(-1, ids)
                at_ids = torch.logaddexp(b_ids, log_lam[..., None] + p_ids.clamp_min(_TINY).log())
                mixed = base.scatter_add(-1, ids, (at_ids - b_ids) * first)
                out = mixed if bool(has.all()) else torch.where(has[..., None], mixed, lp_lm)
            else:
                p_mem_y = (w * (ids == targets[..., None])).sum(-1)
                mixed = torch.logaddexp(log_1m + lp_y, log_lam + p_mem_y.clamp_min(_TINY).log())
                nll = -torch.where(has, mixed, lp_y)
                out = (nll, -lp_y)
                self._record(ok, cand_values, ids, w, valid, has, targets, log_lam, nll, -lp_y)
        if self.datastore is not None:
            out = self._read_datastore(q, out, targets)
        last = q[:, -1]
        keys, values, count = self._push(keys, values, q[:, : T - 1], tokens[:, 1:], count)
        new = CacheState(keys=keys, values=values, count=count, last_key=last,
                         has_last=torch.ones((), dtype=torch.long, device=q.device))
        return out, new

    def _read_datastore(self, q: torch.Tensor, out, targets: torch.Tensor | None):
        """Mix the attached datastore's distribution into ``out`` (log-probs, or (nll, nll_lm))."""
        B, T, D = q.shape
        store = self.datastore
        with torch.no_grad():  # a fixed store, read like the kNN-LM's: never trained through
            scores, ids = store.search(q.reshape(-1, D), self.datastore_k, self.datastore_search)
            scores, ids = scores.view(B, T, -1), ids.view(B, T, -1)
            valid = torch.isfinite(scores)
            theta = self.datastore_theta or self.theta
            w = torch.softmax((theta * scores.masked_fill(~valid, 0.0)).masked_fill(~valid, -1e4), -1) * valid
        dt, lam = q.dtype, self.datastore_lambda
        if targets is None:
            p_ds = torch.zeros_like(out).scatter_add_(-1, ids, w.to(dt))
            return torch.logaddexp(math.log1p(-lam) + out, math.log(lam) + p_ds.clamp_min(_TINY).log())
        nll_cache, nll_lm = out
        p_y = (w.to(dt) * (ids == targets[..., None])).sum(-1)
        log_p_ds = p_y.clamp_min(_TINY).log()

        def mixed(nll_base: torch.Tensor, g: float) -> torch.Tensor:  # NLL of (1 - g) p_base + g p_ds
            return -torch.logaddexp(math.log1p(-g) - nll_base, math.log(g) + log_p_ds)

        nll = mixed(nll_cache, lam)
        with torch.no_grad():
            s = self._stats
            freq = store.value_freq.to(q.device)[targets]
            k_eff = valid.sum(-1).float()
            best = ids[..., 0] == targets  # scores come best first
            s["ds_positions"] += B * T
            s["ds_hits"] += float(((ids == targets[..., None]) & valid).any(-1).sum())
            s["ds_hits_chance"] += float((1 - (1 - freq).pow(k_eff)).sum())
            s["ds_best"] += float(best.sum())
            s["ds_best_chance"] += float(freq.sum())
            s["nll_full"] += float(nll.sum())
            s["nll_ds_only"] += float(mixed(nll_lm, lam).sum())
            for g in self.datastore_lambda_grid:
                self._grid_nll[g] = self._grid_nll.get(g, 0.0) + float(mixed(nll_cache, g).sum())
        return nll, nll_lm

    @torch.no_grad()
    def _record(self, ok, cand_values, ids, w, valid, has, targets, log_lam, nll, nll_lm) -> None:
        """``ok [T, C]``: which candidates each position may read (the same for every stream)."""
        s = self._stats
        B, T = targets.shape
        n_cand = ok.sum(-1).float()  # [T]
        # candidates holding the target, counted as bytes: a bool sum would first copy the
        # [B, T, C] mask to int64
        same = (cand_values[:, None, :] == targets[..., None]) & ok
        match = same.view(torch.uint8).sum(-1, dtype=torch.int32).float()
        frac = torch.where(has, match / n_cand.clamp_min(1), torch.zeros_like(match))
        k_eff = valid.sum(-1).float()
        hit = ((ids == targets[..., None]) & valid).any(-1) & has
        best = (ids.gather(-1, w.argmax(-1, keepdim=True))[..., 0] == targets) & has
        s["positions"] += B * T
        s["reads"] += float(has.sum())
        s["hits"] += float(hit.sum())
        s["hits_chance"] += float((1 - (1 - frac).pow(k_eff))[has].sum())
        s["best"] += float(best.sum())
        s["best_chance"] += float(frac[has].sum())
        s["lambda"] += float(torch.where(has, log_lam.exp(), torch.zeros_like(log_lam)).sum())
        s["nll"] += float(nll.sum())
        s["nll_lm"] += float(nll_lm.sum())


class _TopKScores(torch.autograd.Function):
    """The k best scores ``q_t . key_c`` of each query ``q [B, T, D]`` among its allowed candidates
    (``ok [T, C]``; ``-inf`` where fewer than k are allowed) and their candidate indices. The
    candidates are the ring's ``ring [B, R, D]`` (stored keys), then this segment's own
    queries ``q[:, :T-1]``.

    The forward is one product against all candidates, masked in place (a single [B, T, C]
    tensor). Autograd's own backward would pass a dense [B, T, C] gradient through top-k, the
    mask and the product, materialising it several times, and would multiply it back against
    the stored keys too; here it is scattered into one zero tensor and multiplied back against
    what needs a gradient: the same gradients in about half the time."""

    @staticmethod
    def forward(ctx, q, ring, ok, k):
        keys = torch.cat([ring, q[:, : q.shape[1] - 1]], dim=1)
        scores = torch.bmm(q, keys.transpose(1, 2)).masked_fill_(~ok, float("-inf"))
        top, idx = scores.topk(k, dim=-1)
        ctx.save_for_backward(q, keys, idx, top)
        ctx.mark_non_differentiable(idx)
        ctx.n_ring = ring.shape[1]
        ctx.buffer = scores if torch.is_grad_enabled() or q.requires_grad else None  # reused by backward
        return top, idx

    @staticmethod
    def backward(ctx, g_top, _g_idx):
        q, keys, idx, top = ctx.saved_tensors
        g = g_top.masked_fill(torch.isinf(top), 0.0)  # an unfilled slot (-inf) carries no gradient
        B, T, _ = q.shape
        dense, ctx.buffer = ctx.buffer, None
        if dense is None or dense.dtype != g.dtype:
            dense = torch.empty(B, T, keys.shape[1], dtype=g.dtype, device=g.device)
        dense.zero_()  # the forward's score buffer: no fresh [B, T, C] allocation
        dense.scatter_(-1, idx, g)  # top-k indices are distinct in each row
        R = ctx.n_ring
        g_q = torch.bmm(dense, keys)  # as the query
        if T > 1:  # as a candidate key of the later positions of this segment
            g_q[:, : T - 1] += torch.bmm(dense[:, :, R:].transpose(1, 2), q)
        g_ring = None  # stored keys are detached in training; a caller may still chain segments
        if ctx.needs_input_grad[1]:
            g_ring = torch.bmm(dense[:, :, :R].transpose(1, 2), q)
        return g_q, g_ring, None, None
