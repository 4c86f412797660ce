"""Put the tables of a benchmark run into the README, untouched by hand.

``python -m mnnn.bench.readme [--results runs/bench] [--readme README.md]`` replaces the text
between ``<!-- bench:SUITE -->`` and ``<!-- /bench:SUITE -->`` with ``SUITE.md`` from the results
folder (``-`` read as ``_``; one suite may write several tables, e.g. ``mqar-steps``) and a line
naming the date, git revision, machine and the command that reproduces it.
Markers whose results are missing are left as they are (and listed); results measured from
uncommitted code (``dirty``) or an unknown revision are refused (and listed), and so are stale
results: those whose ``sources`` (the mnnn files the suite had imported) differ between the
result's revision and the working tree, so a table cannot outlive the code it measured. Results
that record no ``dirty`` flag or no ``sources`` (written before suites recorded them) are
refused too: their freshness cannot be checked.

``--check-prose`` lists the figures in the README's prose (outside the generated tables, code
and inline code) that no result of its section holds: every measured figure in the text must be
one a suite wrote (a table's cell, or a value of its JSON, at the precision the text prints it,
also read as a percentage or in thousands or millions). Figures that are not measurements (HTTP
status codes, an address, a dataset's years) are listed in ``NOT_MEASUREMENTS`` with why.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
from pathlib import Path


# figures the prose may print that no suite measures, with the reason
NOT_MEASUREMENTS: dict[str, str] = {
    "0.001": "the seed's AMN learning rate (its quick-start setting)",
    "409": "an HTTP status code",
    "413": "an HTTP status code",
    "500": "an HTTP status code",
    "127.0": "the loopback address 127.0.0.1",
    "8192": "zoology's MQAR vocabulary (the recipe the grid scales down)",
    "2004": "the first year of the goog series",
    "2008": "the last year of the goog series",
}

FIGURE = re.compile(r"(?<![\w.])\d{1,3}(?:,\d{3})+(?:\.\d+)?|(?<![\w.])\d+\.\d+|(?<![\w.-])\d{3,}(?![\w])")
BLOCK = re.compile(r"<!-- bench:([\w-]+) -->.*?<!-- /bench:\1 -->", re.S)


def _numbers(value, out: set[float]) -> set[float]:
    if isinstance(value, bool):
        return out
    if isinstance(value, (int, float)):
        if value == value and abs(value) != float("inf"):
            out.add(abs(float(value)))
    elif isinstance(value, dict):
        for v in value.values():
            _numbers(v, out)
    elif isinstance(value, list):
        for v in value:
            _numbers(v, out)
    return out


def _suite_numbers(suite: str, results: Path) -> set[float]:
    stem = suite.replace("-", "_")
    out: set[float] = set()
    if (results / f"{stem}.json").exists():
        _numbers(json.loads((results / f"{stem}.json").read_text()), out)
    if (results / f"{stem}.md").exists():
        out.update(abs(float(m)) for m in re.findall(r"-?\d+(?:\.\d+)?(?:e-?\d+)?", (results / f"{stem}.md").read_text()))
    return out


def _printed_as(figure: str, values: set[float]) -> bool:
    text = figure.replace(",", "")
    value = float(text)
    half = 0.5 * 10 ** -(len(text.split(".")[1]) if "." in text else 0)
    return any(abs(v * scale - value) <= half + 1e-9 for v in values for scale in (1, 100, 1e-3, 1e-6, 1e3))


def unsourced_figures(readme: Path, results: Path) -> list[tuple[str, str]]:
    """(section heading, figure) for every figure in the prose of ``readme`` that no result of
    its section (the suites whose tables it holds; every suite for a section without tables)
    prints or records. Each ``##``/``###`` heading starts a section."""
    every = {p.stem.replace("_", "-") for p in results.glob("*.json")}
    found = []
    for section in re.split(r"(?m)^(?=#{2,3} )", readme.read_text()):
        suites = BLOCK.findall(section) or sorted(every)
        values = set().union(*(_suite_numbers(s, results) for s in suites))
        prose = BLOCK.sub("", section)
        prose = re.sub(r"`[^`]*`", "", re.sub(r"```.*?```", "", prose, flags=re.S))
        heading = section.splitlines()[0] if section.strip() else ""
        found += [(heading, m) for m in FIGURE.findall(prose)
                  if m not in NOT_MEASUREMENTS and not _printed_as(m, values)]
    return found


class DirtyResult(ValueError):
    """A result whose code is not a commit: it is not spliced."""


# Modules every suite imports that hold none of what a suite measures: ``mnnn.cli`` parses the
# ``mnnn bench`` arguments and hands them to :func:`mnnn.bench.runner.run_suites` (which is in a
# suite's sources); the parsed preset is in each JSON. Their edits do not make a table stale.
LAUNCHERS = frozenset({"src/mnnn/cli.py"})


def changed_sources(revision: str, sources: list[str], repo: Path) -> list[str] | None:
    """The files of ``sources`` (less :data:`LAUNCHERS`) that differ between ``revision`` and the
    working tree of ``repo`` (None: git cannot tell, e.g. the revision is not in this repository)."""
    measured = [s for s in sources if s not in LAUNCHERS]
    if not measured:
        return []
    try:
        run = subprocess.run(["git", "diff", "--name-only", revision, "--", *measured], capture_output=True,
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
    if repo is not None:
        if info.get("dirty") is None or not info.get("sources"):
            # written before results recorded both: whether the code it measured changed since is unknown
            raise DirtyResult(f"{suite}: the results record no dirty flag or no sources (the files the suite "
                              "imported), so their freshness cannot be checked; re-run the suite")
        changed = changed_sources(info["git_revision"], info["sources"], repo)
        if changed is None:
            raise DirtyResult(f"{suite}: cannot compare revision {info['git_revision'][:7]} with this checkout")
        if changed:
            raise DirtyResult(f"{suite}: stale, the code it measured changed since {info['git_revision'][:7]} "
                              f"({', '.join(changed[:3])}{', ...' if len(changed) > 3 else ''}); re-run the suite")
    rev = (info.get("git_revision") or "unknown")[:7]
    machine = info.get("machine", {})
    where = f"{machine.get('processor', '?')}, {machine.get('threads', '?')} threads, torch {machine.get('torch', '?')}"
    return (f"\n{_blank_missing(table.read_text().rstrip())}\n\n_{info.get('date', '?')[:10]}, git {rev}, {where}; reproduce: "
            f"`.venv/bin/mnnn bench {info.get('suite', suite)} --preset {info.get('preset', 'default')}`_\n")


def _blank_missing(table: str) -> str:
    """The suite's table with cells that hold ``None`` (a value the row does not have, e.g. the
    planted hit rate of a per-segment read) left blank, as the table's other absent values are."""
    return "\n".join(re.sub(r"(?<=\|) None(?= \|)", " ", line) for line in table.split("\n"))


def marked(suite: str, body: str) -> str:
    """``body`` between the suite's markers: the block :data:`BLOCK` finds and :func:`update` writes."""
    return f"<!-- bench:{suite} -->{body}<!-- /bench:{suite} -->"


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
        return marked(suite, body)

    new = BLOCK.sub(sub, text)
    if new != text:
        readme.write_text(new)
    for line in refused:
        print(f"refused: {line}")
    return missing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", default="runs/bench", help="folder with <suite>.md/.json (default: runs/bench)")
    parser.add_argument("--readme", default="README.md", help="file with the markers (default: README.md)")
    parser.add_argument("--check-prose", action="store_true",
                        help="splice nothing; list the prose figures no result holds and exit 1 if there are any")
    args = parser.parse_args(argv)
    if args.check_prose:
        found = unsourced_figures(Path(args.readme), Path(args.results))
        for heading, figure in found:
            print(f"unsourced: {figure} in {heading or 'the introduction'}")
        return 1 if found else 0
    missing = update(Path(args.readme), Path(args.results))
    if missing:
        print(f"no results for: {', '.join(missing)} (left as they were)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
