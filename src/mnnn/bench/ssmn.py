"""``mnnn bench ssmn``: Standard SSMN epoch time at the seed's defaults, Text-Native
``generate_sequence`` at the seed's sizes (against the copying step path it replaced), step-path
generation speed vs context length, and the fast forms vs their naive loops (training speed at
T=1024).

Verification first: each fast form is compared with its naive loop (max relative error), and
``generate_sequence`` must sample exactly the tokens of the copying step path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from mnnn.bench.common import markdown_table, median_time, provenance, write_json
from mnnn.estimators import SparseStreamMemoryNetwork
from mnnn.models.ssmn import TextNativeSSMN
from mnnn.ops.synaptic import synaptic_memory, synaptic_memory_naive
from mnnn.ops.window_attention import window_attention, window_attention_naive

PRESETS = {
    "default": {"standard": {"rows": 1000, "input_dim": 128, "output_dim": 64, "hidden_dim": 256,
                             "window_size": 512, "repeats": 3},
                "text": {"vocab": 30522, "contexts": [1024, 16384], "new_tokens": 64, "seed_vocab": 1000, "prompt": 16,
                         "seed_new_tokens": 256},
                "kernels": {"T": 1024, "B": 4, "H": 4, "D": 32, "window": 128, "repeats": 3}},
    "toy": {"standard": {"rows": 64, "input_dim": 8, "output_dim": 4, "hidden_dim": 16, "window_size": 16,
                         "repeats": 1},
            "text": {"vocab": 100, "contexts": [32, 64], "new_tokens": 4, "small": True, "seed_vocab": 50, "prompt": 4,
                     "seed_new_tokens": 4},
            "kernels": {"T": 64, "B": 1, "H": 2, "D": 8, "window": 16, "repeats": 1}},
}


def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _kernels(c) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    B, T, H, D = c["B"], c["T"], c["H"], c["D"]
    rows = []
    q = torch.nn.functional.normalize(torch.randn(B, T, H, D), dim=-1)
    k = torch.nn.functional.normalize(torch.randn(B, T, H, D), dim=-1)
    v = torch.tanh(torch.randn(B, T, H, D))
    g = torch.rand(B, T, H)
    cases = {
        "synaptic_memory": (lambda *a: synaptic_memory(*a, 0.01, 0.001)[0],
                            lambda *a: synaptic_memory_naive(*a, 0.01, 0.001)[0], (q, k, v, g)),
        "window_attention": (lambda *a: window_attention(*a, c["window"])[0],
                             lambda *a: window_attention_naive(*a, c["window"])[0], (q, k, v)),
    }
    for name, (fast, naive, inputs) in cases.items():
        err = _rel(fast(*inputs), naive(*inputs))
        if err > 1e-4:
            raise AssertionError(f"{name}: fast and naive differ ({err:.2e})")

        def train_step(fn):
            leaves = [t.clone().requires_grad_() for t in inputs]
            fn(*leaves).sum().backward()

        t_fast, _ = median_time(lambda: train_step(fast), repeats=c["repeats"], warmup=1)
        t_naive, _ = median_time(lambda: train_step(naive), repeats=c["repeats"])
        rows.append({"kind": "kernel", "name": name, "T": T, "fast_s": t_fast, "naive_s": t_naive,
                     "speedup": t_naive / t_fast, "max_rel_err": err})
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
    torch.manual_seed(0)
    small = dict(embed_dim=16, hidden_dim=16, window_size=8, num_layers=2, num_heads=2) if c.get("small") else {}
    rows = []
    # the seed's call at the seed's sizes (TextNativeSSMN(vocab_size=1000, embed_dim=128,
    # hidden_dim=256, window_size=512), 5 layers, batch 1): generate_sequence, prompt included
    model = TextNativeSSMN(c["seed_vocab"], **small).eval()
    prompt = torch.randint(0, c["seed_vocab"], (c["prompt"],)).tolist()
    n = c["seed_new_tokens"]
    fast = model.generate_sequence(prompt, max_length=n, seed=0)
    if fast != _copying_generation(model, prompt, n, 0):
        raise AssertionError("generate_sequence (in-place step) samples other tokens than the copying step path")
    t, _ = median_time(lambda: model.generate_sequence(prompt, max_length=n, seed=0), repeats=3, warmup=1)
    t_ref, _ = median_time(lambda: _copying_generation(model, prompt, n, 0), repeats=3)
    rows.append({"kind": "generate_sequence", "vocab": c["seed_vocab"], "context": c["prompt"], "new_tokens": n,
                 "tokens_per_s": n / t, "baseline_tokens_per_s": n / t_ref, "speedup": t_ref / t})
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
    kernels = _kernels(cfg["kernels"])
    standard = _standard(cfg["standard"])
    text = _text(cfg["text"])
    results = kernels + [standard] + text
    payload = {"suite": "ssmn", "preset": preset, "results": results, **provenance(cfg)}
    write_json(out_dir / "ssmn.json", payload)
    md = markdown_table(kernels, ["name", "T", "fast_s", "naive_s", "speedup", "max_rel_err"])
    md += "\n" + markdown_table([standard], ["kind", "rows", "hidden_dim", "window_size", "epoch_s"])
    md += "\n" + markdown_table(text, ["kind", "vocab", "context", "new_tokens", "tokens_per_s", "baseline_tokens_per_s",
                                        "speedup"])
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
