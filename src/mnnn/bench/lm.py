"""``mnnn bench lm``: WikiText-2 (BERT tokens) perplexity of S3CMN, the Text-Native SSMN and
Transformer / LSTM baselines of about the same parameter count, with and without the output
memory, each trained by the same loop for the same wall-clock budget, evaluated on the same valid
slice. A model with the memory is reported twice from one checkpoint and one pass: memory on,
and memory off (its own LM distribution). The Transformer's context is its segment (seq_len
tokens, no state across segments); the recurrent models carry their state across segments.

The unigram perplexity (fitted on the whole train split) is reported as a floor reference.
Needs ``MNNN_DATA_DIR``; the GPU recipe is the same command with ``--preset gpu`` on a CUDA machine.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from mnnn.bench.common import markdown_table, provenance, write_json
from mnnn.bench.switches import fast_weights_off
from mnnn.data.wikitext import load_split, unigram_perplexity
from mnnn.models.lm_baselines import LSTMLM, TransformerLM
from mnnn.models.memory_lm import OutputMemoryLM
from mnnn.models.s3cmn import S3CMN
from mnnn.models.ssmn import TextNativeSSMN
from mnnn.training.lm import evaluate_lm, train_lm

PRESETS = {
    "default": {"budget_s": 150, "batch_size": 16, "seq_len": 128, "lr": 3e-3, "valid_tokens": 50_000,
                "E": 128, "H": 256},
    "toy": {"budget_s": 2, "batch_size": 2, "seq_len": 16, "lr": 3e-3, "valid_tokens": 600, "E": 16, "H": 16},
    "gpu": {"budget_s": 1800, "batch_size": 64, "seq_len": 256, "lr": 1e-3, "valid_tokens": None, "E": 256,
            "H": 512},
}


def build_models(c: dict[str, Any]) -> dict[str, Any]:
    E, H = c["E"], c["H"]
    s3 = dict(embedding_dim=E, hidden_dim=H, num_layers=2, memory_size=2048, d_state=32, max_len=256,
              memory_top_k=32)
    mem = dict(memory_size=2048, memory_top_k=32)
    ssmn = dict(embed_dim=E, hidden_dim=H, window_size=128, num_layers=3, plastic_ratio=0.34, num_heads=4)
    return {
        "s3cmn": lambda: S3CMN(**s3),
        "transformer": lambda: TransformerLM(30522, d_model=E, num_layers=3, num_heads=4, max_len=512),
        "transformer + memory": lambda: OutputMemoryLM(
            TransformerLM(30522, d_model=E, num_layers=3, num_heads=4, max_len=512), **mem),
        "lstm": lambda: LSTMLM(30522, embed_dim=E, hidden_dim=int(1.25 * H)),
        "lstm + memory": lambda: OutputMemoryLM(LSTMLM(30522, embed_dim=E, hidden_dim=int(1.25 * H)), **mem),
        # the default plasticity rule (delta) and the seed's Hebbian rule on one architecture
        "text_native_ssmn": lambda: TextNativeSSMN(30522, **ssmn),
        "text_native_ssmn (hebbian)": lambda: TextNativeSSMN(30522, **ssmn, plasticity_rule="hebbian"),
    }


def verify(models: dict[str, Any], vocab: int = 30522) -> dict[str, Any]:
    """Checks that can fail, on a fresh copy of every model, before anything is timed:

    - causality: changing token j changes no output before j;
    - memory path: for a model with a memory switch, memory on and off give different outputs on a
      sequence that repeats (the memory is read), and equal outputs with the switch off (it is a
      switch, not a second model)."""
    failures = []
    gen = torch.Generator().manual_seed(0)
    seg = torch.randint(0, vocab, (2, 16), generator=gen)
    tok = torch.cat([seg, seg, seg], dim=1)
    for name, make in models.items():
        torch.manual_seed(0)
        model = make().eval()
        with torch.no_grad():
            ref, _ = model(tok)
            j = 30
            changed = tok.clone()
            changed[:, j] = (changed[:, j] + 1) % vocab
            out, _ = model(changed)
            leak = float((out[:, :j] - ref[:, :j]).abs().max())
            if leak > 1e-4:
                failures.append(f"{name}: output before position {j} changed by {leak:.2e} (future leak)")
            if hasattr(model, "set_memory_enabled") and getattr(model, "has_output_memory", False):
                model.set_memory_enabled(False)
                off, _ = model(tok)
                model.set_memory_enabled(True)
                lm = torch.log_softmax(model.head(model.features(tok)[0]), -1)
                if float((off - lm).abs().max()) > 1e-4:
                    failures.append(f"{name}: memory off is not the model without its memory")
                if float((off - ref).abs().max()) < 1e-6:
                    failures.append(f"{name}: the memory path changes nothing (memory on == off)")
    return {"passed": not failures, "failures": failures,
            "checks": ["causality (token 30 changed)", "memory path: on != off, off == LM alone"]}


def run(out_dir: str | Path, preset: str = "default", progress: bool = True) -> dict[str, Any]:
    c = PRESETS[preset]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    models = build_models(c)
    check = verify(models)
    if not check["passed"]:
        payload = {"suite": "lm", "preset": preset, "results": [], "check": check, **provenance(c)}
        write_json(out_dir / "lm.json", payload)
        return payload
    train, valid = load_split("train"), load_split("valid")
    if c["valid_tokens"]:
        valid = valid[: c["valid_tokens"]]
    rows = [{"model": "unigram (whole train split)", "valid_ppl": unigram_perplexity(train, valid)}]
    curves = {}
    for name, make in models.items():
        torch.manual_seed(0)
        model = make()
        n_params = sum(p.numel() for p in model.parameters())
        hist = train_lm(model, train, batch_size=c["batch_size"], seq_len=c["seq_len"], learning_rate=c["lr"],
                        time_budget_s=c["budget_s"], progress=progress)
        t0 = time.perf_counter()
        ev = evaluate_lm(model, valid, batch_size=c["batch_size"], seq_len=c["seq_len"])
        eval_s = time.perf_counter() - t0
        base = {"params": n_params, "steps": hist["steps"], "train_tokens": hist["tokens"],
                "train_tokens_per_s": hist["tokens"] / hist["seconds"], "eval_tokens_per_s": ev["tokens"] / eval_s}
        memory = getattr(model, "has_output_memory", False)
        row = {"model": name + (" (memory on)" if memory else ""), **base, "valid_ppl": ev["ppl"]}
        if hasattr(model, "get_stats"):
            stats = model.get_stats()
            row.update({k: stats[k] for k in ("memory_hit_rate", "memory_hit_rate_chance", "retrieval_accuracy",
                                               "retrieval_accuracy_chance", "mean_lambda", "spike_rate")
                        if k in stats})
            if "output_memory" in stats:
                row.update(theta=stats["output_memory"]["theta"], top_k=stats["output_memory"]["top_k"])
        rows.append(row)
        if memory:  # the same checkpoint with the memory switched off (same pass: exact)
            rows.append({"model": name + " (memory off)", **base, "valid_ppl": ev["ppl_no_memory"]})
        if isinstance(model, TextNativeSSMN):  # the same checkpoint, fast-weight writes switched off
            with fast_weights_off(model.core):
                off = evaluate_lm(model, valid, batch_size=c["batch_size"], seq_len=c["seq_len"])
            rows[-1]["model"] = name + " (fast weights on)"
            rows.append({"model": name + " (fast weights off)", **base, "valid_ppl": off["ppl"]})
        curves[name] = hist["loss"]
    payload = {"suite": "lm", "preset": preset, "results": rows, "valid_tokens": len(valid), "check": check,
               **provenance(c)}
    write_json(out_dir / "lm.json", payload)
    (out_dir / "lm.md").write_text(markdown_table(rows, COLUMNS))
    _plot(curves, out_dir / "lm.png")
    return payload


COLUMNS = ["model", "params", "steps", "train_tokens_per_s", "eval_tokens_per_s", "valid_ppl", "memory_hit_rate",
           "memory_hit_rate_chance", "retrieval_accuracy", "retrieval_accuracy_chance", "mean_lambda", "theta",
           "spike_rate"]


def _plot(curves, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, loss in curves.items():
        ax.plot(range(1, len(loss) + 1), loss, label=name, lw=1)
    ax.set_xlabel("training step")
    ax.set_ylabel("training loss (nats / token)")
    ax.set_title("WikiText-2, same wall-clock budget per model")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
