"""``mnnn bench robustness``: the MNNN API seed's quick-start settings over many initialisations.

AMRC, PMRC and AMN built exactly as the seed's quick start builds them (seeds/003: AMRC hidden 20,
beta 0.3, alpha 0.1, learning rate 0.01; PMRC hidden 20 with learnable gates and output memory,
learning rate 0.01; AMN hidden 32, manifold 64, learning rate 0.001, dt 0.1, memory decay 0.995,
``batch_size=32``; 50 epochs each), fitted with ``random_state`` 0..9 on noisy-sine tasks that
differ in phase and in the noise draw (1000 train / 200 test rows, 10 lags -> next value). The
table gives each model's test R^2 distribution (min, median, max, and how many runs reach 0.98)
beside two baselines of every task: the last value (persistence) and ridge on the lags.

Before anything is fitted at length, a check that can fail: for each model, after a short fit,
predicting the test rows in two calls equals one call, and ``set_memory_state`` (AMN: and
``set_manifold_state``) of a snapshot reproduces the predictions exactly.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from mnnn.bench.common import markdown_table, provenance, write_json
from mnnn.bench.regression import r2, ridge_predict
from mnnn.data.synthetic import noisy_sine
from mnnn.estimators import AMN, AMRC, PMRC

QUICK_START: dict[str, tuple[type, dict[str, Any], dict[str, Any]]] = {
    # name: (class, constructor arguments, fit arguments) as in the seed's quick start
    "amrc": (AMRC, {"hidden_size": 20, "beta": 0.3, "alpha": 0.1, "learning_rate": 0.01}, {}),
    "pmrc": (PMRC, {"hidden_size": 20, "use_learnable_gates": True, "use_output_memory": True,
                    "learning_rate": 0.01}, {}),
    "amn": (AMN, {"hidden_size": 32, "memory_manifold_size": 64, "learning_rate": 0.001, "dt": 0.1,
                  "memory_decay": 0.995}, {"batch_size": 32}),
}

# (noise seed, phase) of each task
TASKS = [(100, 0.0), (101, 1.3), (102, 2.9)]

PRESETS: dict[str, dict[str, Any]] = {
    "default": {"epochs": 50, "random_states": list(range(10)), "tasks": TASKS, "threshold": 0.98},
    "toy": {"epochs": 2, "random_states": [0, 1], "tasks": TASKS[:1], "threshold": 0.98},
}


def _build(name: str, random_state: int):
    cls, kwargs, fit_kwargs = QUICK_START[name]
    return cls(input_size=10, output_size=1, random_state=random_state, **kwargs), fit_kwargs


def verify(Xtr, ytr, Xte) -> dict[str, Any]:
    """Chunked predict == one predict, and a memory snapshot restores the predictions exactly."""
    failures, errors = [], {}
    for name in QUICK_START:
        model, fit_kwargs = _build(name, 0)
        model.fit(Xtr[:200], ytr[:200], epochs=2, **fit_kwargs)
        snap = model.get_memory_state()
        manifold = model.get_manifold_state() if name == "amn" else None

        def restore():
            model.set_memory_state(snap)
            if manifold is not None:
                model.set_manifold_state(manifold)

        whole = model.predict(Xte)
        restore()
        split = len(Xte) // 3
        parts = np.concatenate([model.predict(Xte[:split]), model.predict(Xte[split:])])
        restore()
        again = model.predict(Xte)
        errors[name] = {"chunks_vs_whole": float(np.abs(parts - whole).max()),
                        "restored_vs_whole": float(np.abs(again - whole).max())}
        if errors[name]["chunks_vs_whole"] > 1e-4:
            failures.append(f"{name}: predicting in two calls differs from one call by "
                            f"{errors[name]['chunks_vs_whole']:.2e}")
        if errors[name]["restored_vs_whole"] != 0.0:
            failures.append(f"{name}: a restored memory snapshot does not reproduce the predictions "
                            f"(max diff {errors[name]['restored_vs_whole']:.2e})")
    return {"passed": not failures, "failures": failures, "max_abs_err": errors}


def run(out_dir: str | Path, preset: str = "default", progress: bool = True) -> dict[str, Any]:
    from tqdm.auto import tqdm

    c = PRESETS[preset]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tasks = {f"noise {seed}, phase {phase}": noisy_sine(seed=seed, phase=phase) for seed, phase in c["tasks"]}
    check = verify(*next(iter(tasks.values()))[:3])
    base = {"suite": "robustness", "preset": preset, "check": check, **provenance(c)}
    if not check["passed"]:
        write_json(out_dir / "robustness.json", {**base, "results": [], "runs": []})
        return {**base, "results": [], "runs": []}

    runs: list[dict[str, Any]] = []
    baselines: list[dict[str, Any]] = []
    total = len(tasks) * len(QUICK_START) * len(c["random_states"])
    with tqdm(total=total, desc="robustness", disable=not progress) as bar:
        for task, (Xtr, ytr, Xte, yte) in tasks.items():
            ridge, _ = ridge_predict(Xtr, ytr, Xte)
            baselines.append({"task": task, "last_value": r2(yte, Xte[:, -1]), "ridge_on_lags": r2(yte, ridge)})
            for name in QUICK_START:
                for rs in c["random_states"]:
                    model, fit_kwargs = _build(name, rs)
                    start = time.perf_counter()
                    model.fit(Xtr, ytr, epochs=c["epochs"], **fit_kwargs)
                    fit_s = time.perf_counter() - start
                    runs.append({"model": name, "task": task, "random_state": rs,
                                 "r2": r2(yte, model.predict(Xte)), "fit_s": fit_s})
                    bar.update(1)

    rows = []
    for name in QUICK_START:
        scores = np.array([r["r2"] for r in runs if r["model"] == name])
        rows.append({"model": name, "runs": len(scores), "min_r2": float(scores.min()),
                     "median_r2": float(np.median(scores)), "max_r2": float(scores.max()),
                     f"runs_ge_{c['threshold']}": int((scores >= c["threshold"]).sum()),
                     "median_fit_s": float(np.median([r["fit_s"] for r in runs if r["model"] == name]))})
    rows += [{"model": "last value (baseline)", "runs": len(baselines),
              "min_r2": min(b["last_value"] for b in baselines), "max_r2": max(b["last_value"] for b in baselines)},
             {"model": "ridge on lags (baseline)", "runs": len(baselines),
              "min_r2": min(b["ridge_on_lags"] for b in baselines),
              "max_r2": max(b["ridge_on_lags"] for b in baselines)}]
    # provenance again at the end: ``sources`` then lists the modules the fits imported as well
    payload = {**base, **provenance(c), "results": rows, "runs": runs, "baselines": baselines,
               "epochs": c["epochs"]}
    write_json(out_dir / "robustness.json", payload)
    columns = ["model", "runs", "min_r2", "median_r2", "max_r2", f"runs_ge_{c['threshold']}", "median_fit_s"]
    note = (f"\n{len(c['random_states'])} initialisations (random_state {c['random_states'][0]}.."
            f"{c['random_states'][-1]}) x {len(tasks)} tasks ({'; '.join(tasks)}), the seed's quick-start "
            f"settings, {c['epochs']} epochs. Check before fitting: chunked predict == one predict and "
            "memory snapshots restore predictions exactly (passed).\n")
    (out_dir / "robustness.md").write_text(markdown_table(rows, columns) + note)
    _plot(runs, baselines, c["threshold"], out_dir / "robustness.png")
    return payload


def _plot(runs, baselines, threshold, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(QUICK_START)
    fig, ax = plt.subplots(figsize=(7, 4))
    rng = np.random.default_rng(0)
    for i, name in enumerate(names):
        scores = [r["r2"] for r in runs if r["model"] == name]
        ax.scatter(i + rng.uniform(-0.15, 0.15, len(scores)), scores, s=14, alpha=0.7, label=None)
    ax.axhline(threshold, color="tab:red", ls="--", lw=1, label=f"goal {threshold}")
    ax.axhline(np.mean([b["ridge_on_lags"] for b in baselines]), color="tab:green", ls=":", lw=1,
               label="ridge on lags (mean over tasks)")
    ax.set_xticks(range(len(names)), names)
    ax.set_xlabel("model (seed quick-start settings)")
    ax.set_ylabel("test R$^2$")
    ax.set_title("test R$^2$ per initialisation and task")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
