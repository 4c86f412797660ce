"""Language-model training and evaluation over contiguous token streams (truncated BPTT).

Any model with ``forward(tokens [B, T], state) -> (logits [B, T, V], state)`` and
``init_state(batch)`` trains here: the token sequence is cut into ``batch_size`` contiguous
streams, read ``seq_len`` tokens at a time, with the state carried (detached) between segments.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mnnn.models.token_lm import TokenLM
from mnnn.serialization import atomic_write
from mnnn.training.checkpoint import load_checkpoint, restore, save_checkpoint
from mnnn.training.loop import cosine_lr


def seed_everything(seed: int) -> None:
    """Seed every generator a run draws from (initialisation, data order, dropout, sampling)."""
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class _BufferSnapshot:
    """Restores a module's buffers (episodic stores, statistics) on exit: an evaluation run in the
    middle of training must not write validation entries into the stores training reads."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self):
        self.saved = {k: v.detach().clone() for k, v in self.model.state_dict().items()
                      if k not in dict(self.model.named_parameters())}
        return self

    def __exit__(self, *exc):
        self.model.load_state_dict(self.saved, strict=False)
        return False


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
def evaluate_lm(model: nn.Module, ids, batch_size: int = 8, seq_len: int = 128,
                progress: bool = False) -> dict[str, float]:
    """Perplexity = exp(total NLL / total predicted tokens) over the whole token sequence; every
    token but the first of each stream is predicted once, the state carried across segments.

    The model's statistics are reset first, so ``get_stats()`` afterwards describes this pass
    only. A model with an output memory (``has_output_memory``) also reports ``ppl_no_memory``: the
    perplexity of its own LM distribution on the same pass (the memory switched off)."""
    model.eval()
    if hasattr(model, "reset_stats"):
        model.reset_stats()
    data = batchify(ids, batch_size)
    state = _fresh_streams(model, batch_size)
    total_nll, total_lm, total = 0.0, 0.0, 0
    device = next(model.parameters()).device
    data = data.to(device)
    with_memory = getattr(model, "has_output_memory", False)
    scored = with_memory or isinstance(model, TokenLM)
    starts = range(0, data.shape[1] - 1, seq_len)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(starts), desc="eval", unit="segment")
    for start in starts:
        x = data[:, start : start + seq_len]
        y = data[:, start + 1 : start + 1 + seq_len]
        x = x[:, : y.shape[1]]
        if scored:  # a token LM scores the targets without keeping T x vocab logits
            nll, nll_lm, state = model.token_nll(x, y, state)
            total_nll += float(nll.sum())
            total_lm += float(nll_lm.sum())
        else:
            logits, state = model(x, state)
            total_nll += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum"))
        total += y.numel()
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    out = {"nll": total_nll / total, "ppl": math.exp(total_nll / total), "tokens": total}
    if with_memory:
        out.update(nll_no_memory=total_lm / total, ppl_no_memory=math.exp(total_lm / total),
                   memory_gain_nats=(total_lm - total_nll) / total)
    return out


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
    valid_ids=None,
    eval_every: int | None = None,
    out_dir: str | Path | None = None,
    checkpoint_every: int | None = None,
    resume: bool = True,
    config: dict[str, Any] | None = None,
    max_bad_steps: int = 10,
    keep_last: int = 1,
) -> dict[str, Any]:
    """The one LM training loop: AdamW with warm-up and cosine decay, gradient clipping, TBPTT
    with the state carried (detached) across segments, stopping after ``max_steps`` or
    ``time_budget_s`` (whichever first; one is required).

    With ``out_dir``: metrics go to ``metrics.jsonl`` (one line per step, validation lines every
    ``eval_every`` steps when ``valid_ids`` is given), a checkpoint (model incl. memory stores,
    optimizer, carried state, RNG, step) is written atomically every ``checkpoint_every`` steps and
    at the end, and ``curves.png`` plots the losses. With ``resume`` a run finds its checkpoint and
    continues; with ``max_steps`` the resumed run ends bitwise equal to an uninterrupted one (a
    time budget makes the schedule depend on speed, so only max_steps runs are reproducible).

    A step whose loss or gradient is not finite is skipped (no update) and counted
    (``skipped_steps`` in metrics.jsonl); ``max_bad_steps`` in a row raise ``FloatingPointError``.
    A checkpoint is only written while the weights are finite, so the last good one survives.
    ``keep_last`` > 1 also keeps each checkpoint as ``checkpoints/step-N.safetensors`` (a hard link
    to the file just written where the file system allows, else a copy), the newest
    ``keep_last`` of them; ``checkpoint.safetensors`` is always the latest, and resume reads it."""
    if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1:
        raise ValueError(f"keep_last must be an int >= 1, got {keep_last!r}")
    if max_steps is None and time_budget_s is None:
        raise ValueError("give max_steps or time_budget_s")
    for name, value in (("learning_rate", learning_rate), ("grad_clip", grad_clip)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    torch.manual_seed(seed)
    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    # DDP: batch_size streams per rank; rank r reads streams [r B, (r+1) B) of a world x B split,
    # so a run on W ranks sees exactly the batches of one process with W x batch_size streams
    data = batchify(train_ids, batch_size * world)[rank * batch_size : (rank + 1) * batch_size]
    data = data.to(next(model.parameters()).device)
    net = model
    if distributed:
        from torch.nn.parallel import DistributedDataParallel

        # buffers (episodic stores) stay per rank: each rank remembers its own streams
        net = DistributedDataParallel(model, broadcast_buffers=False, find_unused_parameters=True)
    steps_per_pass = (data.shape[1] - 1) // seq_len
    if steps_per_pass < 1:
        raise ValueError(f"seq_len={seq_len} is longer than each stream ({data.shape[1]} tokens)")
    planned = max_steps or 10**9
    schedule_len = max_steps or max(1, int(time_budget_s * 2))  # refined after the first steps
    opt = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=weight_decay)
    state = _fresh_streams(model, batch_size)
    scored = getattr(model, "has_output_memory", False) or isinstance(model, TokenLM)
    step = 0
    out = Path(out_dir) if out_dir is not None and rank == 0 else None  # rank 0 writes for everyone
    ckpt = out / "checkpoint.safetensors" if out is not None else None
    run_config = dict(config or {}, batch_size=batch_size, seq_len=seq_len, learning_rate=learning_rate,
                      weight_decay=weight_decay, max_steps=max_steps, time_budget_s=time_budget_s, seed=seed)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        for stale in out.glob(".checkpoint.safetensors.*.tmp"):  # left by a run killed mid-write
            stale.unlink()
        if resume and ckpt.is_file():
            tensors, meta = load_checkpoint(ckpt)
            changes = config_changes(meta["config"], run_config)
            if changes:
                raise ValueError(f"{ckpt} was written by another config ({'; '.join(changes)}); resume with the "
                                 "same config, or start afresh with --no-resume or another --out")
            state, step = restore(tensors, meta, model, opt, state)
            schedule_len = meta["extra"].get("schedule_len", schedule_len)
        # lines written after the checkpoint (or by a run that never wrote one, or that we do
        # not resume) would be written again: drop them
        _truncate_metrics(out / "metrics.jsonl", step)
        _truncate_metrics(out / "timing.jsonl", step)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=max_steps, initial=step, desc="train", unit="step")
    start_time = time.perf_counter()
    first_step = step
    history: dict[str, Any] = {"step": [], "loss": [], "tokens_per_s": [], "valid": []}
    tokens = 0
    metrics = open(out / "metrics.jsonl", "a") if out is not None else None
    timings = open(out / "timing.jsonl", "a") if out is not None else None
    skipped = consecutive_bad = 0

    def checkpoint() -> None:
        if ckpt is not None and consecutive_bad == 0 and all(bool(torch.isfinite(p).all())
                                                            for p in model.parameters()):
            save_checkpoint(ckpt, model, opt, state, step, run_config, {"schedule_len": schedule_len})
            if keep_last > 1:
                _keep_snapshot(ckpt, step, keep_last)

    try:
        while step < planned:
            i = (step % steps_per_pass) * seq_len
            if i == 0 and step:
                state = _fresh_streams(model, batch_size)  # a new pass over the streams
            x, y = data[:, i : i + seq_len], data[:, i + 1 : i + 1 + seq_len]
            for group in opt.param_groups:
                group["lr"] = learning_rate * cosine_lr(step, schedule_len, warmup)
            model.train()
            if scored:  # the NLL of the targets (the mixture's, with memory), no T x vocab tensor kept
                nll, _, state = net(x, state, targets=y)
                loss = nll.mean()
            else:
                logits, state = net(x, state)
                loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
            state = state.detach()
            opt.zero_grad(set_to_none=True)
            loss.backward()  # under DDP the gradients are averaged over ranks here
            if distributed:  # log the loss of the whole global batch
                loss = loss.detach().clone()
                dist.all_reduce(loss)
                loss /= world
            grad_norm = nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            if not (torch.isfinite(loss) and torch.isfinite(grad_norm)):
                # a non-finite loss or gradient: the update is skipped (weights and optimizer
                # untouched) and counted; too many in a row stops the run with the last good state
                skipped += 1
                consecutive_bad += 1
                if consecutive_bad >= max_bad_steps:
                    raise FloatingPointError(
                        f"training diverged: {consecutive_bad} consecutive steps with a non-finite loss or "
                        f"gradient (last loss {loss.item()}) at step {step}; the last finite checkpoint is kept"
                        + (f" in {ckpt}" if ckpt is not None else "") + "; lower training.learning_rate")
                opt.zero_grad(set_to_none=True)
            else:
                consecutive_bad = 0
                opt.step()
            step += 1
            tokens += y.numel() * world
            elapsed = time.perf_counter() - start_time
            if time_budget_s is not None and max_steps is None and step - first_step == 5:
                schedule_len = max(step + 1, int(time_budget_s / (elapsed / 5)))
            # metrics.jsonl holds only what the seed determines (same config, same file);
            # wall-clock figures go to timing.jsonl
            record = {"step": step, "loss": loss.item(), "lr": opt.param_groups[0]["lr"]}
            if skipped:
                record["skipped_steps"] = skipped
            timing = {"step": step, "tokens_per_s": tokens / elapsed, "elapsed_s": elapsed}
            history["step"].append(step)
            history["loss"].append(record["loss"])
            history["tokens_per_s"].append(timing["tokens_per_s"])
            if valid_ids is not None and eval_every and step % eval_every == 0:
                with _BufferSnapshot(model):
                    record["valid_ppl"] = evaluate_lm(model, valid_ids, batch_size=min(4, batch_size),
                                                      seq_len=seq_len, progress=False)["ppl"]
                history["valid"].append((step, record["valid_ppl"]))
            if metrics is not None:
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
                timings.write(json.dumps(timing) + "\n")
                timings.flush()
            if bar is not None:
                bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{timing['tokens_per_s']:.0f}")
                bar.update(1)
            if checkpoint_every and step % checkpoint_every == 0:
                checkpoint()
            if time_budget_s is not None and elapsed >= time_budget_s:
                break
        checkpoint()
    finally:
        if metrics is not None:
            metrics.close()
            timings.close()
        if bar is not None:
            bar.close()
    history["steps"] = step
    history["tokens"] = tokens
    history["seconds"] = time.perf_counter() - start_time
    if out is not None:
        plot_curves(out / "metrics.jsonl", out / "curves.png")
    return history


# keys a resumed run may change: how long it runs, what it logs and writes, not what it computes
RESUMABLE_CHANGES = frozenset({"max_steps", "time_budget_s", "eval_every", "checkpoint_every", "eval_batch_size",
                               "eval_tokens", "out_dir", "sample_prompt", "max_bad_steps",
                               "keep_last"})


def config_changes(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """``section.key: saved -> now`` for every key that differs between a checkpoint's config and
    this run's, except those a resumed run may change (:data:`RESUMABLE_CHANGES`)."""
    out = []

    def walk(a: Any, b: Any, prefix: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b), key=str):
                if key not in RESUMABLE_CHANGES:
                    walk(a.get(key), b.get(key), f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix[:-1]}: {a!r} -> {b!r}")

    walk(saved, now, "")
    # the run's own arguments repeat the training section's keys at the top level: say each once
    named = {line.split(":", 1)[0] for line in out}
    return [line for line in out if f"training.{line.split(':', 1)[0]}" not in named]


def _keep_snapshot(ckpt: Path, step: int, keep_last: int) -> None:
    """``checkpoints/step-N.safetensors`` for the checkpoint just written; only the newest
    ``keep_last`` stay. Checkpoints are replaced by rename, so a hard link keeps this one's bytes
    after the next is written; the link (or copy) is made under a temporary name, then renamed."""
    import os
    import shutil

    folder = ckpt.parent / "checkpoints"
    folder.mkdir(exist_ok=True)
    target = folder / f"step-{step:08d}.safetensors"
    tmp = folder / f".{target.name}.tmp"
    tmp.unlink(missing_ok=True)
    try:
        os.link(ckpt, tmp)
    except OSError:  # no hard links here: copy
        shutil.copyfile(ckpt, tmp)
    os.replace(tmp, target)
    for old in sorted(folder.glob("step-*.safetensors"))[:-keep_last]:
        old.unlink()


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines written after the checkpoint we resume from."""
    if not path.is_file():
        return
    lines = []
    for ln in path.read_text().splitlines():
        try:
            row = json.loads(ln)
        except json.JSONDecodeError:  # a line torn by a kill mid-write
            continue
        if isinstance(row, dict) and row.get("step", step + 1) <= step:
            lines.append(ln)
    atomic_write(path, lambda tmp: Path(tmp).write_text("".join(ln + "\n" for ln in lines)))


def plot_curves(metrics_path: Path, png_path: Path) -> None:
    """Training loss (and validation perplexity when recorded) against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = []
    for ln in Path(metrics_path).read_text().splitlines():
        try:
            rows.append(json.loads(ln))
        except json.JSONDecodeError:
            continue
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=1, label="train loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    val = [r for r in rows if "valid_ppl" in r]
    if val:
        ax2 = ax.twinx()
        ax2.plot([r["step"] for r in val], [r["valid_ppl"] for r in val], "o-", color="tab:red", label="valid ppl")
        ax2.set_ylabel("valid perplexity")
        ax2.legend(loc="upper center")
    ax.legend(loc="upper right")
    ax.set_title("training curves")
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
