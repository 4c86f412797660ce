"""``mnnn bench streaming``: per-token latency and state memory of every language model's step
path against context length, with the Transformer decoding from a KV cache as the baseline.

A check that can fail first (:func:`verify`; on failure the JSON holds it and no rows, and the
runner exits 1): over more tokens than S3CMN's output cache holds and the SSMN's window, every
model's step path gives the parallel forward's logits, the recurrent models' chunked forward gives
them too, and switching S3CMN's and the SSMN's memory off moves their logits. Then, for each
context length L:

* recurrent models (S3CMN, Text-Native SSMN, LSTM) read L tokens through their parallel forward
  in chunks of ``chunk`` with the state carried (chunks == whole is tested), then ``steps``
  single tokens are timed one by one (median); S3CMN twice: ``model.step`` and its lean decoder
  (:class:`mnnn.models.s3cmn_decode.S3CMNDecoder`, row ``s3cmn_decoder``, from the same context
  state; the check compares its logits with the parallel forward's too);
* the Transformer gets a KV cache of L random keys/values per layer (its decode cost depends on
  the cache length, not on its content; a real prefill of 64k tokens would need a 64k x 64k
  attention) and ``steps`` decode steps are timed the same way.

Memory: the bytes of the state carried between tokens (KV cache / recurrent state) after the
context, and on CUDA the peak allocated memory during the timed steps. Every model has width
``d`` and ``layers`` layers and the BERT vocabulary (30522).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import torch

from mnnn.bench.common import markdown_table, provenance, write_json
from mnnn.bench.switches import memory_off
from mnnn.models.lm_baselines import LSTMLM, TransformerLM
from mnnn.models.s3cmn import S3CMN
from mnnn.models.s3cmn_decode import S3CMNDecoder
from mnnn.models.ssmn import TextNativeSSMN
from mnnn.state import step_through

PRESETS = {
    "default": {"contexts": [1024, 4096, 16384, 65536], "d": 128, "layers": 2, "vocab": 30522, "steps": 32,
                "chunk": 1024, "window": 256},
    "gpu": {"contexts": [1024, 4096, 16384, 65536], "d": 512, "layers": 4, "vocab": 30522, "steps": 64,
            "chunk": 4096, "window": 512},
    "toy": {"contexts": [16, 32], "d": 16, "layers": 1, "vocab": 50, "steps": 2, "chunk": 8, "window": 4},
}


def build(c: dict[str, Any]) -> dict[str, torch.nn.Module]:
    d, n, V = c["d"], c["layers"], c["vocab"]
    return {
        "transformer_kv": TransformerLM(V, d_model=d, num_layers=n, num_heads=max(1, d // 32),
                                        max_len=max(c["contexts"]) + c["steps"] + 3),
        "lstm": LSTMLM(V, embed_dim=d, hidden_dim=d, num_layers=n),
        "s3cmn": S3CMN(vocab_size=V, embedding_dim=d, hidden_dim=d, num_layers=n, memory_size=1024,
                       d_state=16, max_len=c["chunk"]),
        "text_native_ssmn": TextNativeSSMN(V, embed_dim=d, hidden_dim=d, window_size=c["window"], num_layers=n,
                                           num_heads=max(1, d // 32)),
    }


def _init(model, batch):
    return model.init_cache(batch) if isinstance(model, TransformerLM) else model.init_state(batch)


def _bytes(state) -> int:
    return sum(t.numel() * t.element_size() for t in state.tensors().values())


def verify_length(models, c: dict[str, Any]) -> int:
    """Tokens the check runs: past S3CMN's memory capacity (its output cache evicts: a stream holds
    ``memory_size`` entries) and second membrane store, and past the SSMN's window (so it slides),
    plus a few."""
    need = [c["window"]]
    if "s3cmn" in models:
        cfg = models["s3cmn"].config
        need += [cfg.memory_size + 1, 2 * cfg.memory_interval]
    return max(need) + 9


@torch.no_grad()
def verify(models, c: dict[str, Any]) -> dict[str, Any]:
    """The suite's check, before anything is timed; ``passed`` is False with the failures named.

    For every model, over ``verify_length`` tokens: stepping token by token gives the logits of
    the parallel forward; for the recurrent models (whose context the suite reads in chunks) the
    forward in three uneven chunks with the state carried gives them too. The memory paths are
    exercised, not just present: S3CMN's and the SSMN's logits must move when their memory is
    switched off on the same model (:func:`mnnn.bench.switches.memory_off`: S3CMN's episodic
    reads, the SSMN's fast-weight writes); S3CMN's must not at the first position, which has
    nothing stored to read (the SSMN writes token 0 before reading, so its first position moves)."""
    T = verify_length(models, c)
    x = torch.randint(0, c["vocab"], (2, T), generator=torch.Generator().manual_seed(0))
    cuts = [0, T // 3 + 1, 2 * T // 3 + 3, T]
    failures: list[str] = []
    errs: dict[str, float] = {}
    memory_effect: dict[str, float] = {}
    for name, model in models.items():
        xs = x[:, :model.max_len] if name == "transformer_kv" else x  # (the toy Transformer is short)
        full, _ = model(xs)
        steps, _ = step_through(model, xs, _init(model, 2))
        errs[name] = float((steps - full).abs().max())
        if errs[name] > 1e-3:
            failures.append(f"{name}: step path differs from the parallel forward by {errs[name]:.2e}")
        if name == "s3cmn":
            dec = S3CMNDecoder(model)
            decoded, _ = step_through(dec, x)
            errs["s3cmn_decoder"] = float((decoded - full).abs().max())
            if errs["s3cmn_decoder"] > 1e-3:
                failures.append(f"s3cmn_decoder: the lean decoder differs from the parallel forward by "
                                f"{errs['s3cmn_decoder']:.2e}")
        if name == "transformer_kv":
            continue
        chunked, carried = [], model.init_state(2)
        for a, b in zip(cuts, cuts[1:]):
            out, carried = model(x[:, a:b], carried)
            chunked.append(out)
        err = float((torch.cat(chunked, 1) - full).abs().max())
        errs[f"{name}_chunks"] = err
        if err > 1e-3:
            failures.append(f"{name}: the forward in chunks differs from the whole by {err:.2e}")
        with memory_off(model) as switched:
            if switched is None:
                continue
            off, _ = model(x)
        if hasattr(model, "reset_stats"):  # S3CMN counts its reads; the check's are not the suite's
            model.reset_stats()
        first, rest = float((full - off)[:, 0].abs().max()), float((full - off)[:, 1:].abs().max())
        memory_effect[name] = rest
        if switched == "memory" and first > 0.0:  # (the SSMN writes x_0 before it reads: its first position moves)
            failures.append(f"{name}: its memory moved the first position's logits (by {first:.2e}), where "
                            f"nothing has been stored to read")
        if rest < 1e-6:
            failures.append(f"{name}: switching its {switched} off moved no logit (the memory path was not "
                            f"exercised)")
    return {"passed": not failures, "failures": failures, "tokens": T, "max_abs_err": errs,
            "memory_effect": memory_effect}


@torch.no_grad()
def _context_state(name, model, L, c, device):
    g = torch.Generator().manual_seed(L)
    if name == "transformer_kv":
        cache = model.init_cache(1, capacity=L + c["steps"] + 2)  # on the model's device; room for the timed steps
        cache.k.copy_(torch.randn(cache.k.shape, generator=g))
        cache.v.copy_(torch.randn(cache.v.shape, generator=g))
        cache.length.fill_(L)
        return cache
    state = model.init_state(1)
    for i in range(0, L, c["chunk"]):
        tokens = torch.randint(0, c["vocab"], (1, min(c["chunk"], L - i)), generator=g).to(device)
        _, state = model(tokens, state)
    return state


def run(out_dir: str | Path, preset: str = "default", progress: bool = True) -> dict[str, Any]:
    from tqdm.auto import tqdm

    c = PRESETS[preset]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = "cuda" if preset == "gpu" and torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    models = {k: m.eval() for k, m in build(c).items()}
    check = verify(models, c)
    base = {"suite": "streaming", "preset": preset, "device": device, "check": check, **provenance(c)}
    if not check["passed"]:
        write_json(out_dir / "streaming.json", {**base, "results": []})
        return {**base, "results": []}
    models = {k: m.to(device) for k, m in models.items()}
    timed = {}  # row -> (what steps, the model that reads the context, the context state -> the stepper's)
    for name, model in models.items():
        timed[name] = (model, model, lambda state: state)
        if name == "s3cmn":
            dec = S3CMNDecoder(model)
            timed["s3cmn_decoder"] = (dec, model, dec.from_state)
    rows = []
    with tqdm(total=len(timed) * len(c["contexts"]), desc="streaming", disable=not progress) as bar:
        for L in c["contexts"]:
            for name, (stepper, model, convert) in timed.items():
                state = convert(_context_state(name, model, L, c, device))
                state_bytes = _bytes(state)
                token = torch.zeros(1, dtype=torch.long, device=device)
                if device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                times = []
                with torch.no_grad():
                    for i in range(c["steps"] + 2):
                        start = time.perf_counter()
                        _, state = stepper.step(token, state)
                        if device == "cuda":
                            torch.cuda.synchronize()
                        if i >= 2:
                            times.append(time.perf_counter() - start)
                row = {"model": name, "context": L, "ms_per_token": 1000 * statistics.median(times),
                       "state_MB": state_bytes / 2**20}
                if device == "cuda":
                    row["peak_MB"] = torch.cuda.max_memory_allocated() / 2**20
                rows.append(row)
                bar.update(1)
    # provenance again at the end: ``sources`` then lists the modules the runs imported as well
    payload = {**base, "results": rows, **provenance(c)}
    write_json(out_dir / "streaming.json", payload)
    (out_dir / "streaming.md").write_text(markdown_table(rows, ["model", "context", "ms_per_token", "state_MB"]))
    _plot(rows, out_dir / "streaming.png")
    return payload


def _plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for name in dict.fromkeys(r["model"] for r in rows):
        sel = [r for r in rows if r["model"] == name]
        axes[0].plot([r["context"] for r in sel], [r["ms_per_token"] for r in sel], "o-", label=name)
        axes[1].plot([r["context"] for r in sel], [r["state_MB"] for r in sel], "o-", label=name)
    axes[0].set_ylabel("ms per token (median, batch 1)")
    axes[1].set_ylabel("state carried between tokens (MB)")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length (tokens)")
        ax.legend()
    axes[1].set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
