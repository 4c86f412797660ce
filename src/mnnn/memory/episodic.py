"""``Memory``: the S3CMN episodic store (seeds/000), real.

Entries are (key, value) pairs kept in buffers, outside autograd; reads are differentiable with
respect to the query and the learned projection.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from mnnn.memory.quantize import bytes_per_row, dequantize_rows, quantize_rows
from mnnn.validation import check_int, check_real


class MemoryRead(NamedTuple):
    values: torch.Tensor  # [N, value_dim] attention-weighted values (zeros on an empty store)
    indices: torch.Tensor  # [N, k] write numbers of the selected entries (stable across growth, pruning, shards)
    scores: torch.Tensor  # [N, k] scaled dot-product scores of the selected entries
    weights: torch.Tensor  # [N, k] softmax attention over the selected entries
    similarity: torch.Tensor  # [N] cosine similarity of the best entry (0 on an empty store)
    entry_values: torch.Tensor  # [N, k, value_dim] the selected entries' stored values (ids stay ids)


class Memory(nn.Module):
    """Episodic key-value memory with learned compression, int8/int4 storage, growth, pruning,
    eviction and optional sharding over ``torch.distributed`` ranks.

    Retrieval: with the learned projection :math:`P \\in R^{c \\times d}` (``compressed_dim`` c),

    .. math::
        s_i = \\frac{(P q) \\cdot (P k_i)}{\\sqrt{c}}, \\qquad
        \\text{read}(q) = \\sum_{i \\in \\text{top-}k(s)} \\operatorname{softmax}(s)_i\\, v_i

    The top-k search runs on a cache of compressed keys :math:`P k_i` (refreshed when ``P`` changes);
    the k selected scores are recomputed with autograd so that gradients reach ``q`` and ``P``.

    Compression: ``P`` is learned by the loss that reads the memory. The seed's "adaptive
    compression" (``P`` refitted to the stored keys' principal directions every
    ``compression_interval`` writes) runs only with ``pca_refit=True``: by default it is off,
    because refitting a projection that the optimizer is training would replace what it learned.

    Capacity: starts at ``initial_size``; when full it grows by ``growth_factor`` up to ``max_size``
    (``None``: unbounded). At ``max_size``, ``eviction='lru'`` (the default) drops the entries
    least recently written or read (a read counts for the entries it gives positive weight), so
    the store keeps recent context and the entries reads keep using. ``eviction='utility'`` (the
    seed's behaviour) first prunes entries whose utility is below ``prune_threshold`` x the mean
    utility (utility = attention received per read since the entry was written, so never-read
    entries go first), then evicts the lowest-utility entries. Ties go oldest write first. Every
    dropped entry is counted in ``get_memory_stats()['evicted']`` (or ``'pruned'``), including the
    leading rows of a batch larger than the whole store.

    Storage: keys as float32, or per-row symmetric int8 / int4 when ``quantize`` (no wrap-around;
    error <= scale / 2 per element). Float values are quantized the same way; integer values
    (e.g. next-token ids, kNN-LM style) are stored exactly.

    A read is a *hit* when the best selected entry has cosine similarity (in the projected space)
    >= ``similarity_threshold``; a read of an empty store is a miss.

    ``num_streams``, ``device`` and ``optimize_memory`` are accepted for the seed's API:
    ``device`` places the buffers; ``num_streams`` (CUDA streams) has no effect on CPU;
    ``optimize_memory`` enables the compressed-key search cache.
    """

    _ENTRY_BUFFERS = ("key_codes", "key_scales", "value_codes", "value_scales", "usage", "born", "order", "groups",
                      "last_used")

    def __init__(
        self,
        initial_size: int,
        embedding_dim: int,
        compressed_dim: int = 128,
        max_size: int | None = None,
        growth_factor: float = 1.5,
        prune_threshold: float = 0.1,
        compression_interval: int = 10000,
        num_streams: int = 4,
        device: str = "cpu",
        distributed: bool = False,
        world_size: int = 1,
        rank: int = 0,
        optimize_memory: bool = True,
        quantize: bool = True,
        quantization_bits: int = 8,
        value_dim: int | None = None,
        similarity_threshold: float = 0.5,
        pca_refit: bool = False,
        eviction: str = "lru",
    ):
        super().__init__()
        if eviction not in ("lru", "utility"):
            raise ValueError(f"eviction must be 'lru' or 'utility', got {eviction!r}")
        self.eviction = eviction
        for name, value in (("initial_size", initial_size), ("embedding_dim", embedding_dim),
                            ("compressed_dim", compressed_dim)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if max_size is not None and (not isinstance(max_size, int) or isinstance(max_size, bool)
                                     or max_size < initial_size):
            raise ValueError(f"max_size must be None or an int >= initial_size ({initial_size}), got {max_size!r}")
        if not growth_factor > 1.0:
            raise ValueError(f"growth_factor must be > 1, got {growth_factor!r}")
        if quantize and quantization_bits not in (4, 8):
            raise ValueError(f"quantization_bits must be 4 or 8, got {quantization_bits!r}")
        if not isinstance(world_size, int) or world_size < 1 or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank!r}, world_size={world_size!r}")
        if distributed:
            import torch.distributed as dist

            if not dist.is_available() or not dist.is_initialized():
                raise ValueError("distributed=True needs torch.distributed initialised (init_process_group)")
            if dist.get_world_size() != world_size or dist.get_rank() != rank:
                raise ValueError(
                    f"world_size/rank ({world_size}/{rank}) disagree with torch.distributed "
                    f"({dist.get_world_size()}/{dist.get_rank()})"
                )
        self.embedding_dim, self.compressed_dim = embedding_dim, compressed_dim
        self.value_dim = embedding_dim if value_dim is None else check_int("value_dim", value_dim)
        self.max_size, self.growth_factor = max_size, float(growth_factor)
        self.prune_threshold = check_real("prune_threshold", prune_threshold, 0.0)
        self.compression_interval = compression_interval
        self.num_streams, self.optimize_memory = num_streams, optimize_memory
        self.distributed, self.world_size, self.rank = distributed, world_size, rank
        self.bits = quantization_bits if quantize else None
        self.similarity_threshold = float(similarity_threshold)
        self.pca_refit = pca_refit
        self.proj = nn.Linear(embedding_dim, compressed_dim, bias=False)
        self._alloc(initial_size, torch.device(device), value_int=False)
        self.register_buffer("count", torch.zeros((), dtype=torch.long))
        self.register_buffer("clock", torch.zeros((), dtype=torch.long))  # reads so far
        self.register_buffer("writes", torch.zeros((), dtype=torch.long))
        self._cache: torch.Tensor | None = None
        self._cache_key: tuple | None = None
        self.reset_stats()
        self.to(device)

    # ---- storage ----------------------------------------------------------------------------------
    def _alloc(self, capacity: int, device: torch.device, value_int: bool) -> None:
        d, v = self.embedding_dim, self.value_dim
        if self.bits is None:
            self.register_buffer("key_codes", torch.zeros(capacity, d, device=device))
        else:
            width = d if self.bits == 8 else (d + 1) // 2
            dtype = torch.int8 if self.bits == 8 else torch.uint8
            self.register_buffer("key_codes", torch.zeros(capacity, width, dtype=dtype, device=device))
        self.register_buffer("key_scales", torch.ones(capacity, device=device))
        if value_int:
            self.register_buffer("value_codes", torch.zeros(capacity, v, dtype=torch.long, device=device))
        elif self.bits is None:
            self.register_buffer("value_codes", torch.zeros(capacity, v, device=device))
        else:
            width = v if self.bits == 8 else (v + 1) // 2
            dtype = torch.int8 if self.bits == 8 else torch.uint8
            self.register_buffer("value_codes", torch.zeros(capacity, width, dtype=dtype, device=device))
        self.register_buffer("value_scales", torch.ones(capacity, device=device))
        self.register_buffer("usage", torch.zeros(capacity, device=device))
        self.register_buffer("born", torch.zeros(capacity, dtype=torch.long, device=device))  # read clock at write
        self.register_buffer("order", torch.zeros(capacity, dtype=torch.long, device=device))  # write number
        self.register_buffer("groups", torch.full((capacity,), -1, dtype=torch.long, device=device))
        # read clock of the entry's last write or read (with a positive weight): the LRU key
        self.register_buffer("last_used", torch.zeros(capacity, dtype=torch.long, device=device))

    @property
    def capacity(self) -> int:
        return self.key_codes.shape[0]

    def __len__(self) -> int:
        return int(self.count)

    def _values_are_int(self) -> bool:
        return self.value_codes.dtype == torch.long

    def _encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.bits is None:
            return x.detach().float(), torch.ones(x.shape[0], device=x.device)
        return quantize_rows(x.float(), self.bits)

    def _decode(self, codes: torch.Tensor, scales: torch.Tensor, dim: int) -> torch.Tensor:
        """Stored rows as the projection's float dtype (integer values stay integer)."""
        if codes.dtype == torch.long:
            return codes
        if codes.is_floating_point():
            return codes.to(self.proj.weight.dtype)
        return dequantize_rows(codes, scales, self.bits, dim).to(self.proj.weight.dtype)

    def stored_keys(self) -> torch.Tensor:
        n = len(self)
        return self._decode(self.key_codes[:n], self.key_scales[:n], self.embedding_dim)

    def stored_values(self) -> torch.Tensor:
        n = len(self)
        return self._decode(self.value_codes[:n], self.value_scales[:n], self.value_dim)

    def bytes_per_entry(self) -> int:
        value_bytes = 8 * self.value_dim if self._values_are_int() else bytes_per_row(self.value_dim, self.bits)
        return bytes_per_row(self.embedding_dim, self.bits) + value_bytes

    # ---- writes -----------------------------------------------------------------------------------
    @staticmethod
    def _as_tensor(x, name: str) -> torch.Tensor:
        """Tensors pass; NumPy arrays and nested lists become tensors (floats in the default
        dtype, integers as int64); complex, boolean and object data are refused."""
        if not isinstance(x, torch.Tensor):
            import numpy as np

            try:
                arr = np.asarray(x)
            except (ValueError, TypeError) as err:
                raise TypeError(f"{name} must be a tensor or an array-like of numbers, got {type(x).__name__}") from err
            if arr.dtype.kind not in "iuf":
                raise TypeError(f"{name} must hold real numbers, got dtype {arr.dtype}")
            x = torch.as_tensor(arr)
            x = x.to(torch.get_default_dtype()) if x.is_floating_point() else x.long()
        if x.is_complex() or x.dtype == torch.bool:
            raise TypeError(f"{name} must hold real numbers, got dtype {x.dtype}")
        return x

    def _check(self, x: torch.Tensor, name: str, dim: int) -> torch.Tensor:
        x = self._as_tensor(x, name)
        if x.dim() == 1:
            x = x[None]
        if x.dim() != 2 or x.shape[1] != dim:
            raise ValueError(f"{name} must have shape [N, {dim}], got {tuple(x.shape)}")
        if x.is_floating_point() and not torch.isfinite(x).all():
            raise ValueError(f"{name} contains NaN or infinity")
        return x

    @torch.no_grad()
    def add_to_memory(self, x: torch.Tensor, y: torch.Tensor, group: torch.Tensor | int | None = None) -> None:
        """Store keys ``x [N, embedding_dim]`` with values ``y [N, value_dim]`` (float) or ``[N]`` /
        ``[N, value_dim]`` integer ids. ``group`` (an int or ``[N]`` ids) tags entries so that a
        search with ``group=`` sees only its own group (e.g. one text stream per batch row).
        In distributed mode every rank passes the same batch and keeps entries ``i`` with
        ``(writes + i) % world_size == rank``."""
        x = self._check(x, "x", self.embedding_dim)
        y = self._as_tensor(y, "y")
        if y.dim() == 1 and not y.is_floating_point():
            y = y[:, None]
        y = self._check(y, "y", self.value_dim)
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"x and y must have the same number of rows, got {x.shape[0]} and {y.shape[0]}")
        if y.is_floating_point() == self._values_are_int():
            if len(self) == 0:
                self._alloc(self.capacity, self.key_codes.device, value_int=not y.is_floating_point())
            else:
                raise TypeError("this memory stores " + ("integer" if self._values_are_int() else "float")
                                + f" values; got {y.dtype}")
        ids = int(self.writes) + torch.arange(x.shape[0], device=x.device)  # global write numbers
        if group is not None:
            g = torch.as_tensor(group)
            if (g.dtype.is_floating_point or g.dtype.is_complex or g.dtype == torch.bool
                    or g.numel() not in (1, x.shape[0])):
                raise ValueError(f"group must be an int or {x.shape[0]} integer ids, got {group!r:.60}")
        groups = torch.full_like(ids, -1) if group is None else torch.as_tensor(group, device=x.device).long().expand_as(ids)
        self.writes += x.shape[0]
        if self.distributed:
            if group is not None:
                raise NotImplementedError("groups are not supported with distributed=True yet")
            keep = ids % self.world_size == self.rank
            x, y, ids = x[keep], y[keep], ids[keep]
        n_new = x.shape[0]
        if n_new == 0:
            return
        self._make_room(n_new)
        if n_new > self.capacity:  # a batch larger than the whole store keeps its last rows
            self._stats["evicted"] += n_new - self.capacity
            n_new = self.capacity
        x, y, ids, groups = x[-n_new:], y[-n_new:], ids[-n_new:], groups[-n_new:]
        start = len(self)
        sl = slice(start, start + n_new)
        kc, ks = self._encode(x)
        self.key_codes[sl], self.key_scales[sl] = kc.to(self.key_codes.dtype), ks
        if self._values_are_int():
            self.value_codes[sl] = y.long()
        else:
            vc, vs = self._encode(y)
            self.value_codes[sl], self.value_scales[sl] = vc.to(self.value_codes.dtype), vs
        if self.bits is not None:
            err = (self._decode(kc, ks, self.embedding_dim) - x.float()).abs().mean()
            self._stats["quant_err_sum"] += float(err) * n_new
            self._stats["quant_err_n"] += n_new
        self.usage[sl] = 0.0
        self.born[sl] = self.clock
        self.last_used[sl] = self.clock
        self.order[sl] = ids
        self.groups[sl] = groups
        self.count += n_new
        self._cache = None
        if self.pca_refit and self.compression_interval and int(self.writes) // self.compression_interval > \
                (int(self.writes) - n_new) // self.compression_interval:
            self.refit_compression()

    def _make_room(self, n_new: int) -> None:
        while len(self) + n_new > self.capacity and (self.max_size is None or self.capacity < self.max_size):
            new_cap = math.ceil(self.capacity * self.growth_factor)
            if self.max_size is not None:
                new_cap = min(new_cap, self.max_size)
            self._resize(new_cap)
            self._stats["expansions"] += 1
        if len(self) + n_new > self.capacity and self.eviction == "utility":
            self.prune()
        overflow = len(self) + n_new - self.capacity
        if overflow > 0:
            self._evict(min(overflow, len(self)))

    def _resize(self, capacity: int) -> None:
        n = len(self)
        for name in self._ENTRY_BUFFERS:
            old = getattr(self, name)
            new = old.new_zeros((capacity,) + tuple(old.shape[1:]))
            new[:n] = old[:n]
            setattr(self, name, new)

    def utility(self) -> torch.Tensor:
        """Attention received per read since each entry was written ``[len(self)]``."""
        n = len(self)
        return self.usage[:n] / (self.clock - self.born[:n]).clamp_min(1).float()

    def _keep(self, keep: torch.Tensor) -> None:
        n = len(self)
        idx = keep.nonzero().squeeze(1)
        for name in self._ENTRY_BUFFERS:
            buf = getattr(self, name)
            buf[: idx.numel()] = buf[:n][idx].clone()
        self.count.fill_(idx.numel())
        self._cache = None

    @torch.no_grad()
    def prune(self) -> int:
        """Remove entries whose utility < ``prune_threshold`` x mean utility; returns how many."""
        n = len(self)
        if n == 0:
            return 0
        u = self.utility()
        keep = u >= self.prune_threshold * u.mean()
        if bool(keep.all()) or not bool(keep.any()):  # nothing read yet: no basis to prune
            return 0
        removed = n - int(keep.sum())
        self._keep(keep)
        self._stats["pruned"] += removed
        return removed

    def _evict(self, k: int) -> None:
        n = len(self)
        # 'lru': least recently written or read first; 'utility': lowest utility first. Among
        # ties the oldest write (smallest order) goes first.
        key = self.last_used[:n] if self.eviction == "lru" else self.utility()
        rank = torch.argsort(self.order[:n], stable=True)
        rank = rank[torch.argsort(key[rank], stable=True)]
        keep = torch.ones(n, dtype=torch.bool, device=key.device)
        keep[rank[:k]] = False
        self._keep(keep)
        self._stats["evicted"] += k

    # ---- compression ------------------------------------------------------------------------------
    @torch.no_grad()
    def refit_compression(self) -> None:
        """Set the projection to the top ``compressed_dim`` principal directions of the stored
        keys (centred), and refresh the search cache."""
        keys = self.stored_keys()
        if keys.shape[0] < 2:
            return
        q = min(self.compressed_dim, keys.shape[0], self.embedding_dim)
        _, _, V = torch.pca_lowrank(keys, q=q, center=True)
        W = torch.zeros_like(self.proj.weight)
        W[:q] = V[:, :q].T * math.sqrt(self.embedding_dim / self.compressed_dim)
        self.proj.weight.copy_(W)
        self._cache = None

    def _search_keys(self) -> torch.Tensor:
        """Compressed keys of all entries, cached while neither the store nor P changes."""
        key = (len(self), self.proj.weight._version, self.proj.weight.data_ptr())
        if self._cache is None or self._cache_key != key or not self.optimize_memory:
            with torch.no_grad():
                self._cache = self.proj(self.stored_keys())
            self._cache_key = key
        return self._cache

    # ---- reads ------------------------------------------------------------------------------------
    def search(self, query: torch.Tensor, top_k: int = 5, group: torch.Tensor | None = None) -> MemoryRead:
        """Top-k retrieval with attention; see the class docstring. ``top_k`` larger than the
        number of entries returns what exists. ``group [N]``: each query sees only entries of its
        group (rows with no such entry read zeros and count as misses)."""
        if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k <= 0:
            raise ValueError(f"top_k must be a positive int, got {top_k!r}")
        query = self._check(query, "query", self.embedding_dim)
        if not query.is_floating_point():
            raise TypeError(f"query must hold floats, got dtype {query.dtype}")
        query = query.to(self.proj.weight.dtype)  # float64 / float16 queries are cast, not a matmul error
        pq = self.proj(query)  # [N, c]
        scale = 1.0 / math.sqrt(self.compressed_dim)
        n_local = len(self)
        k_local = min(top_k, n_local)
        if k_local:
            with torch.no_grad():
                all_scores = pq.detach() @ self._search_keys().T * scale
                if group is not None:
                    group = torch.as_tensor(group, device=pq.device).long().expand(query.shape[0])
                    all_scores = all_scores.masked_fill(group[:, None] != self.groups[:n_local][None], float("-inf"))
                local_scores, local_idx = all_scores.topk(k_local, dim=1)
        else:
            local_scores = pq.new_zeros(query.shape[0], 0)
            local_idx = torch.zeros(query.shape[0], 0, dtype=torch.long, device=pq.device)
        keys = self.stored_keys()[local_idx] if k_local else pq.new_zeros(query.shape[0], 0, self.embedding_dim)
        values = self.stored_values()[local_idx] if k_local else pq.new_zeros(query.shape[0], 0, self.value_dim)
        gidx = self.order[local_idx] if k_local else local_idx
        if self.distributed:
            keys, values, gidx, local_scores = self._gather_topk(keys, values, gidx, local_scores, top_k)
        k = keys.shape[1]
        if k == 0:
            self._record(query.shape[0], None, None)
            empty = torch.zeros(query.shape[0], 0, device=pq.device)
            out = pq.new_zeros(query.shape[0], self.value_dim) + 0.0 * pq.sum()  # keeps the graph
            return MemoryRead(out, empty.long() - 1, empty, empty, torch.zeros(query.shape[0], device=pq.device),
                              pq.new_zeros(query.shape[0], 0, self.value_dim))
        pk = self.proj(keys)  # [N, k, c], differentiable in P
        scores = torch.einsum("nc,nkc->nk", pq, pk) * scale
        valid = torch.isfinite(local_scores)
        # a large finite fill (not -inf) keeps rows with no valid entry free of NaN in both passes
        scores = scores.masked_fill(~valid, -1e9)
        weights = torch.softmax(scores, dim=1) * valid
        out = torch.einsum("nk,nkv->nv", weights, values.to(weights.dtype))
        with torch.no_grad():
            sim = F.cosine_similarity(pq.detach()[:, None], pk.detach(), dim=-1).masked_fill(~valid, -1.0)
            best = sim.max(dim=1).values
        # usage is tracked for local reads; sharded reads do not yet credit remote entries
        usage = None if self.distributed else (local_idx, weights.detach())
        self._record(query.shape[0], best, usage)
        return MemoryRead(out, gidx, scores, weights, best, values)

    def get_memory(self, query: torch.Tensor, top_k: int = 5) -> torch.Tensor:
        """Attention-weighted values of the ``top_k`` best entries for each query row:
        ``query [N, embedding_dim] -> [N, value_dim]`` (zeros when the store is empty)."""
        return self.search(query, top_k).values

    def _gather_topk(self, keys, values, gidx, scores, top_k):
        import torch.distributed as dist

        N, k = scores.shape
        pad = top_k - k
        if pad:
            keys = F.pad(keys, (0, 0, 0, pad))
            values = F.pad(values, (0, 0, 0, pad))
            gidx = F.pad(gidx, (0, pad), value=-1)
            scores = F.pad(scores, (0, pad), value=float("-inf"))
        parts = []
        for t in (keys.detach().contiguous(), values.contiguous(), gidx.contiguous(), scores.contiguous()):
            bufs = [torch.empty_like(t) for _ in range(self.world_size)]
            dist.all_gather(bufs, t)
            parts.append(torch.cat(bufs, dim=1))
        keys, values, gidx, scores = parts
        best, pick = scores.topk(min(top_k, scores.shape[1]), dim=1)
        n_valid = int(torch.isfinite(best).any(dim=0).sum())
        pick, best = pick[:, :n_valid], best[:, :n_valid]
        take = lambda t: t.gather(1, pick.view(N, -1, *([1] * (t.dim() - 2))).expand(-1, -1, *t.shape[2:]))  # noqa: E731
        return take(keys), take(values), gidx.gather(1, pick), best

    # ---- statistics ---------------------------------------------------------------------------------
    def reset_stats(self) -> None:
        self._stats = {"reads": 0, "hits": 0, "sim_sum": 0.0, "expansions": 0, "pruned": 0, "evicted": 0,
                       "quant_err_sum": 0.0, "quant_err_n": 0}

    @torch.no_grad()
    def _record(self, n_reads: int, best: torch.Tensor | None, usage) -> None:
        self.clock += n_reads
        self._stats["reads"] += n_reads
        if best is None:
            return
        self._stats["hits"] += int((best >= self.similarity_threshold).sum())
        self._stats["sim_sum"] += float(best.clamp_min(-1).sum())
        if usage is not None:
            idx, w = usage
            if idx.numel():
                self.usage.index_add_(0, idx.reshape(-1), w.reshape(-1).to(self.usage.dtype))
                used = idx.reshape(-1)[w.reshape(-1) > 0]
                self.last_used.index_fill_(0, used, int(self.clock))

    def get_memory_stats(self) -> dict[str, float]:
        """Hit rate, mean best similarity, fill, compression ratio, bytes, expansion/prune/evict
        counts and mean absolute key quantization error."""
        s = self._stats
        n = len(self)
        float_bytes = 4 * self.embedding_dim
        return {
            "entries": n,
            "capacity": self.capacity,
            "reads": s["reads"],
            "hit_rate": s["hits"] / s["reads"] if s["reads"] else 0.0,
            "avg_similarity": s["sim_sum"] / s["reads"] if s["reads"] else 0.0,
            "usage": n / self.capacity,
            "compression_ratio": float_bytes / bytes_per_row(self.embedding_dim, self.bits),
            "bytes_per_entry": self.bytes_per_entry(),
            "bytes_used": n * self.bytes_per_entry(),
            "expansions": s["expansions"],
            "pruned": s["pruned"],
            "evicted": s["evicted"],
            "quantization_error": s["quant_err_sum"] / s["quant_err_n"] if s["quant_err_n"] else 0.0,
        }

    def clear(self) -> None:
        """Forget every entry (e.g. per evaluation stream); statistics are kept."""
        self.count.zero_()
        self._cache = None

    # state_dict: buffers may have grown or switched to integer values since construction
    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # validate what a file claims before adopting it: a tampered store must not load silently
        where = f"memory store {prefix.rstrip('.') or '(root)'}"
        if prefix + "born" in state_dict and prefix + "last_used" not in state_dict:
            state_dict[prefix + "last_used"] = state_dict[prefix + "born"].clone()  # a file from before LRU
        codes = state_dict.get(prefix + "key_codes")
        if codes is not None:
            rows = codes.shape[0]
            if self.max_size is not None and rows > self.max_size:
                raise ValueError(f"{where}: the file holds {rows} slots, more than max_size {self.max_size}")
            count = state_dict.get(prefix + "count")
            if count is not None and (count.numel() != 1 or not 0 <= int(count) <= rows):
                raise ValueError(f"{where}: count {count.tolist()} is outside [0, {rows}] (the file's slots)")
        for name in self._buffers:
            value = state_dict.get(prefix + name)
            if value is not None and value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise ValueError(f"{where}: {name} holds NaN or infinite values")
        for name, buf in list(self._buffers.items()):
            key = prefix + name
            if key in state_dict and buf is not None and (state_dict[key].shape != buf.shape
                                                           or state_dict[key].dtype != buf.dtype):
                self._buffers[name] = torch.empty_like(state_dict[key], device=buf.device)
        self._cache = None
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
