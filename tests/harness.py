"""Shared checks for every stateful module (the contract of docs/architecture.md, section 2)."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from mnnn.state import step_through


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| (absolute when b is zero)."""
    a, b = (torch.view_as_real(t.detach().cdouble()) if t.is_complex() else t.detach().double()
            for t in (a, b))
    denom = b.norm()
    return float((a - b).norm() / (denom if denom > 0 else 1.0))


def _grads(module: nn.Module, x: torch.Tensor, run: Callable, upstream: torch.Tensor):
    module.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    y = run(x)
    (y * upstream).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}
    return y.detach(), x.grad.detach().clone(), grads


def run_whole(module):
    return lambda x: module(x)[0]


def run_chunks(module, splits: Sequence[int]):
    def run(x):
        state, outs, start = None, [], 0
        for end in list(splits) + [x.shape[1]]:
            y, state = module(x[:, start:end], state)
            outs.append(y)
            start = end
        return torch.cat(outs, dim=1)

    return run


def run_steps(module):
    return lambda x: step_through(module, x)[0]


def check_streaming(module: nn.Module, x: torch.Tensor, splits: Sequence[int] = (1, 7, 20),
                    tol: float = 1e-5) -> None:
    """whole == chunks (state carried) == step by step, in outputs, input gradients and
    parameter gradients, for a random upstream gradient."""
    torch.manual_seed(1234)
    out_shape = module(x)[0].shape
    upstream = torch.randn(out_shape, dtype=x.dtype)
    ref_y, ref_gx, ref_gp = _grads(module, x, run_whole(module), upstream)
    for label, run in (("chunks", run_chunks(module, splits)), ("steps", run_steps(module))):
        y, gx, gp = _grads(module, x, run, upstream)
        assert rel_err(y, ref_y) < tol, f"{label}: outputs differ ({rel_err(y, ref_y):.2e})"
        assert rel_err(gx, ref_gx) < tol, f"{label}: input grads differ ({rel_err(gx, ref_gx):.2e})"
        assert gp.keys() == ref_gp.keys(), f"{label}: different parameters received gradients"
        for name in ref_gp:
            err = rel_err(gp[name], ref_gp[name])
            assert err < tol, f"{label}: grad of {name} differs ({err:.2e})"


def check_against_reference(fast: Callable, ref: Callable, inputs: Sequence[torch.Tensor],
                            tol: float = 1e-5) -> None:
    """A fast form equals its naive reference in every output and in the gradients of every
    input, for random upstream gradients."""
    torch.manual_seed(4321)

    def run(fn):
        leaves = [t.detach().clone().requires_grad_(t.is_floating_point() or t.is_complex()) for t in inputs]
        outs = fn(*leaves)
        outs = outs if isinstance(outs, tuple) else (outs,)
        return leaves, outs

    leaves_r, outs_r = run(ref)
    ups = [torch.randn_like(o) for o in outs_r]
    loss = sum((o * u).real.sum() if o.is_complex() else (o * u).sum() for o, u in zip(outs_r, ups))
    loss.backward()
    leaves_f, outs_f = run(fast)
    loss = sum((o * u).real.sum() if o.is_complex() else (o * u).sum() for o, u in zip(outs_f, ups))
    loss.backward()
    for i, (of, orf) in enumerate(zip(outs_f, outs_r)):
        assert rel_err(of, orf) < tol, f"output {i} differs ({rel_err(of, orf):.2e})"
    for i, (lf, lr) in enumerate(zip(leaves_f, leaves_r)):
        if lr.grad is not None or lf.grad is not None:
            # an input the fast form never touches (e.g. the decay at T=1) gets no grad: zero
            gf = torch.zeros_like(lr.grad) if lf.grad is None else lf.grad
            gr = torch.zeros_like(lf.grad) if lr.grad is None else lr.grad
            assert rel_err(gf, gr) < tol, f"grad of input {i} differs ({rel_err(gf, gr):.2e})"


@torch.no_grad()
def greedy_reference(model, prompt: list[int], n: int) -> list[int]:
    """Greedy continuation by a token LM's own forward: the prompt once, then one token per step
    with the state carried (stateless models re-read prompt + output)."""
    logits, state = model(torch.tensor([prompt]), model.init_state(1))
    out: list[int] = []
    for _ in range(n):
        out.append(int(logits[0, -1].argmax()))
        stateless = type(state).__name__ == "NoState"
        logits, state = model(torch.tensor([prompt + out] if stateless else [[out[-1]]]), state)
    return out
