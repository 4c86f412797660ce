"""Contextual Memory Reweaving (seeds/004) around any Hugging Face causal LM.

Forward hooks on chosen transformer blocks capture their hidden states (whole tensors, no
per-token Python); a relevance scorer decides which states are stored in a per-layer
:class:`~mnnn.memory.layered.LayeredMemoryBuffer`; before each segment a retrieval strategy picks
memories of *earlier* segments for every stream, and the hooks reweave them into the block
outputs through cross-attention with a zero-initialised gate. Consequences:

* an untrained CMR (or ``use_memory=False``) returns exactly the base model's logits;
* causal by construction: memories come only from earlier segments, the retrieval query is the
  previous segment's mean state, and reweaving is position-wise;
* only the CMR parameters train; the base model is frozen.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mnnn.layers.reweave import ReweaveLayer
from mnnn.memory.layered import EVICTION, LayeredMemoryBuffer
from mnnn.memory.retrieval import STRATEGIES, ContextualScorer, Retriever

SCORING = ("attention_based", "variance_based", "hybrid")
RECONSTRUCTION = ("cross_attention",)


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
    retrieval_budget: int = 32
    reconstruction_method: str = "cross_attention"
    reweave_heads: int = 4

    def __post_init__(self) -> None:
        if self.scoring_method not in SCORING:
            raise ValueError(f"scoring_method must be one of {SCORING}, got {self.scoring_method!r}")
        if self.eviction_strategy not in EVICTION:
            raise ValueError(f"eviction_strategy must be one of {EVICTION}, got {self.eviction_strategy!r}")
        if self.retrieval_strategy not in STRATEGIES:
            raise ValueError(f"retrieval_strategy must be one of {STRATEGIES}, got {self.retrieval_strategy!r}")
        if self.reconstruction_method not in RECONSTRUCTION:
            raise ValueError(f"reconstruction_method must be one of {RECONSTRUCTION}, got {self.reconstruction_method!r}")
        if self.retrieval_budget < 1:
            raise ValueError(f"retrieval_budget must be >= 1, got {self.retrieval_budget!r}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "CMRConfig":
        values = dict(values)
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
    """``CMRModel(base_model, cmr_config)`` or ``CMRModel.from_pretrained(name_or_path, cmr_config)``."""

    def __init__(self, base_model: nn.Module, cmr_config: CMRConfig | dict | None = None):
        super().__init__()
        cfg = cmr_config if isinstance(cmr_config, CMRConfig) else CMRConfig.from_dict(cmr_config or {})
        self.base, self.config = base_model, cfg
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.blocks = find_blocks(base_model)
        n = len(self.blocks)
        layers = cfg.target_layers if cfg.target_layers is not None else sorted({n // 2, n - 1})
        bad = [layer for layer in layers if not isinstance(layer, int) or not 0 <= layer < n]
        if bad or not layers:
            raise ValueError(f"target_layers {list(layers)} out of range: the model has {n} blocks (0..{n - 1})")
        self.target_layers = list(layers)
        dim = base_model.config.hidden_size
        self.reweavers = nn.ModuleDict({str(layer): ReweaveLayer(dim, cfg.reweave_heads) for layer in self.target_layers})
        self.scorer = ContextualScorer(dim, cfg.context_heads) if cfg.retrieval_strategy == "contextual" else None
        self.buffer = LayeredMemoryBuffer(self.target_layers, dim, cfg.max_entries_per_layer, cfg.max_total_entries,
                                          cfg.eviction_strategy)
        self.retriever = Retriever(cfg.retrieval_strategy, cfg.similarity_threshold, cfg.retrieval_budget,
                                   cfg.cache_size, cfg.max_clusters, cfg.criteria_weights, self.scorer)
        self._handles = [self.blocks[layer].register_forward_hook(self._hook(layer)) for layer in self.target_layers]
        self._retrieved: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = {}
        self._captured: dict[int, torch.Tensor] = {}
        self._capture = False
        self.reset_memory()

    @classmethod
    def from_pretrained(cls, name_or_path: str, cmr_config: CMRConfig | dict | None = None, **kwargs) -> "CMRModel":
        from transformers import AutoModelForCausalLM

        return cls(AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs), cmr_config)

    def reset_memory(self) -> None:
        """Forget every stored state (a new set of streams)."""
        self.buffer.clear()
        self.segment = 0
        self._summary: dict[int, torch.Tensor] = {}
        self.stats = {"segments": 0, "retrieved": 0, "reads_with_memory": 0, "reads": 0, "retrieval_s": 0.0}

    # ---- hooks -------------------------------------------------------------------------------------
    def _hook(self, layer: int):
        def hook(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            if self._capture:
                self._captured[layer] = hidden.detach()
            if layer in self._retrieved:
                memory, mask, weights = self._retrieved[layer]
                hidden = self.reweavers[str(layer)](hidden, memory, mask, weights)
                return (hidden, *output[1:]) if isinstance(output, tuple) else hidden
            return output

        return hook

    def _retrieve(self, batch: int, device) -> None:
        """Pick memories of earlier segments for every target layer and stream."""
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
            states = self.buffer.data[layer]["states"]
            memory = states.new_zeros(batch, K, states.shape[1])
            mask = torch.zeros(batch, K, dtype=torch.bool, device=states.device)
            for b, p in enumerate(picks):
                memory[b, : p.numel()] = states[p]
                mask[b, : p.numel()] = True
                self.buffer.touch(layer, p, self.segment)
            weights = None
            if self.scorer is not None:  # the scorer weights the values too, so it learns from the loss
                weights = torch.stack([torch.softmax(self.scorer(self._summary[layer][b], memory[b]).masked_fill(
                    ~mask[b], float("-inf")), 0) for b in range(batch)])
                weights = (weights * mask.sum(1, keepdim=True)).to(device)
            self._retrieved[layer] = (memory.to(device), mask.to(device), weights)
            self.stats["retrieved"] += int(mask.sum())
        self.stats["reads"] += 1
        self.stats["reads_with_memory"] += int(bool(self._retrieved))
        self.stats["retrieval_s"] += time.perf_counter() - start

    @torch.no_grad()
    def _store(self, attention_mask: torch.Tensor | None) -> None:
        for layer, h in self._captured.items():
            B, T, d = h.shape
            valid = torch.ones(B, T, dtype=torch.bool, device=h.device) if attention_mask is None else attention_mask.bool()
            self._summary[layer] = (h * valid[..., None]).sum(1) / valid.sum(1, keepdim=True).clamp_min(1)
            score = relevance_scores(h, self.config.scoring_method)
            keep = (score >= self.config.relevance_threshold) & valid
            rows = torch.arange(B, device=h.device)[:, None].expand(B, T)[keep]
            self.buffer.add(layer, h[keep], score[keep], self.segment, rows)
        self._captured = {}

    # ---- forward ---------------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, use_memory: bool = True, return_memory_info: bool = False):
        """One segment of each stream: returns the base model's output (logits, loss when
        ``labels``), with ``memory_info`` when asked. With ``use_memory`` the segment reads memories
        of earlier segments and is then stored for later ones."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        self._retrieved = {}
        if use_memory:
            self._retrieve(input_ids.shape[0], input_ids.device)
        self._capture = use_memory
        try:
            out = self.base(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        finally:
            self._capture = False
            self._retrieved = {}
        if use_memory:
            self._store(attention_mask)
            self.segment += 1
            self.stats["segments"] += 1
        if return_memory_info:
            out["memory_info"] = self.memory_info()
        return out

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, use_memory: bool = True, **kwargs) -> torch.Tensor:
        """``base.generate`` with the memories retrieved for this prompt reweaved at every step
        (nothing is stored while generating)."""
        self._retrieved = {}
        if use_memory:
            self._retrieve(input_ids.shape[0], input_ids.device)
        try:
            return self.base.generate(input_ids=input_ids, **kwargs)
        finally:
            self._retrieved = {}

    def memory_info(self) -> dict[str, Any]:
        s = self.stats
        return {**self.buffer.stats(), "segment": self.segment, "retrieved_entries": s["retrieved"],
                "hit_rate": s["reads_with_memory"] / s["reads"] if s["reads"] else 0.0,
                "retrieval_ms_per_segment": 1000 * s["retrieval_s"] / max(s["reads"], 1),
                "cache_hits": self.retriever.cache_hits, "cache_misses": self.retriever.cache_misses}

    def cmr_parameters(self) -> list[nn.Parameter]:
        """The parameters that train (the base model stays frozen)."""
        return [p for n, p in self.named_parameters() if not n.startswith("base.")]


def train_cmr(model: CMRModel, ids: torch.Tensor, segment_len: int, steps: int, learning_rate: float = 1e-3,
              batch_size: int = 4, progress: bool = False) -> list[float]:
    """Train the CMR parameters only: the token sequence is cut into ``batch_size`` streams read
    in segments of ``segment_len`` in order, with the memory carried between segments (and reset
    when the streams restart)."""
    from mnnn.training.lm import batchify

    data = batchify(ids, batch_size)
    per_pass = (data.shape[1] - 1) // segment_len
    opt = torch.optim.AdamW(model.cmr_parameters(), lr=learning_rate)
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
