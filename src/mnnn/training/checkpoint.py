"""Atomic training checkpoints: model, optimizer, carried recurrent state, RNG, step, config.

One safetensors file per checkpoint with a JSON header; nothing is pickled, so loading executes no
code. ``save_checkpoint`` writes to a temporary file and renames it, so a crash (even ``kill -9``)
leaves the previous checkpoint or the new one, never a torn file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mnnn.serialization import load_tensors, save_tensors
from mnnn.state import TensorState


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors, layout = {}, {}
    for pid, st in sd["state"].items():
        layout[str(pid)] = {}
        for key, value in st.items():
            if isinstance(value, torch.Tensor):
                tensors[f"opt/{pid}/{key}"] = value
                layout[str(pid)][key] = "tensor"
            else:
                layout[str(pid)][key] = value
    return tensors, {"param_groups": sd["param_groups"], "state": layout}


def _restore_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    state = {}
    for pid, entries in meta["state"].items():
        state[int(pid)] = {k: tensors[f"opt/{pid}/{k}"] if v == "tensor" else v for k, v in entries.items()}
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    state: TensorState | None, step: int, config: dict[str, Any],
                    extra: dict[str, Any] | None = None) -> Path:
    tensors = {f"model/{k}": v for k, v in model.state_dict().items()}
    opt_tensors, opt_meta = _optimizer_tensors(optimizer)
    tensors.update(opt_tensors)
    if state is not None:
        tensors.update({f"carry/{k}": v for k, v in state.tensors().items()})
    tensors["rng/torch"] = torch.get_rng_state()
    meta = {"kind": "mnnn.checkpoint", "step": step, "config": config, "optimizer": opt_meta,
            "extra": extra or {}}
    return save_tensors(path, tensors, meta)


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a checkpoint (``ValueError`` for a truncated or foreign file)."""
    tensors, meta = load_tensors(path)
    if meta.get("kind") != "mnnn.checkpoint":
        raise ValueError(f"{path} is not an mnnn training checkpoint")
    return tensors, meta


def restore(tensors: dict[str, torch.Tensor], meta: dict[str, Any], model: torch.nn.Module,
            optimizer: torch.optim.Optimizer | None, state_like: TensorState | None):
    """Load the model (and optimizer, RNG) in place; return the carried state and the step.
    ``ValueError`` (nothing loaded) when the file's tensors do not fit the model its config
    builds or hold NaN/infinity."""
    weights = {k[6:]: v for k, v in tensors.items() if k.startswith("model/")}
    check_weights(weights, model)
    model.load_state_dict(weights)
    if optimizer is not None:
        _restore_optimizer(optimizer, tensors, meta["optimizer"])
    torch.set_rng_state(tensors["rng/torch"])
    state = None
    if state_like is not None:
        carry = {k[6:]: v for k, v in tensors.items() if k.startswith("carry/")}
        state = type(state_like).from_tensors(carry)
    return state, meta["step"]


def check_weights(weights: dict[str, torch.Tensor], model: torch.nn.Module) -> None:
    """Compare a file's weights with ``model``'s own before loading: missing or unexpected keys,
    shapes (episodic stores may have grown: their own loader checks them), non-finite values."""
    own = model.state_dict()
    # episodic stores written before LRU eviction lack last_used: the store fills it from born
    missing = sorted(k for k in set(own) - set(weights)
                     if not (k.endswith(".last_used") and k[: -len("last_used")] + "born" in weights))
    unexpected = sorted(set(weights) - set(own))
    if missing or unexpected:
        raise ValueError(f"the checkpoint does not fit the model its config builds: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    from mnnn.memory.episodic import Memory

    grown = {f"{name}.{b}" if name else b for name, mod in model.named_modules() if isinstance(mod, Memory)
             for b, _ in mod.named_buffers(recurse=False)}
    for key, value in weights.items():
        if key not in grown and value.shape != own[key].shape:
            raise ValueError(f"the checkpoint's {key} has shape {tuple(value.shape)}, the model's config gives "
                             f"{tuple(own[key].shape)}")
        if value.is_floating_point() or value.is_complex():
            if not bool(torch.isfinite(value).all()):
                raise ValueError(f"the checkpoint's {key} holds NaN or infinite values (a diverged or tampered file)")
