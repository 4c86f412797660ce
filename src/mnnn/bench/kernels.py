"""``mnnn bench kernels``: every fast form against its naive loop, same inputs, same process.
(``tied_nll``'s "naive" form is the composite ``cross_entropy(x @ E.T)`` it replaces.)

For each op and sequence length: max relative error of the outputs (forward) and of the input
gradients (backward through ``sum(out * w)`` with a fixed random ``w``), then the median time of
forward + backward of both forms and the speed-up ``naive / fast``. Every error is measured
before anything is timed (:func:`verify`); one above tolerance fails the check: the JSON records
it with no rows and the suite exits 1.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from mnnn.bench.common import markdown_table, median_time, provenance, write_json
from mnnn.ops import (decay_attention, decay_attention_naive, lif, lif_naive, linear_scan, linear_scan_naive,
                      synaptic_memory, synaptic_memory_naive, window_attention, window_attention_naive)
from mnnn.ops.delta_rule import delta_rule, delta_rule_naive
from mnnn.ops.longconv import long_conv_fft, long_conv_naive
from mnnn.ops.ssm import discretize, s4d_fft, s4d_naive
from mnnn.ops.tied_nll import tied_nll, tied_nll_naive

PRESETS = {
    "default": {"lengths": [256, 1024, 4096], "batch": 4, "dim": 64, "heads": 4, "repeats": 3, "tol": 1e-3},
    "toy": {"lengths": [32], "batch": 2, "dim": 8, "heads": 2, "repeats": 1, "tol": 1e-3},
}


def cases(B: int, T: int, D: int, H: int) -> dict[str, tuple[Callable, Callable, list[torch.Tensor]]]:
    """name -> (fast, naive, inputs); each callable maps the inputs to one output tensor."""
    K = D // H
    g = torch.Generator().manual_seed(T)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).requires_grad_()

    a = torch.rand(B, T, D, generator=g).mul(0.5).add(0.5).requires_grad_()
    decay = torch.rand(B, T, H, generator=g).mul(0.2).add(0.8).requires_grad_()
    gate = torch.rand(B, T, H, generator=g).requires_grad_()
    beta = torch.rand(B, T, H, generator=g).mul(0.9).add(0.05).requires_grad_()
    q, k, v = r(B, T, H, K, scale=K ** -0.5), r(B, T, H, K, scale=K ** -0.5), r(B, T, H, K)
    log_dt, A_re, A_im = torch.randn(D, generator=g) - 2, torch.randn(D, 16, generator=g) * 0.5, torch.randn(D, 16, generator=g)
    Bc, Cc = torch.randn(D, 16, dtype=torch.cfloat, generator=g), torch.randn(D, 16, dtype=torch.cfloat, generator=g)
    Ab, Bb, Cd = discretize(log_dt, A_re, A_im, Bc, Cc)
    Dd = torch.randn(D, generator=g)
    filt = r(min(T, 1024), D, scale=0.05)
    out = {
        "linear_scan": (lambda a, b: linear_scan(a, b)[0], lambda a, b: linear_scan_naive(a, b)[0], [a, r(B, T, D)]),
        "decay_attention": (lambda q, k, v, d: decay_attention(q, k, v, d)[0],
                            lambda q, k, v, d: decay_attention_naive(q, k, v, d)[0], [q, k, v, decay]),
        "synaptic_memory": (lambda q, k, v, gt: synaptic_memory(q, k, v, gt, 0.1, 0.01)[0],
                            lambda q, k, v, gt: synaptic_memory_naive(q, k, v, gt, 0.1, 0.01)[0], [q, k, v, gate]),
        "window_attention(w=64)": (lambda q, k, v: window_attention(q, k, v, 64)[0],
                                   lambda q, k, v: window_attention_naive(q, k, v, 64)[0], [q, k, v]),
        "lif": (lambda c: lif(c)[0], lambda c: lif_naive(c)[0], [r(B, T, D, scale=0.6)]),
        "s4d": (lambda u: s4d_fft(u, Ab, Bb, Cd, Dd)[0], lambda u: s4d_naive(u, Ab, Bb, Cd, Dd)[0], [r(B, T, D)]),
        "long_conv": (long_conv_fft, long_conv_naive, [r(B, T, D), filt]),
        "delta_rule": (lambda q, k, v, b: delta_rule(F.normalize(q, dim=-1), F.normalize(k, dim=-1), v, b)[0],
                       lambda q, k, v, b: delta_rule_naive(F.normalize(q, dim=-1), F.normalize(k, dim=-1), v, b)[0],
                       [q, k, v, beta]),
        "gated_delta_rule": (
            lambda q, k, v, b, d: delta_rule(F.normalize(q, dim=-1), F.normalize(k, dim=-1), v, b, d)[0],
            lambda q, k, v, b, d: delta_rule_naive(F.normalize(q, dim=-1), F.normalize(k, dim=-1), v, b, d)[0],
            [q, k, v, beta, decay]),
    }
    if B * T <= 4096:  # the LM loss at the BERT vocabulary (B*T rows of 30522 logits; larger would not fit)
        targets = torch.randint(0, 30522, (B, T), generator=g)
        out["tied_nll(V=30522)"] = (lambda x, e: tied_nll(x, e, targets), lambda x, e: tied_nll_naive(x, e, targets),
                                    [r(B, T, D), r(30522, D, scale=0.02)])
    return out


def _fwd_bwd(fn, inputs, w):
    for x in inputs:
        x.grad = None
    out = fn(*inputs)
    (out * w).sum().backward()
    return out.detach(), [x.grad.clone() for x in inputs]


def _rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def verify(c: dict[str, Any]) -> dict[str, Any]:
    """The suite's check, before anything is timed: at every length, each fast op's outputs and
    input gradients against its naive loop (relative error <= ``tol``; LIF spikes exactly, its
    gradients pass a threshold and are reported, not bounded)."""
    failures: list[str] = []
    errors: dict[str, list[float]] = {}
    for T in c["lengths"]:
        for name, (fast, naive, inputs) in cases(c["batch"], T, c["dim"], c["heads"]).items():
            w = torch.randn(fast(*inputs).shape, generator=torch.Generator().manual_seed(1))
            out_f, grads_f = _fwd_bwd(fast, inputs, w)
            out_n, grads_n = _fwd_bwd(naive, inputs, w)
            err_out = _rel(out_f, out_n)
            err_grad = max(_rel(gf, gn) for gf, gn in zip(grads_f, grads_n))
            errors[f"{name} T={T}"] = [err_out, err_grad]
            if name != "lif" and max(err_out, err_grad) > c["tol"]:
                failures.append(f"{name} T={T}: fast form differs from the naive loop "
                                f"(outputs {err_out:.2e}, gradients {err_grad:.2e})")
            if name == "lif" and err_out > 0:
                failures.append(f"lif T={T}: spikes differ from the naive loop")
    return {"passed": not failures, "failures": failures, "max_rel_err": errors}


def run(out_dir: str | Path, preset: str = "default", progress: bool = True) -> dict[str, Any]:
    from tqdm.auto import tqdm

    c = PRESETS[preset]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    check = verify(c)
    base = {"suite": "kernels", "preset": preset, "check": check, **provenance(c)}
    if not check["passed"]:
        write_json(out_dir / "kernels.json", {**base, "results": []})
        return {**base, "results": []}
    rows = []
    with tqdm(total=len(check["max_rel_err"]), desc="kernels", disable=not progress) as bar:
        for T in c["lengths"]:
            for name, (fast, naive, inputs) in cases(c["batch"], T, c["dim"], c["heads"]).items():
                w = torch.randn(fast(*inputs).shape, generator=torch.Generator().manual_seed(1))
                err_out, err_grad = check["max_rel_err"][f"{name} T={T}"]
                t_fast, _ = median_time(lambda: _fwd_bwd(fast, inputs, w), repeats=c["repeats"], warmup=1)
                t_naive, _ = median_time(lambda: _fwd_bwd(naive, inputs, w), repeats=c["repeats"], warmup=1)
                rows.append({"op": name, "T": T, "fast_s": t_fast, "naive_s": t_naive, "speedup": t_naive / t_fast,
                             "max_rel_err_out": err_out, "max_rel_err_grad": err_grad})
                bar.update(1)
    payload = {**base, "results": rows, **provenance(c)}
    write_json(out_dir / "kernels.json", payload)
    (out_dir / "kernels.md").write_text(markdown_table(rows, ["op", "T", "fast_s", "naive_s", "speedup",
                                                              "max_rel_err_out", "max_rel_err_grad"]))
    _plot(rows, out_dir / "kernels.png")
    return payload


def _plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for op in dict.fromkeys(r["op"] for r in rows):
        sel = [r for r in rows if r["op"] == op]
        ax.plot([r["T"] for r in sel], [r["speedup"] for r in sel], "o-", label=op)
    ax.axhline(1.0, color="k", ls="--")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length T")
    ax.set_ylabel("speed-up of fast form over naive loop (fwd + bwd)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
