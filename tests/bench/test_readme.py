import json

from mnnn.bench.readme import update


def test_update_replaces_marked_tables_only(tmp_path):
    res = tmp_path / "res"
    res.mkdir()
    (res / "copy.md").write_text("| model | acc |\n|---|---|\n| lstm | 0.5 |\n")
    (res / "copy.json").write_text(json.dumps({"date": "2026-11-22T00:00:00", "git_revision": "abcdef123",
                                               "preset": "default", "machine": {"processor": "x86_64", "threads": 2,
                                                                                 "torch": "2.13.0"}}))
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- bench:copy -->old<!-- /bench:copy -->\n<!-- bench:mqar -->keep<!-- /bench:mqar -->\n")
    assert update(readme, res) == ["mqar"]
    text = readme.read_text()
    assert "| lstm | 0.5 |" in text and "old" not in text and "keep" in text
    assert "git abcdef1" in text and "mnnn bench copy --preset default" in text


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
