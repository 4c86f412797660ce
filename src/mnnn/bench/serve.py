"""``mnnn bench serve``: the inference server under load, and what a session saves.

Everything talks to a real uvicorn on 127.0.0.1 (a free port, in this process); every request loop
is bounded in count and time.

Check first (exit non-zero, nothing timed, when it fails), per model: a follow-up turn in a session
gives the same greedy tokens as a fresh request that re-sends the whole history; a bad request gets
a 4xx naming its field; /metrics parses.

1. Follow-up cost against history length: a session holds H tokens; a turn of ``turn`` prompt
   tokens + ``turn`` new tokens is timed in the session (``followup_ms``) and as a fresh request
   carrying the H-token history (``fresh_ms``), median of ``repeats``. A recurrent model's
   follow-up is flat in H; the Transformer baseline (no recurrent state, context capped at its
   ``max_len``) re-reads its context at every step either way.
2. Load: ``clients`` concurrent clients (httpx, streaming) send turns for ``duration_s`` (at most
   ``max_requests`` in all): throughput, p50/p99 latency and time to first token, errors, and the
   process RSS sampled over time.

The models are untrained (random weights, seed 0): serving cost does not depend on what the
weights say. Clients and server share one process (and the GIL); the figures are a lower bound on
what a separate client machine would see.
"""

from __future__ import annotations

import concurrent.futures
import json
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import torch

from mnnn.bench.common import markdown_table, provenance, write_json

PRESETS = {
    "default": {"d": 128, "hidden": 256, "layers": 2, "vocab": 30522, "memory_size": 2048, "max_len": 1024,
                "histories": [256, 1024, 4096], "turn": 16, "repeats": 3, "clients": 32, "duration_s": 20.0,
                "max_requests": 5000},
    "toy": {"d": 16, "hidden": 16, "layers": 1, "vocab": 64, "memory_size": 32, "max_len": 64,
            "histories": [16, 48], "turn": 4, "repeats": 1, "clients": 4, "duration_s": 1.0, "max_requests": 40},
}


def build(c: dict[str, Any]) -> dict[str, torch.nn.Module]:
    from mnnn.models.lm_baselines import TransformerLM
    from mnnn.models.s3cmn import S3CMN

    torch.manual_seed(0)
    return {
        "s3cmn": S3CMN(vocab_size=c["vocab"], embedding_dim=c["d"], hidden_dim=c["hidden"], num_layers=c["layers"],
                       d_state=16, max_len=256 if c["max_len"] > 256 else c["max_len"],
                       memory_size=c["memory_size"], memory_top_k=min(32, c["memory_size"])).eval(),
        "transformer": TransformerLM(c["vocab"], d_model=c["d"], num_layers=c["layers"], num_heads=max(1, c["d"] // 32),
                                     max_len=c["max_len"]).eval(),
    }


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            import os

            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _post(client, body: dict) -> dict:
    r = client.post("/v1/generate", json=body)
    if r.status_code != 200:
        raise AssertionError(f"POST /v1/generate -> {r.status_code}: {r.text[:200]}")
    return r.json()


def check(client, vocab: int, turn: int) -> list[str]:
    """Failures (empty: passed): session follow-up == fresh request with the whole history (greedy),
    a bad request -> 4xx naming its field, /metrics parses."""
    from prometheus_client.parser import text_string_to_metric_families

    failures = []
    g = torch.Generator().manual_seed(1)
    first = torch.randint(0, vocab, (2 * turn,), generator=g).tolist()
    second = torch.randint(0, vocab, (turn,), generator=g).tolist()
    sid = client.post("/v1/sessions").json()["session_id"]
    a = _post(client, {"prompt_ids": first, "max_new_tokens": turn, "temperature": 0, "session_id": sid})
    b = _post(client, {"prompt_ids": second, "max_new_tokens": turn, "temperature": 0, "session_id": sid})
    fresh = _post(client, {"prompt_ids": first + a["token_ids"] + second, "max_new_tokens": turn, "temperature": 0})
    if b["token_ids"] != fresh["token_ids"]:
        failures.append(f"session follow-up {b['token_ids']} != fresh request with the history {fresh['token_ids']}")
    client.delete(f"/v1/sessions/{sid}")
    bad = client.post("/v1/generate", json={"prompt_ids": [1], "max_new_tokens": -1})
    if bad.status_code != 422 or bad.json().get("field") != "max_new_tokens":
        failures.append(f"max_new_tokens=-1 gave {bad.status_code} {bad.text[:100]}, expected 422 naming the field")
    try:
        names = {f.name for f in text_string_to_metric_families(client.get("/metrics").text)}
        if "mnnn_request_latency_seconds" not in names:
            failures.append("/metrics lacks mnnn_request_latency_seconds")
    except Exception as err:  # a parse error is the failure being checked for
        failures.append(f"/metrics does not parse: {err}")
    return failures


def followup_rows(client, name: str, c: dict, progress) -> list[dict[str, Any]]:
    rows, g, turn = [], torch.Generator().manual_seed(2), c["turn"]
    for H in c["histories"]:
        history = torch.randint(0, c["vocab"], (H,), generator=g).tolist()
        sid = client.post("/v1/sessions").json()["session_id"]
        seen = _post(client, {"prompt_ids": history, "max_new_tokens": 1, "temperature": 0, "session_id": sid})
        seen_ids = history + seen["token_ids"]
        follow, fresh = [], []
        for _ in range(c["repeats"]):
            prompt = torch.randint(0, c["vocab"], (turn,), generator=g).tolist()
            start = time.perf_counter()
            out = _post(client, {"prompt_ids": prompt, "max_new_tokens": turn, "temperature": 0, "session_id": sid})
            follow.append(time.perf_counter() - start)
            seen_ids += prompt + out["token_ids"]
            start = time.perf_counter()
            _post(client, {"prompt_ids": seen_ids[-(H + turn):], "max_new_tokens": turn, "temperature": 0})
            fresh.append(time.perf_counter() - start)
        client.delete(f"/v1/sessions/{sid}")
        f_ms, r_ms = 1000 * statistics.median(follow), 1000 * statistics.median(fresh)
        rows.append({"model": name, "history": H, "followup_ms": f_ms, "fresh_ms": r_ms, "fresh_over_followup": r_ms / f_ms})
        progress.update(1)
    return rows


def load_rows(url: str, name: str, c: dict) -> tuple[dict[str, Any], list[tuple[float, int]]]:
    import httpx

    deadline = time.monotonic() + c["duration_s"]
    budget = threading.Semaphore(c["max_requests"])
    lat, ttft, errors, tokens = [], [], [], [0]
    lock = threading.Lock()
    rss: list[tuple[float, int]] = []
    t0 = time.monotonic()

    def client_loop(i: int) -> None:
        g = torch.Generator().manual_seed(100 + i)
        with httpx.Client(base_url=url, timeout=60) as http:
            while time.monotonic() < deadline and budget.acquire(blocking=False):
                body = {"prompt_ids": torch.randint(0, c["vocab"], (c["turn"],), generator=g).tolist(),
                        "max_new_tokens": c["turn"], "temperature": 1.0, "top_k": 50, "seed": i, "stream": True}
                start, first, n = time.perf_counter(), None, 0
                try:
                    with http.stream("POST", "/v1/generate", json=body) as r:
                        if r.status_code != 200:
                            raise AssertionError(f"status {r.status_code}")
                        for line in r.iter_lines():
                            if not line.startswith("data: "):
                                continue
                            event = json.loads(line[6:])
                            if "error" in event:
                                raise AssertionError(event["error"])
                            if "token_id" in event:
                                first = first if first is not None else time.perf_counter() - start
                                n += 1
                except Exception as err:  # counted and reported: the suite's result includes its errors
                    with lock:
                        errors.append(str(err)[:200])
                    continue
                with lock:
                    lat.append(time.perf_counter() - start)
                    ttft.append(first if first is not None else float("nan"))
                    tokens[0] += n

    stop = threading.Event()

    def sample_rss() -> None:
        while not stop.is_set():
            rss.append((time.monotonic() - t0, _rss_bytes()))
            stop.wait(0.25)

    sampler = threading.Thread(target=sample_rss, daemon=True)
    sampler.start()
    with concurrent.futures.ThreadPoolExecutor(c["clients"]) as pool:
        list(pool.map(client_loop, range(c["clients"]), timeout=c["duration_s"] + 300))
    elapsed = time.monotonic() - t0
    stop.set()
    sampler.join(5)

    def pct(xs, q):
        xs = sorted(x for x in xs if x == x)
        return 1000 * xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")

    row = {"model": name, "clients": c["clients"], "requests": len(lat), "errors": len(errors),
           "tokens_per_s": tokens[0] / elapsed, "p50_ms": pct(lat, 0.5), "p99_ms": pct(lat, 0.99),
           "ttft_p50_ms": pct(ttft, 0.5), "ttft_p99_ms": pct(ttft, 0.99),
           "rss_MB_max": max(r for _, r in rss) / 2**20 if rss else float("nan"), "first_errors": errors[:3]}
    return row, rss


def run(out_dir: str | Path, preset: str = "default", progress: bool = True) -> dict[str, Any]:
    import httpx
    from tqdm.auto import tqdm

    from mnnn.deploy.engine import InferenceEngine
    from mnnn.deploy.server import create_app, running

    c = PRESETS[preset]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    models = build(c)
    apps = {name: create_app(InferenceEngine(model), max_sessions=c["clients"] + 8, max_new_tokens=c["turn"] * 4,
                             max_prompt_tokens=max(c["histories"]) + 4 * c["turn"] * (c["repeats"] + 1))
            for name, model in models.items()}
    failures: list[str] = []
    followup, load, rss_trace = [], [], {}
    with tqdm(total=len(models) * (len(c["histories"]) + 1) + 1, desc="serve", disable=not progress) as bar:
        for name, app in apps.items():
            with running(app) as url, httpx.Client(base_url=url, timeout=600) as client:
                failures += [f"{name}: {f}" for f in check(client, c["vocab"], c["turn"])]
                bar.update(1)
                if failures:
                    break
                followup += followup_rows(client, name, c, bar)
                if name == "s3cmn":
                    row, rss_trace[name] = load_rows(url, name, c)
                    load.append(row)
                    bar.update(1)
                    if row["errors"]:  # a load figure with failed requests in it is no figure
                        failures.append(f"{name}: {row['errors']} load requests failed (first: "
                                        f"{row['first_errors'][0]})")
    payload = {"suite": "serve", "preset": preset, "check": {"passed": not failures, "failures": failures},
               "results": [] if failures else followup + load, "followup": followup, "load": load,
               "rss_trace": {k: [[round(t, 3), b] for t, b in v] for k, v in rss_trace.items()}, **provenance(c)}
    write_json(out_dir / "serve.json", payload)
    if failures:
        return payload
    (out_dir / "serve.md").write_text(
        markdown_table(followup, ["model", "history", "followup_ms", "fresh_ms", "fresh_over_followup"]) + "\n\n"
        + markdown_table(load, ["model", "clients", "requests", "errors", "tokens_per_s", "p50_ms", "p99_ms",
                                "ttft_p50_ms", "ttft_p99_ms", "rss_MB_max"]))
    _plot(followup, rss_trace, out_dir / "serve.png")
    return payload


def _plot(followup, rss_trace, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for name in dict.fromkeys(r["model"] for r in followup):
        sel = [r for r in followup if r["model"] == name]
        axes[0].plot([r["history"] for r in sel], [r["followup_ms"] for r in sel], "o-", label=f"{name}: session follow-up")
        axes[0].plot([r["history"] for r in sel], [r["fresh_ms"] for r in sel], "s--", label=f"{name}: fresh, whole history")
    axes[0].set_xscale("log", base=2)
    axes[0].set_yscale("log")
    axes[0].set_xlabel("history length (tokens)")
    axes[0].set_ylabel("one turn (ms, median)")
    axes[0].legend(fontsize=8)
    for name, trace in rss_trace.items():
        axes[1].plot([t for t, _ in trace], [b / 2**20 for _, b in trace], label=f"{name} under load")
    axes[1].set_xlabel("time (s)")
    axes[1].set_ylabel("process RSS (MB)")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
