import json

import pytest

from mnnn.cli import build_parser, main


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("demo", "bench", "info"):
        assert cmd in out


def test_every_option_has_help():
    parser = build_parser()
    for action in parser._subparsers._group_actions[0].choices.values():
        for opt in action._actions:
            if opt.dest != "help":
                assert opt.help, f"{action.prog} {opt.dest} has no help"


def test_bench_estimators_toy(tmp_path):
    assert main(["bench", "estimators", "--preset", "toy", "--out", str(tmp_path), "--quiet"]) == 0
    payload = json.loads((tmp_path / "estimators.json").read_text())
    assert payload["suite"] == "estimators" and "git_revision" in payload and payload["config"]
    assert {r["model"] for r in payload["results"]} == {"amrc", "pmrc", "amn", "lstm", "gru"}
    assert payload["check"]["passed"] and max(payload["check"]["max_abs_err"].values()) < 1e-4
    assert (tmp_path / "estimators.png").stat().st_size > 0
    assert (tmp_path / "estimators.md").read_text().startswith("| model")


def test_bench_unknown_suite(tmp_path, capsys):
    assert main(["bench", "nope", "--out", str(tmp_path)]) == 2
    assert "known" in capsys.readouterr().err


def test_demo_runs(tmp_path):
    assert main(["demo", "--epochs", "1", "--out", str(tmp_path), "--quiet"]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results) == {"amrc", "pmrc", "amn"}
    assert (tmp_path / "predictions.png").exists() and (tmp_path / "amn.safetensors").exists()


def test_info(capsys):
    assert main(["info"]) == 0
    assert "torch" in capsys.readouterr().out


def test_bench_memory_toy(tmp_path):
    assert main(["bench", "memory", "--preset", "toy", "--out", str(tmp_path), "--quiet"]) == 0
    payload = json.loads((tmp_path / "memory.json").read_text())
    kinds = {r["kind"] for r in payload["results"]}
    assert kinds == {"get_memory", "lif_fwd_bwd"}
    assert payload["check"]["passed"] and payload["results"][0]["topk_agreement_bruteforce"] >= 0.99
    assert (tmp_path / "memory.png").stat().st_size > 0


def test_bench_ssmn_toy(tmp_path):
    assert main(["bench", "ssmn", "--preset", "toy", "--out", str(tmp_path), "--quiet"]) == 0
    payload = json.loads((tmp_path / "ssmn.json").read_text())
    kinds = {r["kind"] for r in payload["results"]}
    assert kinds == {"quality", "kernel", "standard_epoch", "generate_sequence", "text_generation"}
    assert payload["check"]["passed"] and payload["check"]["max_err"]["standard_step_vs_forward"] < 1e-4
    variants = {r["variant"] for r in payload["results"] if r.get("task", "").startswith("delayed recall")}
    assert variants == {"hebbian, importance-gated", "hebbian, ungated", "delta rule", "gated delta rule (default)",
                        "default's checkpoint, writes off (eta 0)", "no plasticity (eta 0)"}
    sine = [r for r in payload["results"] if r.get("task") == "noisy sine"]
    assert len(sine) == 3 and all(r["r2_min"] <= r["r2"] for r in sine)
    (seed_row,) = [r for r in payload["results"] if r["kind"] == "generate_sequence"]
    assert seed_row["tokens_per_s"] > 0 and seed_row["baseline_tokens_per_s"] > 0
    assert all(r["max_rel_err"] < 1e-4 for r in payload["results"] if r["kind"] == "kernel")


def test_bench_lm_toy(tmp_path):
    import os

    if not os.environ.get("MNNN_DATA_DIR"):
        pytest.skip("MNNN_DATA_DIR not set")
    assert main(["bench", "lm", "--preset", "toy", "--out", str(tmp_path), "--quiet"]) == 0
    payload = json.loads((tmp_path / "lm.json").read_text())
    rows = {r["model"]: r for r in payload["results"]}
    assert payload["check"]["passed"] and "dirty" in payload
    for name in ("s3cmn", "transformer + memory", "lstm + memory"):
        on, off = rows[f"{name} (memory on)"], rows[f"{name} (memory off)"]
        assert on["steps"] == off["steps"] and on["valid_ppl"] != off["valid_ppl"]  # one checkpoint, a switch
        assert 0 <= on["memory_hit_rate_chance"] <= 1 and 0 < on["mean_lambda"] < 1
    assert {"transformer", "lstm"} <= set(rows)
    for name in ("text_native_ssmn", "text_native_ssmn (hebbian)"):  # fast weights switched on one checkpoint
        on, off = rows[f"{name} (fast weights on)"], rows[f"{name} (fast weights off)"]
        assert on["steps"] == off["steps"] and on["valid_ppl"] != off["valid_ppl"]


def test_bench_lm_check_fails_on_a_future_leak(tmp_path, monkeypatch, capsys):
    """A model that peeks at the next token fails the suite's causality check: exit 1, the
    failure in the JSON, nothing trained."""
    import torch

    import mnnn.bench.lm as lm
    from mnnn.models.lm_baselines import LSTMLM

    class Leaky(LSTMLM):
        def features(self, tokens, state=None):
            feats, state = super().features(tokens, state)
            return feats + 0.1 * self.embed(torch.roll(tokens, -1, dims=1)), state

    monkeypatch.setattr(lm, "build_models", lambda c: {"leaky": lambda: Leaky(30522, embed_dim=8, hidden_dim=8)})
    assert main(["bench", "lm", "--preset", "toy", "--out", str(tmp_path), "--quiet"]) == 1
    payload = json.loads((tmp_path / "lm.json").read_text())
    assert not payload["check"]["passed"] and "future leak" in payload["check"]["failures"][0]
    assert payload["results"] == [] and "check failed" in capsys.readouterr().err


def test_bench_preset_missing(tmp_path, capsys):
    assert main(["bench", "estimators", "--preset", "gpu", "--out", str(tmp_path)]) == 2
    assert "presets" in capsys.readouterr().err


def test_bench_cmr_toy(tmp_path):
    pytest.importorskip("transformers")
    assert main(["bench", "cmr", "--preset", "toy", "--out", str(tmp_path), "--quiet"]) == 0
    payload = json.loads((tmp_path / "cmr.json").read_text())
    assert payload["check"]["passed"] and not payload["check"]["failures"]
    rows = payload["results"]
    assert rows[0]["model"] == "base" and len(rows) == 17  # 4 strategies: per token, per segment, KV read, output
    assert sum("(KV read)" in r["model"] for r in rows) == 4 and sum("(output read)" in r["model"] for r in rows) == 4
    assert all(r.get("max_abs_diff_closed_gate", 0) < 1e-5 for r in rows)


def test_bench_cmr_fails_before_timing_when_a_closed_read_changes_the_logits(tmp_path, monkeypatch, capsys):
    """A CMR whose logits move off the base's (a read that leaks with its gate closed) fails the
    check of every configuration: nothing is timed, the failures are in the JSON, exit 1."""
    pytest.importorskip("transformers")
    from mnnn.bench import cmr as suite

    class Leaky(suite.CMRModel):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out["logits"] = out["logits"] + 1e-3
            return out

    monkeypatch.setattr(suite, "CMRModel", Leaky)
    assert main(["bench", "cmr", "--preset", "toy", "--out", str(tmp_path), "--quiet"]) == 1
    payload = json.loads((tmp_path / "cmr.json").read_text())
    assert payload["check"]["passed"] is False and payload["results"] == []
    assert len(payload["check"]["failures"]) == 16 and "cmr/semantic (KV read)" in " ".join(payload["check"]["failures"])
    assert not (tmp_path / "cmr.png").exists()
    assert "check failed" in capsys.readouterr().err


def test_bench_cmr_wikitext_toy(tmp_path):
    import os

    pytest.importorskip("transformers")
    if not os.environ.get("MNNN_DATA_DIR"):
        pytest.skip("MNNN_DATA_DIR not set")
    assert main(["bench", "cmr-wikitext", "--preset", "toy", "--out", str(tmp_path), "--quiet"]) == 0
    rows = json.loads((tmp_path / "cmr_wikitext.json").read_text())["results"]
    assert abs(rows[0]["valid_ppl"] - rows[1]["valid_ppl"]) < 1e-3 * rows[0]["valid_ppl"]  # untrained == base
    labels = [r["model"] for r in rows]
    assert "CMR trained (KV read), memory on" in labels and "CMR trained (KV read), memory off" in labels
    for read in ("KV read", "output read of 32"):
        off = rows[labels.index(f"CMR trained ({read}), memory off")]["valid_ppl"]
        assert abs(off - rows[0]["valid_ppl"]) < 1e-3 * rows[0]["valid_ppl"]  # the switch gives the base
    assert any(label.startswith("CMR untrained, output read") for label in labels)


def test_bench_datastore_toy(tmp_path):
    import os

    if not os.environ.get("MNNN_DATA_DIR"):
        pytest.skip("MNNN_DATA_DIR not set")
    assert main(["bench", "datastore", "--preset", "toy", "--out", str(tmp_path), "--quiet"]) == 0
    payload = json.loads((tmp_path / "datastore.json").read_text())
    assert payload["check"]["passed"] and len(payload["check"]["checks"]) == 5
    rows = {r["reading"].split(" (")[0]: r for r in payload["results"]}
    assert set(rows) == {"LM alone", "cache", "datastore", "cache + datastore"}
    assert rows["LM alone"]["vs_memory_off"] == 1.0
    assert 0 < rows["datastore"]["hit_rate_chance"] < 1 and rows["datastore"]["entries"] > 3000
    assert (tmp_path / "datastore.png").stat().st_size > 1000


def test_bench_datastore_fails_when_its_check_fails(tmp_path, monkeypatch):
    import mnnn.memory.datastore as ds

    real = ds.Datastore.search_entries

    def broken(self, queries, k, search="exact", block=16384):  # a search that drops the best entry
        scores, idx = real(self, queries, k + 1, search, block)
        return scores[:, 1:], idx[:, 1:]

    monkeypatch.setattr(ds.Datastore, "search_entries", broken)
    assert main(["bench", "datastore", "--preset", "toy", "--out", str(tmp_path), "--quiet"]) == 1
    payload = json.loads((tmp_path / "datastore.json").read_text())
    assert not payload["check"]["passed"] and "brute-force" in payload["check"]["failures"][0]


def test_bench_datastore_fails_when_its_books_disagree(tmp_path, monkeypatch):
    """The evaluation's perplexity and the datastore's statistics of the same pass must agree; when
    they do not, the suite records the failure and exits 1 instead of raising."""
    import os

    import mnnn.training.lm as training

    if not os.environ.get("MNNN_DATA_DIR"):
        pytest.skip("MNNN_DATA_DIR not set")
    real = training.evaluate_lm

    def off_by_one_percent(*args, **kwargs):
        ev = real(*args, **kwargs)
        return {**ev, "ppl": ev["ppl"] * 1.01}

    monkeypatch.setattr(training, "evaluate_lm", off_by_one_percent)
    assert main(["bench", "datastore", "--preset", "toy", "--out", str(tmp_path), "--quiet"]) == 1
    payload = json.loads((tmp_path / "datastore.json").read_text())
    assert not payload["check"]["passed"] and payload["results"] == []
    assert "disagree with the evaluation" in payload["check"]["failures"][0]


def test_internal_errors_are_one_line_unless_debug(tmp_path, monkeypatch, capsys):
    import mnnn.cli as cli

    def broken(args):
        raise RuntimeError("something\ninside broke")

    monkeypatch.setattr(cli, "_cmd_info", broken)
    assert main(["info"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: unexpected RuntimeError: something inside broke; run again with `mnnn --debug ...` "
                   "for the traceback"]
    with pytest.raises(RuntimeError, match="inside broke"):
        main(["--debug", "info"])


def test_model_errors_come_before_the_data_is_read(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MNNN_DATA_DIR", str(tmp_path))  # empty: the data loader would fail
    code = main(["train", "--no-resume", "--quiet", "--out", str(tmp_path / "o"), "--set", "model.threshold=.inf"])
    assert code == 2
    assert capsys.readouterr().err.strip() == "error: threshold must be a finite number in (0, inf), got inf"
    code = main(["train", "--no-resume", "--quiet", "--out", str(tmp_path / "o"), "--set", "model.memory_size=7"])
    assert code == 2 and "both the model and the memory section" in capsys.readouterr().err
