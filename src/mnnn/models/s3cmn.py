"""S3CMN language model (seeds/000, seeds/001): Hyena frontend, S4D blocks, spiking neurons whose
membrane input fuses an episodic kNN-LM style memory, tied LM head.

    tokens -> Embedding(E) -> x += Hyena(LN x) -> Linear(E -> H)
           -> num_layers x [ x += W_o GELU(S4D(LN x))
                             q = LN x;  r = sum_k w_k Emb(next-token id of entry k)   (Memory.search(q))
                             s = LIF(W_s q + W_m r);  x += W_p s ]
           -> LN -> Linear(H -> E) -> logits = . Emb^T

Memory (one per block) stores (q_t, token_{t+1}) pairs. Entries are buffered in the recurrent
state and written to the store only when the absolute position reaches a multiple of
``memory_interval``; a position therefore reads only entries whose key and value both come
from strictly earlier positions (causal), every read sees the same store however the sequence
is cut (whole == chunks == steps), and each batch row reads only its own stream (``group``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mnnn.layers.hyena import Hyena, HyenaState
from mnnn.layers.spiking import SpikingLayer, SpikingState
from mnnn.layers.ssm import S4D
from mnnn.memory.episodic import Memory
from mnnn.memory.output_cache import CacheState, OutputMemory
from mnnn.models.token_lm import TokenLM
from mnnn.state import TensorState
from mnnn.validation import check_bool, check_int, check_real


@dataclasses.dataclass
class S3CMNConfig:
    vocab_size: int = 30522
    embedding_dim: int = 256
    hidden_dim: int = 512
    num_layers: int = 1
    memory_size: int = 1024
    d_state: int = 64
    max_len: int = 1024  # Hyena filter support
    use_memory: bool = True
    memory_top_k: int = 8
    memory_interval: int = 64
    memory_compressed_dim: int = 64
    memory_quantize: bool = True
    memory_similarity_threshold: float = 0.9  # membrane fusion: a read is a hit when its best cosine reaches this
    memory_fusion: str = "output"  # 'output' (mixture at the output), 'membrane' (the seed's), or 'both'
    memory_theta: float = 10.0  # output memory: initial inverse temperature of the cosine scores
    memory_lambda: float = 0.05  # output memory: initial mixture weight
    beta: float = 0.95
    threshold: float = 1.0
    spike_grad: str = "fast_sigmoid"

    def __post_init__(self) -> None:
        for name in ("vocab_size", "embedding_dim", "hidden_dim", "num_layers", "memory_size", "d_state",
                     "max_len", "memory_top_k", "memory_interval", "memory_compressed_dim"):
            check_int(name, getattr(self, name))
        if self.memory_fusion not in ("output", "membrane", "both"):
            raise ValueError(f"memory_fusion must be 'output', 'membrane' or 'both', got {self.memory_fusion!r}")
        check_bool("use_memory", self.use_memory)
        check_bool("memory_quantize", self.memory_quantize)
        check_real("memory_similarity_threshold", self.memory_similarity_threshold, -1.0, 1.0)
        check_real("memory_theta", self.memory_theta, 0.0, open_low=True)
        check_real("memory_lambda", self.memory_lambda, 0.0, 1.0, open_low=True, open_high=True)
        check_real("beta", self.beta, 0.0, 1.0)
        check_real("threshold", self.threshold, 0.0, open_low=True)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "S3CMNConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown S3CMN config keys {unknown}; known keys: {sorted(known)}")
        return cls(**values)


@dataclasses.dataclass
class S3CMNState(TensorState):
    pos: torch.Tensor  # [] absolute position of the next token
    hyena: HyenaState
    ssm: torch.Tensor  # [L, B, H, N] complex
    membrane: torch.Tensor  # [L, B, H]
    pending_keys: torch.Tensor  # [L, B, S, H] completed entries not yet written
    pending_values: torch.Tensor  # [B, S] their next-token ids
    pending_count: torch.Tensor  # []
    last_keys: torch.Tensor  # [L, B, H] key of the previous position, waiting for its next token
    has_last: torch.Tensor  # [] 1 once a previous position exists
    cache: CacheState  # the output memory's per-stream ring buffer (zero slots without one)


class S3CMNBlock(nn.Module):
    def __init__(self, cfg: S3CMNConfig):
        super().__init__()
        H, E = cfg.hidden_dim, cfg.embedding_dim
        self.ln_ssm = nn.LayerNorm(H)
        self.ssm = S4D(H, cfg.d_state)
        self.ssm_out = nn.Linear(H, H)
        self.ln_spk = nn.LayerNorm(H)
        # non-finite values are the trainer's to catch (it skips the step and keeps the last good state)
        self.spiking = SpikingLayer(H, H, beta=cfg.beta, threshold=cfg.threshold, spike_grad=cfg.spike_grad,
                                    check_finite=False)
        self.spk_out = nn.Linear(H, H)
        self.memory = None
        if cfg.use_memory and cfg.memory_fusion in ("membrane", "both"):
            self.memory = Memory(cfg.memory_size, H, compressed_dim=min(cfg.memory_compressed_dim, H),
                                 max_size=cfg.memory_size, quantize=cfg.memory_quantize, value_dim=1,
                                 similarity_threshold=cfg.memory_similarity_threshold)
            self.mem_in = nn.Linear(E, H, bias=False)
            nn.init.zeros_(self.mem_in.weight)  # an untrained read changes nothing
        self.top_k = cfg.memory_top_k


class S3CMN(TokenLM):
    """The S3CMN language model. ``forward(tokens [B, T], state) -> (logits [B, T, V], state)``;
    see the module docstring. Signature of the seed: ``S3CMN(vocab_size=30522, embedding_dim=256,
    hidden_dim=512, num_layers=1, memory_size=1024, device=...)``; the other knobs live in
    :class:`S3CMNConfig` and may be passed as keywords."""

    def __init__(self, vocab_size: int = 30522, embedding_dim: int = 256, hidden_dim: int = 512,
                 num_layers: int = 1, memory_size: int = 1024, device: str = "cpu", **config: Any):
        super().__init__()
        cfg = S3CMNConfig.from_dict(dict(vocab_size=vocab_size, embedding_dim=embedding_dim,
                                         hidden_dim=hidden_dim, num_layers=num_layers, memory_size=memory_size,
                                         **config))
        self.config = cfg
        E, H = cfg.embedding_dim, cfg.hidden_dim
        self.embed = nn.Embedding(cfg.vocab_size, E)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.ln_in = nn.LayerNorm(E)
        self.hyena = Hyena(E, cfg.max_len)
        self.up = nn.Linear(E, H)
        self.blocks = nn.ModuleList(S3CMNBlock(cfg) for _ in range(cfg.num_layers))
        self.ln_out = nn.LayerNorm(H)
        self.down = nn.Linear(H, E)
        self.output_memory = None
        if cfg.use_memory and cfg.memory_fusion in ("output", "both"):
            self.output_memory = OutputMemory(E, cfg.memory_size, cfg.memory_top_k, cfg.memory_theta,
                                              cfg.memory_lambda)
        self.memory_enabled = True
        self.reset_stats()
        self.to(device)

    # ---- state --------------------------------------------------------------------------------------
    def init_state(self, batch_size: int) -> S3CMNState:
        cfg, w = self.config, self.up.weight
        L, H, S = cfg.num_layers, cfg.hidden_dim, cfg.memory_interval
        ssm = torch.stack([b.ssm.init_state(batch_size) for b in self.blocks])
        zero = torch.zeros((), dtype=torch.long, device=w.device)
        return S3CMNState(pos=zero, hyena=self.hyena.init_state(batch_size), ssm=ssm,
                          membrane=w.new_zeros(L, batch_size, H), pending_keys=w.new_zeros(L, batch_size, S, H),
                          pending_values=torch.zeros(batch_size, S, dtype=torch.long, device=w.device),
                          pending_count=zero.clone(), last_keys=w.new_zeros(L, batch_size, H), has_last=zero.clone(),
                          cache=self._init_cache(batch_size))

    def _init_cache(self, batch_size: int) -> CacheState:
        if self.output_memory is not None:
            return self.output_memory.init_state(batch_size)
        w, zero = self.up.weight, torch.zeros((), dtype=torch.long, device=self.up.weight.device)
        E = self.config.embedding_dim
        return CacheState(keys=w.new_zeros(batch_size, 0, E), values=zero.new_zeros(batch_size, 0),
                          count=zero, last_key=w.new_zeros(batch_size, E), has_last=zero.clone())

    def set_memory_enabled(self, enabled: bool) -> None:
        """Switch every memory read and write on or off on this (trained) model: off, the model is
        its own no-memory ablation — same weights, same checkpoint."""
        self.memory_enabled = bool(enabled)
        if self.output_memory is not None:
            self.output_memory.enabled = self.memory_enabled

    @property
    def has_output_memory(self) -> bool:
        return self.output_memory is not None

    def reset_memory(self) -> None:
        """Empty every block's episodic store (e.g. before evaluating a new stream)."""
        for block in self.blocks:
            if block.memory is not None:
                block.memory.clear()

    def reset_stats(self) -> None:
        self._retrieval = [0, 0]
        if getattr(self, "output_memory", None) is not None:
            self.output_memory.reset_stats()
        for block in getattr(self, "blocks", []):
            block.spiking.reset_state()
            if block.memory is not None:
                block.memory.reset_stats()

    # ---- forward ------------------------------------------------------------------------------------
    def features(self, tokens: torch.Tensor, state: S3CMNState | None = None):
        """``forward`` without the output layer: (features ``[B, T, embedding_dim]``, state), so a
        loss scored at a few positions need not build ``T x vocab`` logits."""
        if tokens.dim() != 2 or tokens.dtype not in (torch.long, torch.int32, torch.int64):
            raise ValueError(f"tokens must be a [B, T] integer tensor, got {tuple(tokens.shape)} {tokens.dtype}")
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.config.vocab_size):
            raise ValueError(f"token ids must be in [0, {self.config.vocab_size}), got "
                             f"[{int(tokens.min())}, {int(tokens.max())}]")
        tokens = tokens.long()
        state = self.init_state(tokens.shape[0]) if state is None else state
        S = self.config.memory_interval
        membrane = self.memory_enabled and any(b.memory is not None for b in self.blocks)
        outs, start, T = [], 0, tokens.shape[1]
        while start < T:
            # with the membrane memory, pieces end where the absolute position reaches a multiple of
            # memory_interval (its stores are written there); without it, one piece: Hyena and S4D
            # run over the whole segment at once
            end = min(T, start + S - (int(state.pos) % S)) if membrane else T
            feats, state = self._piece(tokens[:, start:end], state, tokens[:, end] if end < T else None)
            outs.append(feats)
            start = end
        return torch.cat(outs, dim=1), state

    def forward(self, tokens, state: S3CMNState | None = None, targets: torch.Tensor | None = None):
        """tokens ``[B, T]`` (a list or 1-D tensor of ids is one stream, ``[1, T]``) ->
        ``(logits [B, T, V], state)``. With the output memory the "logits" are the mixture's
        log-probabilities (a softmax of them is the mixture). With ``targets [B, T]``:
        ``(nll, nll_no_memory, state)``, each NLL ``[B, T]`` — the training and evaluation path,
        which never builds a second ``T x vocab`` tensor."""
        tokens = _as_batch(tokens)
        feats, state = self.features(tokens, state)
        if self.output_memory is None:
            if targets is None:
                return self.head(feats), state
            nll = self.target_nll(feats, targets)
            return nll, nll, state
        if targets is None:
            out, cache = self.output_memory(feats, tokens, self.head(feats), state.cache)
        else:
            out, cache = self.output_memory(feats, tokens, None, state.cache, targets,
                                            nll_lm=self.target_nll(feats, targets))
        state = dataclasses.replace(state, cache=cache)
        return (out, state) if targets is None else (out[0], out[1], state)

    def step(self, token_t: torch.Tensor, state: S3CMNState):
        logits, state = self(token_t[:, None], state)
        return logits[:, 0], state

    def _piece(self, tokens: torch.Tensor, state: S3CMNState, next_token: torch.Tensor | None):
        B, T = tokens.shape
        x = self.embed(tokens)
        h, hyena_state = self.hyena(self.ln_in(x), state.hyena)
        x = self.up(x + h)
        group = torch.arange(B, device=tokens.device).repeat_interleave(T)
        ssm_states, membranes, keys = [], [], []
        for i, block in enumerate(self.blocks):
            y, h_ssm = block.ssm(block.ln_ssm(x), state.ssm[i])
            x = x + block.ssm_out(F.gelu(y))
            ssm_states.append(h_ssm)
            q = block.ln_spk(x)
            extra = None
            if block.memory is not None and self.memory_enabled:
                extra = self._read(block, q, group, tokens, next_token)
                keys.append(q.detach())
            spikes, sp_state = block.spiking(q, SpikingState(u=state.membrane[i]), extra)
            membranes.append(sp_state.u)
            x = x + block.spk_out(spikes)
        feats = self.down(self.ln_out(x))
        new = S3CMNState(pos=state.pos + T, hyena=hyena_state, ssm=torch.stack(ssm_states),
                         membrane=torch.stack(membranes), pending_keys=state.pending_keys,
                         pending_values=state.pending_values, pending_count=state.pending_count,
                         last_keys=state.last_keys, has_last=state.has_last, cache=state.cache)
        if keys:
            new = self._buffer_entries(new, torch.stack(keys), tokens)
        return feats, new

    def _read(self, block: S3CMNBlock, q: torch.Tensor, group, tokens, next_token) -> torch.Tensor:
        B, T, H = q.shape
        read = block.memory.search(q.reshape(B * T, H), block.top_k, group=group)
        ids = read.entry_values[..., 0].long()  # [B*T, k]
        mix = torch.einsum("nk,nke->ne", read.weights, self.embed(ids)) if ids.numel() else \
            q.new_zeros(B * T, self.config.embedding_dim)
        with torch.no_grad():  # retrieval accuracy: the best entry's next token vs the true next token
            if ids.numel():
                truth = torch.cat([tokens[:, 1:], next_token[:, None] if next_token is not None
                                   else torch.full_like(tokens[:, :1], -1)], dim=1).reshape(-1)
                best = ids.gather(1, read.weights.argmax(1, keepdim=True))[:, 0]
                found = (read.weights.sum(1) > 0) & (truth >= 0)
                self._retrieval[0] += int(((best == truth) & found).sum())
                self._retrieval[1] += int(found.sum())
        return block.mem_in(mix).view(B, T, H)

    @torch.no_grad()
    def _buffer_entries(self, state: S3CMNState, keys: torch.Tensor, tokens: torch.Tensor) -> S3CMNState:
        """keys ``[L, B, T, H]`` of this piece's positions. Entry of position t = (key_t, token_{t+1}):
        complete for the previous piece's last position and positions < T-1 here; flushed to the
        stores when the absolute position reaches a multiple of memory_interval."""
        L, B, T, H = keys.shape
        S = self.config.memory_interval
        if int(state.has_last):
            new_keys = torch.cat([state.last_keys[:, :, None], keys[:, :, :-1]], dim=2)
            new_vals = tokens
        else:
            new_keys, new_vals = keys[:, :, :-1], tokens[:, 1:]
        c, n = int(state.pending_count), new_keys.shape[2]
        pk, pv = state.pending_keys.clone(), state.pending_values.clone()
        pk[:, :, c:c + n], pv[:, c:c + n] = new_keys, new_vals
        c += n
        if int(state.pos) % S == 0:
            group = torch.arange(B, device=keys.device).repeat_interleave(c)
            for i, block in enumerate(self.blocks):
                block.memory.add_to_memory(pk[i, :, :c].reshape(B * c, H), pv[:, :c].reshape(-1), group=group)
            c = 0
        state.pending_keys, state.pending_values = pk, pv
        state.pending_count = torch.tensor(c, device=keys.device)
        state.last_keys, state.has_last = keys[:, :, -1], torch.ones((), dtype=torch.long, device=keys.device)
        return state

    # ---- statistics -----------------------------------------------------------------------------
    def get_stats(self) -> dict[str, Any]:
        """Memory and spike statistics since :meth:`reset_stats` (which every evaluation calls).

        With the output memory: ``memory_hit_rate`` = reads whose top-k holds the true next token
        (recall@k), ``retrieval_accuracy`` = the best entry's token is the true next token, each
        with its ``*_chance`` level (k, or one, entries drawn at random from the same store);
        ``memory_gain_nats``, ``mean_lambda``, ``theta``, ``top_k`` (see
        :meth:`mnnn.memory.output_cache.OutputMemory.get_stats`). With the membrane fusion only:
        the stores' cosine-threshold hit rate and the best entry's accuracy, as before."""
        out: dict[str, Any] = {"retrieval_accuracy": self._retrieval[0] / self._retrieval[1]
                               if self._retrieval[1] else 0.0, "blocks": []}
        for block in self.blocks:
            entry = {"spikes": block.spiking.get_stats()}
            if block.memory is not None:
                entry["memory"] = block.memory.get_memory_stats()
            out["blocks"].append(entry)
        mem = [b["memory"] for b in out["blocks"] if "memory" in b]
        out["memory_hit_rate"] = sum(m["hit_rate"] for m in mem) / len(mem) if mem else 0.0
        out["spike_rate"] = sum(b["spikes"]["spike_rate"] for b in out["blocks"]) / len(out["blocks"])
        if self.output_memory is not None:
            om = self.output_memory.get_stats()
            out["output_memory"] = om
            out.update(memory_hit_rate=om["hit_rate"], memory_hit_rate_chance=om["hit_rate_chance"],
                       retrieval_accuracy=om["retrieval_accuracy"],
                       retrieval_accuracy_chance=om["retrieval_accuracy_chance"],
                       memory_gain_nats=om["memory_gain_nats"], mean_lambda=om["mean_lambda"])
        return out

    # ---- persistence ------------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Weights (memory stores included) as safetensors with the config in the header."""
        from mnnn.serialization import save_tensors

        save_tensors(path, dict(self.state_dict()), {"class": "S3CMN", "config": dataclasses.asdict(self.config)})

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu") -> "S3CMN":
        from mnnn.serialization import load_tensors

        tensors, meta = load_tensors(path)
        if meta.get("class") != "S3CMN":
            raise ValueError(f"{path} holds a {meta.get('class')!r}, not an S3CMN checkpoint")
        model = cls(device=device, **meta["config"])
        model.load_state_dict(tensors)
        return model


def _as_batch(tokens) -> torch.Tensor:
    """A ``[B, T]`` tensor of ids; a list, NumPy array or 1-D tensor is one stream."""
    if not isinstance(tokens, torch.Tensor):
        import numpy as np

        arr = np.asarray(tokens)
        if arr.dtype.kind not in "iu":
            raise TypeError(f"tokens must be integer token ids, got {arr.dtype}")
        tokens = torch.as_tensor(arr)
    if tokens.dim() == 1:
        tokens = tokens[None]
    return tokens
