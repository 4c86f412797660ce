"""Baseline language models for comparisons: a causal Transformer and an LSTM, under the same
``forward(tokens, state) -> (logits, state)`` contract and tied embeddings."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from mnnn.models.token_lm import TokenLM
from mnnn.state import TensorState
from mnnn.validation import check_int


@dataclasses.dataclass
class NoState(TensorState):
    """The Transformer carries nothing across segments (its context is the segment)."""


class TransformerLM(TokenLM):
    """Pre-LN causal Transformer (learned positions up to ``max_len``), tied head."""

    def __init__(self, vocab_size: int, d_model: int = 256, num_layers: int = 2, num_heads: int = 4,
                 max_len: int = 512):
        super().__init__()
        for name, value in (("vocab_size", vocab_size), ("d_model", d_model), ("num_layers", num_layers),
                            ("num_heads", num_heads), ("max_len", max_len)):
            check_int(name, value)
        if d_model % num_heads:
            raise ValueError(f"d_model must be divisible by num_heads, got d_model={d_model}, num_heads={num_heads}")
        self.embed = nn.Embedding(vocab_size, d_model)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.pos = nn.Embedding(max_len, d_model)
        nn.init.normal_(self.pos.weight, std=0.02)
        layer = nn.TransformerEncoderLayer(d_model, num_heads, 4 * d_model, dropout=0.0, batch_first=True,
                                           norm_first=True, activation="gelu")
        self.layers = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.ln = nn.LayerNorm(d_model)
        self.max_len = max_len

    def init_state(self, batch_size: int) -> NoState:
        return NoState()

    def features(self, tokens: torch.Tensor, state: NoState | None = None):
        """``forward`` without the output layer: (features ``[B, T, d_model]``, state)."""
        T = tokens.shape[1]
        if T > self.max_len:
            raise ValueError(f"sequence of {T} tokens is longer than max_len={self.max_len}")
        x = self.embed(tokens) + self.pos(torch.arange(T, device=tokens.device))
        mask = torch.triu(torch.full((T, T), float("-inf"), device=tokens.device), diagonal=1)
        x = self.layers(x, mask=mask, is_causal=True)
        return self.ln(x), NoState()

    # ---- KV-cache decoding (the streaming baseline) ---------------------------------------------------
    def init_cache(self, batch_size: int, capacity: int | None = None) -> KVCache:
        """An empty cache with room for ``capacity`` tokens (default ``max_len``), allocated once."""
        capacity = self.max_len if capacity is None else capacity
        if not 0 < capacity <= self.max_len:
            raise ValueError(f"capacity must be in [1, max_len={self.max_len}], got {capacity}")
        d = self.embed.weight.shape[1]
        heads = self.layers.layers[0].self_attn.num_heads
        z = self.embed.weight.new_zeros(len(self.layers.layers), batch_size, heads, capacity, d // heads)
        return KVCache(k=z, v=z.clone(), length=torch.zeros((), dtype=torch.long, device=z.device))

    def step(self, token_t: torch.Tensor, cache: KVCache) -> tuple[torch.Tensor, KVCache]:
        """One token ``[B]`` with a KV cache of the earlier ones: logits ``[B, vocab]`` equal to the
        last position of ``forward`` over the whole prefix. The new key/value is written into the
        preallocated cache in place (no copy of the context per token); with autograd enabled each
        layer's buffer is copied first, so gradients through a decoded sequence stay correct."""
        t, capacity = int(cache.length), cache.k.shape[3]
        if t >= capacity:
            raise ValueError(f"KV cache is full ({capacity} tokens); make it with init_cache(capacity=...)")
        grad = torch.is_grad_enabled()
        ks, vs = [], []
        x = self.embed(token_t) + self.pos.weight[t]
        for i, layer in enumerate(self.layers.layers):
            attn = layer.self_attn
            H = attn.num_heads
            B, d = x.shape
            q, k, v = F.linear(layer.norm1(x), attn.in_proj_weight, attn.in_proj_bias).view(B, 3, H, d // H).unbind(1)
            k_i, v_i = (cache.k[i].clone(), cache.v[i].clone()) if grad else (cache.k[i], cache.v[i])
            k_i[:, :, t], v_i[:, :, t] = k, v
            ks.append(k_i)
            vs.append(v_i)
            o = F.scaled_dot_product_attention(q[:, :, None], k_i[:, :, : t + 1], v_i[:, :, : t + 1])
            x = x + attn.out_proj(o[:, :, 0].reshape(B, d))
            x = x + layer.linear2(layer.activation(layer.linear1(layer.norm2(x))))
        k_all, v_all = (torch.stack(ks), torch.stack(vs)) if grad else (cache.k, cache.v)
        return self.head(self.ln(x)), KVCache(k=k_all, v=v_all, length=cache.length + 1)


@dataclasses.dataclass
class KVCache(TensorState):
    """Keys and values ``[layers, B, heads, capacity, head_dim]``; the first ``length`` positions
    hold the earlier tokens."""

    k: torch.Tensor
    v: torch.Tensor
    length: torch.Tensor


@dataclasses.dataclass
class LSTMState(TensorState):
    h: torch.Tensor
    c: torch.Tensor


class LSTMLM(TokenLM):
    """LSTM language model with input/output projections tied to the embedding."""

    def __init__(self, vocab_size: int, embed_dim: int = 256, hidden_dim: int = 512, num_layers: int = 1):
        super().__init__()
        for name, value in (("vocab_size", vocab_size), ("embed_dim", embed_dim), ("hidden_dim", hidden_dim),
                            ("num_layers", num_layers)):
            check_int(name, value)
        self.embed = nn.Embedding(vocab_size, embed_dim)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.lstm = nn.LSTM(embed_dim, hidden_dim, num_layers, batch_first=True)
        self.down = nn.Linear(hidden_dim, embed_dim)
        self.num_layers, self.hidden_dim = num_layers, hidden_dim

    def init_state(self, batch_size: int) -> LSTMState:
        z = self.down.weight.new_zeros(self.num_layers, batch_size, self.hidden_dim)
        return LSTMState(h=z, c=z.clone())

    def features(self, tokens: torch.Tensor, state: LSTMState | None = None):
        """``forward`` without the output layer: (features ``[B, T, embed_dim]``, state)."""
        state = self.init_state(tokens.shape[0]) if state is None else state
        y, (h, c) = self.lstm(self.embed(tokens), (state.h, state.c))
        return self.down(y), LSTMState(h=h, c=c)

    def step(self, token_t: torch.Tensor, state: LSTMState) -> tuple[torch.Tensor, LSTMState]:
        """One token ``[B]`` -> (logits ``[B, vocab]``, state), the same as ``forward`` on it."""
        logits, state = self(token_t[:, None], state)
        return logits[:, 0], state
