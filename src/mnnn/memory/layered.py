"""LayeredMemoryBuffer: per-layer tensors of captured hidden states with eviction (CMR)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch

from mnnn.serialization import load_tensors, save_tensors

EVICTION = ("lru", "relevance", "lru_relevance")
_FIELDS = ("states", "relevance", "segment", "last_access", "row")


class LayeredMemoryBuffer:
    """One store per target layer: ``states [N, d]``, ``relevance [N]``, ``segment [N]`` (when
    written), ``last_access [N]`` (segment of the last retrieval, or of the write), ``row [N]``
    (the batch row / stream it belongs to).

    Capacity: at most ``max_entries_per_layer`` per layer and ``max_total_entries`` overall; over
    either, entries are evicted from the layer being written by ``eviction_strategy``:
    'lru' (least recently retrieved, oldest first among ties), 'relevance' (lowest relevance), or
    'lru_relevance' (lowest mean of the two ranks, each scaled to [0, 1]).
    Every change bumps the layer's ``version`` (retrieval caches key on it).
    """

    def __init__(self, layers: list[int], dim: int, max_entries_per_layer: int = 1000,
                 max_total_entries: int = 5000,
                 eviction_strategy: Literal["lru", "relevance", "lru_relevance"] = "lru_relevance"):
        if eviction_strategy not in EVICTION:
            raise ValueError(f"eviction_strategy must be one of {EVICTION}, got {eviction_strategy!r}")
        if max_entries_per_layer < 1 or max_total_entries < 1:
            raise ValueError("max_entries_per_layer and max_total_entries must be >= 1")
        self.layers, self.dim = list(layers), dim
        self.max_entries_per_layer, self.max_total_entries = max_entries_per_layer, max_total_entries
        self.eviction_strategy = eviction_strategy
        self.evictions = 0
        self.clear()

    def clear(self) -> None:
        self.data = {layer: {"states": torch.zeros(0, self.dim), "relevance": torch.zeros(0),
                             "segment": torch.zeros(0, dtype=torch.long),
                             "last_access": torch.zeros(0, dtype=torch.long),
                             "row": torch.zeros(0, dtype=torch.long)} for layer in self.layers}
        self.version = {layer: 0 for layer in self.layers}

    def __len__(self) -> int:
        return sum(self.size(layer) for layer in self.layers)

    def size(self, layer: int) -> int:
        return self.data[layer]["states"].shape[0]

    @torch.no_grad()
    def add(self, layer: int, states: torch.Tensor, relevance: torch.Tensor, segment: int, rows: torch.Tensor) -> None:
        d = self.data[layer]
        n = states.shape[0]
        if n == 0:
            return
        dev = states.device
        new = {"states": states.detach().to(d["states"].dtype), "relevance": relevance.detach().float(),
               "segment": torch.full((n,), segment, dtype=torch.long, device=dev),
               "last_access": torch.full((n,), segment, dtype=torch.long, device=dev), "row": rows.long()}
        for key in _FIELDS:
            d[key] = torch.cat([d[key].to(dev), new[key].to(dev)])
        over = max(self.size(layer) - self.max_entries_per_layer, len(self) - self.max_total_entries)
        if over > 0:
            self._evict(layer, min(over, self.size(layer)))
        self.version[layer] += 1

    def _evict(self, layer: int, k: int) -> None:
        d = self.data[layer]
        n = self.size(layer)
        order = torch.argsort(d["segment"], stable=True)  # oldest first among ties

        def scaled_rank(values: torch.Tensor) -> torch.Tensor:
            r = torch.empty(n, device=values.device)
            r[torch.argsort(values[order], stable=True)] = torch.arange(n, device=values.device, dtype=torch.float)
            return r / max(n - 1, 1)

        if self.eviction_strategy == "lru":
            key = scaled_rank(d["last_access"].float())
        elif self.eviction_strategy == "relevance":
            key = scaled_rank(d["relevance"])
        else:
            key = 0.5 * (scaled_rank(d["last_access"].float()) + scaled_rank(d["relevance"]))
        drop = order[torch.argsort(key, stable=True)[:k]]
        keep = torch.ones(n, dtype=torch.bool, device=key.device)
        keep[drop] = False
        for field in _FIELDS:
            d[field] = d[field][keep]
        self.evictions += k

    def touch(self, layer: int, index: torch.Tensor, segment: int) -> None:
        """Mark entries as retrieved at ``segment`` (for LRU)."""
        if index.numel():
            self.data[layer]["last_access"][index] = segment

    def stats(self) -> dict:
        return {"entries_per_layer": {str(k): self.size(k) for k in self.layers}, "total_entries": len(self),
                "evictions": self.evictions}

    def save(self, path: str | Path) -> None:
        """safetensors + JSON header, written atomically."""
        tensors = {f"{layer}/{key}": value.cpu() for layer, d in self.data.items() for key, value in d.items()}
        meta = {"kind": "mnnn.LayeredMemoryBuffer", "layers": self.layers, "dim": self.dim,
                "max_entries_per_layer": self.max_entries_per_layer, "max_total_entries": self.max_total_entries,
                "eviction_strategy": self.eviction_strategy, "evictions": self.evictions}
        save_tensors(path, tensors, meta)

    @classmethod
    def load(cls, path: str | Path) -> "LayeredMemoryBuffer":
        tensors, meta = load_tensors(path)
        if meta.get("kind") != "mnnn.LayeredMemoryBuffer":
            raise ValueError(f"{path} is not a LayeredMemoryBuffer file")
        buf = cls(meta["layers"], meta["dim"], meta["max_entries_per_layer"], meta["max_total_entries"],
                  meta["eviction_strategy"])
        buf.evictions = meta["evictions"]
        for layer in buf.layers:
            for key in _FIELDS:
                buf.data[layer][key] = tensors[f"{layer}/{key}"]
        return buf
