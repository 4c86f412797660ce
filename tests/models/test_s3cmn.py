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
    return m


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


@pytest.mark.parametrize("use_memory", [True, False], ids=["memory", "no-memory"])
def test_whole_equals_chunks_equals_steps(use_memory):
    m = _model(use_memory=use_memory)
    tok = torch.randint(0, 50, (2, 23))
    y, g = _run(m, tok, None)
    for cut in ((7,), (1, 5, 6, 17), 1):
        y2, g2 = _run(m, tok, cut)
        assert rel_err(y2, y) < 1e-10
        assert g2.keys() == g.keys()
        for name in g:
            assert rel_err(g2[name], g[name]) < 1e-9, name
    if use_memory:
        assert len(m.blocks[0].memory) > 0 and m.get_stats()["memory_hit_rate"] > 0


@pytest.mark.parametrize("j", [0, 5, 12, 22])
def test_causal_with_memory(j):
    m = _model()
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
    m = _model(memory_interval=4)
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
