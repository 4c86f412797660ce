"""``mnnn bench soak``: bounded memory of every recurrent model's streaming step.

Each model streams ``steps`` tokens through ``model.step`` at batch 1 (under ``no_grad``, as a
server or a generator does), and the process's resident set size (RSS, ``/proc/self/status``)
and the mean ms/step are sampled every ``sample_every`` steps. The growth is the least-squares
slope of RSS against steps over the samples after the first ``warmup`` fraction (stores and
caches fill up and the allocator settles there), reported in MB per 1M steps beside its
resolution (the residual scatter of RSS divided by the span measured: a slope smaller than that
cannot be told from zero by this run). The issue's bound is 1 MB per 1M steps.

Check first (it can fail): a step that leaks one 4 KiB page per call on purpose must be measured
at >= half its true rate by the same sampler and fit, or the suite stops with exit status 1.

Models are small (vocabulary 1000) so that a million steps fit in a CPU run: what can grow
(statistics, stores, caches, Python lists) does not depend on the width. The Transformer is not
in the table: its state is the whole context by design (a KV cache; see ``bench streaming``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from mnnn.bench.common import markdown_table, provenance, write_json

PRESETS = {
    "default": {"steps": 1_000_000, "sample_every": 20_000, "warmup": 0.2, "leak_steps": 20_000},
    "short": {"steps": 100_000, "sample_every": 2_000, "warmup": 0.2, "leak_steps": 20_000},
    "toy": {"steps": 600, "sample_every": 100, "warmup": 0.2, "leak_steps": 3_000},
}
VOCAB = 1000
COLUMNS = ["model", "steps", "ms_per_step", "rss_start_MB", "rss_end_MB", "growth_MB_per_1M_steps",
           "resolution_MB_per_1M_steps", "bounded"]


def rss_bytes() -> int:
    """The current resident set size (Linux ``VmRSS``); elsewhere the peak (``ru_maxrss``)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def build() -> dict[str, Any]:
    from mnnn.models.lm_baselines import LSTMLM
    from mnnn.models.s3cmn import S3CMN
    from mnnn.models.ssmn import TextNativeSSMN

    s3 = dict(vocab_size=VOCAB, embedding_dim=32, hidden_dim=64, num_layers=1, d_state=8, max_len=64,
              memory_size=256, memory_top_k=8)
    return {
        "s3cmn (output memory)": lambda: S3CMN(**s3),
        "s3cmn (membrane memory, episodic stores)": lambda: S3CMN(**s3, memory_fusion="membrane",
                                                                  memory_interval=8),
        "text_native_ssmn": lambda: TextNativeSSMN(VOCAB, embed_dim=32, hidden_dim=64, window_size=32, num_layers=2,
                                                   num_heads=2),
        "lstm": lambda: LSTMLM(VOCAB, embed_dim=32, hidden_dim=64),
    }


def soak(step, state, steps: int, sample_every: int, progress: bool = False, name: str = "") -> dict[str, Any]:
    """Run ``state = step(token, state)`` ``steps`` times; samples of (step, RSS bytes, ms/step)."""
    gen = torch.Generator().manual_seed(0)
    stream = torch.randint(0, VOCAB, (4096, 1), generator=gen)
    samples = [(0, rss_bytes(), float("nan"))]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc=f"soak {name}", unit="step", unit_scale=True)
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(1, steps + 1):
            state = step(stream[i % 4096], state)
            if i % sample_every == 0 or i == steps:
                now = time.perf_counter()
                n = i - samples[-1][0]
                samples.append((i, rss_bytes(), (now - t0) * 1000 / n))
                if bar is not None:
                    bar.update(n)
                t0 = time.perf_counter()
    if bar is not None:
        bar.close()
    return {"samples": samples}


def growth(samples: list[tuple[int, int, float]], warmup: float) -> tuple[float, float]:
    """(slope, resolution) in bytes per step over the samples after the ``warmup`` fraction:
    the least-squares slope of RSS against steps, and the residuals' standard deviation divided
    by the span of steps fitted."""
    last = samples[-1][0]
    pts = [(s, r) for s, r, _ in samples if s >= warmup * last]
    if len(pts) < 3:
        raise ValueError(f"too few samples after the warm-up to fit a slope ({len(pts)}); sample more often")
    x = torch.tensor([p[0] for p in pts], dtype=torch.float64)
    y = torch.tensor([p[1] for p in pts], dtype=torch.float64)
    xm, ym = x.mean(), y.mean()
    slope = float(((x - xm) * (y - ym)).sum() / ((x - xm) ** 2).sum())
    resid = y - (ym + slope * (x - xm))
    return slope, float(resid.std() / (x.max() - x.min()))


def verify(c: dict[str, Any]) -> dict[str, Any]:
    """The sampler and the fit must see a leak planted on purpose: one fresh 4 KiB page per step
    (an anonymous mapping, written to: new resident memory even in a process whose heap holds
    freed memory the allocator could hand out again without growing)."""
    import mmap

    leak: list[mmap.mmap] = []

    def leaking(token, state):
        page = mmap.mmap(-1, 4096)
        page[0] = 1
        leak.append(page)
        return state

    every = max(1, c["leak_steps"] // 20)
    run = soak(leaking, None, c["leak_steps"], every)
    slope, _ = growth(run["samples"], c["warmup"])
    for page in leak:
        page.close()
    leak.clear()
    measured = slope / 1024
    failures = [] if measured >= 2 else [f"a planted leak of 4 KiB/step was measured at {measured:.2f} KiB/step"]
    return {"passed": not failures, "failures": failures, "planted_leak_measured_KiB_per_step": measured,
            "checks": ["a planted 4 KiB/step leak is measured at >= 2 KiB/step"]}


def run(out_dir: str | Path, preset: str = "default", progress: bool = True) -> dict[str, Any]:
    c = PRESETS[preset]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    check = verify(c)
    if not check["passed"]:
        payload = {"suite": "soak", "preset": preset, "results": [], "check": check, **provenance(c)}
        write_json(out_dir / "soak.json", payload)
        return payload
    rows, traces = [], {}
    for name, make in build().items():
        torch.manual_seed(0)
        model = make().eval()

        def step(token, state, model=model):
            return model.step(token, state)[1]

        result = soak(step, model.init_state(1), c["steps"], c["sample_every"], progress, name)
        samples = result["samples"]
        slope, resolution = growth(samples, c["warmup"])
        per_m = slope * 1e6 / 2**20
        rows.append({"model": name, "steps": c["steps"],
                     "ms_per_step": sorted(ms for _, _, ms in samples[1:])[len(samples[1:]) // 2],
                     "rss_start_MB": samples[0][1] / 2**20, "rss_end_MB": samples[-1][1] / 2**20,
                     "growth_MB_per_1M_steps": per_m, "resolution_MB_per_1M_steps": resolution * 1e6 / 2**20,
                     "bounded": bool(per_m < 1.0)})
        traces[name] = samples
        del model
    payload = {"suite": "soak", "preset": preset, "results": rows, "check": check,
               "traces": {k: [list(s) for s in v] for k, v in traces.items()}, **provenance(c)}
    write_json(out_dir / "soak.json", payload)
    (out_dir / "soak.md").write_text(markdown_table(rows, COLUMNS))
    _plot(traces, out_dir / "soak.png")
    return payload


def _plot(traces, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for name, samples in traces.items():
        steps = [s for s, _, _ in samples]
        a.plot(steps, [r / 2**20 for _, r, _ in samples], label=name, lw=1)
        b.plot(steps[1:], [ms for _, _, ms in samples[1:]], label=name, lw=1)
    a.set_xlabel("streaming steps")
    a.set_ylabel("process RSS (MB)")
    a.set_title("resident memory while streaming (batch 1)")
    b.set_xlabel("streaming steps")
    b.set_ylabel("ms / step (interval mean)")
    b.set_title("step time")
    a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
