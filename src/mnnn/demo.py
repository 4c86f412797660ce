"""The main job of ``make run``: train the three memory-native estimators on the noisy sine
task, print R^2 and diagnostics, and save the models and a plot of the predictions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mnnn.data.synthetic import noisy_sine
from mnnn.estimators import create_model


def run_demo(out_dir: str | Path, epochs: int = 100, seed: int = 0, verbose: int = 1) -> dict:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    Xtr, ytr, Xte, yte = noisy_sine(seed=seed)
    last_value_r2 = 1 - np.mean((Xte[:, -1] - yte) ** 2) / np.var(yte)
    print(f"noisy sine: {len(Xtr)} train / {len(Xte)} test rows, window {Xtr.shape[1]}; "
          f"last-value baseline R^2 = {last_value_r2:.4f}")
    results, preds = {}, {}
    for name in ("amrc", "pmrc", "amn"):
        model = create_model(name, random_state=seed).fit(Xtr, ytr, epochs=epochs, verbose=verbose)
        preds[name] = model.predict(Xte)
        r2 = 1 - np.mean((preds[name] - yte) ** 2) / np.var(yte)
        info = {"r2": float(r2), "training_steps": model.training_steps, "last_loss": model.last_loss,
                "avg_memory_magnitude": model.avg_memory_magnitude}
        if name == "amn":
            info.update(avg_manifold_energy=model.avg_manifold_energy,
                        avg_lru_magnitude=model.avg_lru_magnitude,
                        avg_lc_timescale=model.avg_lc_timescale)
        results[name] = info
        model.save(out_dir / f"{name}.safetensors")
        print(f"{name.upper():5s} R^2 = {r2:.4f}  " + "  ".join(
            f"{k}={v:.4g}" for k, v in info.items() if k != "r2"))
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    _plot(yte, preds, out_dir / "predictions.png")
    print(f"models, results.json and predictions.png written to {out_dir}")
    return results


def _plot(y, preds, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4))
    ax.plot(y, "k.", ms=3, label="target")
    for name, p in preds.items():
        ax.plot(p, lw=1.2, label=name.upper())
    ax.set_xlabel("test step")
    ax.set_ylabel("value")
    ax.set_title("Next-step prediction on the noisy sine (test rows)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
