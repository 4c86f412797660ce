"""Contextual Memory Reweaving (seeds/004) around any Hugging Face causal LM.

Forward hooks on chosen transformer blocks capture their hidden states (whole tensors, no
per-token Python); a relevance scorer decides which states are stored in a per-layer
:class:`~mnnn.memory.layered.LayeredMemoryBuffer`; the hooks then reweave memories of *earlier*
segments into the block outputs through cross-attention with a zero-initialised gate.

Retrieval is per token by default (``retrieval_mode='token'``): every position's query is its
own hidden state at the capture layer, each position reads its own top ``retrieval_budget``
entries (Memorizing Transformers' kNN memory, here over captured block outputs). The seed's
mode, one query per segment (the previous segment's mean state) shared by all its positions,
is ``retrieval_mode='segment'``. Consequences:

* an untrained CMR (or ``use_memory=False``) returns exactly the base model's logits;
* causal by construction: memories come only from earlier segments, a position's query is its
  own state (tokens up to it), and reweaving is position-wise;
* streams never share entries (every entry carries its stream's row);
* only the CMR parameters train; the base model is frozen.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mnnn.layers.kv_read import KVMemoryRead
from mnnn.layers.output_read import OutputRead
from mnnn.layers.reweave import ReweaveLayer
from mnnn.memory.layered import EVICTION, LayeredMemoryBuffer
from mnnn.memory.retrieval import RECENCY, STRATEGIES, ContextualScorer, Retriever, stream_mean
from mnnn.validation import check_real

SCORING = ("attention_based", "variance_based", "hybrid")
RECONSTRUCTION = ("cross_attention", "kv_attention")
MODES = ("token", "segment")
INDEXING = ("block", "hidden_states")
FUSION = ("reweave", "output", "both")
_REFUSED = {
    "enable_prefetching": "retrieval reads each position's own hidden state, which exists only while "
                          "the segment runs, so there is nothing to compute ahead of it",
    "enable_background_optimization": "mnnn runs no background threads: eviction and cache "
                                      "invalidation happen synchronously on each write so runs stay "
                                      "reproducible",
}


@dataclasses.dataclass
class CMRConfig:
    """The seed's memory and retrieval configuration, flattened."""

    target_layers: list[int] | None = None  # None: the middle and the last block
    max_entries_per_layer: int = 1000
    max_total_entries: int = 5000
    scoring_method: str = "hybrid"
    relevance_threshold: float = 0.5
    eviction_strategy: str = "lru_relevance"
    retrieval_strategy: str = "multi_criteria"
    similarity_threshold: float = 0.7
    context_heads: int = 8
    cache_size: int = 1000
    max_clusters: int = 32
    criteria_weights: dict[str, float] = dataclasses.field(
        default_factory=lambda: {"relevance": 0.4, "similarity": 0.3, "recency": 0.2, "diversity": 0.1})
    # multi_criteria's recency counts segments since an entry was last retrieved ('access'; never
    # retrieved: since its write) or since its write ('write')
    recency_from: str = "access"
    retrieval_budget: int = 32
    # 'cross_attention': a gated cross-attention after the block reads stored block outputs;
    # 'kv_attention': the block's own attention reads stored attention keys/values (KVMemoryRead)
    reconstruction_method: str = "cross_attention"
    reweave_heads: int = 4
    retrieval_mode: str = "token"
    # what an entry gives when read (cross_attention): 'next' the next position's state (the
    # default), 'next_token' the base's input embedding of the token that followed (kNN-LM's
    # value), 'self' the entry's own state. kv_attention reads the entry's own value ('self').
    memory_values: str | None = None
    center_keys: bool = True  # per-token cosine after subtracting the stream's mean entry
    layer_indexing: str = "block"  # 'hidden_states': the seed's numbering, L = output of block L - 1
    enable_adaptive_thresholds: bool = False
    target_keep_fraction: float = 0.5  # adaptive thresholds: the share of positions stored
    enable_batch_optimization: bool = True  # False: one retrieval per stream (same result, slower)
    enable_prefetching: bool = False
    enable_background_optimization: bool = False
    # where a read goes: 'reweave' into the hidden states (above), 'output' into the next-token
    # distribution (OutputRead: the retrieved entries' next tokens, mixed with a learned gate),
    # 'both'. The output read queries one target layer (output_read_layer, numbered as
    # target_layers; None: the last) and needs per-token retrieval. Its cosine is centred as the
    # retrieval's is when center_keys is set.
    memory_fusion: str = "reweave"
    output_theta: float = 10.0
    output_lambda_init: float = 0.05
    output_read_layer: int | None = None

    def __post_init__(self) -> None:
        for key, why in _REFUSED.items():
            if getattr(self, key):
                raise ValueError(f"{key}=True is not supported: {why}; leave it False")
        if self.memory_fusion not in FUSION:
            raise ValueError(f"memory_fusion must be one of {FUSION}, got {self.memory_fusion!r}")
        if self.memory_fusion != "reweave" and (self.retrieval_mode != "token"
                                                or self.reconstruction_method == "kv_attention"):
            raise ValueError(f"memory_fusion={self.memory_fusion!r} reads each position's own block output: it "
                             f"needs retrieval_mode='token' and reconstruction_method='cross_attention', got "
                             f"{self.retrieval_mode!r} and {self.reconstruction_method!r}")
        if self.retrieval_mode not in MODES:
            raise ValueError(f"retrieval_mode must be one of {MODES}, got {self.retrieval_mode!r}")
        if self.memory_values not in (None, "next", "next_token", "self"):
            raise ValueError(f"memory_values must be 'next', 'next_token' or 'self', got {self.memory_values!r}")
        if self.reconstruction_method == "kv_attention":
            if self.retrieval_mode != "token":
                raise ValueError("reconstruction_method='kv_attention' retrieves per token; "
                                 f"retrieval_mode must be 'token', got {self.retrieval_mode!r}")
            if self.memory_values not in (None, "self"):
                raise ValueError("reconstruction_method='kv_attention' reads each entry's own attention value; "
                                 f"memory_values must be left unset or 'self', got {self.memory_values!r}")
            self.memory_values = "self"
        elif self.memory_values is None:
            self.memory_values = "next"
        if self.layer_indexing not in INDEXING:
            raise ValueError(f"layer_indexing must be one of {INDEXING}, got {self.layer_indexing!r}")
        if not 0.0 < self.target_keep_fraction <= 1.0:
            raise ValueError(f"target_keep_fraction must be in (0, 1], got {self.target_keep_fraction!r}")
        if self.scoring_method not in SCORING:
            raise ValueError(f"scoring_method must be one of {SCORING}, got {self.scoring_method!r}")
        if self.eviction_strategy not in EVICTION:
            raise ValueError(f"eviction_strategy must be one of {EVICTION}, got {self.eviction_strategy!r}")
        if self.retrieval_strategy not in STRATEGIES:
            raise ValueError(f"retrieval_strategy must be one of {STRATEGIES}, got {self.retrieval_strategy!r}")
        if self.reconstruction_method not in RECONSTRUCTION:
            raise ValueError(f"reconstruction_method must be one of {RECONSTRUCTION}, got {self.reconstruction_method!r}")
        if self.recency_from not in RECENCY:
            raise ValueError(f"recency_from must be one of {RECENCY}, got {self.recency_from!r}")
        if self.retrieval_budget < 1:
            raise ValueError(f"retrieval_budget must be >= 1, got {self.retrieval_budget!r}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "CMRConfig":
        values = dict(values)
        for nested in ("memory_config", "optimization_config"):  # the seed's three dicts, merged
            values.update(values.pop(nested, None) or {})
        retrieval = values.pop("retrieval_config", None) or {}
        if "strategy" in retrieval:  # the seed's nested retrieval_config
            values.setdefault("retrieval_strategy", retrieval.pop("strategy"))
        values.update(retrieval)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown CMR config keys {unknown}; known: {sorted(known)}")
        return cls(**values)


def find_blocks(model: nn.Module) -> nn.ModuleList:
    """The transformer's block list: the ModuleList whose length is the config's number of layers
    and whose items share one class (GPT-2 ``transformer.h``, Llama ``model.layers``, ...)."""
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    found = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            if len({type(m) for m in module}) == 1 and (n is None or len(module) == n):
                found.append((name, module))
    if not found:
        raise ValueError(f"no transformer block list found in {type(model).__name__}: expected an nn.ModuleList "
                         f"of {n if n is not None else 'N'} identical blocks")
    return max(found, key=lambda item: len(item[1]))[1]


def relevance_scores(h: torch.Tensor, method: str) -> torch.Tensor:
    """Relevance in (0, 1) of every position of ``h [B, T, d]`` (0.5 = typical):

    * variance_based: ``v_t / (v_t + median_t v)`` with ``v_t = Var_d(h_t)``;
    * attention_based: ``a_t T / (a_t T + 1)`` with ``a = softmax_t(h_t . mean_t h / sqrt(d))``, the
      attention each state would receive from the segment summary;
    * hybrid: the mean of the two.
    """
    h = h.float()
    if method in ("variance_based", "hybrid"):
        v = h.var(dim=-1)
        var_score = v / (v + v.median(dim=1, keepdim=True).values.clamp_min(1e-12))
    if method in ("attention_based", "hybrid"):
        a = torch.softmax(h @ h.mean(1, keepdim=True).transpose(1, 2) / h.shape[-1] ** 0.5, dim=1)[..., 0]
        att_score = a * h.shape[1] / (a * h.shape[1] + 1)
    if method == "variance_based":
        return var_score
    if method == "attention_based":
        return att_score
    return 0.5 * (var_score + att_score)


class CMRModel(nn.Module):
    """``CMRModel(base_model, cmr_config)``, ``CMRModel.from_pretrained(name_or_path, cmr_config)``
    or ``CMRModel.from_config(base_config, cmr_config)`` (a freshly initialised base)."""

    _defaults: dict[str, Any] = {}

    def __init__(self, base_model: nn.Module, cmr_config: CMRConfig | dict | None = None):
        super().__init__()
        if isinstance(base_model, str):
            raise TypeError(f"{type(self).__name__} needs a built model; for a name or path use "
                            f"{type(self).__name__}.from_pretrained({base_model!r}, cmr_config)")
        if not isinstance(base_model, nn.Module):
            if hasattr(base_model, "to_dict") and hasattr(base_model, "model_type"):  # a PretrainedConfig
                base_model = _base_from_config(base_model)
            else:
                raise TypeError(f"base_model must be a torch module or a transformers config, "
                                f"got {type(base_model).__name__}")
        if isinstance(cmr_config, CMRConfig):
            cfg = cmr_config
        else:
            cfg = CMRConfig.from_dict({**self._defaults, **(cmr_config or {})})
        self.base, self.config = base_model, cfg
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.blocks = find_blocks(base_model)
        n = len(self.blocks)
        if cfg.target_layers is None:
            layers = sorted({n // 2, n - 1})
        else:
            shift = _block_offset(cfg)
            bad = [layer for layer in cfg.target_layers if not isinstance(layer, int) or not 0 <= layer - shift < n]
            if bad and shift:
                raise ValueError(f"target_layers {list(cfg.target_layers)} out of range: with "
                                 f"layer_indexing='hidden_states' layer L is the output of block L - 1, "
                                 f"so L must be in 1..{n} for this {n}-block model")
            if bad:
                raise ValueError(f"target_layers {list(cfg.target_layers)} out of range: the model has {n} blocks "
                                 f"(0..{n - 1}); for the seed's numbering (hidden_states index 1..{n}, e.g. "
                                 f"[4, 8, 12] on GPT-2) pass layer_indexing='hidden_states'")
            layers = [layer - shift for layer in cfg.target_layers]
        if not layers:
            raise ValueError("target_layers must name at least one block")
        self.target_layers = sorted(set(layers))
        dim = base_model.config.hidden_size
        self.kv = cfg.reconstruction_method == "kv_attention"
        if self.kv:  # entries are the blocks' attention keys (retrieval) and values (read)
            self._taps = {layer: _attention_taps(self.blocks[layer], layer) for layer in self.target_layers}
            heads, head_dim, _ = self._taps[self.target_layers[0]]
            dim = heads * head_dim
            self.reweavers = nn.ModuleDict()
            self.kv_readers = nn.ModuleDict({str(layer): KVMemoryRead(*self._taps[layer][:2])
                                             for layer in self.target_layers})
        else:
            self.reweavers = nn.ModuleDict({str(layer): ReweaveLayer(dim, cfg.reweave_heads)
                                            for layer in self.target_layers})
            self.kv_readers = nn.ModuleDict()
        # KV read: queries and entries are the block's attention queries and keys, so the learned
        # scorer starts as their mean attention logit (identity maps) instead of random projections
        # (in the planted-recall probe a random start wrecked the joint softmax: 0.14 vs 0.85).
        self.scorer = (ContextualScorer(dim, cfg.context_heads, init="identity" if self.kv else "random")
                       if cfg.retrieval_strategy == "contextual" else None)
        self.buffer = LayeredMemoryBuffer(self.target_layers, dim, cfg.max_entries_per_layer, cfg.max_total_entries,
                                          cfg.eviction_strategy)
        self.retriever = Retriever(cfg.retrieval_strategy, cfg.similarity_threshold, cfg.retrieval_budget,
                                   cfg.cache_size, cfg.max_clusters, cfg.criteria_weights, self.scorer,
                                   center=cfg.center_keys, recency_from=cfg.recency_from)
        self.relevance_threshold = cfg.relevance_threshold
        self.read_layer = self._read_layer(cfg)
        # the layers whose states are stored: with the output read alone, only the one it queries
        self._stored_layers = {self.read_layer} if cfg.memory_fusion == "output" else set(self.target_layers)
        self._stats_layer = min(self._stored_layers)  # the layer whose store counts the statistics
        self.output_read = (OutputRead(dim, cfg.output_theta, cfg.output_lambda_init)
                            if cfg.memory_fusion != "reweave" else None)
        self._picks: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]] = {}
        self._read_keys: tuple[torch.Tensor, torch.Tensor | None] | None = None  # the output read's, per call
        if self.kv:
            self._handles = [h for layer in self.target_layers for h in (
                self.blocks[layer].attn.c_attn.register_forward_hook(self._qkv_hook(layer)),
                self.blocks[layer].attn.c_proj.register_forward_pre_hook(self._read_hook(layer)))]
        else:
            self._handles = [self.blocks[layer].register_forward_hook(self._hook(layer))
                             for layer in self.target_layers]
        self._qkv: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._attention_mask: torch.Tensor | None = None
        self._retrieved: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = {}
        self._views: dict[int, dict[str, torch.Tensor]] = {}
        self._targets: torch.Tensor | None = None
        self._captured: dict[int, torch.Tensor] = {}
        self._capture = False
        self.last_retrieval: dict[int, dict[str, torch.Tensor]] = {}
        self.reset_memory()

    def _read_layer(self, cfg: CMRConfig) -> int:
        """The block the output read queries: ``output_read_layer`` in the numbering of
        ``target_layers`` (``layer_indexing``), which must name one of them; None: the last."""
        if cfg.output_read_layer is None:
            return self.target_layers[-1]
        layer = cfg.output_read_layer - _block_offset(cfg)
        if layer not in self.target_layers:
            raise ValueError(f"output_read_layer must be one of target_layers (numbered as layer_indexing="
                             f"{cfg.layer_indexing!r}), got {cfg.output_read_layer!r}")
        return layer

    def train(self, mode: bool = True) -> "CMRModel":
        """Train mode for CMR's own modules; the frozen base stays in eval mode (its dropout off),
        so the base a CMR trains against is the base it is evaluated with."""
        super().train(mode)
        self.base.eval()
        return self

    @classmethod
    def from_pretrained(cls, name_or_path: str, cmr_config: CMRConfig | dict | None = None, **kwargs) -> "CMRModel":
        from transformers import AutoModelForCausalLM

        return cls(AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs), cmr_config)

    @classmethod
    def from_config(cls, base_config, cmr_config: CMRConfig | dict | None = None) -> "CMRModel":
        """Build the base from a ``transformers`` config (``AutoModelForCausalLM.from_config``:
        freshly initialised weights, nothing downloaded) and wrap it."""
        return cls(_base_from_config(base_config), cmr_config)

    def reset_memory(self) -> None:
        """Forget every stored state (a new set of streams) and zero the statistics."""
        self.buffer.clear()
        self.segment = 0
        self._summary: dict[int, torch.Tensor] = {}
        self.reset_stats()

    def remove_hooks(self) -> None:
        """Detach this CMR from its base model: its forward hooks are removed, so the base runs bare
        again (and can be wrapped by another CMR, as the benchmarks do with one frozen base). This
        CMR reads no memory afterwards; calling it twice is harmless."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def set_multi_criteria(self, criteria_weights: dict[str, float] | None = None,
                           recency_from: str | None = None) -> None:
        """Switch the multi-criteria weights and/or recency clock of this (trained) model, e.g. one
        criterion off for an ablation on the same checkpoint (None keeps the current setting);
        ``config`` follows. Same checks as the config."""
        self.retriever.set_multi_criteria(criteria_weights, recency_from)
        if criteria_weights is not None:
            self.config.criteria_weights = dict(criteria_weights)
        if recency_from is not None:
            self.config.recency_from = recency_from

    def reset_stats(self) -> None:
        """Zero the read statistics (the buffer keeps its entries)."""
        self.stats = {"segments": 0, "retrieved": 0, "reads_with_memory": 0, "reads": 0, "retrieval_s": 0.0,
                      "forward_s": 0.0, "positions": 0, "positions_with_memory": 0, "scored": 0, "hits": 0,
                      "hit_chance": 0.0, "stored": 0, "offered": 0, "lambda_sum": 0.0, "lambda_positions": 0}

    # ---- hooks -------------------------------------------------------------------------------------
    def _hook(self, layer: int):
        def hook(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            if self._capture and layer in self._stored_layers:
                self._captured[layer] = hidden.detach()
            if layer in self._views:
                if self.config.memory_fusion == "output":  # pick for the output read; the block is untouched
                    self._pick_tokens(layer, hidden)
                    return output
                hidden = self._reweave_tokens(layer, hidden)
                return (hidden, *output[1:]) if isinstance(output, tuple) else hidden
            if layer in self._retrieved:
                memory, mask, weights, values = self._retrieved[layer]
                hidden = self.reweavers[str(layer)](hidden, memory, mask, weights, values)
                return (hidden, *output[1:]) if isinstance(output, tuple) else hidden
            return output

        return hook

    def _qkv_hook(self, layer: int):
        """kv_attention: keep the block's queries, keys and values (``c_attn``'s output)."""
        def hook(module, args, output):
            q, k, v = output.split(output.shape[-1] // 3, dim=-1)
            self._qkv[layer] = (q, k, v)
            if self._capture:
                self._captured[layer] = (k.detach(), v.detach())
            return None

        return hook

    def _read_hook(self, layer: int):
        """kv_attention: extend the block's merged attention output (``c_proj``'s input) over the
        entries each position retrieves."""
        def hook(module, args):
            qkv = self._qkv.pop(layer, None)
            if layer not in self._views or qkv is None:
                return None
            return (self._read_kv(layer, args[0], *qkv), *args[1:])

        return hook

    def _read_kv(self, layer: int, a: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        reader = self.kv_readers[str(layer)]
        if reader.closed:  # the base, bitwise; nothing is read
            return a
        heads, head_dim, scale = self._taps[layer]
        B, T, _ = a.shape
        start = time.perf_counter()
        view = self._views[layer]
        qh = q.reshape(B, T, heads, head_dim)
        query = reader.memory_query(qh).detach().reshape(B, T, -1)
        idx, valid, bias = self.retriever.retrieve_tokens(view, query, self.segment, layer, self.buffer.version[layer])
        self.stats["retrieval_s"] += time.perf_counter() - start
        with torch.no_grad():
            self._token_stats(layer, view, idx, valid)
        N = view["mask"].shape[1]
        picked = torch.zeros(B, T, N, dtype=torch.bool, device=a.device).scatter(-1, idx.to(a.device), valid.to(a.device))
        score_bias = None
        if self.config.retrieval_strategy == "contextual":  # the learned score joins the logits, so it trains
            score_bias = torch.zeros(B, T, N, dtype=a.dtype, device=a.device).scatter(
                -1, idx.to(a.device), bias.to(a.dtype).masked_fill(~valid.to(a.device), 0.0))
        mem_k = view["states"].to(a.device).reshape(B, N, heads, head_dim)
        mem_v = view["values"].to(a.device).reshape(B, N, heads, head_dim)
        return reader(a, qh, k.reshape(B, T, heads, head_dim), mem_k, mem_v, picked, scale,
                      self._attention_mask, score_bias)

    def _pick_tokens(self, layer: int, hidden: torch.Tensor):
        """Per-token retrieval for one layer (inside the block's forward hook): ``(idx, valid,
        bias)`` as :meth:`Retriever.retrieve_tokens` gives them. The read layer keeps its picks
        and query for the output read."""
        start = time.perf_counter()
        view = self._views[layer]
        version = self.buffer.version[layer]
        if self.config.enable_batch_optimization:
            idx, valid, bias = self.retriever.retrieve_tokens(view, hidden, self.segment, layer, version)
        else:  # one retrieval per stream: the same picks, B calls instead of one
            parts = [self.retriever.retrieve_tokens({k: v[b : b + 1] for k, v in view.items()}, hidden[b : b + 1],
                                                    self.segment, layer, version) for b in range(hidden.shape[0])]
            width = max(p[0].shape[-1] for p in parts)
            idx = torch.cat([F.pad(p[0], (0, width - p[0].shape[-1])) for p in parts])
            valid = torch.cat([F.pad(p[1], (0, width - p[1].shape[-1])) for p in parts])
            bias = None if parts[0][2] is None else torch.cat([F.pad(p[2], (0, width - p[2].shape[-1])) for p in parts])
        self.stats["retrieval_s"] += time.perf_counter() - start
        with torch.no_grad():
            self._token_stats(layer, view, idx, valid)
        if self.output_read is not None and layer == self.read_layer:
            # the contextual scorer's scores join the output read's weights, so it learns there too
            learned = bias if self.config.retrieval_strategy == "contextual" else None
            self._picks[layer] = (idx, valid, hidden.detach(), learned)
        return idx, valid, bias

    def _reweave_tokens(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """Per-token retrieval and reweaving for one layer."""
        view = self._views[layer]
        idx, valid, bias = self._pick_tokens(layer, hidden)
        learned = self.config.retrieval_strategy == "contextual"
        return self.reweavers[str(layer)].forward_tokens(
            hidden, view["states"].to(hidden.device), idx, valid, bias if learned else None,
            view["values"].to(hidden.device), None if learned else bias)

    def _mix_output(self, logits: torch.Tensor, positions: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
        """:class:`OutputRead` over the read layer's picks at ``positions`` (all of them in the
        forward, the last one while generating): ``(the mixture's logits, lambda)``. The entries'
        mapped keys (and the stream's mean entry, when centring as the retrieval does) are made
        once per forward or per ``generate`` call."""
        idx, valid, query, learned = self._picks.pop(self.read_layer)
        view = self._views[self.read_layer]
        dev = logits.device
        if self._read_keys is None:
            states = view["states"].to(dev)
            center = stream_mean(states, view["mask"].to(dev)) if self.config.center_keys else None
            self._read_keys = (self.output_read.keys(states, center), center)
        keys, center = self._read_keys
        return self.output_read(logits, query[:, positions].to(dev), None, view["next_token"].to(dev),
                                idx[:, positions].to(dev), valid[:, positions].to(dev), center, keys=keys,
                                score_bias=None if learned is None else learned[:, positions].to(dev))

    def _read_output(self, out, labels: torch.Tensor | None) -> None:
        """The output read: ``out.logits`` become the mixture's logits (their softmax is the
        mixture; see :class:`OutputRead`) and ``out.loss``, with ``labels``, its shifted
        cross-entropy, as the base computes it."""
        mixed, lam = self._mix_output(out.logits)
        out["logits"] = mixed
        if labels is not None:
            out["loss"] = F.cross_entropy(mixed[:, :-1].reshape(-1, mixed.shape[-1]), labels[:, 1:].reshape(-1),
                                          ignore_index=-100)
        with torch.no_grad():
            self.stats["lambda_sum"] += float(lam.sum())
            self.stats["lambda_positions"] += int((lam > 0).sum())

    @torch.no_grad()
    def _token_stats(self, layer: int, view, idx: torch.Tensor, valid: torch.Tensor) -> None:
        """Counts for :meth:`memory_info` and LRU touches. Hit: the position's retrieved set holds an
        entry whose stored next token is the position's true next token (recall@k, as S3CMN's
        output memory defines it); chance: the same for ``k`` entries drawn at random from the
        stream's store, ``1 - (1 - m / n)^k`` with ``m`` matching of ``n`` entries."""
        B, T, k = idx.shape
        touched = view["index"].to(idx.device).gather(1, idx.reshape(B, -1)).reshape(B, T, k)[valid]
        self.buffer.touch(layer, touched.unique(), self.segment)
        has = valid.any(-1)
        self.stats["positions"] += B * T
        self.stats["positions_with_memory"] += int(has.sum())
        self.stats["retrieved"] += int(valid.sum())
        nxt = view["next_token"].to(idx.device)
        self.last_retrieval[layer] = {"idx": idx, "valid": valid, "segment": view["segment"].to(idx.device).gather(
            1, idx.reshape(B, -1)).reshape(B, T, k), "position": view["position"].to(idx.device).gather(
            1, idx.reshape(B, -1)).reshape(B, T, k), "entries": view["mask"].sum(1).to(idx.device)}
        if self._targets is None:
            return
        target = self._targets.to(idx.device)  # [B, T], -1 where unknown
        known = target >= 0
        picked_next = nxt.gather(1, idx.reshape(B, -1)).reshape(B, T, k)
        hit = ((picked_next == target[..., None]) & valid).any(-1)
        match = (nxt[:, None, :] == target[..., None]) & view["mask"].to(idx.device)[:, None, :]  # [B, T, N]
        n = view["mask"].to(idx.device).sum(1, keepdim=True).clamp_min(1).float()  # [B, 1]
        draws = valid.sum(-1).float()
        chance = 1 - (1 - match.sum(-1).float() / n) ** draws
        self.stats["scored"] += int(known.sum())
        self.stats["hits"] += int((hit & known).sum())
        self.stats["hit_chance"] += float(chance[known].sum())

    def _retrieve(self, batch: int, device) -> None:
        """Per-segment mode: pick memories of earlier segments for every target layer and stream."""
        start = time.perf_counter()
        self._retrieved = {}
        for layer in self.target_layers:
            if self.buffer.size(layer) == 0 or layer not in self._summary:
                continue
            picks = [self.retriever.retrieve(self.buffer, layer, b, self._summary[layer][b], self.segment)
                     for b in range(batch)]
            K = max((p.numel() for p in picks), default=0)
            if K == 0:
                continue
            states, stored_values = self.buffer.data[layer]["states"], self.buffer.data[layer]["values"]
            memory = states.new_zeros(batch, K, states.shape[1])
            values = torch.zeros_like(memory)
            mask = torch.zeros(batch, K, dtype=torch.bool, device=states.device)
            for b, p in enumerate(picks):
                memory[b, : p.numel()] = states[p]
                values[b, : p.numel()] = stored_values[p]
                mask[b, : p.numel()] = True
                self.buffer.touch(layer, p, self.segment)
            weights = None
            if self.scorer is not None:  # the scorer weights the values too, so it learns from the loss
                weights = torch.stack([torch.softmax(self.scorer(self._summary[layer][b], memory[b]).masked_fill(
                    ~mask[b], float("-inf")), 0) for b in range(batch)])
                weights = (weights * mask.sum(1, keepdim=True)).to(device)
            self._retrieved[layer] = (memory.to(device), mask.to(device), weights, values.to(device))
            self.stats["retrieved"] += int(mask.sum())
        self.stats["reads"] += 1
        self.stats["reads_with_memory"] += int(bool(self._retrieved))
        self.stats["retrieval_s"] += time.perf_counter() - start

    @torch.no_grad()
    def _store(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
        next_tokens = _next_tokens(input_ids, attention_mask)  # the same for every layer
        for layer, h in self._captured.items():
            if self.kv:  # (key, value) of every position; the key is what retrieval scores
                h, kv_values = h
            B, T, d = h.shape
            valid = torch.ones(B, T, dtype=torch.bool, device=h.device) if attention_mask is None else attention_mask.bool()
            self._summary[layer] = (h * valid[..., None]).sum(1) / valid.sum(1, keepdim=True).clamp_min(1)
            score = relevance_scores(h, self.config.scoring_method)
            keep = (score >= self.relevance_threshold) & valid
            values = kv_values if self.kv else h
            if self.config.memory_values != "self":  # (state, what came next): the last position waits
                if self.config.memory_values == "next":
                    values = torch.cat([h[:, 1:], torch.zeros_like(h[:, :1])], 1)
                else:
                    values = self.base.get_input_embeddings()(next_tokens.clamp_min(0)).to(h.dtype)
                keep[:, -1] = False
                keep[:, :-1] &= valid[:, 1:]
            rows = torch.arange(B, device=h.device)[:, None].expand(B, T)[keep]
            positions = torch.arange(T, device=h.device)[None].expand(B, T)[keep]
            self.buffer.add(layer, h[keep], score[keep], self.segment, rows, positions,
                            next_tokens[keep], values[keep])
            if layer == self._stats_layer:  # counted once per segment
                self.stats["stored"] += int(keep.sum())
                self.stats["offered"] += int(valid.sum())
                if self.config.enable_adaptive_thresholds and int(valid.sum()):
                    # stochastic approximation: store more when below the target share, fewer above
                    kept = float(keep.sum()) / float(valid.sum())
                    self.relevance_threshold += 0.5 * (kept - self.config.target_keep_fraction)
        self._captured = {}

    # ---- forward ---------------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, use_memory: bool = True, return_memory_info: bool = False,
                output_hidden_states: bool = False, **kwargs):
        """One segment of each stream: the base model's output (``logits``, ``loss`` with
        ``labels``) plus ``last_hidden_state`` (the last block's output after the base's final norm,
        with memory reweaved in), ``hidden_states`` when ``output_hidden_states``, and with
        ``return_memory_info`` the keys ``memory_info``, ``memory_stats``, ``performance_stats``
        and ``retrieval_stats``. With ``use_memory`` the segment reads memories of earlier
        segments and is then stored for later ones."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise ValueError(f"input_ids must be a [batch, seq] tensor, got {shape}")
        if self.kv and kwargs.get("past_key_values") is not None:
            raise ValueError("reconstruction_method='kv_attention' recomputes each segment's local attention "
                             "and cannot extend a past_key_values cache; pass whole segments")
        start = time.perf_counter()
        self._retrieved, self._views = {}, {}
        self._targets = None
        self._attention_mask = attention_mask
        if use_memory:
            if self.config.retrieval_mode == "token":
                self._views = self._token_views(input_ids.shape[0])
                self._targets = _next_tokens(input_ids, attention_mask)
                self.stats["reads"] += 1
                self.stats["reads_with_memory"] += int(bool(self._views))
            else:
                self._retrieve(input_ids.shape[0], input_ids.device)
        self._capture = use_memory
        self._picks, self._read_keys = {}, None
        try:
            out = self.base(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                            output_hidden_states=True, **kwargs)
            if self.read_layer in self._picks:
                self._read_output(out, labels)
        finally:
            self._capture = False
            self._retrieved, self._views, self._targets, self._picks = {}, {}, None, {}
            self._qkv, self._attention_mask, self._read_keys = {}, None, None
        if use_memory:
            self._store(input_ids, attention_mask)
            self.segment += 1
            self.stats["segments"] += 1
        self.stats["forward_s"] += time.perf_counter() - start
        out["last_hidden_state"] = out.hidden_states[-1]
        if not output_hidden_states:
            out["hidden_states"] = None
        if return_memory_info:
            out["memory_info"] = self.memory_info()
            out["memory_stats"] = self.memory_stats()
            out["performance_stats"] = self.performance_stats()
            out["retrieval_stats"] = self.retrieval_stats()
        return out

    def _token_views(self, batch: int) -> dict[int, dict[str, torch.Tensor]]:
        """Per-token mode: the padded store of every layer that reads (only the read layer when
        the memory goes to the output alone), for ``batch`` streams."""
        read = [self.read_layer] if self.config.memory_fusion == "output" else self.target_layers
        return {layer: self.buffer.padded(layer, batch) for layer in read if self.buffer.size(layer)}

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, use_memory: bool = True, **kwargs) -> torch.Tensor:
        """``base.generate`` with memory (nothing is stored while generating). Per-token mode: every
        new position retrieves with its own state; per-segment mode: the memories retrieved for
        the prompt are reweaved at every step."""
        self._retrieved, self._views = {}, {}
        if self.kv and use_memory:
            if kwargs.get("use_cache"):
                raise ValueError("reconstruction_method='kv_attention' generates without the base's KV cache "
                                 "(each step recomputes the local attention it extends); drop use_cache=True")
            if kwargs.get("attention_mask") is not None:
                raise ValueError("reconstruction_method='kv_attention' generates unpadded prompts only; "
                                 "drop attention_mask")
            kwargs["use_cache"] = False
        if use_memory:
            if self.config.retrieval_mode == "token":
                self._views = self._token_views(input_ids.shape[0])
            else:
                self._retrieve(input_ids.shape[0], input_ids.device)
        if self.output_read is not None and self.read_layer in self._views:
            from transformers import LogitsProcessorList

            kwargs["logits_processor"] = LogitsProcessorList([*(kwargs.get("logits_processor") or []),
                                                              _OutputReadProcessor(self)])
        self._picks, self._read_keys = {}, None
        try:
            return self.base.generate(input_ids=input_ids, **kwargs)
        finally:
            self._retrieved, self._views, self._qkv, self._picks, self._read_keys = {}, {}, {}, {}, None

    def memory_stats(self) -> dict[str, Any]:
        s = self.stats
        return {**self.buffer.stats(), "segment": self.segment, "relevance_threshold": self.relevance_threshold,
                "stored_fraction": s["stored"] / s["offered"] if s["offered"] else None}

    def performance_stats(self) -> dict[str, Any]:
        s = self.stats
        return {"segments": s["segments"], "forward_ms_per_segment": 1000 * s["forward_s"] / max(s["segments"], 1),
                "retrieval_ms_per_segment": 1000 * s["retrieval_s"] / max(s["segments"], s["reads"], 1)}

    def retrieval_stats(self) -> dict[str, Any]:
        """``hit_rate`` (per-token mode, positions whose next token is known): the share of
        positions whose retrieved entries include one whose stored next token is the true next
        token, beside ``hit_rate_chance``, the same for as many entries drawn at random from the
        stream's store. ``coverage``: positions that read at least one entry (not a quality
        measure: any non-empty store gives ~1). With the output read (``memory_fusion`` 'output'
        or 'both'): ``output_lambda``, the mean mixture weight over positions that read an entry,
        and ``output_theta``, the cosine scores' inverse temperature."""
        s = self.stats
        return {"mode": self.config.retrieval_mode, "strategy": self.config.retrieval_strategy,
                "budget": self.config.retrieval_budget,
                "hit_rate": s["hits"] / s["scored"] if s["scored"] else None,
                "hit_rate_chance": s["hit_chance"] / s["scored"] if s["scored"] else None,
                "coverage": s["positions_with_memory"] / s["positions"] if s["positions"] else None,
                "retrieved_per_position": s["retrieved"] / s["positions"] if s["positions"] else None,
                "output_lambda": (s["lambda_sum"] / s["lambda_positions"] if s["lambda_positions"] else None),
                "output_theta": self.output_read.theta if self.output_read is not None else None,
                "cache_hits": self.retriever.cache_hits + self.retriever.cluster_hits,
                "cache_misses": self.retriever.cache_misses + self.retriever.cluster_misses}

    def memory_info(self) -> dict[str, Any]:
        s = self.stats
        r = self.retrieval_stats()
        return {**self.buffer.stats(), "segment": self.segment, "retrieved_entries": s["retrieved"],
                "hit_rate": r["hit_rate"], "hit_rate_chance": r["hit_rate_chance"], "coverage": r["coverage"],
                "output_lambda": r["output_lambda"], "output_theta": r["output_theta"],
                "retrieval_ms_per_segment": self.performance_stats()["retrieval_ms_per_segment"],
                "cache_hits": r["cache_hits"], "cache_misses": r["cache_misses"]}

    def cmr_parameters(self) -> list[nn.Parameter]:
        """The parameters that train (the base model stays frozen)."""
        return [p for n, p in self.named_parameters() if not n.startswith("base.")]

    def optimizer_groups(self, learning_rate: float, scorer_learning_rate: float | None = None) -> list[dict]:
        """Optimizer parameter groups over :meth:`cmr_parameters`: one group at ``learning_rate``,
        or, with ``scorer_learning_rate``, the contextual scorer's parameters in a second group at
        that rate. The KV read's scorer starts as the mean attention logit and does best well
        below the rest (``mnnn bench cmr-recall`` trains it at 3e-4, the rest at 3e-2)."""
        check_real("learning_rate", learning_rate, 0.0, open_low=True)
        params = self.cmr_parameters()
        if scorer_learning_rate is None or self.scorer is None:
            return [{"params": params, "lr": learning_rate}]
        check_real("scorer_learning_rate", scorer_learning_rate, 0.0)
        scorer = {id(p) for p in self.scorer.parameters()}
        return [{"params": [p for p in params if id(p) not in scorer], "lr": learning_rate},
                {"params": [p for p in params if id(p) in scorer], "lr": scorer_learning_rate}]


class FullCMRModel(CMRModel):
    """The seed's name: ``FullCMRModel(base_config_or_model, cmr_config)``. Defaults as the seed
    documents them: ``scoring_method='attention_based'`` and the seed's layer numbering
    (``layer_indexing='hidden_states'``: ``target_layers=[4, 8, 12]`` on GPT-2 are the outputs of
    blocks 3, 7 and 11). The seed's untrained 256-wide projection of ``last_hidden_state`` is not
    reproduced: ``last_hidden_state`` is the model's own."""

    _defaults = {"scoring_method": "attention_based", "layer_indexing": "hidden_states"}


class IntegratedCMRModel(CMRModel):
    """The seed's name: as :class:`FullCMRModel` with ``scoring_method='hybrid'``."""

    _defaults = {"scoring_method": "hybrid", "layer_indexing": "hidden_states"}


class _OutputReadProcessor:
    """``generate`` with the output read: the step's last-position logits become the mixture's
    (a ``transformers`` logits processor, applied before any sampling warper)."""

    def __init__(self, model: CMRModel):
        self.model = model

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        mixed, _ = self.model._mix_output(scores[:, None], slice(-1, None))
        return mixed[:, 0]


def _block_offset(cfg: CMRConfig) -> int:
    """What a configured layer number minus this is the block index of: 1 with the seed's
    numbering (``layer_indexing='hidden_states'``, L = the output of block L - 1), else 0."""
    return int(cfg.layer_indexing == "hidden_states")


def _attention_taps(block: nn.Module, layer: int) -> tuple[int, int, float]:
    """``(heads, head_dim, logit scale)`` of a GPT-2-style block (``attn.c_attn`` producing the
    fused q|k|v, ``attn.c_proj`` reading the merged heads), the layout kv_attention hooks into."""
    attn = getattr(block, "attn", None)
    if attn is None or not hasattr(attn, "c_attn") or not hasattr(attn, "c_proj") or \
            getattr(attn, "is_cross_attention", False) or not hasattr(attn, "num_heads"):
        raise ValueError(f"reconstruction_method='kv_attention' needs GPT-2-style attention (block.attn.c_attn / "
                         f"block.attn.c_proj); block {layer} is a {type(block).__name__}. Use "
                         "reconstruction_method='cross_attention' for other models")
    heads, head_dim = int(attn.num_heads), int(attn.head_dim)
    return heads, head_dim, float(getattr(attn, "scaling", head_dim ** -0.5))


def _base_from_config(config) -> nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(config).eval()


def _next_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """``[B, T]``: each position's next token inside the segment, -1 at the last position (its next
    token belongs to the next segment) and where ``attention_mask`` hides either token."""
    nxt = torch.full_like(input_ids, -1)
    nxt[:, :-1] = input_ids[:, 1:]
    if attention_mask is not None:
        m = attention_mask.bool()
        nxt[:, :-1] = nxt[:, :-1].masked_fill(~(m[:, :-1] & m[:, 1:]), -1)
        nxt = nxt.masked_fill(~m, -1)
    return nxt


def train_cmr(model: CMRModel, ids: torch.Tensor, segment_len: int, steps: int, learning_rate: float = 1e-3,
              batch_size: int = 4, progress: bool = False, scorer_learning_rate: float | None = None) -> list[float]:
    """Train the CMR parameters only: the token sequence is cut into ``batch_size`` streams read
    in segments of ``segment_len`` in order, with the memory carried between segments (and reset
    when the streams restart). ``scorer_learning_rate``: the contextual scorer's own rate (see
    :meth:`CMRModel.optimizer_groups`; default: ``learning_rate``)."""
    from mnnn.training.lm import batchify

    data = batchify(ids, batch_size)
    per_pass = (data.shape[1] - 1) // segment_len
    opt = torch.optim.AdamW(model.optimizer_groups(learning_rate, scorer_learning_rate), lr=learning_rate)
    losses = []
    model.train()
    model.reset_memory()
    for step in range(steps):
        i = (step % per_pass) * segment_len
        if i == 0 and step:
            model.reset_memory()
        x = data[:, i : i + segment_len]
        y = data[:, i + 1 : i + 1 + segment_len]
        logits = model(x).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        if loss.requires_grad:  # the first segment of a pass has no memories: nothing to learn from it
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        losses.append(loss.item())
    return losses
