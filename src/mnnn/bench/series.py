"""``mnnn bench series``: next-step regression R^2 of every estimator and classic baselines.

Datasets (window of 10 past values -> the next one; all ship with the installed packages):

* ``sine``: the foundation issue's noisy sine (1000 train / 200 test rows);
* ``goog``: daily adjusted close of Google stock, Aug 2004 - Oct 2008 (1047 days; the
  ``goog.npz`` sample that ships with matplotlib), as log price standardised with train-split
  statistics; the first 80 % of days train, the rest test (no shuffling across time).

Baselines in the same process: "last value" (persistence), ridge regression on the lags
(closed form, alpha chosen on the last 20 % of the train split), and LSTM/GRU estimators.
Estimators run at their defaults with ``epochs`` from the preset.

Checked first (:func:`verify`; a failure exits 1 with nothing trained): every dataset's windows
hold only the past (row i + 1 is row i shifted by one step, its last value row i's target, across
the train/test split too), ridge on the sine's lags reaches R^2 >= 0.9 (the pipeline can be
learned: persistence gives ~0.89, the noise floor ~0.995), and every estimator, fitted for one
epoch, reads its rows as time steps causally: changing a row changes no earlier row's
prediction, and predicting in two calls, the memory carried, equals one call.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from mnnn.bench.common import markdown_table, provenance, write_json
from mnnn.bench.regression import r2, ridge_predict
from mnnn.data.synthetic import noisy_sine
from mnnn.estimators import MODELS

PRESETS = {
    "default": {"epochs": 100, "window": 10, "models": ["amrc", "pmrc", "amn", "ssmn", "lstm", "gru"], "seed": 0},
    "toy": {"epochs": 1, "window": 4, "models": ["amrc", "pmrc", "amn", "ssmn", "lstm", "gru"], "seed": 0},
}


def goog_series(window: int = 10, train_frac: float = 0.8):
    """Windows over standardised log adjusted close; split by time."""
    import matplotlib.cbook as cbook

    price = np.asarray(cbook.get_sample_data("goog.npz")["price_data"]["adj_close"], dtype=np.float64)
    s = np.log(price)
    cut = int(train_frac * len(s))
    mu, sd = s[:cut].mean(), s[:cut].std()
    s = ((s - mu) / sd).astype(np.float32)
    X = np.lib.stride_tricks.sliding_window_view(s[:-1], window)
    y = s[window:]
    n_train = cut - window
    return X[:n_train], y[:n_train], X[n_train:], y[n_train:]


def verify(datasets: dict[str, tuple], models: list[str], seed: int = 0) -> dict[str, Any]:
    """The checks of the module docstring: ``{"passed", "failures", "checks"}``."""
    failures = []
    for ds, (Xtr, ytr, Xte, yte) in datasets.items():
        X, y = np.concatenate([Xtr, Xte]), np.concatenate([ytr, yte])
        if not (np.array_equal(X[1:, :-1], X[:-1, 1:]) and np.array_equal(X[1:, -1], y[:-1])):
            failures.append(f"{ds}: the windows are not consecutive past values with the next value as target")
    Xtr, ytr, Xte, yte = datasets["sine"]
    ridge = r2(yte, ridge_predict(Xtr, ytr, Xte)[0])
    if not ridge >= 0.9:
        failures.append(f"sine: ridge on the lags reaches R^2 {ridge:.3f} (at least 0.9 expected)")
    probe = Xte[:16].copy()
    changed = probe.copy()
    changed[3] += 1.0
    for name in models:
        model = MODELS[name](random_state=seed)
        model.fit(Xtr[:64], ytr[:64], epochs=1)

        def predict(rows, reset=True):
            return np.asarray(model.predict(rows, reset_memory=reset), np.float64).ravel()

        whole = predict(probe)
        parts = np.concatenate([predict(probe[:7]), predict(probe[7:], reset=False)])
        other = predict(changed)
        if not np.allclose(whole, parts, rtol=0, atol=1e-5):
            failures.append(f"{name}: predicting in two calls (the memory carried) differs from one call "
                            f"(max difference {np.abs(whole - parts).max():.2e})")
        if not np.allclose(whole[:3], other[:3], rtol=0, atol=1e-5) or np.allclose(whole[3], other[3]):
            failures.append(f"{name}: changing row 3 changed an earlier row's prediction (future leak), or not "
                            "its own")
    return {"passed": not failures, "failures": failures,
            "checks": ["windows are consecutive past values, target = the next value (across the split)",
                       "ridge on the sine's lags: R^2 >= 0.9",
                       "every estimator is causal over the rows (a changed row changes no earlier prediction) "
                       "and one predict == two with the memory carried"]}


def run(out_dir: str | Path, preset: str = "default", progress: bool = True) -> dict[str, Any]:
    from tqdm.auto import tqdm

    c = PRESETS[preset]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    datasets = {"sine": noisy_sine(window=c["window"], seed=c["seed"]), "goog": goog_series(c["window"])}
    check = verify(datasets, c["models"], c["seed"])
    if not check["passed"]:
        payload = {"suite": "series", "preset": preset, "results": [], "check": check, **provenance(c)}
        write_json(out_dir / "series.json", payload)
        return payload
    rows = []
    with tqdm(total=len(datasets) * (len(c["models"]) + 2), desc="series", disable=not progress) as bar:
        for ds, (Xtr, ytr, Xte, yte) in datasets.items():
            rows.append({"dataset": ds, "model": "last value", "r2": r2(yte, Xte[:, -1])})
            p, alpha = ridge_predict(Xtr, ytr, Xte)
            rows.append({"dataset": ds, "model": "ridge on lags", "r2": r2(yte, p), "alpha": alpha})
            bar.update(2)
            for name in c["models"]:
                model = MODELS[name](random_state=c["seed"])
                model.fit(Xtr, ytr, epochs=c["epochs"])
                rows.append({"dataset": ds, "model": name, "r2": r2(yte, model.predict(Xte))})
                bar.update(1)
    payload = {"suite": "series", "preset": preset, "results": rows,
               "sizes": {k: {"train": len(v[0]), "test": len(v[2])} for k, v in datasets.items()}, "check": check,
               **provenance(c)}
    write_json(out_dir / "series.json", payload)
    (out_dir / "series.md").write_text(markdown_table(rows, ["dataset", "model", "r2"]))
    _plot(rows, list(datasets), out_dir / "series.png")
    return payload


def _plot(rows, datasets, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(datasets), figsize=(6 * len(datasets), 4))
    for ax, ds in zip(np.atleast_1d(axes), datasets):
        sel = [r for r in rows if r["dataset"] == ds]
        ax.barh([r["model"] for r in sel], [max(r["r2"], -0.1) for r in sel])
        ax.set_xlabel("test R$^2$ (clipped at -0.1)")
        ax.set_ylabel("model")
        ax.set_title(ds)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
