"""``mnnn bench cmr``: capture + retrieval + reweave overhead of CMR over the bare model.

GPT-2-architecture models (random weights: the overhead does not depend on them; a small 4 x 256
one and GPT-2 small's geometry, 12 x 768, the seed's example base) read
segments of T tokens; the bare model and CMR (memory of the 2 earlier segments, restored before
every repeat; every retrieval strategy, per token, per segment, per token read by the base's
own attention, "KV read", and per token read into the output distribution, "output read") are
timed on the same segment in the same process, in paired rounds (the bare model, then CMR):
a row's overhead is the median over rounds of CMR's time / the bare model's of the same round.

Verification first, for every base and configuration before anything is timed: an untrained
CMR's logits (zero output projection), a closed KV read's (memory weight -inf) and a closed
output read's (gate bias -inf), each reading its memory, equal the base model's within 1e-5. A
failure is written into ``cmr.json``'s ``check`` with no timings, and the suite exits 1.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import torch

from mnnn.bench.common import markdown_table, median_time, provenance, write_json
from mnnn.memory.retrieval import STRATEGIES
from mnnn.models.cmr import CMRModel

PRESETS = {
    "default": {"T": 512, "batch": 1, "repeats": 7, "budget": 32,
                "bases": {"4x256": {"n_embd": 256, "n_layer": 4, "n_head": 4, "vocab": 30522},
                          "gpt2-small": {"n_embd": 768, "n_layer": 12, "n_head": 12, "vocab": 50257}}},
    "toy": {"T": 32, "batch": 1, "repeats": 1, "budget": 4,
            "bases": {"toy": {"n_embd": 32, "n_layer": 2, "n_head": 2, "vocab": 100}}},
}


def run(out_dir: str | Path, preset: str = "default", progress: bool = True) -> dict[str, Any]:
    from transformers import GPT2Config, GPT2LMHeadModel

    c = PRESETS[preset]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    bases = {}
    for name, b in c["bases"].items():
        torch.manual_seed(0)
        base = GPT2LMHeadModel(GPT2Config(vocab_size=b["vocab"], n_positions=max(1024, c["T"]), n_embd=b["n_embd"],
                                          n_layer=b["n_layer"], n_head=b["n_head"], bos_token_id=0,
                                          eos_token_id=0)).eval()
        bases[name] = base, [torch.randint(0, b["vocab"], (c["batch"], c["T"])) for _ in range(3)]
    configs = [(mode, strategy) for mode in ("token", "segment", "kv", "output") for strategy in STRATEGIES]
    # verification first, for every base and configuration, before anything is timed
    closed, failures = {}, []
    for name, (base, segs) in bases.items():
        for mode, strategy in configs:
            model = _with_memory(base, segs, strategy, mode, c, closed=True)
            closed[name, mode, strategy] = diff = _closed_gate_diff(model, base, segs[2])
            model.remove_hooks()
            if not diff <= 1e-5:
                failures.append(f"{name} {_label(strategy, mode)}: closed-gate CMR differs from the base model "
                                f"by {diff:.2e} (at most 1e-5)")
    check = {"passed": not failures, "failures": failures,
             "checks": ["closed-gate CMR (zero output projection, KV memory weight -inf, output gate -inf) == "
                        "the base model's logits, every base and configuration"]}
    if failures:
        payload = {"suite": "cmr", "preset": preset, "check": check, "results": [], **provenance(c)}
        write_json(out_dir / "cmr.json", payload)
        return payload
    rows = []
    for name, (base, segs) in bases.items():
        def time_base():
            with torch.no_grad():
                return median_time(lambda: base(input_ids=segs[2]), repeats=c["repeats"], warmup=1)[0]

        t_base = time_base()
        rows.append({"base": name, "model": "base", "T": c["T"], "forward_s": t_base, "overhead": 0.0})
        for mode, strategy in configs:
            row = _time_cmr(base, segs, strategy, mode, c)
            rows.append({"base": name, **row, "max_abs_diff_closed_gate": closed[name, mode, strategy]})
    payload = {"suite": "cmr", "preset": preset, "check": check, "results": rows, **provenance(c)}
    write_json(out_dir / "cmr.json", payload)
    columns = ["base", "model", "T", "forward_s", "base_s", "overhead", "retrieval_ms", "entries"]
    (out_dir / "cmr.md").write_text(markdown_table(rows, columns))
    _plot(rows, out_dir / "cmr.png")
    return payload


def _label(strategy: str, mode: str) -> str:
    return f"cmr/{strategy}" + {"token": "", "segment": " (per segment)", "kv": " (KV read)",
                                "output": " (output read)"}[mode]


def _with_memory(base, segs, strategy: str, mode: str, c, closed: bool = False):
    """An untrained CMR of one configuration holding the memory of segments 1 and 2.

    Its reads are open as built (KV memory weight 0, output gate at its initial value; the
    reweaving's output projection is zero, which does not change its cost); ``closed``: closed
    after the writes (KV memory weight -inf, output gate bias -inf). ``mode`` 'kv': per-token
    retrieval read by the base's attention (``reconstruction_method='kv_attention'``); 'output':
    per-token retrieval read into the output distribution."""
    kv, output = mode == "kv", mode == "output"
    model = CMRModel(base, {"retrieval_strategy": strategy, "retrieval_budget": c["budget"],
                            "retrieval_mode": "token" if kv or output else mode, "similarity_threshold": -1.0,
                            "memory_fusion": "output" if output else "reweave",
                            "reconstruction_method": "kv_attention" if kv else "cross_attention"}).eval()
    with torch.no_grad():
        model(segs[0])
        model(segs[1])
        if closed:
            for r in model.kv_readers.values():
                r.bias.fill_(float("-inf"))
            if output:
                model.output_read.gate.bias.fill_(float("-inf"))
    return model


@torch.no_grad()
def _closed_gate_diff(model: CMRModel, base, seg: torch.Tensor) -> float:
    """Largest |logit difference| between a closed CMR (reading its memory) and the bare base."""
    return (model(seg).logits - base(input_ids=seg).logits).abs().max().item()


def _time_cmr(base, segs, strategy: str, mode: str, c) -> dict[str, Any]:
    """One CMR configuration on segment 3 with the memory of segments 1 and 2 (restored before
    every repeat, so each timed forward reads the same store), its reads open."""
    model = _with_memory(base, segs, strategy, mode, c)
    snapshot = {layer: {k: v.clone() for k, v in d.items()} for layer, d in model.buffer.data.items()}
    summary = {layer: v.clone() for layer, v in model._summary.items()}
    with torch.no_grad():
        def segment():
            for layer, d in snapshot.items():
                model.buffer.replace(layer, d)  # a new version: no cache carries over between repeats
            model._summary = {layer: v.clone() for layer, v in summary.items()}
            model.segment = 2
            model(segs[2])

        def bare():  # the base model alone (CMR's hooks are attached but idle: a few Python calls)
            base(input_ids=segs[2])

        model.reset_stats()
        bare(), segment()  # both sides warm
        # paired rounds, bare then CMR: the overhead is the median of the per-round ratios, so a
        # drift of this shared machine's speed during the run lands on both sides of each ratio
        t_cmr, t_bare = [], []
        for _ in range(c["repeats"]):
            for fn, times in ((bare, t_bare), (segment, t_cmr)):
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
        ratios = [a / b for a, b in zip(t_cmr, t_bare)]
    row = {"model": _label(strategy, mode), "T": c["T"],
           "forward_s": statistics.median(t_cmr), "base_s": statistics.median(t_bare),
           "overhead": statistics.median(ratios) - 1.0,
           "entries": sum(d["states"].shape[0] for d in snapshot.values()),
           "retrieval_ms": model.performance_stats()["retrieval_ms_per_segment"]}
    model.remove_hooks()
    return row


def _plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 0.3 * len(rows) + 1.5))
    ax.barh([f"{r['base']}: {r['model']}" for r in rows], [100 * r["overhead"] for r in rows])
    ax.axvline(10, color="tab:red", ls="--", label="goal: 10 %")
    ax.set_xlabel("overhead over the bare model (%)")
    ax.set_ylabel("base: model")
    ax.set_title("CMR forward overhead per segment")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
