"""A persistent datastore for the output memory (kNN-LM, Khandelwal et al. 2020).

``mnnn index CHECKPOINT`` runs a trained model over a split (the training split by default) and
stores one entry per position: the key is the model's unit feature vector ``q_i`` (the same
vector the output memory queries with), the value is the token that followed, ``x_{i+1}``. At
evaluation the output memory searches it for the top ``k`` entries of every query and mixes

.. math::
    p_{ds}(w) = \\sum_{i \\in \\text{top-}k,\\ x_{i+1} = w} \\operatorname{softmax}_i(\\theta \\cos(q_t, k_i)),
    \\qquad p(w) = (1 - \\lambda_{ds})\\, p_{cache}(w) + \\lambda_{ds}\\, p_{ds}(w)

into the distribution the stream's own cache already gave (``p_cache`` is the LM alone when the
cache has nothing), with a fixed ``lambda_ds`` (kNN-LM's 0.25 by default) and the memory's learned
``theta`` unless one is given. The read is never trained through: the store is fixed, like the
kNN-LM's.

Search is exact (blocked matrix products, the keys held in float16) or, for large stores, through
faiss (``search='faiss'``: an inverted-file index over the same keys, approximate; the optional
``faiss-cpu`` package). A datastore records the vocabulary size, the feature size, the split it was
built from and a fingerprint of the model's parameters; attaching it to another model, or
evaluating on the split it was built from (every position would read its own continuation), is
refused with the reason.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from mnnn.serialization import load_tensors, save_tensors

FORMAT = "mnnn-datastore/1"
SEARCHES = ("exact", "faiss")


def model_fingerprint(model: torch.nn.Module) -> str:
    """16 hex digits of a SHA-256 over the model's parameter names and values: two models give the
    same fingerprint only if their weights are equal (stores and statistics are not included)."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().float().numpy().tobytes())
    return h.hexdigest()[:16]


class Datastore:
    """``keys [N, D]`` (normalised here; held in float16), ``values [N]`` next-token ids in
    ``[0, vocab_size)``; ``meta`` is free JSON (the builder records split, tokens and model)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, vocab_size: int,
                 meta: dict[str, Any] | None = None):
        if not isinstance(keys, torch.Tensor) or keys.dim() != 2 or not keys.is_floating_point():
            raise TypeError(f"keys must be a [N, D] float tensor, got "
                            f"{tuple(keys.shape) if isinstance(keys, torch.Tensor) else type(keys).__name__}")
        if not isinstance(values, torch.Tensor) or values.dim() != 1 or values.is_floating_point():
            raise TypeError("values must be a [N] integer tensor of next-token ids")
        if keys.shape[0] != values.shape[0] or keys.shape[0] == 0:
            raise ValueError(f"keys and values must hold the same number (>= 1) of entries, got "
                             f"{keys.shape[0]} keys and {values.shape[0]} values")
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
            raise ValueError(f"vocab_size must be a positive int, got {vocab_size!r}")
        if not bool(torch.isfinite(keys).all()):
            raise ValueError("datastore keys hold NaN or infinity")
        norms = keys.float().norm(dim=-1)
        if bool((norms < 1e-6).any()):
            raise ValueError(f"datastore keys must be nonzero vectors; {int((norms < 1e-6).sum())} are zero")
        if int(values.min()) < 0 or int(values.max()) >= vocab_size:
            raise ValueError(f"datastore values must be token ids in [0, {vocab_size}), got "
                             f"[{int(values.min())}, {int(values.max())}]")
        if keys.dtype == torch.float16 and bool(((norms - 1).abs() < 4e-3).all()):
            self.keys = keys.contiguous()  # already unit in float16 (a saved store): kept bit for bit
        else:
            self.keys = F.normalize(keys.float(), dim=-1).half()
        self.values = values.to(torch.int32)
        self.vocab_size = vocab_size
        self.meta = dict(meta or {})
        counts = torch.bincount(self.values.long(), minlength=vocab_size).float()
        self.value_freq = counts / counts.sum()  # the chance of a random entry holding token w
        self._faiss = None

    @property
    def size(self) -> int:
        return self.keys.shape[0]

    @property
    def dim(self) -> int:
        return self.keys.shape[1]

    def __repr__(self) -> str:
        return f"Datastore(size={self.size}, dim={self.dim}, vocab_size={self.vocab_size})"

    # ---- search -------------------------------------------------------------------------------------
    def search(self, queries: torch.Tensor, k: int, search: str = "exact",
               block: int = 16384) -> tuple[torch.Tensor, torch.Tensor]:
        """``queries [n, D]`` (unit vectors) -> ``(cosines [n, k'], token ids [n, k'])``, best first,
        ``k' = min(k, size)``. ``'exact'`` scans the keys in blocks of ``block``; ``'faiss'`` asks an
        inverted-file index (built on first use; see :meth:`build_faiss`)."""
        scores, idx = self.search_entries(queries, k, search, block)
        return scores, self.values[idx.cpu()].long().to(scores.device)  # index first: no copy of the store

    def search_entries(self, queries: torch.Tensor, k: int, search: str = "exact",
                       block: int = 16384) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`search` returning entry indices ``[n, k']`` instead of their tokens (an entry
        missing from an approximate search is index 0 with cosine ``-inf``)."""
        if search not in SEARCHES:
            raise ValueError(f"search must be one of {SEARCHES}, got {search!r}")
        if queries.dim() != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries must be [n, {self.dim}], got {tuple(queries.shape)}")
        k = min(int(k), self.size)
        # float32 scores (float64 for a float64 model, so its stream == steps holds to round-off)
        dt = torch.float64 if queries.dtype == torch.float64 else torch.float32
        q = queries.detach().cpu().to(dt)
        if search == "faiss":
            if self._faiss is None:
                self.build_faiss()
            scores, idx = self._faiss.search(q.float().contiguous().numpy(), k)
            idx = torch.from_numpy(idx).long()
            scores = torch.from_numpy(scores)
            missing = idx < 0  # fewer than k entries in the probed lists
            idx = idx.clamp_min(0)
            scores = scores.masked_fill(missing, float("-inf"))
        else:
            best_s = q.new_full((q.shape[0], 0), float("-inf"))
            best_i = torch.zeros(q.shape[0], 0, dtype=torch.long)
            for start in range(0, self.size, block):
                s = q @ self.keys[start : start + block].to(dt).T
                top, i = s.topk(min(k, s.shape[1]), dim=-1)
                best_s, j = torch.cat([best_s, top], 1).topk(min(k, best_s.shape[1] + top.shape[1]), dim=-1)
                best_i = torch.cat([best_i, i + start], 1).gather(1, j)
            scores, idx = best_s, best_i
        return scores.to(queries.device), idx.to(queries.device)

    def build_faiss(self, nlist: int | None = None, nprobe: int = 32) -> None:
        """An inverted-file index (``faiss.IndexIVFFlat``, inner product) over the keys: ``nlist``
        lists (default ``sqrt(N)``), ``nprobe`` of them searched per query. Needs faiss-cpu."""
        try:
            import faiss
        except ImportError as err:
            raise ImportError("search='faiss' needs the faiss-cpu package: pip install 'mnnn[bench]' "
                              "(or search='exact')") from err
        x = self.keys.float().numpy()
        nlist = nlist or max(1, min(int(math.sqrt(self.size)), self.size // 39))
        quantizer = faiss.IndexFlatIP(self.dim)
        index = faiss.IndexIVFFlat(quantizer, self.dim, nlist, faiss.METRIC_INNER_PRODUCT)
        gen = torch.Generator().manual_seed(0)
        sample = x[torch.randperm(self.size, generator=gen)[: min(self.size, 64 * nlist)].numpy()]
        index.train(sample)
        index.add(x)
        index.nprobe = min(nprobe, nlist)
        self._faiss = index

    # ---- files --------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """One safetensors file (keys float16, values int32) with JSON metadata, written atomically."""
        meta = {**self.meta, "format": FORMAT, "vocab_size": self.vocab_size, "dim": self.dim, "size": self.size}
        return save_tensors(path, {"keys": self.keys, "values": self.values}, meta)

    @classmethod
    def load(cls, path: str | Path) -> "Datastore":
        tensors, meta = load_tensors(path)
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path} is not an mnnn datastore (format {meta.get('format')!r}, expected {FORMAT!r})")
        if set(tensors) != {"keys", "values"}:
            raise ValueError(f"{path}: a datastore holds 'keys' and 'values', got {sorted(tensors)}")
        keys, values = tensors["keys"], tensors["values"]
        if keys.dim() != 2 or keys.shape[1] != meta.get("dim") or keys.shape[0] != meta.get("size"):
            raise ValueError(f"{path}: keys {tuple(keys.shape)} do not match the recorded size {meta.get('size')} "
                             f"and dim {meta.get('dim')}")
        return cls(keys, values, int(meta["vocab_size"]), meta)


@torch.no_grad()
def build_datastore(model: torch.nn.Module, ids, batch_size: int = 16, seq_len: int = 128,
                    progress: bool = False, meta: dict[str, Any] | None = None) -> Datastore:
    """Run ``model`` (one with an output memory) over the token sequence ``ids`` as ``batch_size``
    streams, the state carried across segments like an evaluation, and keep ``(q_i, x_{i+1})`` for
    every predicted position. ``meta`` is recorded with the model's fingerprint and vocabulary."""
    from mnnn.training.lm import _fresh_streams, batchify

    if not getattr(model, "has_output_memory", False):
        raise ValueError("a datastore is read by the output memory; this model has none (S3CMN with "
                         "memory_fusion 'output' or 'both', or a baseline with memory.enabled=true)")
    model.eval()
    data = batchify(ids, batch_size)
    device = next(model.parameters()).device
    data = data.to(device)
    state = _fresh_streams(model, batch_size)
    keys, values = [], []
    starts = range(0, data.shape[1] - 1, seq_len)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(starts), desc="index", unit="segment")
    for start in starts:
        y = data[:, start + 1 : start + 1 + seq_len]
        x = data[:, start : start + y.shape[1]]
        feats, state = model.features(x, state)
        keys.append(F.normalize(feats.float(), dim=-1).reshape(-1, feats.shape[-1]).half().cpu())
        values.append(y.reshape(-1).cpu())
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    vocab = model.embed.weight.shape[0]
    info = {**(meta or {}), "model": type(model).__name__, "fingerprint": model_fingerprint(model),
            "tokens": int(data.numel())}
    return Datastore(torch.cat(keys), torch.cat(values), vocab, info)


def check_compatible(model: torch.nn.Module, store: Datastore, split: str | None = None) -> None:
    """The refusals of :func:`attach`: another vocabulary, another feature size, other weights, or
    evaluating on the split the store was built from."""
    if not getattr(model, "has_output_memory", False):
        raise ValueError("a datastore is read by the output memory; this model has none")
    vocab, dim = model.embed.weight.shape[0], model.output_memory.dim
    if store.vocab_size != vocab:
        raise ValueError(f"the datastore was built for a vocabulary of {store.vocab_size} tokens; "
                         f"this model has {vocab}")
    if store.dim != dim:
        raise ValueError(f"the datastore's keys have {store.dim} features; this model's memory queries have {dim}")
    recorded = store.meta.get("fingerprint")
    if recorded is not None and recorded != model_fingerprint(model):
        raise ValueError(f"the datastore was built by other weights (fingerprint {recorded}, this model "
                         f"{model_fingerprint(model)}): rebuild it with mnnn index for this checkpoint")
    if split is not None and store.meta.get("split") == split:
        raise ValueError(f"the datastore was built from the {split} split: evaluating on it would let every "
                         "position read its own continuation; index another split (the training split is the default)")
