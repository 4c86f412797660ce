"""Any token LM with the output memory (:mod:`mnnn.memory.output_cache`) around it.

The memory is a component, not a property of S3CMN: the Transformer and LSTM baselines take the
same per-stream cache at their output (``--set memory.enabled=true``), so a benchmark can tell
whether an architecture or the memory is what helps.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from mnnn.memory.output_cache import CacheState, OutputMemory
from mnnn.models.token_lm import TokenLM
from mnnn.state import TensorState


@dataclasses.dataclass
class MemoryLMState(TensorState):
    base: TensorState
    cache: CacheState


class OutputMemoryLM(TokenLM):
    """``base`` (a :class:`TokenLM`) with an :class:`OutputMemory` over its features.

    ``forward(tokens, state, targets=None)`` has S3CMN's contract: log-probabilities of the
    mixture, or ``(nll, nll_no_memory, state)`` with targets. ``set_memory_enabled(False)`` gives
    the base model's own distribution with the same weights."""

    def __init__(self, base: TokenLM, memory_size: int = 2048, memory_top_k: int = 32, memory_theta: float = 10.0,
                 memory_lambda: float = 0.05):
        super().__init__()
        if not isinstance(base, TokenLM):
            raise TypeError(f"base must be a TokenLM, got {type(base).__name__}")
        self.base = base
        dim = base.embed.weight.shape[1]
        self.output_memory = OutputMemory(dim, memory_size, memory_top_k, memory_theta, memory_lambda)

    @property
    def embed(self) -> nn.Embedding:  # the tied output layer is the base's
        return self.base.embed

    has_output_memory = True

    def init_state(self, batch_size: int) -> MemoryLMState:
        return MemoryLMState(base=self.base.init_state(batch_size), cache=self.output_memory.init_state(batch_size))

    def set_memory_enabled(self, enabled: bool) -> None:
        self.output_memory.enabled = bool(enabled)

    def reset_stats(self) -> None:
        self.output_memory.reset_stats()

    def get_stats(self) -> dict:
        om = self.output_memory.get_stats()
        return {"output_memory": om, "memory_hit_rate": om["hit_rate"], "memory_hit_rate_chance": om["hit_rate_chance"],
                "retrieval_accuracy": om["retrieval_accuracy"],
                "retrieval_accuracy_chance": om["retrieval_accuracy_chance"],
                "memory_gain_nats": om["memory_gain_nats"], "mean_lambda": om["mean_lambda"]}

    def features(self, tokens, state: MemoryLMState | None = None):
        """The base's features mapped into the tied embedding's space (its ``head_features``: an
        SSMN projects hidden -> embed); the memory is keyed on these, and this model's own head
        multiplies them by the embedding directly."""
        state = self.init_state(tokens.shape[0]) if state is None else state
        feats, base = self.base.features(tokens, state.base)
        return self.base.head_features(feats), MemoryLMState(base=base, cache=state.cache)

    def forward(self, tokens, state: MemoryLMState | None = None, targets=None):
        state = self.init_state(tokens.shape[0]) if state is None else state
        feats, state = self.features(tokens, state)
        base = state.base
        if targets is None:
            out, cache = self.output_memory(feats, tokens, self.head(feats), state.cache)
        else:
            out, cache = self.output_memory(feats, tokens, None, state.cache, targets,
                                            nll_lm=self.target_nll(feats, targets))
        state = MemoryLMState(base=base, cache=cache)
        return (out, state) if targets is None else (out[0], out[1], state)

    def step(self, token_t, state: MemoryLMState):
        out, state = self(token_t[:, None], state)
        return out[:, 0], state
