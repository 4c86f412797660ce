"""What the synthetic token suites (mqar, copy, selective-copy) share: the models at one width,
their recurrent state sizes, and one trainer scored only at labelled positions."""

from __future__ import annotations

import math
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from mnnn.data.tasks import IGNORE
from mnnn.models.lm_baselines import LSTMLM, TransformerLM
from mnnn.models.s3cmn import S3CMN
from mnnn.models.ssmn import TextNativeSSMN

MODELS = ("transformer", "lstm", "s3cmn", "text_native_ssmn")
# the Text-Native SSMN by plasticity rule: "text_native_ssmn" is the default rule (delta; it was
# the Hebbian rule in tables before that default changed, which their git revision tells), the
# others name their rule; accepted by build(), the by-steps MQAR presets compare them
RULE_MODELS = {"text_native_ssmn": "delta", "text_native_ssmn_hebbian": "hebbian",
               "text_native_ssmn_gated_delta": "gated_delta"}


def build(name: str, vocab: int, d: int, seq_len: int, window: int) -> nn.Module:
    """Two-layer models of width ``d`` (the LSTM: one layer of ``d`` units). The Text-Native SSMN
    sees ``window`` tokens by attention and older ones only through its synaptic memory."""
    if name == "transformer":
        return TransformerLM(vocab, d_model=d, num_layers=2, num_heads=max(1, d // 32), max_len=seq_len)
    if name == "lstm":
        return LSTMLM(vocab, embed_dim=d, hidden_dim=d)
    if name == "s3cmn":
        return S3CMN(vocab_size=vocab, embedding_dim=d, hidden_dim=d, num_layers=2, memory_size=256, d_state=16,
                     max_len=seq_len, memory_top_k=4, memory_interval=8,
                     # the token tasks score features()+head() at a few positions, which the output
                     # memory (a mixture at the output) does not enter: they measure the membrane read
                     memory_fusion="membrane")
    if name in RULE_MODELS:
        return TextNativeSSMN(vocab, embed_dim=d, hidden_dim=d, window_size=window, num_layers=2,
                              plastic_ratio=0.5, num_heads=max(1, d // 32), plasticity_rule=RULE_MODELS[name])
    raise ValueError(f"unknown model {name!r}; known: {MODELS[:3] + tuple(RULE_MODELS)}")


def state_bytes(model: nn.Module, name: str, seq_len: int) -> int:
    """Bytes carried from one token to the next at context ``seq_len``: every tensor of the
    recurrent state (complex S4D states at their complex size, counts included) plus the
    episodic stores that live in module buffers (S3CMN's membrane fusion); for the Transformer,
    its KV cache (2 x layers x seq_len x d floats)."""
    if name == "transformer":
        d = model.embed.weight.shape[1]
        return 2 * len(model.layers.layers) * seq_len * d * model.embed.weight.element_size()
    from mnnn.memory.episodic import Memory

    state = model.init_state(1)
    total = sum(t.numel() * t.element_size() for t in state.tensors().values())
    for module in model.modules():
        if isinstance(module, Memory):
            total += sum(b.numel() * b.element_size() for b in module.buffers())
    return total


def forget(model: nn.Module) -> None:
    """Empty a model's module-level episodic stores (S3CMN's membrane fusion), if it has any."""
    if hasattr(model, "reset_memory"):
        model.reset_memory()


def _scored(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and targets at the labelled positions only (the output layer runs on those rows).
    Every row is an independent example, so module-level episodic stores (S3CMN's membrane
    fusion) are emptied first: an example never reads entries of an earlier batch's examples."""
    forget(model)
    feats, _ = model.features(x)
    m = y != IGNORE
    return model.head(feats[m]), y[m]


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 256) -> float:
    model.eval()
    hits = n = 0
    with torch.no_grad():
        for i in range(0, len(x), batch):
            logits, target = _scored(model, x[i : i + batch], y[i : i + batch])
            hits += int((logits.argmax(-1) == target).sum())
            n += target.numel()
    return hits / max(n, 1)


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, batch: int, lr: float,
          progress: Callable | None = None, seed: int = 0, time_budget_s: float | None = None,
          weight_decay: float = 0.1, max_steps: int | None = None) -> dict:
    """AdamW, linear warm-up over the first 10 % then cosine decay to 0, loss only where
    ``y != -100``. Runs ``epochs`` passes, or stops at ``time_budget_s`` seconds if that comes
    first; the schedule follows whichever is further along (step fraction or time fraction), so a
    budgeted run still anneals. ``max_steps`` caps the steps (the schedule spans the cap). Returns steps done, seconds, per-step losses and what stopped it."""
    g = torch.Generator().manual_seed(seed)
    per_epoch = max(1, len(x) // batch)
    steps = epochs * per_epoch if max_steps is None else min(epochs * per_epoch, max_steps)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    start, losses, step = time.perf_counter(), [], 0
    stopped_by = "steps"
    model.train()
    while step < steps:
        if step % per_epoch == 0:
            order = torch.randperm(len(x), generator=g).to(x.device)
        elapsed = time.perf_counter() - start
        if time_budget_s is not None and elapsed >= time_budget_s:
            stopped_by = "time_budget"
            break
        frac = max(step / steps, elapsed / time_budget_s if time_budget_s else 0.0)
        for group in opt.param_groups:
            group["lr"] = lr * (frac / 0.1 if frac < 0.1 else 0.5 * (1 + math.cos(math.pi * (frac - 0.1) / 0.9)))
        idx = order[(step % per_epoch) * batch : (step % per_epoch + 1) * batch]
        logits, target = _scored(model, x[idx], y[idx])
        loss = F.cross_entropy(logits, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        step += 1
        if progress is not None:
            progress(1)
    return {"steps": step, "planned_steps": steps, "stopped_by": stopped_by,
            "train_s": time.perf_counter() - start, "losses": losses}


def bar(total: int, desc: str, enabled: bool):
    return tqdm(total=total, desc=desc, disable=not enabled)
