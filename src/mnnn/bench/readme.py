"""Put the tables of a benchmark run into the README, untouched by hand.

``python -m mnnn.bench.readme [--results runs/bench] [--readme README.md]`` replaces the text
between ``<!-- bench:SUITE -->`` and ``<!-- /bench:SUITE -->`` with ``SUITE.md`` from the results
folder (``-`` read as ``_``; one suite may write several tables, e.g. ``mqar-steps``) and a line
naming the date, git revision, machine and the command that reproduces it.
Markers whose results are missing are left as they are (and listed); results measured from
uncommitted code (``dirty``) or an unknown revision are refused (and listed), and so are stale
results: those whose ``sources`` (the mnnn files the suite had imported) differ between the
result's revision and the working tree, so a table cannot outlive the code it measured.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
from pathlib import Path


class DirtyResult(ValueError):
    """A result whose code is not a commit: it is not spliced."""


def changed_sources(revision: str, sources: list[str], repo: Path) -> list[str] | None:
    """The files of ``sources`` that differ between ``revision`` and the working tree of ``repo``
    (None: git cannot tell, e.g. the revision is not in this repository)."""
    try:
        run = subprocess.run(["git", "diff", "--name-only", revision, "--", *sources], capture_output=True,
                             text=True, cwd=repo, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return run.stdout.split() if run.returncode == 0 else None


def render(suite: str, results: Path, repo: Path | None = None) -> str | None:
    stem = suite.replace("-", "_")
    table, meta = results / f"{stem}.md", results / f"{stem}.json"
    if not table.exists() or not meta.exists():
        return None
    info = json.loads(meta.read_text())
    if info.get("dirty") or not info.get("git_revision"):
        # measured from uncommitted code: no revision reproduces it, so it stays out of the README
        raise DirtyResult(f"{suite}: results come from a dirty or unknown revision; commit, then re-run the suite")
    if info.get("sources") and repo is not None:
        changed = changed_sources(info["git_revision"], info["sources"], repo)
        if changed is None:
            raise DirtyResult(f"{suite}: cannot compare revision {info['git_revision'][:7]} with this checkout")
        if changed:
            raise DirtyResult(f"{suite}: stale, the code it measured changed since {info['git_revision'][:7]} "
                              f"({', '.join(changed[:3])}{', ...' if len(changed) > 3 else ''}); re-run the suite")
    rev = (info.get("git_revision") or "unknown")[:7]
    machine = info.get("machine", {})
    where = f"{machine.get('processor', '?')}, {machine.get('threads', '?')} threads, torch {machine.get('torch', '?')}"
    return (f"\n{table.read_text().rstrip()}\n\n_{info.get('date', '?')[:10]}, git {rev}, {where}; reproduce: "
            f"`.venv/bin/mnnn bench {info.get('suite', suite)} --preset {info.get('preset', 'default')}`_\n")


def update(readme: Path, results: Path) -> list[str]:
    text = readme.read_text()
    missing: list[str] = []
    refused: list[str] = []

    def sub(match: re.Match) -> str:
        suite = match.group(1)
        try:
            body = render(suite, results, readme.resolve().parent)
        except DirtyResult as err:
            refused.append(str(err))
            return match.group(0)
        if body is None:
            missing.append(suite)
            return match.group(0)
        return f"<!-- bench:{suite} -->{body}<!-- /bench:{suite} -->"

    new = re.sub(r"<!-- bench:([\w-]+) -->.*?<!-- /bench:\1 -->", sub, text, flags=re.S)
    if new != text:
        readme.write_text(new)
    for line in refused:
        print(f"refused: {line}")
    return missing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", default="runs/bench", help="folder with <suite>.md/.json (default: runs/bench)")
    parser.add_argument("--readme", default="README.md", help="file with the markers (default: README.md)")
    args = parser.parse_args(argv)
    missing = update(Path(args.readme), Path(args.results))
    if missing:
        print(f"no results for: {', '.join(missing)} (left as they were)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
