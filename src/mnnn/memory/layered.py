"""LayeredMemoryBuffer: per-layer tensors of captured hidden states with eviction (CMR)."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Literal

import torch

from mnnn.serialization import load_tensors, save_tensors

EVICTION = ("lru", "relevance", "lru_relevance")
_FIELDS = ("states", "values", "relevance", "segment", "last_access", "row", "position", "next_token")
_GENERATION = itertools.count(1)  # process-wide, never reset: a content key no clear() can reuse


class LayeredMemoryBuffer:
    """One store per target layer: ``states [N, d]`` (the keys retrieval scores), ``values [N, d]``
    (what reweaving reads: the state itself, or the next position's), ``relevance [N]``, ``segment [N]`` (when
    written), ``last_access [N]`` (segment of the last retrieval, or of the write), ``row [N]``
    (the batch row / stream it belongs to), ``position [N]`` (its position in the segment that
    wrote it) and ``next_token [N]`` (the token that followed it; -1 when unknown).

    Capacity is per stream: at most ``max_entries_per_layer`` entries of a stream per layer and
    ``max_total_entries`` of a stream over all layers; over either, the stream's entries in the
    layer being written are evicted (never another stream's) by ``eviction_strategy``:
    'lru' (least recently retrieved, oldest first among ties), 'relevance' (lowest relevance), or
    'lru_relevance' (lowest mean of the two ranks, each scaled to [0, 1]).
    Every change (write, eviction, clear) gives the layer a new ``version`` drawn from a
    process-wide counter, so a version is never reused and a cache keyed on it can not return
    entries of an earlier buffer content.
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
        self.data = {layer: {"states": torch.zeros(0, self.dim), "values": torch.zeros(0, self.dim),
                             "relevance": torch.zeros(0),
                             "segment": torch.zeros(0, dtype=torch.long),
                             "last_access": torch.zeros(0, dtype=torch.long),
                             "row": torch.zeros(0, dtype=torch.long),
                             "position": torch.zeros(0, dtype=torch.long),
                             "next_token": torch.zeros(0, dtype=torch.long)} for layer in self.layers}
        self.version = {layer: next(_GENERATION) for layer in self.layers}

    def __len__(self) -> int:
        return sum(self.size(layer) for layer in self.layers)

    def size(self, layer: int) -> int:
        return self.data[layer]["states"].shape[0]

    @torch.no_grad()
    def add(self, layer: int, states: torch.Tensor, relevance: torch.Tensor, segment: int, rows: torch.Tensor,
            positions: torch.Tensor | None = None, next_tokens: torch.Tensor | None = None,
            values: torch.Tensor | None = None) -> None:
        d = self.data[layer]
        n = states.shape[0]
        if n == 0:
            return
        dev = states.device
        if rows.numel() != n or int(rows.min()) < 0:
            raise ValueError(f"rows must hold one stream index >= 0 per state ({n}), got "
                             f"{rows.numel()} with minimum {int(rows.min()) if rows.numel() else None}")
        new = {"states": states.detach().to(d["states"].dtype),
               "values": (states if values is None else values).detach().to(d["states"].dtype),
               "relevance": relevance.detach().float(),
               "segment": torch.full((n,), segment, dtype=torch.long, device=dev),
               "last_access": torch.full((n,), segment, dtype=torch.long, device=dev), "row": rows.long(),
               "position": (torch.full((n,), -1, dtype=torch.long, device=dev) if positions is None
                            else positions.long()),
               "next_token": (torch.full((n,), -1, dtype=torch.long, device=dev) if next_tokens is None
                              else next_tokens.long())}
        for key in _FIELDS:
            d[key] = torch.cat([d[key].to(dev), new[key].to(dev)])
        # capacity is per stream: no stream evicts another's entries. Counts per stream in one
        # bincount per layer; only the streams over a limit are visited.
        width = int(d["row"].max()) + 1
        here = torch.bincount(d["row"], minlength=width)
        total = sum(torch.bincount(self.data[other]["row"].to(dev), minlength=width)[:width]
                    for other in self.layers)
        over = torch.maximum(here - self.max_entries_per_layer, total - self.max_total_entries)
        over[~torch.isin(torch.arange(width, device=dev), new["row"])] = 0  # only streams written now
        for row in over.gt(0).nonzero().squeeze(1).tolist():
            mine = d["row"] == row
            self._evict(layer, min(int(over[row]), int(here[row])), mine)
        self.version[layer] = next(_GENERATION)

    def _evict(self, layer: int, k: int, among: torch.Tensor) -> None:
        """Drop ``k`` of the entries ``among`` marks (one stream's) by the eviction strategy."""
        d = self.data[layer]
        candidates = among.nonzero().squeeze(1)
        n = candidates.numel()
        sub = {key: d[key][candidates] for key in ("segment", "last_access", "relevance")}
        order = torch.argsort(sub["segment"], stable=True)  # oldest first among ties

        def scaled_rank(values: torch.Tensor) -> torch.Tensor:
            r = torch.empty(n, device=values.device)
            r[torch.argsort(values[order], stable=True)] = torch.arange(n, device=values.device, dtype=torch.float)
            return r / max(n - 1, 1)

        if self.eviction_strategy == "lru":
            key = scaled_rank(sub["last_access"].float())
        elif self.eviction_strategy == "relevance":
            key = scaled_rank(sub["relevance"])
        else:
            key = 0.5 * (scaled_rank(sub["last_access"].float()) + scaled_rank(sub["relevance"]))
        drop = candidates[order[torch.argsort(key, stable=True)[:k]]]
        keep = torch.ones(self.size(layer), dtype=torch.bool, device=key.device)
        keep[drop] = False
        for field in _FIELDS:
            d[field] = d[field][keep]
        self.evictions += k

    def replace(self, layer: int, fields: dict[str, torch.Tensor]) -> None:
        """Set one layer's entries (every field, as :attr:`data` holds them) under a new version."""
        missing = sorted(set(_FIELDS) - set(fields))
        if missing:
            raise ValueError(f"replace() needs every field {list(_FIELDS)}; missing {missing}")
        self.data[layer] = {key: fields[key].clone() for key in _FIELDS}
        self.version[layer] = next(_GENERATION)

    def touch(self, layer: int, index: torch.Tensor, segment: int) -> None:
        """Mark entries as retrieved at ``segment`` (for LRU). Not a content change: the version
        (and every cache keyed on it) stays."""
        if index.numel():
            self.data[layer]["last_access"][index.to(self.data[layer]["last_access"].device)] = segment

    def padded(self, layer: int, batch: int) -> dict[str, torch.Tensor]:
        """The layer's entries per stream, padded: every field as ``[batch, N_max, ...]`` plus
        ``mask [batch, N_max]`` (True where an entry exists) and ``index [batch, N_max]`` (its row
        in the flat store, -1 for padding). Entries keep their store order within a stream."""
        d = self.data[layer]
        row = d["row"]
        dev = d["states"].device
        if row.numel() and (int(row.min()) < 0 or int(row.max()) >= batch):
            raise ValueError(f"the memory holds streams 0..{int(row.max())} but the batch has {batch}; "
                             "call reset_memory() before reading a different set of streams")
        counts = torch.bincount(row, minlength=batch)
        n_max = int(counts.max()) if row.numel() else 0
        order = torch.argsort(row, stable=True)
        starts = torch.cumsum(counts, 0) - counts
        slot = torch.arange(row.numel(), device=dev) - starts[row[order]]
        out = {"mask": torch.zeros(batch, n_max, dtype=torch.bool, device=dev),
               "index": torch.full((batch, n_max), -1, dtype=torch.long, device=dev)}
        out["mask"][row[order], slot] = True
        out["index"][row[order], slot] = order
        for key in _FIELDS:
            value = d[key]
            padded = value.new_zeros((batch, n_max, *value.shape[1:]))
            padded[row[order], slot] = value[order]
            out[key] = padded
        return out

    def stats(self) -> dict:
        return {"entries_per_layer": {str(k): self.size(k) for k in self.layers}, "total_entries": len(self),
                "evictions": self.evictions}

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every layer's fields as ``"<layer>/<field>"`` (sharing storage with the buffer): what
        :meth:`save` writes and a carried memory state holds."""
        return {f"{layer}/{key}": value for layer, d in self.data.items() for key, value in d.items()}

    def load_tensors(self, tensors: dict[str, torch.Tensor], source: str = "the memory",
                     device: torch.device | str | None = None, legacy: bool = False) -> None:
        """Make ``tensors`` (named as :meth:`tensors` names them) every layer's entries, under new
        versions. Each layer is checked before any is taken: every field present (with ``legacy``,
        a file written before ``position``, ``next_token`` or ``values`` were stored gets -1, -1 and
        the states), one entry count for all, ``[N, dim]`` states and values, finite values, streams >= 0.
        ``source`` names the tensors in the errors; ``device``: where the entries go (default:
        where they are)."""
        layers = {}
        for layer in self.layers:
            fields = {key: tensors.get(f"{layer}/{key}") for key in _FIELDS}
            if legacy and fields["row"] is not None:  # the fields stored only since later versions
                for key in ("position", "next_token"):
                    if fields[key] is None:
                        fields[key] = torch.full((fields["row"].shape[0],), -1, dtype=torch.long)
            if legacy and fields["values"] is None and fields["states"] is not None:
                fields["values"] = fields["states"]
            missing = [key for key, value in fields.items() if value is None]
            if missing:
                stored = sorted({key.split("/", 1)[0] for key in tensors if "/" in key and not key.startswith("summary/")})
                raise ValueError(f"{source} has no {missing} for layer {layer} (written by another configuration?); "
                                 f"its layers: {stored}")
            _check_fields(layer, fields, self.dim, source)
            layers[layer] = fields
        for layer, fields in layers.items():
            self.replace(layer, {key: value if device is None else value.to(device) for key, value in fields.items()})

    def save(self, path: str | Path) -> None:
        """safetensors + JSON header, written atomically."""
        tensors = {name: value.cpu() for name, value in self.tensors().items()}
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
        buf.load_tensors(tensors, source=str(path), legacy=True)
        return buf


def _check_fields(layer: int, fields: dict[str, torch.Tensor], dim: int, source: str) -> None:
    """One layer's fields (e.g. from a file or a checkpoint) before the buffer takes them: one
    entry count for all, ``[N, dim]`` states and values, finite values, streams >= 0."""
    n = fields["states"].shape[0]
    shapes = {key: tuple(value.shape) for key, value in fields.items()}
    wrong = {key: shape for key, shape in shapes.items()
             if shape != ((n, dim) if key in ("states", "values") else (n,))}
    if wrong:
        raise ValueError(f"{source}: layer {layer} has fields of shapes {wrong}; expected "
                         f"[{n}, {dim}] states and values and [{n}] for the rest")
    bad = [key for key, value in fields.items() if value.is_floating_point() and not bool(torch.isfinite(value).all())]
    if bad:
        raise ValueError(f"{source}: layer {layer} holds NaN or infinite {bad} (a diverged or tampered state)")
    if n and int(fields["row"].min()) < 0:
        raise ValueError(f"{source}: layer {layer} has stream index {int(fields['row'].min())} < 0")
