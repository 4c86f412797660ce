import dataclasses
import math
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from torch import nn

from mnnn.state import TensorState
from mnnn.training.checkpoint import load_checkpoint
from mnnn.training.lm import batchify, evaluate_lm, train_lm


@dataclasses.dataclass
class _Empty(TensorState):
    pass


class _FixedLM(nn.Module):
    """Predicts the same distribution everywhere: p = [1/2, 1/4, 1/8, 1/8]."""

    def __init__(self):
        super().__init__()
        self.logits = nn.Parameter(torch.log(torch.tensor([0.5, 0.25, 0.125, 0.125])))

    def init_state(self, batch_size):
        return _Empty()

    def forward(self, tokens, state=None):
        return self.logits.expand(*tokens.shape, 4), _Empty()


def test_perplexity_hand_computed():
    ids = np.array([0, 1, 2, 3, 0, 0, 1, 3, 2, 0], dtype=np.int64)
    # one stream: tokens 1..9 are predicted once each
    nll = -np.log([0.25, 0.125, 0.125, 0.5, 0.5, 0.25, 0.125, 0.125, 0.5])
    result = evaluate_lm(_FixedLM(), ids, batch_size=1, seq_len=4)
    assert result["tokens"] == 9
    assert result["ppl"] == pytest.approx(math.exp(nll.mean()), rel=1e-6)
    # two streams of 5: each stream's first token is not predicted
    two = evaluate_lm(_FixedLM(), ids, batch_size=2, seq_len=3)
    assert two["tokens"] == 8


def test_batchify_and_budget_errors():
    assert batchify(np.arange(10), 3).shape == (3, 3)
    with pytest.raises(ValueError, match="at least"):
        batchify(np.arange(3), 2)
    with pytest.raises(ValueError, match="max_steps or time_budget_s"):
        train_lm(_FixedLM(), np.arange(100) % 4)


SCRIPT = textwrap.dedent("""
    import sys, numpy as np, torch
    from mnnn.models.s3cmn import S3CMN
    from mnnn.training.lm import train_lm
    torch.manual_seed(0)
    model = S3CMN(vocab_size=40, embedding_dim=16, hidden_dim=16, num_layers=1, memory_size=64, max_len=32,
                  memory_interval=8, memory_top_k=2, d_state=8)
    ids = np.random.default_rng(0).integers(0, 40, 20000)
    train_lm(model, ids, batch_size=4, seq_len=16, max_steps=int(sys.argv[2]), learning_rate=3e-3,
             out_dir=sys.argv[1], checkpoint_every=5, warmup=3)
""")


def _run(out, steps):
    return subprocess.Popen([sys.executable, "-c", SCRIPT, str(out), str(steps)],
                            env=dict(os.environ, OMP_NUM_THREADS="1"))


def test_resume_after_kill_minus_9_is_bitwise(tmp_path):
    steps = 120
    assert _run(tmp_path / "a", steps).wait(timeout=600) == 0
    proc = _run(tmp_path / "b", steps)
    ckpt = tmp_path / "b" / "checkpoint.safetensors"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if ckpt.is_file() and load_checkpoint(ckpt)[1]["step"] >= 15:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    _, meta = load_checkpoint(ckpt)  # whatever instant the kill hit, the checkpoint is whole
    assert meta["step"] < steps, "the run finished before it could be killed"
    assert _run(tmp_path / "b", steps).wait(timeout=600) == 0
    a, meta_a = load_checkpoint(tmp_path / "a" / "checkpoint.safetensors")
    b, meta_b = load_checkpoint(ckpt)
    assert meta_a["step"] == meta_b["step"] == steps
    for key in a:
        if key.startswith(("model/", "opt/")):
            assert torch.equal(a[key], b[key]), key
    lines = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == steps  # no duplicated steps after the resume


def _ddp_worker(rank, world, port, steps, out):
    import torch.distributed as dist

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    out[rank] = (_train_small("lstm", 2, steps), _train_small("s3cmn", 2, steps))
    dist.destroy_process_group()


def _train_small(kind, batch_size, steps):
    """(losses, final parameters as one flat float64 array) of a small run."""
    from mnnn.models.lm_baselines import LSTMLM
    from mnnn.models.s3cmn import S3CMN

    torch.manual_seed(0)
    if kind == "lstm":
        model = LSTMLM(40, embed_dim=16, hidden_dim=16)
    else:
        # a store large enough that nothing is evicted: the per-rank and the single-process stores
        # then hold the same entries for every stream
        model = S3CMN(vocab_size=40, embedding_dim=16, hidden_dim=16, num_layers=1, memory_size=4096, max_len=32,
                      memory_interval=8, memory_top_k=2, d_state=8)
    ids = np.random.default_rng(0).integers(0, 40, 8000)
    hist = train_lm(model, ids, batch_size=batch_size, seq_len=16, max_steps=steps, learning_rate=3e-3, warmup=2)
    params = torch.cat([p.detach().double().reshape(-1) for p in model.parameters()]).numpy()
    return hist["loss"], params


def test_ddp_two_gloo_ranks_match_one_process_with_double_batch():
    """What DDP guarantees: every rank holds bitwise the same parameters after every step (the
    averaged gradient is applied everywhere), and the run follows the one-process run with the
    global batch up to reduction-order round-off. That round-off differs with the thread count;
    for the LSTM it stays ~1e-7, for S3CMN it flips individual spikes (a Heaviside threshold), so
    there only the first loss (no update yet) is held to round-off and the trajectory to 2 %."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(_ddp_worker, args=(2, port, 8, out), nprocs=2, join=True)
    (lstm_loss, lstm_params), (s3_loss, s3_params) = _train_small("lstm", 4, 8), _train_small("s3cmn", 4, 8)
    for model in (0, 1):
        np.testing.assert_array_equal(out[0][model][1], out[1][model][1])  # ranks never diverge
        np.testing.assert_array_equal(out[0][model][0], out[1][model][0])  # both log the global loss
    np.testing.assert_allclose(out[0][0][0], lstm_loss, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out[0][0][1], lstm_params, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(out[0][1][0][0], s3_loss[0], rtol=1e-5)
    np.testing.assert_allclose(out[0][1][0], s3_loss, rtol=2e-2)
    assert np.abs(out[0][1][1] - s3_params).max() < 0.05  # 8 AdamW steps of lr <= 3e-3 from one start


# ---- tampered checkpoints: refused before anything is loaded -------------------------------------
def _tiny_checkpoint(path, fusion="membrane", tamper=None):
    from mnnn.lm import build_model
    from mnnn.training.checkpoint import save_checkpoint

    cfg = {"model": {"name": "s3cmn", "vocab_size": 50, "embedding_dim": 8, "hidden_dim": 8, "num_layers": 1,
                     "d_state": 4, "max_len": 16},
           "memory": {"memory_fusion": fusion, "memory_size": 16, "memory_interval": 4}, "training": {}}
    torch.manual_seed(0)
    model = build_model(cfg)
    if fusion == "membrane":  # a store with a few entries
        model(torch.randint(0, 50, (2, 9)))
    opt = torch.optim.AdamW(model.parameters())
    save_checkpoint(path, model, opt, None, 3, cfg)
    if tamper is not None:
        from mnnn.serialization import load_tensors, save_tensors

        tensors, meta = load_tensors(path)
        tamper(tensors)
        save_tensors(path, tensors, meta)
    return path


@pytest.mark.parametrize("tamper, expected", [
    (lambda t: t["model/embed.weight"].__setitem__((0, 0), float("nan")), "checkpoint's embed.weight holds NaN"),
    (lambda t: t.__setitem__("model/up.weight", torch.zeros(3, 3)), "up.weight has shape (3, 3)"),
    (lambda t: t.pop("model/down.bias"), "missing ['down.bias']"),
    (lambda t: t.__setitem__("model/blocks.0.memory.count", torch.tensor(10**6)), "count 1000000 is outside [0, 16]"),
    (lambda t: t["model/blocks.0.memory.key_scales"].__setitem__(0, float("inf")), "key_scales holds NaN"),
    (lambda t: t.__setitem__("model/blocks.0.memory.key_codes",
                             torch.zeros(999, *t["model/blocks.0.memory.key_codes"].shape[1:],
                                         dtype=t["model/blocks.0.memory.key_codes"].dtype)), "more than max_size 16"),
])
def test_tampered_checkpoint_is_refused_with_the_reason(tamper, expected, tmp_path, capsys):
    from mnnn.cli import main
    from mnnn.lm import load_checkpoint_model

    path = _tiny_checkpoint(tmp_path / "checkpoint.safetensors", tamper=tamper)
    with pytest.raises(ValueError) as err:
        load_checkpoint_model(path)
    assert expected in str(err.value)
    assert main(["generate", str(path), "the city"]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_untampered_checkpoint_loads():
    import tempfile

    from mnnn.lm import load_checkpoint_model

    with tempfile.TemporaryDirectory() as tmp:
        model, meta = load_checkpoint_model(_tiny_checkpoint(f"{tmp}/c.safetensors"))
    assert meta["step"] == 3 and len(model.blocks[0].memory) > 0


def test_resume_refuses_a_changed_config_and_names_the_keys(tmp_path):
    from mnnn.training.lm import config_changes

    torch.manual_seed(0)
    from mnnn.models.lm_baselines import LSTMLM

    ids = np.arange(4000) % 50
    cfg = {"model": {"name": "lstm", "vocab_size": 50}, "training": {"batch_size": 2}}
    train_lm(LSTMLM(50, 8, 8), ids, batch_size=2, seq_len=8, max_steps=2, out_dir=tmp_path, checkpoint_every=1,
             config=cfg)
    with pytest.raises(ValueError, match=r"batch_size: 2 -> 4.*learning_rate: 0.003 -> 0.01"):
        train_lm(LSTMLM(50, 8, 8), ids, batch_size=4, seq_len=8, max_steps=3, learning_rate=1e-2,
                 out_dir=tmp_path, config=cfg)
    # a longer run of the same config resumes: only how long it runs changed
    hist = train_lm(LSTMLM(50, 8, 8), ids, batch_size=2, seq_len=8, max_steps=3, out_dir=tmp_path, config=cfg)
    assert hist["steps"] == 3
    assert config_changes({"model": {"a": 1}, "max_steps": 1}, {"model": {"a": 2}, "max_steps": 9}) == \
        ["model.a: 1 -> 2"]
    assert config_changes({"seed": 0, "training": {"seed": 0}}, {"seed": 1, "training": {"seed": 1}}) == \
        ["training.seed: 0 -> 1"]


def test_keep_last_keeps_the_newest_checkpoints(tmp_path):
    from mnnn.models.lm_baselines import LSTMLM

    torch.manual_seed(0)
    model = LSTMLM(40, embed_dim=8, hidden_dim=8)
    ids = np.random.default_rng(0).integers(0, 40, 4000)
    train_lm(model, ids, batch_size=2, seq_len=8, max_steps=7, out_dir=tmp_path, checkpoint_every=2, keep_last=2,
             warmup=1)
    kept = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert kept == ["step-00000006.safetensors", "step-00000007.safetensors"]  # every 2 steps and the end
    latest, meta = load_checkpoint(tmp_path / "checkpoint.safetensors")
    last, meta_last = load_checkpoint(tmp_path / "checkpoints" / kept[-1])
    earlier, meta_earlier = load_checkpoint(tmp_path / "checkpoints" / kept[0])
    assert meta["step"] == meta_last["step"] == 7 and meta_earlier["step"] == 6
    assert all(torch.equal(latest[k], last[k]) for k in latest)
    assert not all(torch.equal(latest[k], earlier[k]) for k in latest if k.startswith("model/"))
    with pytest.raises(ValueError, match="keep_last"):
        train_lm(model, ids, batch_size=2, seq_len=8, max_steps=1, keep_last=0)
