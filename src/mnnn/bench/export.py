"""``mnnn bench export``: S3CMN's exported step (ONNX, int8 ONNX, torch.export) against its PyTorch step.

The ``default`` preset trains S3CMN with the embedded default config (``mnnn train``'s model) for
``train_s`` seconds on WikiText-2, then exports its step twice from that one checkpoint: memory on
and memory off (the switch, same weights).

Check first (exit non-zero, nothing kept, when it fails): onnxruntime's logits equal the model's
own ``step`` within 1e-4 over ``verify_steps`` tokens of WikiText-2 valid, memory on and off; the
torch.export program equals it too.

Then, over ``eval_tokens`` valid tokens fed one at a time (batch 1, the serving case): median
ms/step, file size and perplexity for the PyTorch step, the torch.export program, the ONNX graph
and its dynamically quantised int8 copy. ``toy`` runs an untrained tiny model on random ids.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mnnn.bench.common import markdown_table, provenance, write_json

PRESETS = {
    "default": {"train_s": 240, "verify_steps": 256, "eval_tokens": 2048, "threads": 2},
    "toy": {"train_s": None, "verify_steps": 32, "eval_tokens": 64, "threads": 1,
            "model": {"name": "s3cmn", "vocab_size": 97, "embedding_dim": 16, "hidden_dim": 16, "num_layers": 1,
                      "d_state": 4, "max_len": 32},
            "memory": {"memory_fusion": "output", "memory_size": 24, "memory_top_k": 4}},
}


def _model(c: dict[str, Any], out_dir: Path, progress: bool):
    """(model, config sections, training step) for the preset."""
    from mnnn.lm import build_model, load_config

    if c["train_s"] is None:
        cfg = {"model": c["model"], "memory": c["memory"]}
        torch.manual_seed(0)
        return build_model(cfg).eval(), cfg, 0
    from mnnn.data.wikitext import load_split
    from mnnn.training.lm import seed_everything, train_lm

    cfg = load_config(None, [f"training.time_budget_s={c['train_s']}", "training.eval_every=0"])
    tr = {k: v for k, v in cfg["training"].items() if k not in ("out_dir", "sample_prompt", "eval_batch_size",
                                                                 "eval_tokens")}
    seed_everything(int(tr.get("seed", 0)))
    model = build_model(cfg)
    hist = train_lm(model, load_split("train"), out_dir=out_dir / "export_train", resume=False, config=cfg,
                    progress=progress, **tr)
    return model.eval(), {k: cfg[k] for k in ("model", "memory")}, hist["steps"]


def run(out_dir: str | Path, preset: str = "default", progress: bool = True) -> dict[str, Any]:
    from mnnn.deploy.export import ExportCheckFailed, export_step, export_step_model, load_torch_export, \
        measure_step, torch_step, verification_tokens
    from mnnn.deploy.step import manifest, step_graph

    c = PRESETS[preset]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(c["threads"])
    model, cfg, steps = _model(c, out_dir, progress)
    failures: list[str] = []
    rows: list[dict[str, Any]] = []
    tokens, source = verification_tokens(model.config.vocab_size, c["eval_tokens"])
    with tempfile.TemporaryDirectory() as tmp:
        for memory in (True, False):
            label = "on" if memory else "off"
            rep: dict[str, Any] = {}
            try:
                for line in export_step_model(model, cfg, "onnx", Path(tmp) / f"step_{label}.onnx", memory=memory,
                                              int8=True, verify_steps=c["verify_steps"], eval_tokens=c["eval_tokens"],
                                              report=rep, checkpoint_step=steps):
                    if progress:
                        print(f"memory {label}: {line}")
            except ExportCheckFailed as err:
                failures.append(f"memory {label}: {err}")
                break
            graph = step_graph(model, memory=memory)
            pt2 = export_step(graph, "torch-export", Path(tmp) / f"step_{label}.pt2", manifest(graph, cfg, 1))
            program, _ = load_torch_export(pt2)
            with torch.no_grad():  # reference: the model's own step, over the first verify_steps tokens
                ref, _, _ = measure_step(torch_step(model.step), model.init_state, tokens[:c["verify_steps"]])
                got, ppl_pt2, ms_pt2 = measure_step(torch_step(program.module()), graph.init_state, tokens)
            err_pt2 = float(np.abs(got[:c["verify_steps"]] - ref).max())
            if not err_pt2 <= 1e-4:
                failures.append(f"memory {label}: the torch.export program differs from the PyTorch step by {err_pt2:.3g}")
                break
            base = rep["torch_step"]["ms_per_step"]
            common = {"memory": label, "tokens": rep["tokens"], "eval_tokens": rep["eval_tokens"]}
            rows += [
                {**common, "engine": "PyTorch step", "MiB": None, "ms_per_step": base, "speedup": 1.0,
                 "ppl": rep["torch_step"]["ppl"], "max_abs_logit_err": 0.0},
                {**common, "engine": "torch.export", "MiB": pt2.stat().st_size / 2**20, "ms_per_step": ms_pt2,
                 "speedup": base / ms_pt2, "ppl": ppl_pt2, "max_abs_logit_err": err_pt2},
                {**common, "engine": "ONNX fp32", "MiB": rep["fp32"]["bytes"] / 2**20,
                 "ms_per_step": rep["fp32"]["ms_per_step"], "speedup": base / rep["fp32"]["ms_per_step"],
                 "ppl": rep["fp32"]["ppl"], "max_abs_logit_err": rep["max_abs_logit_err"]},
                {**common, "engine": "ONNX int8 (dynamic)", "MiB": rep["int8"]["bytes"] / 2**20,
                 "ms_per_step": rep["int8"]["ms_per_step"], "speedup": base / rep["int8"]["ms_per_step"],
                 "ppl": rep["int8"]["ppl"], "max_abs_logit_err": rep["int8"]["max_abs_logit_diff"]},
            ]
    payload = {"suite": "export", "preset": preset, "check": {"passed": not failures, "failures": failures},
               "train_steps": steps, "token_source": source, "results": rows,
               "params": sum(p.numel() for p in model.parameters()), **provenance(c)}
    write_json(out_dir / "export.json", payload)
    if failures:
        return payload
    note = (f"\nS3CMN ({payload['params'] / 1e6:.1f} M parameters, {steps} training steps), batch 1, "
            f"{c['threads']} threads, {rows[0]['eval_tokens']} tokens of {source} fed one at a time; "
            f"max_abs_logit_err against the PyTorch step over the first {c['verify_steps']} (int8: against "
            f"ONNX fp32, all tokens). Memory on/off: the same checkpoint with its memory switch.\n")
    (out_dir / "export.md").write_text(markdown_table(rows, ["memory", "engine", "MiB", "ms_per_step", "speedup",
                                                             "ppl", "max_abs_logit_err"]) + note)
    _plot(rows, out_dir / "export.png")
    return payload


def _plot(rows, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    engines = list(dict.fromkeys(r["engine"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    x = np.arange(len(engines))
    for j, label in enumerate(("on", "off")):
        sel = {r["engine"]: r for r in rows if r["memory"] == label}
        axes[0].bar(x + 0.4 * j - 0.2, [sel[e]["ms_per_step"] for e in engines], 0.4, label=f"memory {label}")
        axes[1].bar(x + 0.4 * j - 0.2, [sel[e]["ppl"] for e in engines], 0.4, label=f"memory {label}")
    for ax, title in zip(axes, ("ms per step (batch 1, median)", "perplexity of the fed tokens")):
        ax.set_xticks(x, engines, rotation=15)
        ax.set_title(title)
        ax.legend()
    fig.suptitle("S3CMN step: PyTorch vs torch.export vs ONNX (fp32, int8)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
