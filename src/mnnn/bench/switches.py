"""Memory switches for on/off comparisons on one trained model (a switch, not a second model).

Each context manager turns a memory off for the body of a ``with`` block and puts back exactly
the setting it found, also when the body raises; the suites score the same weights both ways.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn


@contextlib.contextmanager
def fast_weights_off(core: nn.Module) -> Iterator[None]:
    """An SSMN core with every synaptic layer's learning rate at 0 (``set_plasticity(0, lambda)``):
    the fast weights stay at zero, so the attention window is all that carries context. Each
    layer's own (eta, lambda) is restored afterwards."""
    layers = core.synaptic_layers()
    saved = [(syn.eta, syn.lam) for syn in layers]
    for syn in layers:
        syn.eta = 0.0
    try:
        yield
    finally:
        for syn, (eta, lam) in zip(layers, saved):
            syn.eta, syn.lam = eta, lam


@contextlib.contextmanager
def memory_off(model: nn.Module) -> Iterator[str | None]:
    """``model`` with its memory switched off; yields what was switched off: "memory" (S3CMN's
    episodic reads and writes, ``set_memory_enabled``), "fast weights" (a Text-Native SSMN's
    plastic layers), or None for a model without a memory switch (nothing is changed)."""
    if hasattr(model, "set_memory_enabled"):
        was = model.memory_enabled
        model.set_memory_enabled(False)
        try:
            yield "memory"
        finally:
            model.set_memory_enabled(was)
        return
    core = getattr(model, "core", None)
    if hasattr(core, "synaptic_layers") and core.synaptic_layers():
        with fast_weights_off(core):
            yield "fast weights"
        return
    yield None
