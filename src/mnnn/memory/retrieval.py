"""Retrieval strategies over a LayeredMemoryBuffer (CMR). Each picks up to ``budget`` entries of
one layer for one stream, given a query vector (the previous segment's mean hidden state)."""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

STRATEGIES = ("semantic", "contextual", "multi_criteria", "hierarchical")
CRITERIA = ("relevance", "similarity", "recency", "diversity")


def _cos(query: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
    return F.normalize(states, dim=-1) @ F.normalize(query, dim=-1)


class ContextualScorer(nn.Module):
    """A small multi-head scorer: ``score_i = mean_h (W^q_h q) . (W^k_h s_i) / sqrt(d_h)``."""

    def __init__(self, dim: int, heads: int = 8):
        super().__init__()
        self.heads, self.head_dim = heads, max(1, dim // heads)
        self.q = nn.Linear(dim, heads * self.head_dim, bias=False)
        self.k = nn.Linear(dim, heads * self.head_dim, bias=False)

    def forward(self, query: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        q = self.q(query).view(self.heads, self.head_dim)
        k = self.k(states).view(-1, self.heads, self.head_dim)
        return torch.einsum("hd,nhd->n", q, k) / (self.heads * self.head_dim ** 0.5)


def _kmeans(x: torch.Tensor, k: int, iters: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means on unit vectors, deterministic init (evenly spaced points)."""
    x = F.normalize(x, dim=-1)
    k = min(k, x.shape[0])
    centers = x[torch.linspace(0, x.shape[0] - 1, k).long()].clone()
    for _ in range(iters):
        assign = (x @ centers.T).argmax(1)
        sums = torch.zeros_like(centers).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).clamp_min(1)[:, None]
        centers = F.normalize(sums / counts, dim=-1)
    return centers, (x @ centers.T).argmax(1)


class Retriever:
    """``retrieve(buffer, layer, row, query, segment)`` -> indices into the layer's store.

    * 'semantic': cosine similarity, entries at or above ``similarity_threshold``, best first.
    * 'contextual': :class:`ContextualScorer` (trainable), best first.
    * 'multi_criteria': ``sum_c w_c x_c`` with the configured weights normalised to sum 1 over
      relevance (stored score), similarity (cosine mapped to [0, 1]), recency
      (``exp(-(segment - written) / 4)``) and diversity (greedy: 1 - max cosine to the entries
      already chosen). No learned network: the weights are the configuration.
    * 'hierarchical': k-means (``max_clusters``) over the layer's entries of the stream, cached per
      buffer version; the clusters nearest the query are opened until ``budget`` candidates exist,
      then the semantic rule ranks them.

    Results are cached (``cache_size`` entries, least recently used dropped); the key includes the
    buffer version, so any write or eviction invalidates them.
    """

    def __init__(self, strategy: str, similarity_threshold: float = 0.7, budget: int = 32, cache_size: int = 1000,
                 max_clusters: int = 32, criteria_weights: dict[str, float] | None = None,
                 scorer: ContextualScorer | None = None):
        if strategy not in STRATEGIES:
            raise ValueError(f"retrieval strategy must be one of {STRATEGIES}, got {strategy!r}")
        weights = dict(criteria_weights or {"relevance": 0.4, "similarity": 0.3, "recency": 0.2, "diversity": 0.1})
        unknown = sorted(set(weights) - set(CRITERIA))
        if unknown:
            raise ValueError(f"unknown criteria {unknown}; known: {list(CRITERIA)}")
        total = sum(weights.values())
        if total <= 0 or any(v < 0 for v in weights.values()):
            raise ValueError(f"criteria_weights must be non-negative with a positive sum, got {weights}")
        self.weights = {c: weights.get(c, 0.0) / total for c in CRITERIA}
        self.strategy, self.similarity_threshold, self.budget = strategy, similarity_threshold, budget
        self.cache_size, self.max_clusters, self.scorer = cache_size, max_clusters, scorer
        self._cache: OrderedDict = OrderedDict()
        self._clusters: dict = {}
        self.cache_hits = self.cache_misses = 0

    def retrieve(self, buffer, layer: int, row: int, query: torch.Tensor, segment: int) -> torch.Tensor:
        d = buffer.data[layer]
        candidates = (d["row"] == row).nonzero().squeeze(1)
        if candidates.numel() == 0:
            return candidates
        key = (layer, row, buffer.version[layer], segment, hash(query.detach().cpu().numpy().tobytes()))
        learned = self.strategy == "contextual"
        if not learned and key in self._cache:
            self._cache.move_to_end(key)
            self.cache_hits += 1
            return self._cache[key]
        self.cache_misses += 1
        states = d["states"][candidates]
        if self.strategy == "semantic":
            picked = self._semantic(query, states)
        elif self.strategy == "contextual":
            with torch.no_grad():
                picked = self.scorer(query, states).topk(min(self.budget, states.shape[0])).indices
        elif self.strategy == "multi_criteria":
            picked = self._multi(query, states, d["relevance"][candidates], d["segment"][candidates], segment)
        else:
            picked = self._hierarchical(query, states, (layer, row, buffer.version[layer]))
        result = candidates[picked]
        if not learned:
            self._cache[key] = result
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return result

    def _semantic(self, query, states):
        sim = _cos(query, states)
        order = sim.argsort(descending=True)[: self.budget]
        return order[sim[order] >= self.similarity_threshold]

    def _multi(self, query, states, relevance, written, segment):
        sim = (_cos(query, states) + 1) / 2
        recency = torch.exp(-(segment - written).float().clamp_min(0) / 4.0)
        base = (self.weights["relevance"] * relevance.to(sim) + self.weights["similarity"] * sim
                + self.weights["recency"] * recency.to(sim))
        unit = F.normalize(states, dim=-1)
        chosen: list[int] = []
        max_sim = torch.zeros_like(sim)
        for _ in range(min(self.budget, states.shape[0])):
            score = base + self.weights["diversity"] * (1 - max_sim)
            if chosen:
                score[chosen] = float("-inf")
            i = int(score.argmax())
            chosen.append(i)
            max_sim = torch.maximum(max_sim, (unit @ unit[i]).clamp_min(0))
        return torch.tensor(chosen, dtype=torch.long, device=states.device)

    def _hierarchical(self, query, states, key):
        if key not in self._clusters:
            self._clusters = {k: v for k, v in self._clusters.items() if k[:2] != key[:2]}  # stale versions
            self._clusters[key] = _kmeans(states, self.max_clusters)
        centers, assign = self._clusters[key]
        opened = torch.zeros_like(assign, dtype=torch.bool)
        for c in (centers @ F.normalize(query, dim=-1)).argsort(descending=True):
            opened |= assign == c
            if int(opened.sum()) >= self.budget:
                break
        idx = opened.nonzero().squeeze(1)
        return idx[self._semantic(query, states[idx])]
