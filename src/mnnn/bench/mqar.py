"""``mnnn bench mqar``: multi-query associative recall (zoology's task, generated locally).

Every model of :mod:`mnnn.bench.token_tasks` is trained per (seq_len, kv pairs, d_model) on the
same examples and scored on held-out ones (accuracy at the queried values only). Accuracy is
plotted against d_model and against the recurrent state size (the Transformer's: its KV cache).

Recipes: ``default`` is CPU-sized: vocabulary 2048 instead of 8192 (the tied 8192-way output
layer is ~90 % of a step here), 8k examples x 3 epochs, (64, 4) and (128, 8) at d_model 64;
``gpu`` is zoology's (100k train / 3k test examples per configuration, 64 epochs, d_model 64-256).
The sanity check of the task and trainer is the Transformer on (64, 4) at d_model 64.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mnnn.bench import token_tasks as tt
from mnnn.bench.common import markdown_table, provenance, write_json
from mnnn.data.tasks import mqar

PRESETS = {
    "default": {"configs": [[64, 4], [128, 8]], "d_models": [64], "vocab": 2048, "train": 8000, "test": 500,
                "epochs": 3, "batch": 64, "lr": 3e-3, "window": 16, "models": list(tt.MODELS)},
    "gpu": {"configs": [[64, 4], [128, 8], [256, 16]], "d_models": [64, 128, 256], "vocab": 8192,
            "train": 100_000, "test": 3_000, "epochs": 64, "batch": 64, "lr": 1e-3, "window": 16,
            "models": list(tt.MODELS)},
    "toy": {"configs": [[16, 2]], "d_models": [16], "vocab": 64, "train": 64, "test": 32, "epochs": 1,
            "batch": 32, "lr": 3e-3, "window": 4, "models": list(tt.MODELS)},
}


def run(out_dir: str | Path, preset: str = "default", progress: bool = True) -> dict[str, Any]:
    c = PRESETS[preset]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = "cuda" if preset == "gpu" and torch.cuda.is_available() else "cpu"
    total = sum(c["epochs"] * (c["train"] // c["batch"]) for _ in c["configs"] for _ in c["d_models"]) * len(c["models"])
    rows = []
    with tt.bar(total, "mqar", progress) as pbar:
        for L, kv in c["configs"]:
            x, y = mqar(c["train"], c["vocab"], L, kv, seed=0)
            xt, yt = mqar(c["test"], c["vocab"], L, kv, seed=1)
            x, y, xt, yt = (t.to(device) for t in (x, y, xt, yt))
            for d in c["d_models"]:
                for name in c["models"]:
                    torch.manual_seed(0)
                    model = tt.build(name, c["vocab"], d, L, c["window"]).to(device)
                    hist = tt.train(model, x, y, c["epochs"], c["batch"], c["lr"], pbar.update)
                    rows.append({"model": name, "seq_len": L, "kv_pairs": kv, "d_model": d,
                                 "accuracy": tt.accuracy(model, xt, yt),
                                 "state_floats": tt.state_floats(model, name, L),
                                 "params": sum(p.numel() for p in model.parameters()),
                                 "train_s": hist["train_s"], "final_loss": sum(hist["losses"][-10:]) / max(len(hist["losses"][-10:]), 1)})
    sanity = [r["accuracy"] for r in rows if r["model"] == "transformer" and (r["seq_len"], r["kv_pairs"], r["d_model"]) == (64, 4, 64)]
    payload = {"suite": "mqar", "preset": preset, "results": rows,
               "sanity_transformer_64_4_d64": sanity[0] if sanity else None, **provenance(c)}
    write_json(out_dir / "mqar.json", payload)
    (out_dir / "mqar.md").write_text(markdown_table(rows, ["model", "seq_len", "kv_pairs", "d_model", "accuracy",
                                                           "state_floats", "train_s"]))
    _plot(rows, c, out_dir / "mqar.png")
    return payload


def _plot(rows, c, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for name in c["models"]:
        for L, kv in c["configs"]:
            sel = [r for r in rows if r["model"] == name and r["seq_len"] == L]
            axes[0].plot([r["d_model"] for r in sel], [r["accuracy"] for r in sel], "o-", label=f"{name} ({L}, {kv})")
            axes[1].plot([r["state_floats"] for r in sel], [r["accuracy"] for r in sel], "o", label=f"{name} ({L}, {kv})")
    axes[0].set_xlabel("d_model")
    axes[1].set_xlabel("recurrent state size (floats; Transformer: KV cache)")
    axes[1].set_xscale("log")
    for ax in axes:
        ax.set_ylabel("MQAR accuracy")
        ax.set_ylim(-0.02, 1.02)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
