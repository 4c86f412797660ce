"""``mnnn bench cmr``: capture + retrieval + reweave overhead of CMR over the bare model.

GPT-2-architecture models (random weights: the overhead does not depend on them; a small 4 x 256
one and GPT-2 small's geometry, 12 x 768, the seed's example base) read
segments of T tokens; the bare model and CMR (memory of the 2 earlier segments, restored before
every repeat; every retrieval strategy, per token, per segment, per token read by the base's
own attention, "KV read", and per token read into the output distribution, "output read") are
timed on the same segment in the same process, in paired rounds (the bare model, then CMR):
a row's overhead is the median over rounds of CMR's time / the bare model's of the same round. Verification first: an untrained CMR's logits
(zero output projection) and a closed KV read's (memory weight -inf) equal the base model's, and
a closed output read's (gate bias -inf) too.
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
    rows = []
    for name, b in c["bases"].items():
        torch.manual_seed(0)
        base = GPT2LMHeadModel(GPT2Config(vocab_size=b["vocab"], n_positions=max(1024, c["T"]), n_embd=b["n_embd"],
                                          n_layer=b["n_layer"], n_head=b["n_head"], bos_token_id=0,
                                          eos_token_id=0)).eval()
        segs = [torch.randint(0, b["vocab"], (c["batch"], c["T"])) for _ in range(3)]
        def time_base():
            with torch.no_grad():
                return median_time(lambda: base(input_ids=segs[2]), repeats=c["repeats"], warmup=1)[0]

        t_base = time_base()
        rows.append({"base": name, "model": "base", "T": c["T"], "forward_s": t_base, "overhead": 0.0})
        for mode in ("token", "segment", "kv", "output"):
            for strategy in STRATEGIES:
                rows.append({"base": name, **_time_cmr(base, segs, strategy, mode, c)})
    payload = {"suite": "cmr", "preset": preset, "results": rows, **provenance(c)}
    write_json(out_dir / "cmr.json", payload)
    columns = ["base", "model", "T", "forward_s", "base_s", "overhead", "retrieval_ms", "entries"]
    (out_dir / "cmr.md").write_text(markdown_table(rows, columns))
    _plot(rows, out_dir / "cmr.png")
    return payload


def _time_cmr(base, segs, strategy: str, mode: str, c) -> dict[str, Any]:
    """One CMR configuration on segment 3 with the memory of segments 1 and 2 (restored before
    every repeat, so each timed forward reads the same store). ``mode`` 'kv': per-token retrieval
    read by the base's attention (``reconstruction_method='kv_attention'``), checked closed
    (memory weight -inf) and timed open."""
    kv, output = mode == "kv", mode == "output"
    model = CMRModel(base, {"retrieval_strategy": strategy, "retrieval_budget": c["budget"],
                            "retrieval_mode": "token" if kv or output else mode, "similarity_threshold": -1.0,
                            "memory_fusion": "output" if output else "reweave",
                            "reconstruction_method": "kv_attention" if kv else "cross_attention"}).eval()
    with torch.no_grad():
        model(segs[0])
        model(segs[1])
        snapshot = {layer: {k: v.clone() for k, v in d.items()} for layer, d in model.buffer.data.items()}
        summary = {layer: v.clone() for layer, v in model._summary.items()}
        for r in model.kv_readers.values():
            r.bias.fill_(float("-inf"))
        if output:
            open_bias = model.output_read.gate.bias.clone()
            model.output_read.gate.bias.fill_(float("-inf"))
            check = (model(segs[2]).logits - base(input_ids=segs[2]).logits).abs().max().item()
            model.output_read.gate.bias.copy_(open_bias)  # open: lambda at its initial value
        else:
            check = (model(segs[2]).logits - base(input_ids=segs[2]).logits).abs().max().item()
        if check > 1e-5:
            raise AssertionError(f"closed-gate CMR differs from the base model by {check:.2e}")
        for r in model.kv_readers.values():
            r.bias.zero_()  # open: every position reads its retrieved keys and values

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
    entries = sum(d["states"].shape[0] for d in snapshot.values())
    row = {"model": f"cmr/{strategy}" + {"token": "", "segment": " (per segment)", "kv": " (KV read)",
                                               "output": " (output read)"}[mode],
           "T": c["T"],
           "forward_s": statistics.median(t_cmr), "base_s": statistics.median(t_bare),
           "overhead": statistics.median(ratios) - 1.0, "entries": entries, "max_abs_diff_closed_gate": check,
           "retrieval_ms": model.performance_stats()["retrieval_ms_per_segment"]}
    for h in model._handles:
        h.remove()
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
