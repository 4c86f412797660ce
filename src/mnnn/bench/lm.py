"""``mnnn bench lm``: WikiText-2 (BERT tokens) perplexity of S3CMN (memory on and off), the
Text-Native SSMN and Transformer / LSTM baselines of about the same parameter count, each
trained by the same loop for the same wall-clock budget, evaluated on the same valid slice.

The unigram perplexity (fitted on the whole train split) is reported as a floor reference.
Needs ``MNNN_DATA_DIR``; the GPU recipe is the same command with ``--preset gpu`` on a CUDA machine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mnnn.bench.common import markdown_table, provenance, write_json
from mnnn.data.wikitext import load_split, unigram_perplexity
from mnnn.models.lm_baselines import LSTMLM, TransformerLM
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


def build_models(c: dict[str, Any]) -> dict[str, torch.nn.Module]:
    E, H = c["E"], c["H"]
    s3 = dict(embedding_dim=E, hidden_dim=H, num_layers=2, memory_size=2048, d_state=32, max_len=256,
              memory_top_k=8, memory_interval=32)
    return {
        "s3cmn_memory": lambda: S3CMN(**s3),
        "s3cmn_no_memory": lambda: S3CMN(**s3, use_memory=False),
        "text_native_ssmn": lambda: TextNativeSSMN(30522, embed_dim=E, hidden_dim=H, window_size=128,
                                                   num_layers=3, plastic_ratio=0.34, num_heads=4),
        "transformer": lambda: TransformerLM(30522, d_model=E, num_layers=3, num_heads=4, max_len=512),
        "lstm": lambda: LSTMLM(30522, embed_dim=E, hidden_dim=int(1.25 * H)),
    }


def run(out_dir: str | Path, preset: str = "default", progress: bool = True) -> dict[str, Any]:
    c = PRESETS[preset]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train, valid = load_split("train"), load_split("valid")
    if c["valid_tokens"]:
        valid = valid[: c["valid_tokens"]]
    rows = [{"model": "unigram (whole train split)", "valid_ppl": unigram_perplexity(train, valid)}]
    curves = {}
    for name, make in build_models(c).items():
        torch.manual_seed(0)
        model = make()
        n_params = sum(p.numel() for p in model.parameters())
        hist = train_lm(model, train, batch_size=c["batch_size"], seq_len=c["seq_len"], learning_rate=c["lr"],
                        time_budget_s=c["budget_s"], progress=progress)
        ev = evaluate_lm(model, valid, batch_size=4, seq_len=c["seq_len"])
        row = {"model": name, "params": n_params, "steps": hist["steps"], "train_tokens": hist["tokens"],
               "train_tokens_per_s": hist["tokens"] / hist["seconds"], "valid_ppl": ev["ppl"]}
        if isinstance(model, S3CMN):
            stats = model.get_stats()
            row.update(memory_hit_rate=stats["memory_hit_rate"], retrieval_accuracy=stats["retrieval_accuracy"],
                       spike_rate=stats["spike_rate"])
        rows.append(row)
        curves[name] = hist["loss"]
    payload = {"suite": "lm", "preset": preset, "results": rows, "valid_tokens": len(valid), **provenance(c)}
    write_json(out_dir / "lm.json", payload)
    (out_dir / "lm.md").write_text(markdown_table(rows, ["model", "params", "steps", "train_tokens_per_s",
                                                         "valid_ppl", "memory_hit_rate", "retrieval_accuracy",
                                                         "spike_rate"]))
    _plot(curves, out_dir / "lm.png")
    return payload


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
