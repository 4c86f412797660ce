import json
import math
import os

import pytest

from mnnn.cli import main
from mnnn.lm import build_model, load_config

TINY = ["--set", "model.embedding_dim=16", "--set", "model.hidden_dim=16", "--set", "model.num_layers=1",
        "--set", "model.max_len=32", "--set", "model.d_state=8", "--set", "memory.memory_size=64",
        "--set", "training.max_steps=3", "--set", "training.time_budget_s=null", "--set", "training.seq_len=16",
        "--set", "training.batch_size=2", "--set", "training.checkpoint_every=2", "--set", "training.eval_batch_size=16",
        "--set", "training.eval_tokens=20000"]

needs_data = pytest.mark.skipif(not os.environ.get("MNNN_DATA_DIR"), reason="MNNN_DATA_DIR not set")


@needs_data
def test_train_eval_generate(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path), "--quiet", *TINY]) == 0
    out = capsys.readouterr().out
    assert "valid perplexity" in out and "memory hit rate" in out and "sample:" in out
    summary = json.loads((tmp_path / "eval.json").read_text())
    assert summary["steps"] == 3 and math.isfinite(summary["valid_ppl"])
    # the checkpoint scored again on the same tokens gives the training run's figure: the
    # evaluation reset its statistics and left the trained state as it found it
    assert main(["eval", str(tmp_path / "checkpoint.safetensors"), "--split", "valid", "--batch-size", "16",
                 "--max-tokens", "20000"]) == 0
    printed = capsys.readouterr().out
    again = json.loads(printed[printed.index("{"):])
    assert again["valid_ppl"] == pytest.approx(summary["valid_ppl"], rel=1e-5)
    assert again["memory_hit_rate"] == pytest.approx(summary["memory_hit_rate"], rel=1e-5)
    assert (tmp_path / "curves.png").stat().st_size > 0
    ckpt = str(tmp_path / "checkpoint.safetensors")
    assert main(["eval", ckpt, "--split", "test", "--batch-size", "16", "--max-tokens", "20000"]) == 0
    assert '"split": "test"' in capsys.readouterr().out
    # a datastore of train entries, read beside the cache; the same split is refused
    ds = str(tmp_path / "ds.safetensors")
    assert main(["index", ckpt, "--max-tokens", "4000", "--out", ds, "--quiet"]) == 0
    assert "3,9" in capsys.readouterr().out  # entries: 4,000 tokens less one per stream
    assert main(["eval", ckpt, "--batch-size", "16", "--max-tokens", "3000", "--datastore", ds,
                 "--datastore-k", "8"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert {"ppl_lm", "ppl_cache", "ppl_datastore", "ppl_both", "hit_rate_chance"} <= set(ev["datastore"])
    assert abs(ev["datastore"]["ppl_both"] - ev["valid_ppl"]) < 1e-6 * ev["valid_ppl"]
    assert main(["eval", ckpt, "--split", "train", "--max-tokens", "3000", "--datastore", ds]) == 2
    assert "built from the train split" in capsys.readouterr().err
    assert main(["eval", ckpt, "--datastore-k", "8"]) == 2
    assert "--datastore PATH" in capsys.readouterr().err
    assert main(["generate", ckpt, "the city", "--max-new-tokens", "3", "--datastore", ds]) == 0
    capsys.readouterr()
    assert main(["generate", ckpt, "the city", "--max-new-tokens", "5", "--seed", "1"]) == 0
    first = capsys.readouterr().out
    main(["generate", ckpt, "the city", "--max-new-tokens", "5", "--seed", "1"])
    assert capsys.readouterr().out == first
    assert main(["generate", ckpt, "  "]) == 2
    assert "empty" in capsys.readouterr().err
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mnnn.lm import load_checkpoint_model

    assert main(["export", ckpt, "--format", "hf", str(tmp_path / "hf")]) == 0
    assert "Hugging Face directory" in capsys.readouterr().out
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    model, _ = load_checkpoint_model(ckpt)
    ids = AutoTokenizer.from_pretrained(tmp_path / "hf")("the city", return_tensors="pt")["input_ids"]
    import torch

    with torch.no_grad():
        assert torch.equal(hf(ids).logits, model(ids, model.init_state(1))[0])
    assert not any(p.name.startswith(".hf.") for p in tmp_path.iterdir())  # no temporary directory left


def test_missing_data_names_the_variable(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MNNN_DATA_DIR", raising=False)
    assert main(["train", "--out", str(tmp_path), "--quiet", *TINY]) == 2
    assert "MNNN_DATA_DIR" in capsys.readouterr().err


def test_config_errors(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path), "--set", "training.epochz=3"]) == 2
    assert "unknown training keys ['epochz']" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown S3CMN config keys"):
        build_model(load_config(None, ["model.hiden_dim=3"]))
    with pytest.raises(ValueError, match="section.key=value"):
        load_config(None, ["max_steps=3"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("modle: {}\n")
    with pytest.raises(ValueError, match="unknown config sections"):
        load_config(bad)


# every bad training value the CLI probe found: one line naming the key and the value, exit 2,
# before any data is read or model built
BAD_TRAINING = {
    "training.batch_size=0": "training.batch_size must be an integer >= 1, got 0",
    "training.batch_size=abc": "training.batch_size must be an integer >= 1, got 'abc'",
    "training.batch_size=2.5": "training.batch_size must be an integer >= 1, got 2.5",
    "training.batch_size=true": "training.batch_size must be an integer >= 1, got True",
    "training.seq_len=0": "training.seq_len must be an integer >= 1, got 0",
    "training.max_steps=0": "training.max_steps must be an integer >= 1, got 0",
    "training.max_steps=-1": "training.max_steps must be an integer >= 1, got -1",
    "training.time_budget_s=-1": "training.time_budget_s must be a finite number > 0, got -1",
    "training.time_budget_s=.inf": "training.time_budget_s must be a finite number > 0, got inf",
    "training.warmup=-5": "training.warmup must be an integer >= 0, got -5",
    "training.eval_tokens=-5": "training.eval_tokens must be an integer >= 2, got -5",
    "training.eval_every=-1": "training.eval_every must be an integer >= 0, got -1",
    "training.checkpoint_every=-1": "training.checkpoint_every must be an integer >= 0, got -1",
    "training.learning_rate=.nan": "training.learning_rate must be a finite number > 0, got nan",
    "training.learning_rate=0": "training.learning_rate must be a finite number > 0, got 0",
    "training.grad_clip=-1": "training.grad_clip must be a finite number > 0, got -1",
    "training.weight_decay=-1": "training.weight_decay must be a finite number >= 0, got -1",
    "training.seed=x": "training.seed must be an integer >= 0, got 'x'",
    "training.keep_last=0": "training.keep_last must be an integer >= 1, got 0",
    "training.out_dir=3": "training.out_dir must be a string, got 3",
    "training.sample_prompt=null": "training.sample_prompt must not be null",
    "training.seq_len=[1": "is not valid YAML",
}


@pytest.mark.parametrize("item", sorted(BAD_TRAINING))
def test_bad_training_values_are_one_line_errors(item, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MNNN_DATA_DIR", str(tmp_path / "no-data"))  # validation comes before the data
    assert main(["train", "--out", str(tmp_path / "run"), "--set", item]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and BAD_TRAINING[item] in err
    assert not (tmp_path / "run").exists()


def test_config_file_and_cross_field_errors(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path), "--set", "training.max_steps=null",
                 "--set", "training.time_budget_s=null"]) == 2
    assert "never stops" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    for text, expected in (("model: [1\n", "not valid YAML"), ("- 1\n", "must map sections"),
                           ("training: 3\n", "section 'training' must map keys")):
        bad.write_text(text)
        assert main(["train", "--config", str(bad), "--out", str(tmp_path)]) == 2
        assert expected in capsys.readouterr().err
    assert main(["train", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err
    under_a_file = tmp_path / "a-file"
    under_a_file.write_text("")
    if os.environ.get("MNNN_DATA_DIR"):  # the output folder is made after the data is read
        assert main(["train", "--out", str(under_a_file / "run"), "--set", "training.max_steps=1"]) == 2
        assert "Not a directory" in capsys.readouterr().err


@pytest.mark.parametrize("argv, expected", [
    (["eval", "CKPT", "--max-tokens", "-1"], "--max-tokens must be an integer >= 2, got -1"),
    (["eval", "CKPT", "--batch-size", "0"], "--batch-size must be an integer >= 1, got 0"),
    (["generate", "CKPT", "the city", "--max-new-tokens", "-1"], "--max-new-tokens must be an integer >= 1, got -1"),
    (["generate", "CKPT", "the city", "--top-k", "0"], "--top-k must be an integer >= 1, got 0"),
    (["generate", "CKPT", "the city", "--temperature", "-1"], "--temperature must be >= 0"),
    (["serve", "CKPT", "--port", "70000"], "--port must be an integer in [0, 65535], got 70000"),
    (["serve", "CKPT", "--max-sessions", "0"], "--max-sessions must be an integer >= 1, got 0"),
])
def test_bad_flags_are_refused_before_the_checkpoint_is_read(argv, expected, tmp_path, capsys):
    argv = [str(tmp_path / "none.safetensors") if a == "CKPT" else a for a in argv]  # never read
    assert main(argv) == 2
    assert expected in capsys.readouterr().err


def test_corrupt_checkpoint(tmp_path, capsys):
    path = tmp_path / "checkpoint.safetensors"
    path.write_bytes(b"\x00" * 100)
    assert main(["eval", str(path)]) == 2
    assert "truncated or foreign" in capsys.readouterr().err


def test_embedded_config_builds_the_default_model():
    cfg = load_config()
    model = build_model(cfg)
    assert model.config.hidden_dim == cfg["model"]["hidden_dim"]


@needs_data
def test_tune_grid(tmp_path, capsys):
    grid = tmp_path / "grid.yaml"
    grid.write_text("memory.memory_top_k: [1, 2]\n")
    assert main(["tune", str(grid), "--out", str(tmp_path / "tune"), "--quiet", *TINY]) == 0
    rows = json.loads((tmp_path / "tune" / "results.json").read_text())
    assert [r["memory.memory_top_k"] for r in rows] == [1, 2]
    assert (tmp_path / "tune" / "results.md").read_text().startswith("| run")
    bad = tmp_path / "bad.yaml"
    bad.write_text("memory.memory_top_k: 3\n")
    assert main(["tune", str(bad), "--out", str(tmp_path / "t2")]) == 2


@needs_data
def test_same_config_twice_in_two_processes_is_identical(tmp_path):
    """training.seed seeds the initialisation as well as the data order: two processes with one
    config write the same metrics.jsonl and the same checkpoint, byte for byte."""
    import subprocess
    import sys

    outs = [tmp_path / "a", tmp_path / "b"]
    procs = [subprocess.Popen([sys.executable, "-m", "mnnn.cli", "train", "--out", str(o), "--quiet", *TINY,
                               "--set", "training.eval_tokens=2000"],
                              env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL)
             for o in outs]
    assert [p.wait(timeout=600) for p in procs] == [0, 0]
    for name in ("metrics.jsonl", "checkpoint.safetensors"):
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name
    assert len((outs[0] / "metrics.jsonl").read_text().splitlines()) == 3


@needs_data
def test_divergence_keeps_the_last_good_checkpoint(tmp_path, capsys):
    """A run whose learning rate makes every step non-finite stops with one line that says why
    and leaves the previous finite checkpoint loadable."""
    from mnnn.training.checkpoint import load_checkpoint

    assert main(["train", "--out", str(tmp_path), "--quiet", *TINY]) == 0
    capsys.readouterr()
    # a changed learning rate is refused on resume (another config), so the diverging run starts
    # afresh in the same folder: it must not overwrite the good checkpoint with a diverged one
    code = main(["train", "--out", str(tmp_path), "--quiet", "--no-resume", *TINY, "--set", "training.max_steps=20",
                 "--set", "training.learning_rate=1.0e+30"])
    assert code == 1
    err = capsys.readouterr().err
    assert "diverged" in err and "learning_rate" in err
    assert main(["train", "--out", str(tmp_path / "x"), "--quiet", *TINY, "--set", "training.learning_rate=.inf"]) == 2
    assert "learning_rate must be a finite number > 0, got inf" in capsys.readouterr().err
    # a checkpoint is written only while the weights are finite: the file holds a finite state
    # (the first run's, or a later finite one) from before the divergence stopped the run
    tensors, meta = load_checkpoint(tmp_path / "checkpoint.safetensors")
    assert 3 <= meta["step"] < 20 and all(bool(t.isfinite().all()) for k, t in tensors.items() if k.startswith("model/"))


def test_torn_metrics_line_does_not_block_resume(tmp_path):
    from mnnn.training.lm import _truncate_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.9}\n{"step": 3, "lo')
    _truncate_metrics(path, 2)
    assert path.read_text() == '{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.9}\n'


@needs_data
def test_train_cmr_over_a_trained_gpt2_base(tmp_path, capsys):
    pytest.importorskip("transformers")
    short = ["--set", "training.max_steps=3", "--set", "training.time_budget_s=null", "--set", "training.seq_len=16",
             "--set", "training.batch_size=2", "--set", "training.eval_tokens=3000", "--quiet"]
    gpt2 = ["--set", "model.n_embd=16", "--set", "model.n_head=2", "--set", "model.n_positions=16"]
    assert main(["train", "--config", "gpt2", "--out", str(tmp_path / "gpt2"), *short, *gpt2]) == 0
    base = tmp_path / "gpt2" / "checkpoint.safetensors"
    assert main(["train", "--model", "cmr", "--out", str(tmp_path / "cmr"), "--set", f"model.base={base}",
                 *short]) == 0
    printed = capsys.readouterr().out
    assert "cmr: " in printed and "CMR memory: hit rate" in printed and "(chance " in printed
    ckpt = str(tmp_path / "cmr" / "checkpoint.safetensors")
    scores = {}
    for name, path, extra in (("base", str(base), []), ("on", ckpt, []), ("off", ckpt, ["--no-memory"])):
        assert main(["eval", path, "--batch-size", "2", "--max-tokens", "3000", *extra]) == 0
        printed = capsys.readouterr().out
        scores[name] = json.loads(printed[printed.index("{"):])
    assert scores["off"]["valid_ppl"] == scores["base"]["valid_ppl"]  # the switch gives the frozen base back
    assert scores["on"]["valid_ppl"] != scores["off"]["valid_ppl"]
    cmr = scores["on"]["cmr"]  # the memory's statistics of this pass, beside their chance level
    assert 0 <= cmr["hit_rate"] <= 1 and 0 < cmr["hit_rate_chance"] < 1 and cmr["coverage"] > 0
    assert scores["off"]["cmr"]["hit_rate"] is None  # memory off: nothing was read
    assert main(["train", "--model", "cmr", "--config", "gpt2", "--out", str(tmp_path / "x")]) == 2
    assert "give one" in capsys.readouterr().err
    assert main(["train", "--config", "no_such_config", "--out", str(tmp_path / "x")]) == 2
    assert "embedded configs, by name" in capsys.readouterr().err
