"""``mnnn bench memory``: Memory.get_memory throughput vs faiss IndexFlatIP, and SpikingLayer's
fused LIF loop vs snnTorch's Leaky loop (forward + backward).

Verification first: mnnn's top-k equals brute force at each size before that size is timed; the
LIF spikes equal snnTorch's before either loop is timed. A failure is recorded in the JSON's
``check`` with no rows and the suite exits 1. faiss and snnTorch are optional: a missing one is
reported, not faked (faiss's agreement with mnnn's top-k is reported beside its timing).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from mnnn.bench.common import markdown_table, median_time, provenance, write_json
from mnnn.memory import Memory
from mnnn.ops.lif import lif

PRESETS = {
    "default": {"sizes": [10_000, 100_000, 1_000_000], "dim": 128, "queries": 256, "top_k": 5,
                "repeats": 5, "lif": {"batch": 32, "steps": 256, "features": 512, "repeats": 5}},
    "toy": {"sizes": [1000], "dim": 32, "queries": 16, "top_k": 5, "repeats": 1,
            "lif": {"batch": 2, "steps": 16, "features": 8, "repeats": 1}},
}


def _memory_rows(cfg, progress, failures: list[str]) -> list[dict[str, Any]]:
    """Per store size: the top-k check, then (if it passed) the timings. A failed check is appended
    to ``failures`` and stops the sizes that follow."""
    try:
        import faiss
    except ImportError:
        faiss = None
    rows = []
    d = cfg["dim"]
    for n in cfg["sizes"]:
        torch.manual_seed(0)
        keys = F.normalize(torch.randn(n, d), dim=1)
        q = F.normalize(torch.randn(cfg["queries"], d), dim=1)
        mem = Memory(n, d, compressed_dim=d, quantize=False, value_dim=1)
        with torch.no_grad():
            mem.proj.weight.copy_(torch.eye(d) * math.sqrt(math.sqrt(d)))  # scores = q . k exactly
        mem.add_to_memory(keys, torch.arange(n))
        with torch.no_grad():
            ours = mem.search(q, cfg["top_k"]).indices
            brute = (q @ keys.T).topk(cfg["top_k"], dim=1).indices
        agree = float((ours == brute).float().mean())
        if agree < 0.99:
            failures.append(f"Memory top-k disagrees with brute force at n={n} ({agree:.3f} of the indices agree)")
            return rows

        def read():
            with torch.no_grad():
                mem.get_memory(q, cfg["top_k"])

        t_ours, _ = median_time(read, repeats=cfg["repeats"], warmup=1)
        row = {"n_entries": n, "dim": d, "queries": cfg["queries"], "mnnn_s": t_ours,
               "mnnn_qps": cfg["queries"] / t_ours, "topk_agreement_bruteforce": agree}
        if faiss is not None:
            index = faiss.IndexFlatIP(d)
            index.add(keys.numpy())
            qn = q.numpy()
            _, fidx = index.search(qn, cfg["top_k"])
            row["topk_agreement_faiss"] = float((torch.from_numpy(fidx) == ours).float().mean())
            t_faiss, _ = median_time(lambda: index.search(qn, cfg["top_k"]), repeats=cfg["repeats"], warmup=1)
            row.update(faiss_s=t_faiss, faiss_qps=cfg["queries"] / t_faiss, speed_vs_faiss=t_faiss / t_ours)
        rows.append(row)
        del mem, keys
    return rows


def _leaky_loop(leaky, current: torch.Tensor) -> torch.Tensor:
    """snnTorch's Leaky stepped over ``current [B, T, F]``: the spikes ``[B, T, F]``."""
    mem = leaky.init_leaky()
    out = []
    for t in range(current.shape[1]):
        s, mem = leaky(current[:, t], mem)
        out.append(s)
    return torch.stack(out, 1)


def _lif_row(cfg, failures: list[str]) -> dict[str, Any]:
    """The LIF loop against snnTorch's (when installed): spikes compared first, then both timed."""
    c = cfg["lif"]
    torch.manual_seed(0)
    current = torch.randn(c["batch"], c["steps"], c["features"]) * 0.8
    row: dict[str, Any] = {"batch": c["batch"], "steps": c["steps"], "features": c["features"]}

    def ours():
        x = current.clone().requires_grad_()
        s, _, _ = lif(x)
        s.sum().backward()

    try:
        import snntorch as snn
    except ImportError:
        leaky = None
        row["snntorch"] = "not installed"
    else:
        leaky = snn.Leaky(beta=0.95, threshold=1.0, spike_grad=snn.surrogate.fast_sigmoid(slope=25))
        with torch.no_grad():
            row["max_abs_diff_vs_snntorch"] = float((lif(current)[0] - _leaky_loop(leaky, current)).abs().max())
        if row["max_abs_diff_vs_snntorch"] > 1e-6:
            failures.append(f"LIF spikes differ from snnTorch's (max abs {row['max_abs_diff_vs_snntorch']:.2e})")
            return row
    row["mnnn_s"], _ = median_time(ours, repeats=c["repeats"], warmup=1)
    if leaky is not None:
        def theirs():
            _leaky_loop(leaky, current.clone().requires_grad_()).sum().backward()

        row["snntorch_s"], _ = median_time(theirs, repeats=c["repeats"], warmup=1)
        row["speedup_vs_snntorch"] = row["snntorch_s"] / row["mnnn_s"]
    return row


def run(out_dir: str | Path, preset: str = "default", progress: bool = True) -> dict[str, Any]:
    cfg = PRESETS[preset]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    failures: list[str] = []
    memory_rows = _memory_rows(cfg, progress, failures)
    lif_row = _lif_row(cfg, failures) if not failures else {}
    check = {"passed": not failures, "failures": failures,
             "checks": ["Memory top-k == brute force (>= 0.99 of the indices) at each size before it is timed",
                        "LIF spikes == snnTorch's Leaky (when installed) before either is timed"]}
    base = {"suite": "memory", "preset": preset, "check": check, **provenance(cfg)}
    if failures:
        write_json(out_dir / "memory.json", {**base, "results": []})
        return {**base, "results": []}
    results = [{"kind": "get_memory", **r} for r in memory_rows] + [{"kind": "lif_fwd_bwd", **lif_row}]
    payload = {**base, "results": results}
    write_json(out_dir / "memory.json", payload)
    table = markdown_table([{"kind": "get_memory", **r} for r in memory_rows],
                           ["kind", "n_entries", "mnnn_qps", "faiss_qps", "speed_vs_faiss"])
    table += "\n" + markdown_table([{"kind": "lif_fwd_bwd", **lif_row}],
                                   ["kind", "batch", "steps", "features", "mnnn_s", "snntorch_s", "speedup_vs_snntorch"])
    (out_dir / "memory.md").write_text(table)
    _plot(memory_rows, out_dir / "memory.png")
    return payload


def _plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    n = [r["n_entries"] for r in rows]
    ax.loglog(n, [r["mnnn_qps"] for r in rows], "o-", label="mnnn Memory.get_memory")
    if all("faiss_qps" in r for r in rows):
        ax.loglog(n, [r["faiss_qps"] for r in rows], "s--", label="faiss IndexFlatIP")
    ax.set_xlabel("entries")
    ax.set_ylabel("queries / s")
    ax.set_title("Exact top-k retrieval throughput")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
