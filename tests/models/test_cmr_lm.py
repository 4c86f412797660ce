"""The ``gpt2`` and ``cmr`` language models of ``mnnn train``: checkpoints, the memory switch,
causality and stream isolation through the LM interface, and the trainer training CMR only."""

import pytest
import torch

pytest.importorskip("transformers")

from mnnn.bench.cmr_checks import open_reads  # noqa: E402
from mnnn.lm import build_model, generate, load_checkpoint_model, load_config  # noqa: E402
from mnnn.models.cmr_lm import GPT2LM  # noqa: E402
from mnnn.training.checkpoint import load_checkpoint  # noqa: E402
from mnnn.training.lm import evaluate_lm, train_lm  # noqa: E402

V = 64
GPT2 = {"name": "gpt2", "vocab_size": V, "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 16}
CMR = {"relevance_threshold": 0.0, "similarity_threshold": -1.0, "retrieval_budget": 8}


def _ids(n, seed=0):
    return torch.randint(0, V, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def base_ckpt(tmp_path_factory):
    """A gpt2 checkpoint written by the LM trainer (a few steps on random tokens)."""
    out = tmp_path_factory.mktemp("gpt2")
    torch.manual_seed(0)
    cfg = {"model": dict(GPT2), "memory": {}, "training": {}}
    train_lm(build_model(cfg), _ids(4000), batch_size=4, seq_len=16, max_steps=3, time_budget_s=None,
             out_dir=out, config=cfg)
    return out / "checkpoint.safetensors"


def _cmr(base_ckpt, **memory):
    return build_model({"model": {"name": "cmr", "base": str(base_ckpt), "vocab_size": V},
                        "memory": {**CMR, **memory}, "training": {}})


def _stream(model, segments):
    """Logits of each segment, read in order as one set of streams (memory carried)."""
    state = model.init_state(segments[0].shape[0])
    out = []
    with torch.no_grad():
        for x in segments:
            logits, state = model(x, state)
            out.append(logits)
    return out


def test_gpt2_checkpoint_keeps_the_tied_head(base_ckpt):
    model, meta = load_checkpoint_model(base_ckpt)
    assert isinstance(model, GPT2LM) and meta["step"] == 3
    hf = model.model
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()  # still one tensor
    assert "model.lm_head.weight" not in model.state_dict()
    with pytest.raises(ValueError, match="n_positions"):
        model(_ids(17).view(1, -1))
    with pytest.raises(ValueError, match="divisible"):
        GPT2LM(vocab_size=V, n_embd=30, n_head=4)


def test_memory_off_is_the_base_and_on_reads_it(base_ckpt):
    model = _cmr(base_ckpt)
    open_reads(model.cmr)
    base, _ = load_checkpoint_model(base_ckpt)
    segs = [_ids(32, s).view(2, 16) for s in range(3)]
    on = _stream(model, segs)
    model.set_memory_enabled(False)
    off = _stream(model, segs)
    ref = [base(x)[0].detach() for x in segs]
    for a, b in zip(off, ref):
        assert torch.equal(a, b)  # the switch gives the bare base model, bit for bit
    assert torch.equal(on[0], ref[0])  # a first segment has no earlier memories
    assert (on[2] - ref[2]).abs().max() > 1e-4  # later ones read them
    assert model.get_stats()["cmr"]["retrieved_entries"] == 0  # the off pass reset and read nothing
    with pytest.raises(TypeError, match="True or False"):
        model.set_memory_enabled(1)


@pytest.mark.parametrize("j", [0, 9, 15])
def test_causal_through_the_lm_interface(base_ckpt, j):
    model = _cmr(base_ckpt)
    open_reads(model.cmr)
    segs = [_ids(32, s).view(2, 16) for s in range(3)]
    changed = [s.clone() for s in segs]
    changed[1][:, j] = (changed[1][:, j] + 1) % V
    a, b = _stream(model, segs), _stream(model, changed)
    assert torch.equal(a[0], b[0])
    torch.testing.assert_close(a[1][:, :j], b[1][:, :j], rtol=0, atol=1e-6)
    assert (a[1][:, j] - b[1][:, j]).abs().max() > 0


def test_a_stream_alone_equals_the_stream_in_a_batch(base_ckpt):
    model = _cmr(base_ckpt)
    open_reads(model.cmr)
    segs = [_ids(48, s).view(3, 16) for s in range(3)]
    batch = _stream(model, segs)
    alone = _stream(model, [s[1:2] for s in segs])
    for a, b in zip(alone, batch):
        torch.testing.assert_close(a, b[1:2], rtol=1e-5, atol=1e-5)


def test_trainer_trains_cmr_only_and_the_checkpoint_reloads(base_ckpt, tmp_path):
    cfg = {"model": {"name": "cmr", "base": str(base_ckpt), "vocab_size": V}, "memory": dict(CMR), "training": {}}
    model = build_model(cfg)
    frozen = {k: v.clone() for k, v in model.cmr.base.state_dict().items()}
    own = {n: p.clone() for n, p in model.named_parameters() if not n.startswith("cmr.base.")}
    hist = train_lm(model, _ids(4000, 5), batch_size=4, seq_len=16, max_steps=4, time_budget_s=None,
                    learning_rate=1e-2, out_dir=tmp_path, config=cfg)
    assert hist["steps"] == 4
    for k, v in model.cmr.base.state_dict().items():
        assert torch.equal(v, frozen[k]), k  # the base is frozen
    assert any(not torch.equal(p, own[n]) for n, p in model.named_parameters() if n in own)
    again, _ = load_checkpoint_model(tmp_path / "checkpoint.safetensors")
    ids = _ids(640, 9)
    assert evaluate_lm(again, ids, batch_size=2, seq_len=16)["ppl"] == evaluate_lm(model, ids, batch_size=2,
                                                                                   seq_len=16)["ppl"]
    out = generate(again, [1, 2, 3], max_new_tokens=20, temperature=0.0)  # context re-read past n_positions
    assert len(out) == 20 and all(0 <= t < V for t in out)


def test_bad_cmr_configs(base_ckpt, tmp_path):
    with pytest.raises(FileNotFoundError, match="mnnn train --config gpt2"):
        build_model({"model": {"name": "cmr", "base": str(tmp_path / "nope.safetensors")}, "memory": {},
                     "training": {}})
    other = tmp_path / "lstm"
    cfg = {"model": {"name": "lstm", "vocab_size": V, "embed_dim": 8, "hidden_dim": 8}, "memory": {}, "training": {}}
    train_lm(build_model(cfg), _ids(400), batch_size=2, seq_len=8, max_steps=1, time_budget_s=None,
             out_dir=other, config=cfg)
    with pytest.raises(ValueError, match="'gpt2' model, got one of 'lstm'"):
        _cmr(other / "checkpoint.safetensors")
    with pytest.raises(ValueError, match="vocab_size"):
        build_model({"model": {"name": "cmr", "base": str(base_ckpt), "vocab_size": 99}, "memory": {},
                     "training": {}})
    with pytest.raises(ValueError, match=r"unknown CMR config keys \['no_such_key'\]; known: .*retrieval_budget"):
        _cmr(base_ckpt, no_such_key=1)


def test_embedded_configs_by_name(tmp_path):
    assert load_config("cmr")["model"]["name"] == "cmr"
    assert load_config("gpt2")["model"]["name"] == "gpt2"
    assert load_config(None)["model"]["name"] == "s3cmn"
    with pytest.raises(FileNotFoundError, match="embedded configs, by name: .*'cmr'"):
        load_config("no_such_config")
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "missing.yaml")


def _train_cmr(base_ckpt, out, max_steps, **kw):
    """Train CMR's parameters (reweaving gates open, so the memory changes the loss) over a few
    segments; returns the history and the model."""
    cfg = {"model": {"name": "cmr", "base": str(base_ckpt), "vocab_size": V}, "memory": dict(CMR), "training": {}}
    torch.manual_seed(3)
    model = build_model(cfg)
    open_reads(model.cmr)
    hist = train_lm(model, _ids(4000, 5), batch_size=2, seq_len=16, max_steps=max_steps, time_budget_s=None,
                    learning_rate=1e-2, warmup=1, out_dir=out, config=cfg, **kw)
    return hist, model


def test_resumed_cmr_training_continues_its_memory(base_ckpt, tmp_path):
    """The memory is the carried state: a checkpoint holds it, so resuming from the step-3
    checkpoint of a 6-step run ends bitwise where the uninterrupted run does (without it, step 4
    would read an empty memory)."""
    import shutil

    whole, model = _train_cmr(base_ckpt, tmp_path / "a", 6, checkpoint_every=3, keep_last=2)
    (tmp_path / "b").mkdir()
    shutil.copy(tmp_path / "a" / "checkpoints" / "step-00000003.safetensors", tmp_path / "b" / "checkpoint.safetensors")
    tensors, _ = load_checkpoint(tmp_path / "b" / "checkpoint.safetensors")
    stored = [k for k in tensors if k.startswith("carry/") and k.endswith("/states")]
    assert stored and all(tensors[k].shape[0] > 0 for k in stored)  # the memory is in the checkpoint
    resumed, again = _train_cmr(base_ckpt, tmp_path / "b", 6)
    assert resumed["loss"] == whole["loss"][3:]
    for (name, p), q in zip(model.named_parameters(), again.parameters()):
        assert torch.equal(p, q), name


def test_evaluation_during_training_leaves_the_training_memory(base_ckpt, tmp_path):
    """An evaluation pass starts its own streams (emptied memory) and the training streams go on
    reading theirs afterwards: the losses are those of a run without evaluations."""
    plain, _ = _train_cmr(base_ckpt, None, 5)
    evaluated, _ = _train_cmr(base_ckpt, None, 5, valid_ids=_ids(200, 7), eval_every=1)
    assert evaluated["loss"] == plain["loss"]
    assert len(evaluated["valid"]) == 5


def test_a_memory_state_reads_the_same_in_a_fresh_model(base_ckpt):
    """Continuing from a state handed out earlier (or by another model) reads that memory, not
    what the model went on to store; a state of another configuration is refused clearly."""
    model = _cmr(base_ckpt)
    open_reads(model.cmr)
    segs = [_ids(32, s).view(2, 16) for s in range(4)]
    with torch.no_grad():
        state = model.init_state(2)
        for x in segs[:2]:
            _, state = model(x, state)
        kept = state
        expected, after = model(segs[2], state)
        model(segs[3], after)  # the model moves on
        again, _ = model(segs[2], kept)  # ... and a kept state still reads as it did
        other = _cmr(base_ckpt)
        other.load_state_dict(model.state_dict())
        fresh, _ = other(segs[2], type(kept).from_tensors({k: v.clone() for k, v in kept.tensors().items()}))
    assert torch.equal(again, expected) and torch.equal(fresh, expected)
    assert kept == type(kept).from_tensors(kept.tensors())
    with pytest.raises(ValueError, match="no .* for layer"):
        other(segs[2], type(kept).from_tensors({k: v for k, v in kept.tensors().items() if "/values" not in k}))
    tampered = {k: v.clone() for k, v in kept.tensors().items()}
    layer = next(k.split("/")[0] for k in tampered if k.endswith("/states"))
    tampered[f"{layer}/states"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        other(segs[2], type(kept).from_tensors(tampered))
    tampered[f"{layer}/states"] = tampered[f"{layer}/states"][:, :3]
    with pytest.raises(ValueError, match="fields of shapes"):
        other(segs[2], type(kept).from_tensors(tampered))
    with pytest.raises(TypeError, match="CMRMemoryState"):
        other(segs[2], torch.zeros(2))
    cut = {k: v for k, v in kept.tensors().items() if k != "segment"}  # its id is the held one's
    other._held = int(cut["id"])
    with pytest.raises(ValueError, match=r"no \['segment'\]"):  # a KeyError before
        other(segs[2], type(kept).from_tensors(cut))


def test_the_engine_serves_the_gpt2_base_and_refuses_cmr_clearly(base_ckpt):
    """``mnnn serve`` on a gpt2 checkpoint re-reads each session's context window (greedy equals
    ``generate``); on a CMR checkpoint it says why it does not serve it (it used to raise an
    AttributeError on a missing ``embed``)."""
    from mnnn.deploy.engine import InferenceEngine, Session

    base, _ = load_checkpoint_model(base_ckpt)
    engine = InferenceEngine(base)
    assert engine.vocab_size == V
    session = engine.read(Session(), [1, 2, 3])
    assert list(engine.generate(session, 5, temperature=0)) == generate(base, [1, 2, 3], 5, temperature=0.0)
    with pytest.raises(ValueError, match="serving a CMR model is not supported.*model.base"):
        InferenceEngine(_cmr(base_ckpt))
