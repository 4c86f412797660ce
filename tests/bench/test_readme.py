import json

from mnnn.bench.readme import update


def _git_repo(path) -> str:
    """A repository at ``path`` with src/model.py, src/other.py and src/mnnn/cli.py committed;
    returns the revision."""
    import subprocess

    def git(*args):
        return subprocess.run(["git", *args], cwd=path, check=True, capture_output=True, text=True).stdout.strip()

    git("init", "-q")
    git("config", "user.email", "t@t")
    git("config", "user.name", "t")
    (path / "src").mkdir()
    (path / "src" / "model.py").write_text("x = 1\n")
    (path / "src" / "other.py").write_text("y = 1\n")
    (path / "src" / "mnnn").mkdir()
    (path / "src" / "mnnn" / "cli.py").write_text("z = 1\n")
    git("add", ".")
    git("commit", "-qm", "one")
    return git("rev-parse", "HEAD")


def test_update_replaces_marked_tables_only(tmp_path):
    rev = _git_repo(tmp_path)
    res = tmp_path / "res"
    res.mkdir()
    (res / "copy.md").write_text("| model | acc |\n|---|---|\n| lstm | 0.5 |\n")
    (res / "copy.json").write_text(json.dumps({"date": "2026-11-22T00:00:00", "git_revision": rev, "dirty": False,
                                               "sources": ["src/model.py"], "preset": "default",
                                               "machine": {"processor": "x86_64", "threads": 2, "torch": "2.13.0"}}))
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- bench:copy -->old<!-- /bench:copy -->\n<!-- bench:mqar -->keep<!-- /bench:mqar -->\n")
    assert update(readme, res) == ["mqar"]
    text = readme.read_text()
    assert "| lstm | 0.5 |" in text and "old" not in text and "keep" in text
    assert f"git {rev[:7]}" in text and "mnnn bench copy --preset default" in text


def test_absent_values_render_blank(tmp_path):
    """A cell a suite wrote as ``None`` (no value for that row) is blank in the README, like the
    table's other absent values; a word merely starting with None is kept."""
    from mnnn.bench.readme import render

    rev = _git_repo(tmp_path)
    res = tmp_path / "res"
    res.mkdir()
    (res / "copy.md").write_text("| model | rate | note |\n|---|---|---|\n| a | None | Nonesuch |\n| b | 0.5 |  |\n")
    (res / "copy.json").write_text(json.dumps({"date": "2026-11-22T00:00:00", "git_revision": rev, "dirty": False,
                                               "sources": ["src/model.py"], "preset": "default"}))
    body = render("copy", res, tmp_path)
    assert "| a |  | Nonesuch |" in body and "| b | 0.5 |  |" in body and "| None |" not in body


def test_results_that_cannot_be_checked_are_refused(tmp_path, capsys):
    """Results written before suites recorded ``dirty`` and ``sources`` cannot be shown fresh."""
    rev = _git_repo(tmp_path)
    res = tmp_path / "res"
    res.mkdir()
    (res / "copy.md").write_text("| model | acc |\n|---|---|\n| lstm | 0.6 |\n")
    readme = tmp_path / "README.md"
    for meta in ({"dirty": False}, {"sources": ["src/model.py"]}, {"dirty": False, "sources": []}):
        (res / "copy.json").write_text(json.dumps({"date": "2026-11-22T00:00:00", "git_revision": rev,
                                                   "preset": "default", "machine": {}, **meta}))
        readme.write_text("<!-- bench:copy -->old<!-- /bench:copy -->\n")
        assert update(readme, res) == []
        assert "old" in readme.read_text() and "0.6" not in readme.read_text(), meta
        assert "cannot be checked" in capsys.readouterr().out


def test_dirty_results_are_refused(tmp_path, capsys):
    res = tmp_path / "res"
    res.mkdir()
    (res / "copy.md").write_text("| model | acc |\n|---|---|\n| lstm | 0.9 |\n")
    (res / "copy.json").write_text(json.dumps({"date": "2026-11-22T00:00:00", "git_revision": "abcdef123",
                                               "dirty": True, "preset": "default", "machine": {}}))
    readme = tmp_path / "README.md"
    readme.write_text("<!-- bench:copy -->old<!-- /bench:copy -->\n")
    assert update(readme, res) == []
    assert "old" in readme.read_text() and "0.9" not in readme.read_text()
    assert "dirty" in capsys.readouterr().out


def test_stale_results_are_refused(tmp_path, capsys):
    """A result whose measured sources changed after its revision is not spliced."""
    rev = _git_repo(tmp_path)
    res = tmp_path / "res"
    res.mkdir()
    (res / "copy.md").write_text("| model | acc |\n|---|---|\n| lstm | 0.7 |\n")
    (res / "copy.json").write_text(json.dumps({"date": "2026-11-24T00:00:00", "git_revision": rev, "dirty": False,
                                               "preset": "default", "machine": {}, "sources": ["src/model.py"]}))
    readme = tmp_path / "README.md"
    readme.write_text("<!-- bench:copy -->old<!-- /bench:copy -->\n")
    (tmp_path / "src" / "other.py").write_text("y = 2\n")  # not measured by the suite: still fresh
    update(readme, res)
    assert "0.7" in readme.read_text()
    readme.write_text("<!-- bench:copy -->old<!-- /bench:copy -->\n")
    (tmp_path / "src" / "mnnn" / "cli.py").write_text("z = 3\n")  # the launcher: never stale
    (res / "copy.json").write_text(json.dumps({"date": "2026-11-24T00:00:00", "git_revision": rev, "dirty": False,
                                               "preset": "default", "machine": {},
                                               "sources": ["src/mnnn/cli.py", "src/model.py"]}))
    update(readme, res)
    assert "0.7" in readme.read_text()
    readme.write_text("<!-- bench:copy -->old<!-- /bench:copy -->\n")
    (tmp_path / "src" / "model.py").write_text("x = 2\n")  # measured code changed: stale
    update(readme, res)
    assert "old" in readme.read_text() and "0.7" not in readme.read_text()
    out = capsys.readouterr().out
    assert "stale" in out and "src/model.py" in out


def test_prose_figures_must_come_from_the_section_results(tmp_path):
    from mnnn.bench.readme import unsourced_figures

    res = tmp_path / "res"
    res.mkdir()
    (res / "copy.md").write_text("| model | acc |\n|---|---|\n| lstm | 0.8125 |\n")
    (res / "copy.json").write_text(json.dumps({"results": [{"model": "lstm", "accuracy": 0.8125, "steps": 2496}]}))
    (res / "lm.json").write_text(json.dumps({"results": [{"valid_ppl": 261.5}]}))
    readme = tmp_path / "README.md"
    readme.write_text("## Copy\n<!-- bench:copy -->x<!-- /bench:copy -->\n"
                      "The LSTM reaches 0.81 (81 %) after 2,496 steps; `0.123` in code is not prose; "
                      "by hand: 0.777, and 261.5 belongs to another section.\n"
                      "## Status\nHTTP 409 is not a measurement; 261.5 is the lm suite's.\n")
    found = unsourced_figures(readme, res)
    assert found == [("## Copy", "0.777"), ("## Copy", "261.5")]


def test_the_readme_prose_holds_no_hand_typed_figure():
    """Every measured figure in the README's prose is one a suite wrote (docs/bench)."""
    from pathlib import Path

    from mnnn.bench.readme import unsourced_figures

    root = Path(__file__).resolve().parents[2]
    assert unsourced_figures(root / "README.md", root / "docs" / "bench") == []


def test_every_readme_table_is_what_its_committed_results_render():
    """Each marked block of the README is exactly docs/bench/<suite>.md with its provenance line:
    no table edited by hand, none spliced from results that were not committed beside it."""
    from pathlib import Path

    from mnnn.bench.readme import BLOCK, marked, render

    root = Path(__file__).resolve().parents[2]
    blocks = list(BLOCK.finditer((root / "README.md").read_text()))
    assert len(blocks) >= 10
    for block in blocks:
        suite = block.group(1)
        assert block.group(0) == marked(suite, render(suite, root / "docs" / "bench")), \
            f"README block {suite!r} differs from docs/bench"
