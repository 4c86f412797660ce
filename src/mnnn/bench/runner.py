"""Run benchmark suites by name: what ``mnnn bench`` does once its arguments are parsed.

This lives here rather than in :mod:`mnnn.cli` so that the command-line module only parses: a
suite's results depend on this module (it is among the ``sources`` a suite records) but not on
the CLI, whose edits therefore do not make every table stale (see ``LAUNCHERS`` in
:mod:`mnnn.bench.readme`)."""

from __future__ import annotations

import sys


def run_suites(suite: str, out: str, preset: str = "default", progress: bool = True) -> int:
    """Run ``suite`` (or every suite for ``'all'``) into ``out``; the exit status: 0 when every
    suite ran and passed its check, 1 when a check failed (its failure is in the JSON), 2 for an
    unknown suite or preset."""
    from mnnn.bench import SUITES, get_suite
    from mnnn.bench.common import git_state

    git_state()  # the revision and dirtiness of the code as it is loaded now, before any suite runs
    names = list(SUITES) if suite == "all" else [suite]
    failed, skipped = False, 0
    for name in names:
        try:
            run = get_suite(name, preset)
        except (KeyError, ValueError) as err:
            if suite == "all" and isinstance(err, ValueError):
                print(f"{name}: skipped ({err.args[0]})", file=sys.stderr)
                skipped += 1
                if skipped == len(names):
                    print(f"error: no suite has the preset {preset!r}", file=sys.stderr)
                    return 2
                continue
            print(f"error: {err.args[0]}", file=sys.stderr)
            return 2
        payload = run(out, preset=preset, progress=progress)
        check = payload.get("check")
        if isinstance(check, dict) and check.get("passed") is False:
            # the suite's check failed before anything was timed: nothing it would print is trustworthy
            for failure in check.get("failures", []):
                print(f"{name}: check failed: {failure}", file=sys.stderr)
            print(f"{name}: check failed; the failure is recorded in {out}", file=sys.stderr)
            failed = True
            continue
        print(f"{name}: results written to {out} ({len(payload['results'])} rows)")
    return 1 if failed else 0
