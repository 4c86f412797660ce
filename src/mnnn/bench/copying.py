"""``mnnn bench copy`` and ``mnnn bench selective-copy``: memory across a delay.

* copy: ``num_tokens`` tokens, ``delay`` blanks, a go marker, then reproduce them in order;
* selective-copy: the tokens sit at random positions among ``delay`` noise tokens.

Every model of :mod:`mnnn.bench.token_tasks` is trained per delay on the same examples and
scored on held-out ones (accuracy over the reproduced tokens); accuracy vs delay is plotted.
S3CMN and the Text-Native SSMN are scored a second time with their memory switched off (same
trained model; rows "(memory off)" and "(fast weights off)"), so the table says whether the
memory is what carries the tokens.

Checks first, each able to fail (then nothing is trained or timed, the failure goes into the
JSON and ``mnnn bench`` exits non-zero): every model is causal on the task's sequences (changing
token j changes no output before j), and the Transformer, whose context holds the whole
sequence, solves the preset's ``sanity`` task (the shortest delay) to ``threshold`` accuracy:
otherwise the task, the data or the trainer is broken.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mnnn.bench import token_tasks as tt
from mnnn.bench.common import markdown_table, provenance, write_json
from mnnn.bench.switches import memory_off
from mnnn.data.tasks import copy_task, selective_copy

# the sanity task: the Transformer on the shortest delay (at the default size it scores 1.000 in ~3 s)
_SANITY = {"delay": 8, "num_tokens": 8, "vocab": 16, "d_model": 64, "train": 4000, "test": 500, "epochs": 4,
           "batch": 64, "lr": 3e-3, "threshold": 0.95}
PRESETS = {
    "default": {"delays": [8, 32, 128], "num_tokens": 8, "vocab": 16, "d_model": 64, "train": 4000, "test": 500,
                "epochs": 4, "batch": 64, "lr": 3e-3, "window": 16, "models": list(tt.MODELS), "sanity": _SANITY},
    "gpu": {"delays": [8, 32, 128, 512], "num_tokens": 16, "vocab": 16, "d_model": 128, "train": 50_000,
            "test": 2_000, "epochs": 20, "batch": 64, "lr": 1e-3, "window": 16, "models": list(tt.MODELS),
            "sanity": _SANITY},
    "toy": {"delays": [2, 4], "num_tokens": 2, "vocab": 6, "d_model": 16, "train": 64, "test": 32, "epochs": 1,
            "batch": 32, "lr": 3e-3, "window": 4, "models": list(tt.MODELS),
            # small enough for the tests, large enough that a working trainer passes it
            "sanity": {"delay": 2, "num_tokens": 2, "vocab": 6, "d_model": 32, "train": 1024, "test": 128,
                       "epochs": 6, "batch": 32, "lr": 1e-2, "threshold": 0.9}},
}


def _make(task: str, n: int, c: dict, delay: int, seed: int):
    if task == "copy":
        return copy_task(n, c["num_tokens"], delay, c["vocab"], seed=seed)
    return selective_copy(n, c["num_tokens"], delay, c["vocab"], seed=seed)


def _memory_off_accuracy(model, xt, yt) -> tuple[str, float] | None:
    """Accuracy of the same trained model with its memory switched off (``switches.memory_off``),
    with what was switched off, or None for a model without a memory switch."""
    with memory_off(model) as what:
        return None if what is None else (what, tt.accuracy(model, xt, yt))


def verify(task: str, c: dict, device: str, progress: bool = False) -> dict[str, Any]:
    """The checks of the module docstring; returns ``{passed, failures, checks, sanity}``."""
    failures = []
    x, _ = _make(task, 4, c, c["delays"][0], seed=2)
    x = x.to(device)
    j = x.shape[1] // 2
    changed = x.clone()
    changed[:, j] = (changed[:, j] + 1) % c["vocab"]
    for name in c["models"]:
        torch.manual_seed(0)
        model = tt.build(name, c["vocab"], c["d_model"], x.shape[1], c["window"]).to(device).eval()
        with torch.no_grad():
            tt.forget(model)
            ref, _ = model.features(x)
            tt.forget(model)
            out, _ = model.features(changed)
        leak = float((out[:, :j] - ref[:, :j]).abs().max())
        if leak > 1e-4:
            failures.append(f"{name}: output before position {j} changed by {leak:.2e} (future leak)")
    sc = c["sanity"]
    sx, sy = (t.to(device) for t in _make(task, sc["train"], sc, sc["delay"], 0))
    tx, ty = (t.to(device) for t in _make(task, sc["test"], sc, sc["delay"], 1))
    torch.manual_seed(0)
    model = tt.build("transformer", sc["vocab"], sc["d_model"], sx.shape[1], c["window"]).to(device)
    with tt.bar(sc["epochs"] * (sc["train"] // sc["batch"]), f"{task} sanity (transformer)", progress) as pbar:
        hist = tt.train(model, sx, sy, sc["epochs"], sc["batch"], sc["lr"], pbar.update)
    acc = tt.accuracy(model, tx, ty)
    if acc < sc["threshold"]:
        failures.append(f"sanity: Transformer accuracy {acc:.3f} < {sc['threshold']} at delay {sc['delay']}: the "
                        "task, the data or the trainer is broken, so the grid is not run")
    return {"passed": not failures, "failures": failures,
            "checks": [f"causality (token {j} changed)", f"sanity: Transformer >= {sc['threshold']} at delay "
                       f"{sc['delay']}"],
            "sanity": {"accuracy": acc, "steps": hist["steps"], "train_s": hist["train_s"]}}


def run_task(task: str, out_dir: str | Path, preset: str, progress: bool) -> dict[str, Any]:
    c = PRESETS[preset]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = "cuda" if preset == "gpu" and torch.cuda.is_available() else "cpu"
    stem = task.replace("-", "_")
    check = verify(task, c, device, progress)
    if not check["passed"]:
        payload = {"suite": task, "preset": preset, "check": check, "results": [], **provenance(c)}
        write_json(out_dir / f"{stem}.json", payload)
        return payload
    chance = 1.0 / (c["vocab"] - 3)  # data tokens are drawn from [3, vocab)
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
                             "chance": chance, "train_s": hist["train_s"]})
                off = _memory_off_accuracy(model, xt, yt)
                if off is not None:  # the same trained model with its memory switched off
                    rows.append({"model": f"{name} ({off[0]} off)", "delay": delay, "accuracy": off[1],
                                 "chance": chance})
    payload = {"suite": task, "preset": preset, "check": check, "results": rows, **provenance(c)}
    write_json(out_dir / f"{stem}.json", payload)
    sanity = check["sanity"]
    note = (f"\nChecks passed: every model causal; the Transformer solves delay {c['sanity']['delay']} "
            f"({sanity['accuracy']:.3f}, needs >= {c['sanity']['threshold']}). Chance: {chance:.3f}.\n")
    (out_dir / f"{stem}.md").write_text(markdown_table(rows, ["model", "delay", "accuracy", "train_s"]) + note)
    _plot(rows, c["models"], chance, task, out_dir / f"{stem}.png")
    return payload


def _plot(rows, models, chance, task, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in models:
        sel = [r for r in rows if r["model"] == name]
        ax.plot([r["delay"] for r in sel], [r["accuracy"] for r in sel], "o-", label=name)
    ax.axhline(chance, color="k", ls="--", label="chance")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("delay (tokens)")
    ax.set_ylabel("accuracy on the copied tokens")
    ax.set_title(task)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
