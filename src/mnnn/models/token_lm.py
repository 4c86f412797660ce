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
