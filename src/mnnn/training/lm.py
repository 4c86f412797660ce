"""Language-model training and evaluation over contiguous token streams (truncated BPTT).

Any model with ``forward(tokens [B, T], state) -> (logits [B, T, V], state)`` and
``init_state(batch)`` trains here: the token sequence is cut into ``batch_size`` contiguous
streams, read ``seq_len`` tokens at a time, with the state carried (detached) between segments.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mnnn.training.loop import cosine_lr


def _fresh_streams(model: nn.Module, batch_size: int):
    """A new state, and empty episodic stores: a stream must never read its own later text."""
    if hasattr(model, "reset_memory"):
        model.reset_memory()
    return model.init_state(batch_size)


def batchify(ids: np.ndarray | torch.Tensor, batch_size: int) -> torch.Tensor:
    """``[N]`` -> ``[batch_size, N // batch_size]`` contiguous streams (the tail is dropped)."""
    ids = torch.as_tensor(np.asarray(ids), dtype=torch.long)
    n = ids.numel() // batch_size
    if n < 2:
        raise ValueError(f"need at least {2 * batch_size} tokens for batch_size={batch_size}, got {ids.numel()}")
    return ids[: n * batch_size].view(batch_size, n)


@torch.no_grad()
def evaluate_lm(model: nn.Module, ids, batch_size: int = 8, seq_len: int = 128) -> dict[str, float]:
    """Perplexity = exp(total NLL / total predicted tokens) over the whole token sequence; every
    token but the first of each stream is predicted once, the state carried across segments."""
    model.eval()
    data = batchify(ids, batch_size)
    state = _fresh_streams(model, batch_size)
    total_nll, total = 0.0, 0
    for start in range(0, data.shape[1] - 1, seq_len):
        x = data[:, start : start + seq_len]
        y = data[:, start + 1 : start + 1 + seq_len]
        x = x[:, : y.shape[1]]
        logits, state = model(x, state)
        total_nll += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum"))
        total += y.numel()
    return {"nll": total_nll / total, "ppl": math.exp(total_nll / total), "tokens": total}


def train_lm(
    model: nn.Module,
    train_ids,
    batch_size: int = 16,
    seq_len: int = 128,
    learning_rate: float = 3e-3,
    weight_decay: float = 0.01,
    max_steps: int | None = None,
    time_budget_s: float | None = None,
    warmup: int = 50,
    grad_clip: float = 1.0,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """AdamW with warm-up and cosine decay, gradient clipping, TBPTT with the state carried across
    segments; stops after ``max_steps`` or ``time_budget_s`` (whichever first; one is required)."""
    if max_steps is None and time_budget_s is None:
        raise ValueError("give max_steps or time_budget_s")
    torch.manual_seed(seed)
    data = batchify(train_ids, batch_size)
    steps_per_pass = (data.shape[1] - 1) // seq_len
    if steps_per_pass < 1:
        raise ValueError(f"seq_len={seq_len} is longer than each stream ({data.shape[1]} tokens)")
    planned = max_steps or 10**9
    schedule_len = max_steps or max(1, int(time_budget_s * 2))  # refined after the first steps
    opt = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=weight_decay)
    state = _fresh_streams(model, batch_size)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=max_steps, desc="train", unit="step")
    start_time = time.perf_counter()
    history: dict[str, list] = {"step": [], "loss": [], "tokens_per_s": []}
    step, tokens = 0, 0
    while step < planned:
        i = (step % steps_per_pass) * seq_len
        if i == 0 and step:
            state = _fresh_streams(model, batch_size)  # a new pass over the streams
        x, y = data[:, i : i + seq_len], data[:, i + 1 : i + 1 + seq_len]
        for group in opt.param_groups:
            group["lr"] = learning_rate * cosine_lr(step, schedule_len, warmup)
        model.train()
        logits, state = model(x, state)
        state = state.detach()
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        step += 1
        tokens += y.numel()
        elapsed = time.perf_counter() - start_time
        if time_budget_s is not None and max_steps is None and step == 5:
            schedule_len = max(step + 1, int(time_budget_s / (elapsed / step)))
        history["step"].append(step)
        history["loss"].append(loss.item())
        history["tokens_per_s"].append(tokens / elapsed)
        if bar is not None:
            bar.set_postfix(loss=f"{float(loss):.3f}", tok_s=f"{tokens / elapsed:.0f}")
            bar.update(1)
        if time_budget_s is not None and elapsed >= time_budget_s:
            break
    if bar is not None:
        bar.close()
    history["steps"] = step
    history["tokens"] = tokens
    history["seconds"] = time.perf_counter() - start_time
    return history
