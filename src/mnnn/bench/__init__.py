"""Benchmark suites: each verifies correctness, then times against baselines in the same
process, and writes JSON, a markdown table and PNG plots into an output folder."""

from __future__ import annotations

from typing import Callable

SUITES: dict[str, str] = {
    "estimators": "mnnn.bench.estimators",
    "robustness": "mnnn.bench.robustness",
    "memory": "mnnn.bench.memory",
    "ssmn": "mnnn.bench.ssmn",
    "lm": "mnnn.bench.lm",
    "datastore": "mnnn.bench.datastore",
    "cmr": "mnnn.bench.cmr",
    "cmr-wikitext": "mnnn.bench.cmr_wikitext",
    "cmr-recall": "mnnn.bench.cmr_recall",
    "mqar": "mnnn.bench.mqar",
    "copy": "mnnn.bench.copy_suite",
    "selective-copy": "mnnn.bench.selective_copy",
    "series": "mnnn.bench.series",
    "streaming": "mnnn.bench.streaming",
    "kernels": "mnnn.bench.kernels",
    "serve": "mnnn.bench.serve",
    "export": "mnnn.bench.export",
    "soak": "mnnn.bench.soak",
}


def get_suite(name: str, preset: str = "default") -> Callable:
    """The ``run(out_dir, preset, progress)`` function of a suite. An unknown suite raises
    ``KeyError`` listing the known ones; a preset the suite lacks, ``ValueError`` listing its own."""
    import importlib

    if name not in SUITES:
        raise KeyError(f"unknown benchmark suite {name!r}; known: {sorted(SUITES)} or 'all'")
    module = importlib.import_module(SUITES[name])
    if preset not in module.PRESETS:
        raise ValueError(f"suite {name!r} has no preset {preset!r}; its presets: {sorted(module.PRESETS)}")
    return module.run
