"""The contract every token language model of mnnn shares.

``features(tokens [B, T], state) -> (features [B, T, E], state)`` runs the network; ``head(features)``
is the output layer (the embedding, tied); ``forward`` is the two together and returns
``(logits [B, T, vocab], state)``. A loss scored at a few positions (MQAR, copy tasks) gathers
those features first and never builds the ``T x vocab`` logits.
"""

from __future__ import annotations

import torch
from torch import nn


class TokenLM(nn.Module):
    """Base of the token LMs: subclasses define ``embed`` and ``features``."""

    embed: nn.Embedding

    def features(self, tokens: torch.Tensor, state=None):
        raise NotImplementedError

    def head(self, feats: torch.Tensor) -> torch.Tensor:
        """Tied output layer: features ``[..., E]`` -> logits ``[..., vocab]``."""
        return feats @ self.embed.weight.T

    def forward(self, tokens: torch.Tensor, state=None):
        feats, state = self.features(tokens, state)
        return self.head(feats), state

    def attach_datastore(self, store, lam: float = 0.25, top_k: int = 32, theta: float | None = None,
                         search: str = "exact", split: str | None = None,
                         lambda_grid: tuple[float, ...] = ()) -> None:
        """Read a persistent datastore (:mod:`mnnn.memory.datastore`, built by ``mnnn index``)
        beside the output memory's cache: ``p = (1 - lam) p_cache + lam p_ds``. Refused for a
        model without an output memory, a store of another vocabulary, feature size or weights,
        and (``split`` given) when evaluating on the split the store was built from.
        ``store=None`` detaches; ``set_memory_enabled(False)`` switches this read off too.
        ``lambda_grid``: other weights scored on the same pass (statistics only)."""
        from mnnn.memory.datastore import check_compatible

        if store is None:
            if getattr(self, "output_memory", None) is not None:
                self.output_memory.attach_datastore(None)
            return
        check_compatible(self, store, split)
        self.output_memory.attach_datastore(store, lam, top_k, theta, search, lambda_grid)
