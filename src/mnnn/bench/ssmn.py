"""``mnnn bench ssmn``: what the SSMN's memory does, then how fast it runs.

Quality (test R^2): the Standard SSMN at the seed's sizes on the noisy sine with each plasticity
rule (median over three initialisations, beside the last-value baseline), and delayed recall beyond the attention window
(:func:`mnnn.data.synthetic.delayed_recall`: a value shown once must be reported 16-39 steps
later, window 8 and 2 blocks, so attention alone reaches 14 steps back) with the Hebbian rule
(importance-gated and ungated), the delta rule and the gated delta rule (the Standard SSMN's
default), and no plasticity (eta 0): one switch on the same architecture, trained the same way;
and the default's trained checkpoint read again with its writes switched off (eta 0).

Speed: Standard SSMN epoch time at the seed's defaults, Text-Native ``generate_sequence`` at the
seed's sizes (against the copying step path it replaced), step-path generation speed vs context
length, and the fast forms vs their naive loops (training speed at T=1024).

Verification first, before anything is trained or timed; a failure is written into the JSON and
the suite exits non-zero: each fast form against its naive loop (max relative error), the
Standard and Text-Native networks' step path against their parallel forward over more steps
than the attention window with plasticity on (the memory path exercised), and
``generate_sequence`` against the copying step path (the same sampled tokens).
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mnnn.bench.common import markdown_table, median_time, provenance, write_json
from mnnn.bench.regression import r2
from mnnn.data.synthetic import delayed_recall, noisy_sine
from mnnn.estimators import SparseStreamMemoryNetwork
from mnnn.state import step_through
from mnnn.models.ssmn import TextNativeSSMN
from mnnn.ops.synaptic import synaptic_memory, synaptic_memory_naive
from mnnn.ops.window_attention import window_attention, window_attention_naive

PRESETS = {
    "default": {"standard": {"rows": 1000, "input_dim": 128, "output_dim": 64, "hidden_dim": 256,
                             "window_size": 512, "repeats": 3},
                "text": {"vocab": 30522, "contexts": [1024, 16384], "new_tokens": 64, "seed_vocab": 1000, "prompt": 16,
                         "seed_new_tokens": 256, "gen_repeats": 9},
                "kernels": {"T": 1024, "B": 4, "H": 4, "D": 32, "window": 128, "repeats": 3},
                "quality": {"sine_epochs": 20, "sine_seeds": [0, 1, 2], "episodes": 300, "test_episodes": 60, "epochs": 15}},
    "toy": {"standard": {"rows": 64, "input_dim": 8, "output_dim": 4, "hidden_dim": 16, "window_size": 16,
                         "repeats": 1},
            "text": {"vocab": 100, "contexts": [32, 64], "new_tokens": 4, "small": True, "seed_vocab": 50, "prompt": 4,
                     "seed_new_tokens": 4},
            "kernels": {"T": 64, "B": 1, "H": 2, "D": 8, "window": 16, "repeats": 1},
            "quality": {"sine_epochs": 1, "episodes": 10, "test_episodes": 4, "epochs": 1, "small": True}},
}

# delayed recall: one architecture, the plasticity switched (the README's SSMN figures)
RECALL = {"hidden_dim": 32, "window_size": 8, "num_layers": 2, "plastic_ratio": 0.5, "num_heads": 2,
          "decay_lambda": 0.02, "bptt": 80, "learning_rate": 3e-3}
RECALL_VARIANTS = {
    "hebbian, importance-gated": {"plasticity_rule": "hebbian", "plasticity_eta": 0.5, "importance_gating": True},
    "hebbian, ungated": {"plasticity_rule": "hebbian", "plasticity_eta": 0.5},
    "delta rule": {"plasticity_rule": "delta"},
    "gated delta rule (default)": {"plasticity_rule": "gated_delta"},
    "no plasticity (eta 0)": {"plasticity_eta": 0.0},
}


def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _kernel_cases(c):
    torch.manual_seed(0)
    B, T, H, D = c["B"], c["T"], c["H"], c["D"]
    q = torch.nn.functional.normalize(torch.randn(B, T, H, D), dim=-1)
    k = torch.nn.functional.normalize(torch.randn(B, T, H, D), dim=-1)
    v = torch.tanh(torch.randn(B, T, H, D))
    g = torch.rand(B, T, H)
    return {
        "synaptic_memory": (lambda *a: synaptic_memory(*a, 0.01, 0.001)[0],
                            lambda *a: synaptic_memory_naive(*a, 0.01, 0.001)[0], (q, k, v, g)),
        "window_attention": (lambda *a: window_attention(*a, c["window"])[0],
                             lambda *a: window_attention_naive(*a, c["window"])[0], (q, k, v)),
    }


def _kernels(c, errors: dict[str, float]) -> list[dict[str, Any]]:
    rows = []
    for name, (fast, naive, inputs) in _kernel_cases(c).items():
        def train_step(fn):
            leaves = [t.clone().requires_grad_() for t in inputs]
            fn(*leaves).sum().backward()

        t_fast, _ = median_time(lambda: train_step(fast), repeats=c["repeats"], warmup=1)
        t_naive, _ = median_time(lambda: train_step(naive), repeats=c["repeats"])
        rows.append({"kind": "kernel", "name": name, "T": c["T"],
                     "fast_s": t_fast, "naive_s": t_naive, "speedup": t_naive / t_fast,
                     "max_rel_err": errors[name]})
    return rows


def _seed_text_model(c) -> TextNativeSSMN:
    torch.manual_seed(0)
    return TextNativeSSMN(c["seed_vocab"], **_small(c)).eval()


def _small(c) -> dict[str, Any]:
    return dict(embed_dim=16, hidden_dim=16, window_size=8, num_layers=2, num_heads=2) if c.get("small") else {}


def verify(cfg) -> dict[str, Any]:
    """Every check of the suite, before anything is trained or timed."""
    failures: list[str] = []
    errors: dict[str, float] = {}
    for name, (fast, naive, inputs) in _kernel_cases(cfg["kernels"]).items():
        errors[name] = _rel(fast(*inputs), naive(*inputs))
        if errors[name] > 1e-4:
            failures.append(f"{name}: fast and naive forms differ (relative error {errors[name]:.2e})")
    # step == forward with the memory path exercised: longer than the window, plasticity on
    torch.manual_seed(0)
    nets = {
        "standard_step_vs_forward": (SparseStreamMemoryNetwork(
            hidden_dim=16, window_size=4, num_layers=2, plastic_ratio=0.5, num_heads=2, plasticity_eta=0.5,
            random_state=0)._build(3, 2).eval(), torch.randn(2, 19, 3)),
        "text_step_vs_forward": (TextNativeSSMN(
            50, embed_dim=16, hidden_dim=16, window_size=4, num_layers=2, plastic_ratio=0.5, num_heads=2,
            plasticity_eta=0.5).eval(), torch.randint(0, 50, (2, 19))),
    }
    for name, (net, x) in nets.items():
        with torch.no_grad():
            whole, state = net(x)
            steps, step_state = step_through(net, x)
        errors[name] = float((steps - whole).abs().max())
        syn = float(state.synaptic.abs().max())
        if errors[name] > 1e-4:
            failures.append(f"{name}: step path and parallel forward differ by {errors[name]:.2e}")
        if syn == 0.0:
            failures.append(f"{name}: the fast weights stayed zero (the memory path was not exercised)")
    tc = cfg["text"]
    model = _seed_text_model(tc)
    prompt = torch.randint(0, tc["seed_vocab"], (tc["prompt"],)).tolist()
    if model.generate_sequence(prompt, max_length=tc["seed_new_tokens"], seed=0) != _copying_generation(
            model, prompt, tc["seed_new_tokens"], 0):
        failures.append("generate_sequence (in-place step) samples other tokens than the copying step path")
    return {"passed": not failures, "failures": failures, "max_err": errors}


def _quality(c) -> list[dict[str, Any]]:
    small = {"hidden_dim": 16, "num_layers": 2, "window_size": 16} if c.get("small") else {}
    Xtr, ytr, Xte, yte = noisy_sine(seed=0)
    rows = []
    seeds = c.get("sine_seeds", [0])
    for rule in ("hebbian", "delta", "gated_delta"):  # one architecture, the seed's sizes, the rule switched
        scores = [r2(yte, SparseStreamMemoryNetwork(random_state=rs, plasticity_rule=rule, **small)
                     .fit(Xtr, ytr, epochs=c["sine_epochs"]).predict(Xte)) for rs in seeds]
        label = {"hebbian": "hebbian (the seed's rule)", "delta": "delta rule",
                 "gated_delta": "gated delta rule (default)"}[rule]
        rows.append({"kind": "quality", "task": "noisy sine", "variant": label + (" [small]" if small else ""),
                     "epochs": c["sine_epochs"], "initialisations": len(seeds), "r2": float(np.median(scores)),
                     "r2_min": float(min(scores)), "baseline": "last value", "baseline_r2": r2(yte, Xte[:, -1])})
    X, y, _ = delayed_recall(c["episodes"], 40, min_delay=16, seed=0)
    Xt, yt, scored = delayed_recall(c["test_episodes"], 40, min_delay=16, seed=1)
    for variant, kwargs in RECALL_VARIANTS.items():
        model = SparseStreamMemoryNetwork(random_state=0, **RECALL, **kwargs).fit(X, y, epochs=c["epochs"])
        pred = model.predict(Xt, reset_memory=True)
        # R^2 0 = predicting the held values' mean; the eta-0 row is what attention alone reaches
        rows.append({"kind": "quality", "task": "delayed recall (16-39 steps, window 8)", "variant": variant, "epochs": c["epochs"],
                     "initialisations": 1, "r2": r2(yt[scored], pred[scored])})
        if variant.endswith("(default)"):  # the same checkpoint with its fast-weight writes switched off
            model.set_params(plasticity_eta=0.0)
            pred = model.predict(Xt, reset_memory=True)
            rows.append({"kind": "quality", "task": "delayed recall (16-39 steps, window 8)",
                         "variant": "default's checkpoint, writes off (eta 0)", "epochs": c["epochs"],
                         "initialisations": 1, "r2": r2(yt[scored], pred[scored])})
    return rows


def _standard(c) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    X = rng.standard_normal((c["rows"], c["input_dim"])).astype(np.float32)
    y = rng.standard_normal((c["rows"], c["output_dim"])).astype(np.float32)
    model = SparseStreamMemoryNetwork(hidden_dim=c["hidden_dim"], window_size=c["window_size"], random_state=0)
    model.fit(X, y, epochs=1)  # build and warm up
    t, runs = median_time(lambda: model.fit(X, y, epochs=1), repeats=c["repeats"])
    return {"kind": "standard_epoch", "rows": c["rows"], "hidden_dim": c["hidden_dim"],
            "window_size": c["window_size"], "epoch_s": t, "runs_s": runs}


def _copying_generation(model, prompt: list[int], n: int, seed: int) -> list[int]:
    """``generate_sequence`` as it was before the in-place step: every step copies the window
    caches (the baseline, and the reference the in-place path must sample identically)."""
    from mnnn.sampling import sample_token

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        logits, state = model.prefill(torch.tensor([prompt]))
        last, out = logits[0], []
        for _ in range(n):
            token = sample_token(last, 1.0, 50, None, gen)
            out.append(token)
            logits, state = model.step(torch.tensor([token]), state)
            last = logits[0]
    return out


def _text(c) -> list[dict[str, Any]]:
    small = _small(c)
    rows = []
    # the seed's call at the seed's sizes (TextNativeSSMN(vocab_size=1000, embed_dim=128,
    # hidden_dim=256, window_size=512), 5 layers, batch 1): generate_sequence, prompt included
    model = _seed_text_model(c)
    prompt = torch.randint(0, c["seed_vocab"], (c["prompt"],)).tolist()
    n = c["seed_new_tokens"]
    # both sides warmed, then timed alternately (a load spike on this shared machine hits both),
    # median of ``gen_repeats``
    runs: dict[str, list[float]] = {"new": [], "ref": []}
    sides = {"new": lambda: model.generate_sequence(prompt, max_length=n, seed=0),
             "ref": lambda: _copying_generation(model, prompt, n, 0)}
    for fn in sides.values():
        fn()
    for _ in range(c.get("gen_repeats", 3)):
        for side, fn in sides.items():
            runs[side].append(median_time(fn, repeats=1)[0])
    t, t_ref = statistics.median(runs["new"]), statistics.median(runs["ref"])
    rows.append({"kind": "generate_sequence", "vocab": c["seed_vocab"], "context": c["prompt"], "new_tokens": n,
                 "tokens_per_s": n / t, "baseline_tokens_per_s": n / t_ref, "speedup": t_ref / t,
                 "runs_tokens_per_s": [n / x for x in runs["new"]]})
    # the step path vs context length (flat: the window bounds the work), BERT vocabulary
    model = TextNativeSSMN(c["vocab"], **small).eval()
    for ctx in c["contexts"]:
        prompt = torch.randint(0, c["vocab"], (ctx,))
        with torch.no_grad():
            _, state = model.prefill(prompt[None])

            def gen():
                s, tok = state.clone(), torch.tensor([1])
                for _ in range(c["new_tokens"]):
                    logits, s = model.step(tok, s, inplace=True)
                    tok = logits.argmax(-1)

            t, _ = median_time(gen, repeats=3, warmup=1)
        rows.append({"kind": "text_generation", "vocab": c["vocab"], "context": ctx, "new_tokens": c["new_tokens"],
                     "tokens_per_s": c["new_tokens"] / t})
    return rows


def run(out_dir: str | Path, preset: str = "default", progress: bool = True) -> dict[str, Any]:
    cfg = PRESETS[preset]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    check = verify(cfg)
    base = {"suite": "ssmn", "preset": preset, "check": check, **provenance(cfg)}
    if not check["passed"]:
        write_json(out_dir / "ssmn.json", {**base, "results": []})
        return {**base, "results": []}
    quality = _quality(cfg["quality"])
    kernels = _kernels(cfg["kernels"], check["max_err"])
    standard = _standard(cfg["standard"])
    text = _text(cfg["text"])
    results = quality + kernels + [standard] + text
    # provenance again at the end: ``sources`` then lists the modules the runs imported as well
    payload = {**base, **provenance(cfg), "results": results}
    write_json(out_dir / "ssmn.json", payload)
    md = markdown_table(quality, ["task", "variant", "epochs", "initialisations", "r2", "r2_min", "baseline",
                                  "baseline_r2"])
    md += "\n" + markdown_table(kernels, ["name", "T", "fast_s", "naive_s", "speedup", "max_rel_err"])
    md += "\n" + markdown_table([standard], ["kind", "rows", "hidden_dim", "window_size", "epoch_s"])
    md += "\n" + markdown_table(text, ["kind", "vocab", "context", "new_tokens", "tokens_per_s", "baseline_tokens_per_s",
                                        "speedup"])
    errs = check["max_err"]
    md += (f"\nChecked first: step path == parallel forward with plasticity on and more steps than the window "
           f"(Standard {errs['standard_step_vs_forward']:.1e}, Text-Native {errs['text_step_vs_forward']:.1e} "
           "max abs difference); generate_sequence samples the copying path's tokens. Delayed recall: R^2 on the "
           "rows 16-39 steps after the value was shown (0 = predicting the values' mean); the eta-0 rows are "
           "what attention and the MLPs reach without plasticity (trained so, or the default's checkpoint "
           "with its writes switched off). r2 is the median over the initialisations, r2_min the worst.\n")
    (out_dir / "ssmn.md").write_text(md)
    _plot(text, kernels, out_dir / "ssmn.png")
    return payload


def _plot(text, kernels, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    steps = [r for r in text if r["kind"] == "text_generation"]
    a.plot([r["context"] for r in steps], [r["tokens_per_s"] for r in steps], "o-")
    a.set_xscale("log")
    a.set_xlabel("context length (tokens)")
    a.set_ylabel("generated tokens / s")
    a.set_title("Text-Native SSMN generation (step path)")
    b.bar([r["name"] for r in kernels], [r["speedup"] for r in kernels])
    b.set_ylabel("naive time / fast time (fwd + bwd)")
    b.set_title("fast forms vs naive loops")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
