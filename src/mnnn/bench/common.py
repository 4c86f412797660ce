"""Helpers every benchmark suite shares: timing, provenance, JSON and plots."""

from __future__ import annotations

import functools
import json
import platform
import statistics
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch

from mnnn.serialization import atomic_write


def median_time(fn: Callable[[], Any], repeats: int = 3, warmup: int = 0) -> tuple[float, list[float]]:
    """Median wall time of ``fn()`` in seconds over ``repeats`` runs (and all the runs)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def provenance(config: dict[str, Any]) -> dict[str, Any]:
    """What is needed to trace and rerun a result: config, git revision (and whether the package's
    sources differed from it when this process started: ``dirty``), command, machine, date."""
    rev, dirty = git_state()
    import sys

    return {
        "config": config,
        "git_revision": rev,
        "dirty": dirty,
        "command": " ".join(["mnnn", *sys.argv[1:]]) if sys.argv and sys.argv[0].endswith("mnnn") else None,
        "sources": loaded_sources(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
    }


def loaded_sources() -> list[str]:
    """Repository paths (``src/mnnn/...``) of the mnnn modules this process has imported: the code a
    result depends on, which ``python -m mnnn.bench.readme`` compares with the working tree."""
    import sys

    root = Path(__file__).resolve().parents[3]
    out = set()
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if (name == "mnnn" or name.startswith("mnnn.")) and path:
            try:
                out.add(Path(path).resolve().relative_to(root).as_posix())
            except ValueError:  # installed elsewhere (not an editable checkout)
                continue
    return sorted(out)


@functools.lru_cache(maxsize=1)
def git_state() -> tuple[str | None, bool | None]:
    """(revision, dirty) of the code this process runs, read once: the CLI calls it before a
    suite starts, so an edit made while a long suite runs does not change what it records."""
    here = Path(__file__).parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=here, timeout=10).stdout.strip() or None
        # dirty: the package's own sources differ from that revision (results are not reproducible
        # from it); untracked files elsewhere do not count
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "."],
                                capture_output=True, text=True, cwd=here.parent, timeout=10).stdout
        dirty = bool(status.strip()) if rev else None
    except (OSError, subprocess.SubprocessError):
        rev, dirty = None, None
    return rev, dirty


def write_json(path: Path, payload: dict[str, Any]) -> Path:
    text = json.dumps(payload, indent=2, default=float)
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def markdown_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"
