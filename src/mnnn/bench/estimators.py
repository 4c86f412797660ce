"""``mnnn bench estimators``: fit time and R^2 of AMRC, PMRC, AMN against LSTM and GRU.

Sizes: the seed README's (input 10, hidden 20 for AMRC/PMRC and 32 for AMN, output 5,
100 random rows x 50 epochs) and a large one (hidden 256, 10,000 rows). R^2 on the noisy sine
task (1000 train / 200 test rows, 100 epochs, defaults). Before anything is timed, each network
is checked for whole == step equality (:func:`verify`); a failure is recorded in the JSON with no
rows and the suite exits 1.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from mnnn.bench.common import markdown_table, median_time, provenance, write_json
from mnnn.data.synthetic import noisy_sine
from mnnn.estimators import MODELS
from mnnn.state import step_through

NAMES = ["amrc", "pmrc", "amn", "lstm", "gru"]

PRESETS: dict[str, dict[str, Any]] = {
    "default": {"readme": {"rows": 100, "epochs": 50, "repeats": 3},
                "large": {"rows": 10_000, "hidden": 256, "epochs": 2, "repeats": 1},
                "sine": {"epochs": 100, "seeds": [0]}},
    "toy": {"readme": {"rows": 40, "epochs": 2, "repeats": 1},
            "large": {"rows": 200, "hidden": 16, "epochs": 1, "repeats": 1},
            "sine": {"epochs": 2, "seeds": [0]}},
}


def _readme_hidden(name: str) -> int:
    return 32 if name == "amn" else 20


def verify(names: list[str]) -> dict[str, Any]:
    """The suite's check, before anything is fitted or timed: each network's step path gives its
    whole-sequence forward on random input (max abs error <= 1e-4)."""
    errs, failures = {}, []
    for name in names:
        torch.manual_seed(0)
        net = MODELS[name](hidden_size=8)._build(4, 2).eval()
        x = torch.randn(2, 33, 4)
        with torch.no_grad():
            y, _ = net(x)
            steps, _ = step_through(net, x)
        errs[name] = float((steps - y).abs().max())
        if errs[name] > 1e-4:
            failures.append(f"{name}: step and forward disagree by {errs[name]:.2e}")
    return {"passed": not failures, "failures": failures, "max_abs_err": errs}


def run(out_dir: str | Path, preset: str = "default", progress: bool = True) -> dict[str, Any]:
    cfg = PRESETS[preset]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    check = verify(NAMES)
    base = {"suite": "estimators", "preset": preset, "check": check, **provenance(cfg)}
    if not check["passed"]:
        write_json(out_dir / "estimators.json", {**base, "results": []})
        return {**base, "results": []}
    rng = np.random.default_rng(0)
    steps = [(n, part) for part in ("readme", "large", "sine") for n in NAMES]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(steps), desc="bench estimators")
    for name, part in steps:
        c = cfg[part]
        row: dict[str, Any] = {"model": name, "setting": part}
        if part in ("readme", "large"):
            hidden = c.get("hidden", _readme_hidden(name))
            X = rng.standard_normal((c["rows"], 10)).astype(np.float32)
            y = rng.standard_normal((c["rows"], 5)).astype(np.float32)

            def fit():
                MODELS[name](hidden_size=hidden, random_state=0).fit(X, y, epochs=c["epochs"])

            med, times = median_time(fit, repeats=c["repeats"])
            row.update(hidden=hidden, rows=c["rows"], epochs=c["epochs"], fit_s=med, runs_s=times)
        else:
            r2s, times = [], []
            for seed in c["seeds"]:
                Xtr, ytr, Xte, yte = noisy_sine(seed=seed)
                model = MODELS[name](random_state=seed)
                t, _ = median_time(lambda: model.fit(Xtr, ytr, epochs=c["epochs"]), repeats=1)
                times.append(t)
                r2s.append(model.score(Xte, yte))
            row.update(epochs=c["epochs"], seeds=c["seeds"], r2=float(np.mean(r2s)),
                       r2_per_seed=r2s, fit_s=float(np.median(times)))
        rows.append(row)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    payload = {**base, "results": rows, **provenance(cfg)}  # sources again: what the fits imported
    write_json(out_dir / "estimators.json", payload)
    table = markdown_table(rows, ["model", "setting", "hidden", "rows", "epochs", "fit_s", "r2"])
    (out_dir / "estimators.md").write_text(table)
    _plot(rows, out_dir / "estimators.png")
    return payload


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, part, key, label in (
        (axes[0], "readme", "fit_s", "fit time (s), README size"),
        (axes[1], "large", "fit_s", "fit time (s), hidden 256 x 10k rows"),
        (axes[2], "sine", "r2", "test R$^2$, noisy sine"),
    ):
        sel = [r for r in rows if r["setting"] == part]
        ax.bar([r["model"] for r in sel], [r[key] for r in sel], color="tab:blue")
        ax.set_title(label)
        ax.set_xlabel("model")
        ax.set_ylabel(key)
        if key == "r2":
            ax.set_ylim(min(0.9, min(r[key] for r in sel) - 0.01), 1.0)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
