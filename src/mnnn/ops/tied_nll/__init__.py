"""Next-token NLL through a tied output layer, without keeping the ``[N, vocab]`` tensors.

    nll_i = logsumexp_w (x_i . e_w) - x_i . e_{y_i}         x: [..., E], e: [V, E], y: [...]

* :func:`tied_nll_naive` — ``F.cross_entropy(x @ e.T, y)`` per position (reference).
* :func:`tied_nll` — one autograd Function: the forward keeps the logits in a workspace and
  returns the NLL; the backward turns that workspace into ``g * (softmax - onehot)`` in place and
  multiplies it back. The composite path allocates four ``N x vocab`` tensors per training step
  (logits, log-softmax, the gather's zero-filled gradient, the log-softmax gradient); on a CPU
  each fresh allocation of that size is paid again in page faults (~0.1 s per 250 MB here). On
  CPU the workspace comes from a small pool and is reused by the next call once the backward (or
  an inference-only forward) is done with it. Outputs and gradients equal the reference.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

_POOL: list[torch.Tensor] = []  # free flat CPU workspaces, at most _POOL_SIZE
_POOL_SIZE = 2
_LOCK = threading.Lock()
_ROWS = 128  # rows per block of the log-sum-exp


def _take(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if device.type == "cpu":
        with _LOCK:
            for i, buf in enumerate(_POOL):
                if buf.dtype == dtype and buf.numel() >= n:
                    return _POOL.pop(i)[:n]
    return torch.empty(n, dtype=dtype, device=device)


def _give(buf: torch.Tensor) -> None:
    if buf.device.type != "cpu":
        return
    base = buf._base if buf._base is not None else buf
    with _LOCK:
        _POOL.append(base)
        if len(_POOL) > _POOL_SIZE:
            del _POOL[min(range(len(_POOL)), key=lambda i: _POOL[i].numel())]


class _TiedNLL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, feats, weight, targets, keep):
        N, V = feats.shape[0], weight.shape[0]
        logits = torch.mm(feats, weight.T, out=_take(N * V, feats.dtype, feats.device).view(N, V))
        # in row blocks: logsumexp's temporaries stay small enough to be reused, not page-faulted
        lse = torch.cat([torch.logsumexp(block, dim=-1) for block in logits.split(_ROWS)])
        nll = lse - logits.gather(1, targets[:, None])[:, 0]
        if keep:  # a backward will come: the workspace becomes the logits' gradient
            ctx.save_for_backward(feats, weight, targets, lse)
            ctx.logits = logits
        else:
            _give(logits)
        return nll

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        feats, weight, targets, lse = ctx.saved_tensors
        p, ctx.logits = ctx.logits, None
        if p is None:  # a second backward through a retained graph: the workspace is spent, recompute
            p = feats @ weight.T
        p.sub_(lse[:, None]).exp_().mul_(grad[:, None])  # g * softmax
        p.scatter_add_(1, targets[:, None], -grad[:, None])  # - g * onehot
        g_feats = p @ weight if ctx.needs_input_grad[0] else None
        g_weight = p.T @ feats if ctx.needs_input_grad[1] else None
        _give(p)
        return g_feats, g_weight, None, None


def _check(feats: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> None:
    if weight.dim() != 2 or feats.shape[-1] != weight.shape[1]:
        raise ValueError(f"feats [..., E] and weight [V, E] must share E, got {tuple(feats.shape)} and "
                         f"{tuple(weight.shape)}")
    if targets.shape != feats.shape[:-1]:
        raise ValueError(f"targets must have shape {tuple(feats.shape[:-1])}, got {tuple(targets.shape)}")
    if targets.dtype not in (torch.long, torch.int32, torch.int64):
        raise TypeError(f"targets must be integer token ids, got {targets.dtype}")


def tied_nll_naive(feats: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Reference: ``nll [...]`` of ``targets [...]`` under ``softmax(feats @ weight.T)``."""
    _check(feats, weight, targets)
    logits = feats @ weight.T
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1).long(),
                           reduction="none").view(targets.shape)


def tied_nll(feats: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Same contract as :func:`tied_nll_naive`. Half-precision inputs take the reference path in
    float32 (a log-sum-exp over the vocabulary in half precision loses the small terms)."""
    _check(feats, weight, targets)
    if feats.dtype not in (torch.float32, torch.float64) or weight.dtype != feats.dtype:
        return tied_nll_naive(feats.float(), weight.float(), targets)
    flat = feats.reshape(-1, feats.shape[-1])
    keep = torch.is_grad_enabled() and (feats.requires_grad or weight.requires_grad)
    return _TiedNLL.apply(flat, weight, targets.reshape(-1).long(), keep).view(targets.shape)


__all__ = ["tied_nll", "tied_nll_naive"]
