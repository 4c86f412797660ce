import math

import numpy as np
import pytest
import torch

from mnnn.models.s3cmn import S3CMN, S3CMNConfig
from mnnn.state import step_through
from tests.harness import rel_err


def _model(**kw):
    torch.manual_seed(0)
    args = dict(vocab_size=50, embedding_dim=16, hidden_dim=16, num_layers=2, memory_size=64, max_len=32,
                memory_interval=4, memory_top_k=3, d_state=8, memory_quantize=False)
    args.update(kw)
    m = S3CMN(**args).double()
    for block in m.blocks:
        if block.memory is not None:  # make the memory path matter
            torch.nn.init.normal_(block.mem_in.weight, std=0.5)
    if m.output_memory is not None:  # an open gate that depends on the position
        torch.nn.init.normal_(m.output_memory.gate.weight, std=0.5)
        torch.nn.init.zeros_(m.output_memory.gate.bias)
    return m


FUSIONS = ["output", "membrane", "both"]


def _run(m, tok, cut):
    """Reset the stores, run with the given cuts (None: whole; 1: token by token)."""
    m.reset_memory()
    m.zero_grad(set_to_none=True)
    if cut is None:
        y, _ = m(tok)
    elif cut == 1:
        y, _ = step_through(m, tok)
    else:
        state, ys, start = None, [], 0
        for end in list(cut) + [tok.shape[1]]:
            out, state = m(tok[:, start:end], state)
            ys.append(out)
            start = end
        y = torch.cat(ys, 1)
    torch.manual_seed(7)
    (y * torch.randn_like(y)).sum().backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    return y.detach(), grads


@pytest.mark.parametrize("fusion", FUSIONS + [None], ids=FUSIONS + ["no-memory"])
def test_whole_equals_chunks_equals_steps(fusion):
    use_memory = fusion is not None
    m = _model(use_memory=use_memory, memory_fusion=fusion or "output", memory_size=6)  # the ring wraps
    tok = torch.randint(0, 50, (2, 23))
    y, g = _run(m, tok, None)
    for cut in ((7,), (1, 5, 6, 17), 1):
        y2, g2 = _run(m, tok, cut)
        assert rel_err(y2, y) < 1e-10
        assert g2.keys() == g.keys()
        for name in g:
            assert rel_err(g2[name], g[name]) < 1e-9, name
    if fusion in ("membrane", "both"):
        assert len(m.blocks[0].memory) > 0 and m.get_stats()["blocks"][0]["memory"]["hit_rate"] > 0


@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("j", [0, 5, 12, 22])
def test_causal_with_memory(j, fusion):
    m = _model(memory_fusion=fusion, memory_size=8)
    tok = torch.randint(0, 50, (2, 23))
    m.reset_memory()
    with torch.no_grad():
        y, _ = m(tok)
        tok2 = tok.clone()
        tok2[:, j] = (tok2[:, j] + 3) % 50
        m.reset_memory()
        y2, _ = m(tok2)
    # FFT convolutions (S4D, Hyena) spread float round-off over all positions (~1e-17 in float64):
    # no information, but not bit-equality, so the bound is at round-off level
    assert (y2[:, :j] - y[:, :j]).abs().max() < 1e-12 if j else True
    assert (y2[:, j] - y[:, j]).abs().max() > 1e-6


def test_memory_stores_next_tokens_per_stream():
    m = _model(memory_interval=4, memory_fusion="membrane")
    tok = torch.randint(0, 50, (2, 9))
    m.reset_memory()
    with torch.no_grad():
        m(tok)
    mem = m.blocks[0].memory
    # entries for positions 0..6 (value = the next token) were flushed at positions 4 and 8
    vals, groups = mem.stored_values()[:, 0], mem.groups[: len(mem)]
    for b in range(2):
        assert sorted(vals[groups == b].tolist()) == sorted(tok[b, 1:8].tolist())


def test_save_load_round_trip(tmp_path):
    m = _model().float()
    tok = torch.randint(0, 50, (1, 12))
    m.reset_memory()
    with torch.no_grad():
        m(tok)
    m.save(tmp_path / "s3cmn.safetensors")
    m2 = S3CMN.load(tmp_path / "s3cmn.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(m2(tok)[0], m(tok)[0])


def test_bad_input():
    with pytest.raises(ValueError, match="unknown S3CMN config keys"):
        S3CMN(vocab_size=10, embedding_dims=4)
    with pytest.raises(ValueError, match="hidden_dim"):
        S3CMNConfig(hidden_dim=0)
    m = _model()
    with pytest.raises(ValueError, match=r"\[0, 50\)"):
        m(torch.tensor([[1, 50]]))
    with pytest.raises(ValueError, match="integer"):
        m(torch.zeros(1, 3))


def test_output_memory_streams_are_isolated_and_batch_size_free():
    """Changing stream 1 never changes stream 0 (with the ring evicting: 40 tokens, 8 slots), and
    a stream alone gives what it gives inside a batch."""
    m = _model(memory_size=8)
    tok = torch.randint(0, 50, (3, 40))
    with torch.no_grad():
        y, state = m(tok)
        tok2 = tok.clone()
        tok2[1] = torch.randint(0, 50, (40,))
        y2, _ = m(tok2)
        alone, _ = m(tok[2:3])
    assert int(state.cache.count) > m.config.memory_size  # entries were evicted
    assert torch.equal(y2[0], y[0]) and torch.equal(y2[2], y[2])
    assert (y2[1] - y[1]).abs().max() > 1e-3
    torch.testing.assert_close(alone[0], y[2], rtol=1e-10, atol=1e-10)


def test_output_memory_switch_and_no_memory_nll():
    """``set_memory_enabled(False)`` gives the LM alone (the same weights), which is what the
    ``nll_no_memory`` of the memory-on pass reports; on, a repeated sequence is predicted better."""
    m = _model(memory_size=64)
    rng = torch.Generator().manual_seed(0)
    seg = torch.randint(0, 50, (2, 12), generator=rng)
    tok = torch.cat([seg, seg, seg], dim=1)  # repeats: the cache must help
    x, y = tok[:, :-1], tok[:, 1:]
    with torch.no_grad():
        nll, nll_lm, _ = m.token_nll(x, y)
        logits, _ = m(x)
        m.set_memory_enabled(False)
        off, _ = m(x)
        nll_off, _, _ = m.token_nll(x, y)
        m.set_memory_enabled(True)
    lm_only = torch.log_softmax(m.head(m.features(x)[0]), -1)
    torch.testing.assert_close(off, lm_only)
    torch.testing.assert_close(nll_off, nll_lm)
    torch.testing.assert_close(-logits.gather(-1, y[..., None])[..., 0], nll)
    assert float(nll[:, 12:].mean()) < float(nll_lm[:, 12:].mean())  # repeats are cheaper with memory
    torch.testing.assert_close(logits.exp().sum(-1), torch.ones(2, 35, dtype=logits.dtype))


def test_untrained_hit_rate_is_near_chance_on_random_tokens():
    """An untrained model reading uniformly random tokens cannot do better than chance: the honest
    hit rate (true next token in the top-k) sits within 2 x of its chance level."""
    m = _model(vocab_size=50, memory_size=64, memory_top_k=4).float()
    tok = torch.randint(0, 50, (4, 200), generator=torch.Generator().manual_seed(3))
    m.reset_stats()
    with torch.no_grad():
        m.token_nll(tok[:, :-1], tok[:, 1:])
    stats = m.get_stats()
    assert 0 < stats["memory_hit_rate_chance"] < 0.5
    assert 0.5 * stats["memory_hit_rate_chance"] <= stats["memory_hit_rate"] <= 2 * stats["memory_hit_rate_chance"]
    assert stats["retrieval_accuracy"] <= 2 * stats["retrieval_accuracy_chance"] + 0.01


def test_evaluation_during_training_leaves_training_untouched():
    """Validation every 2 steps changes nothing that training reads (membrane stores, the output
    cache, RNG): the same final weights as a run without validation."""
    from mnnn.training.lm import train_lm

    ids = np.random.default_rng(0).integers(0, 50, 3000)
    finals = []
    for eval_every in (None, 2):
        m = _model(memory_fusion="both", memory_size=32).float()
        train_lm(m, ids, batch_size=2, seq_len=16, max_steps=6, warmup=1, valid_ids=ids[:400], eval_every=eval_every)
        finals.append(torch.cat([p.detach().reshape(-1) for p in m.parameters()]))
    assert torch.equal(finals[0], finals[1])


def test_output_memory_bad_input():
    with pytest.raises(ValueError, match="memory_fusion"):
        S3CMN(vocab_size=10, embedding_dim=4, hidden_dim=4, memory_fusion="cache")
    with pytest.raises(ValueError, match="memory_size"):
        S3CMN(vocab_size=10, embedding_dim=4, hidden_dim=4, memory_size=0)
    from mnnn.memory.output_cache import OutputMemory

    mem = OutputMemory(4, memory_size=8)
    with pytest.raises(ValueError, match="NaN"), torch.no_grad():
        feats = torch.full((1, 3, 4), float("nan"))
        mem(feats, torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 3, 10), mem.init_state(1))
    assert math.isclose(mem.theta, 10.0, rel_tol=1e-6)
