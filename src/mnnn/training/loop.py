"""The training loop shared by estimators (and, as the library grows, every model)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn


@dataclass
class TrainHistory:
    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    steps: int = 0


def train_epochs(
    model: nn.Module,
    batches: Callable[[int], Iterable[tuple[torch.Tensor, ...]]],
    loss_fn: Callable[[nn.Module, tuple[torch.Tensor, ...]], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    epochs: int,
    grad_clip: float | None = 1.0,
    after_step: Callable[[], None] | None = None,
    validate: Callable[[], float] | None = None,
    progress: bool = False,
    desc: str = "fit",
) -> TrainHistory:
    """Run ``epochs`` passes; ``batches(epoch)`` yields the batches of one epoch.

    ``after_step`` runs after every optimizer step (e.g. to restore frozen weights); ``validate``
    after every epoch. With ``progress`` a tqdm bar shows the epoch, loss and validation loss.
    """
    history = TrainHistory()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=epochs, desc=desc, unit="epoch")
    for epoch in range(epochs):
        model.train()
        total, count = 0.0, 0
        for batch in batches(epoch):
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model, batch)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"training diverged at epoch {epoch} (loss={loss.item()}); lower learning_rate"
                )
            loss.backward()
            if grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            optimizer.step()
            if after_step is not None:
                after_step()
            total += loss.item()
            count += 1
            history.steps += 1
        history.train_loss.append(total / max(count, 1))
        if validate is not None:
            model.eval()
            with torch.no_grad():
                history.val_loss.append(float(validate()))
        if bar is not None:
            post = {"loss": f"{history.train_loss[-1]:.4g}"}
            if history.val_loss:
                post["val"] = f"{history.val_loss[-1]:.4g}"
            bar.set_postfix(post)
            bar.update(1)
    if bar is not None:
        bar.close()
    return history


def cosine_lr(step: int, total: int, warmup: int) -> float:
    """Multiplier for a linear warm-up then cosine decay to 10 %."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))
