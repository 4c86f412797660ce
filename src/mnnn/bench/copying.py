"""``mnnn bench copy`` and ``mnnn bench selective-copy``: memory across a delay.

* copy: ``num_tokens`` tokens, ``delay`` blanks, a go marker, then reproduce them in order;
* selective-copy: the tokens sit at random positions among ``delay`` noise tokens.

Every model of :mod:`mnnn.bench.token_tasks` is trained per delay on the same examples and
scored on held-out ones (accuracy over the reproduced tokens); accuracy vs delay is plotted.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mnnn.bench import token_tasks as tt
from mnnn.bench.common import markdown_table, provenance, write_json
from mnnn.data.tasks import copy_task, selective_copy

PRESETS = {
    "default": {"delays": [8, 32, 128], "num_tokens": 8, "vocab": 16, "d_model": 64, "train": 4000, "test": 500,
                "epochs": 4, "batch": 64, "lr": 3e-3, "window": 16, "models": list(tt.MODELS)},
    "gpu": {"delays": [8, 32, 128, 512], "num_tokens": 16, "vocab": 16, "d_model": 128, "train": 50_000,
            "test": 2_000, "epochs": 20, "batch": 64, "lr": 1e-3, "window": 16, "models": list(tt.MODELS)},
    "toy": {"delays": [2, 4], "num_tokens": 2, "vocab": 6, "d_model": 16, "train": 64, "test": 32, "epochs": 1,
            "batch": 32, "lr": 3e-3, "window": 4, "models": list(tt.MODELS)},
}


def _make(task: str, n: int, c: dict, delay: int, seed: int):
    if task == "copy":
        return copy_task(n, c["num_tokens"], delay, c["vocab"], seed=seed)
    return selective_copy(n, c["num_tokens"], delay, c["vocab"], seed=seed)


def run_task(task: str, out_dir: str | Path, preset: str, progress: bool) -> dict[str, Any]:
    c = PRESETS[preset]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = "cuda" if preset == "gpu" and torch.cuda.is_available() else "cpu"
    rows = []
    total = len(c["delays"]) * len(c["models"]) * c["epochs"] * (c["train"] // c["batch"])
    with tt.bar(total, task, progress) as pbar:
        for delay in c["delays"]:
            x, y = (t.to(device) for t in _make(task, c["train"], c, delay, 0))
            xt, yt = (t.to(device) for t in _make(task, c["test"], c, delay, 1))
            for name in c["models"]:
                torch.manual_seed(0)
                model = tt.build(name, c["vocab"], c["d_model"], x.shape[1], c["window"]).to(device)
                hist = tt.train(model, x, y, c["epochs"], c["batch"], c["lr"], pbar.update)
                rows.append({"model": name, "delay": delay, "accuracy": tt.accuracy(model, xt, yt),
                             "chance": 1.0 / (c["vocab"] - 3), "train_s": hist["train_s"]})
    stem = task.replace("-", "_")
    payload = {"suite": task, "preset": preset, "results": rows, **provenance(c)}
    write_json(out_dir / f"{stem}.json", payload)
    (out_dir / f"{stem}.md").write_text(markdown_table(rows, ["model", "delay", "accuracy", "train_s"]))
    _plot(rows, c, task, out_dir / f"{stem}.png")
    return payload


def _plot(rows, c, task, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in c["models"]:
        sel = [r for r in rows if r["model"] == name]
        ax.plot([r["delay"] for r in sel], [r["accuracy"] for r in sel], "o-", label=name)
    ax.axhline(1.0 / (c["vocab"] - 3), color="k", ls="--", label="chance")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("delay (tokens)")
    ax.set_ylabel("accuracy on the copied tokens")
    ax.set_title(task)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
