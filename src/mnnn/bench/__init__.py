"""Benchmark suites: each verifies correctness, then times against baselines in the same
process, and writes JSON, a markdown table and PNG plots into an output folder."""

from __future__ import annotations

from typing import Callable

SUITES: dict[str, str] = {
    "estimators": "mnnn.bench.estimators",
    "memory": "mnnn.bench.memory",
    "ssmn": "mnnn.bench.ssmn",
}


def get_suite(name: str) -> Callable:
    """The ``run(out_dir, preset, progress)`` function of a suite; KeyError lists the known ones."""
    import importlib

    if name not in SUITES:
        raise KeyError(f"unknown benchmark suite {name!r}; known: {sorted(SUITES)} or 'all'")
    return importlib.import_module(SUITES[name]).run
