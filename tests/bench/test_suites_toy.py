"""Every suite that needs no data runs end to end at its toy size and writes the documented files."""

import json

import pytest

from mnnn.cli import main

SUITES = ["cmr-recall", "mqar", "copy", "selective-copy", "series", "streaming", "kernels"]


@pytest.mark.parametrize("suite", SUITES)
def test_suite_toy_writes_json_table_plot(suite, tmp_path):
    assert main(["bench", suite, "--preset", "toy", "--out", str(tmp_path), "--quiet"]) == 0
    stem = suite.replace("-", "_")
    payload = json.loads((tmp_path / f"{stem}.json").read_text())
    assert payload["suite"] == suite and payload["preset"] == "toy"
    assert payload["results"] and payload["config"] and "git_revision" in payload and "machine" in payload
    assert (tmp_path / f"{stem}.md").read_text().startswith("|")
    assert (tmp_path / f"{stem}.png").stat().st_size > 1000


def test_all_skips_suites_without_the_preset(tmp_path, capsys, monkeypatch):
    import mnnn.bench as bench

    monkeypatch.setattr(bench, "SUITES", {"kernels": "mnnn.bench.kernels", "series": "mnnn.bench.series"})
    assert main(["bench", "all", "--preset", "gpu", "--out", str(tmp_path), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "kernels: skipped" in err and "series: skipped" in err
