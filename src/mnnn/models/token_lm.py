"""The contract every token language model of mnnn shares.

``features(tokens [B, T], state) -> (features [B, T, E], state)`` runs the network; ``head(features)``
is the output layer (the embedding, tied); ``forward`` is the two together and returns
``(logits [B, T, vocab], state)``. A loss scored at a few positions (MQAR, copy tasks) gathers
those features first and never builds the ``T x vocab`` logits.
"""

from __future__ import annotations

import torch
from torch import nn

from mnnn.ops.tied_nll import tied_nll


class TokenLM(nn.Module):
    """Base of the token LMs: subclasses define ``embed`` and ``features``."""

    embed: nn.Embedding

    def features(self, tokens: torch.Tensor, state=None):
        raise NotImplementedError

    def head_features(self, feats: torch.Tensor) -> torch.Tensor:
        """What multiplies the tied embedding: ``feats`` itself here (a subclass may project)."""
        return feats

    def head(self, feats: torch.Tensor) -> torch.Tensor:
        """Tied output layer: features ``[..., E]`` -> logits ``[..., vocab]``."""
        return self._tied_logits(self.head_features(feats))

    def target_nll(self, feats: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """NLL ``[B, T]`` of ``targets`` under ``softmax(head(feats))``, without keeping the logits
        (:func:`mnnn.ops.tied_nll.tied_nll`)."""
        return tied_nll(self.head_features(feats), self.embed.weight, targets)

    def _tied_logits(self, feats: torch.Tensor) -> torch.Tensor:
        """``feats @ embed.weight.T``. One or two rows without autograd (a streaming or generation
        step) multiply a cached ``[E, vocab]`` copy of the weight instead: on CPU that
        vector-matrix product runs ~4x faster than through the transposed view. The copy is
        remade when the weight changes (its version or storage), e.g. after an optimizer step."""
        w = self.embed.weight
        if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.is_grad_enabled() \
                or w.device.type != "cpu" or feats.numel() > 2 * feats.shape[-1]:
            return feats @ w.T
        key = (w._version, w.data_ptr(), w.dtype)
        cached = self.__dict__.get("_head_t")
        if cached is None or cached[0] != key:
            cached = (key, w.detach().T.contiguous())
            self.__dict__["_head_t"] = cached
        return feats @ cached[1]

    def forward(self, tokens: torch.Tensor, state=None, targets: torch.Tensor | None = None):
        """``(logits [B, T, vocab], state)``; with ``targets [B, T]``: ``(nll, nll, state)`` (the
        second NLL is the model without memory, the same here), the training and evaluation path,
        which never keeps a ``T x vocab`` tensor."""
        feats, state = self.features(tokens, state)
        if targets is None:
            return self.head(feats), state
        nll = self.target_nll(feats, targets)
        return nll, nll, state

    def token_nll(self, tokens: torch.Tensor, targets: torch.Tensor, state=None):
        """``(nll, nll_no_memory, state)``: see :meth:`forward`."""
        return self(tokens, state, targets=targets)

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
