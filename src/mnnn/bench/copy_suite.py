"""``mnnn bench copy``: see :mod:`mnnn.bench.copying`."""

from mnnn.bench.copying import PRESETS, run_task


def run(out_dir, preset: str = "default", progress: bool = True):
    return run_task("copy", out_dir, preset, progress)


__all__ = ["PRESETS", "run"]
