"""The state contract shared by every stateful layer and model.

Every stateful module implements::

    forward(x, state=None) -> (y, state)   # x: [B, T, ...], the fast form
    step(x_t, state)       -> (y_t, state) # x_t: [B, ...], one time step
    init_state(batch_size) -> state

States are dataclasses of tensors deriving from :class:`TensorState`, so truncated BPTT can
cut the graph with ``state.detach()`` whatever the model.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, TypeVar

import torch

S = TypeVar("S", bound="TensorState")


@dataclasses.dataclass
class TensorState:
    """Base class for recurrent states: a dataclass whose fields are tensors (or nested states).

    Two states are equal when they have the same type and every field is equal (tensors: same
    shape, dtype and values), so ``state == other`` is a bool rather than the "ambiguous truth
    value" error that the dataclass default (a tuple comparison of tensors) raises.
    """

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        # Put the value equality in the subclass itself: @dataclass then keeps it instead of
        # generating its own field-tuple comparison.
        cls.__eq__ = TensorState.__eq__

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        for field in dataclasses.fields(self):
            a, b = getattr(self, field.name), getattr(other, field.name)
            if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
                if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
                    return False
                if a.shape != b.shape or a.dtype != b.dtype or not torch.equal(a.cpu(), b.cpu()):
                    return False
            elif a != b:
                return False
        return True

    __hash__ = None  # mutable: states are not dictionary keys

    def map(self: S, fn: Callable[[torch.Tensor], torch.Tensor]) -> S:
        """Apply ``fn`` to every tensor field and return a new state of the same type."""
        values = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, TensorState):
                values[field.name] = value.map(fn)
            elif isinstance(value, torch.Tensor):
                values[field.name] = fn(value)
            else:
                values[field.name] = value
        return type(self)(**values)

    def detach(self: S) -> S:
        """Cut the autograd graph (truncated BPTT) without copying data."""
        return self.map(torch.Tensor.detach)

    def clone(self: S) -> S:
        return self.map(torch.Tensor.clone)

    def to(self: S, *args, **kwargs) -> S:
        return self.map(lambda t: t.to(*args, **kwargs))

    def tensors(self) -> dict[str, torch.Tensor]:
        """Flat ``{name: tensor}`` view, with nested states as ``outer.inner`` (for saving)."""
        out: dict[str, torch.Tensor] = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, TensorState):
                out.update({f"{field.name}.{k}": v for k, v in value.tensors().items()})
            elif isinstance(value, torch.Tensor):
                out[field.name] = value
        return out

    @classmethod
    def from_tensors(cls: type[S], tensors: dict[str, torch.Tensor]) -> S:
        """Inverse of :meth:`tensors`."""
        values = {}
        for field in dataclasses.fields(cls):
            name = field.name
            nested = {k[len(name) + 1 :]: v for k, v in tensors.items() if k.startswith(name + ".")}
            if name in tensors:
                values[name] = tensors[name]
            else:
                values[name] = _resolve_state_type(cls, name).from_tensors(nested)
        return cls(**values)


def _resolve_state_type(cls: type, name: str) -> type[TensorState]:
    import typing

    hint = typing.get_type_hints(cls)[name]
    if isinstance(hint, type) and issubclass(hint, TensorState):
        return hint
    raise TypeError(f"field {cls.__name__}.{name} is not a TensorState type (got {hint!r})")


def step_through(module, x: torch.Tensor, state=None):
    """Run ``module.step`` over the time axis (dim 1) of ``x`` from ``state`` (default
    ``module.init_state(B)``): ``(outputs stacked on dim 1, final state)`` — the reference every
    parallel ``forward`` is checked against (tests, and each benchmark's verify step)."""
    state = module.init_state(x.shape[0]) if state is None else state
    outs = []
    for t in range(x.shape[1]):
        out, state = module.step(x[:, t], state)
        outs.append(out)
    return torch.stack(outs, dim=1), state
