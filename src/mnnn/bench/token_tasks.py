"""What the synthetic token suites (mqar, copy, selective-copy) share: the models at one width,
their recurrent state sizes, and one trainer scored only at labelled positions."""

from __future__ import annotations

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


def build(name: str, vocab: int, d: int, seq_len: int, window: int) -> nn.Module:
    """Two-layer models of width ``d`` (the LSTM: one layer of ``d`` units). The Text-Native SSMN
    sees ``window`` tokens by attention and older ones only through its synaptic memory."""
    if name == "transformer":
        return TransformerLM(vocab, d_model=d, num_layers=2, num_heads=max(1, d // 32), max_len=seq_len)
    if name == "lstm":
        return LSTMLM(vocab, embed_dim=d, hidden_dim=d)
    if name == "s3cmn":
        return S3CMN(vocab_size=vocab, embedding_dim=d, hidden_dim=d, num_layers=2, memory_size=256, d_state=16,
                     max_len=seq_len, memory_top_k=4, memory_interval=8)
    if name == "text_native_ssmn":
        return TextNativeSSMN(vocab, embed_dim=d, hidden_dim=d, window_size=window, num_layers=2,
                              plastic_ratio=0.5, num_heads=max(1, d // 32))
    raise ValueError(f"unknown model {name!r}; known: {MODELS}")


def state_floats(model: nn.Module, name: str, seq_len: int) -> int:
    """Numbers carried from one token to the next at context ``seq_len``: the recurrent state, or
    the KV cache (2 x layers x seq_len x d) of the Transformer."""
    if name == "transformer":
        d = model.embed.weight.shape[1]
        return 2 * len(model.layers.layers) * seq_len * d
    state = model.init_state(1)
    return sum(t.numel() for t in state.tensors().values() if torch.is_floating_point(t))


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 256) -> float:
    model.eval()
    hits = n = 0
    with torch.no_grad():
        for i in range(0, len(x), batch):
            logits, _ = model(x[i : i + batch])
            m = y[i : i + batch] != IGNORE
            hits += int((logits[m].argmax(-1) == y[i : i + batch][m]).sum())
            n += int(m.sum())
    return hits / max(n, 1)


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, batch: int, lr: float,
          progress: Callable | None = None, seed: int = 0) -> dict:
    """AdamW with linear warm-up (10 %) then cosine decay; loss only where ``y != -100``."""
    g = torch.Generator().manual_seed(seed)
    steps = epochs * max(1, len(x) // batch)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1), pct_start=0.1)
    start, losses, step = time.perf_counter(), [], 0
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=g)
        for i in range(0, len(x) - batch + 1, batch):
            idx = order[i : i + batch]
            logits, _ = model(x[idx])
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y[idx].reshape(-1), ignore_index=IGNORE)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
            step += 1
            if progress is not None:
                progress(1)
    return {"steps": step, "train_s": time.perf_counter() - start, "losses": losses}


def bar(total: int, desc: str, enabled: bool):
    return tqdm(total=total, desc=desc, disable=not enabled)
