"""The one-token paths and no-autograd caches that streaming and generation use agree with the
general forms they replace: Hyena's dot-product step vs its FFT convolution, S4D's recurrence
step vs its FFT kernel, the output memory's sparse mixture vs the dense one (duplicates
included, gradients too), and the cached filter / transposed head follow weight updates."""

import torch
import torch.nn.functional as F

from mnnn.layers.hyena import Hyena
from mnnn.layers.ssm import S4D
from mnnn.memory.output_cache import _TINY, OutputMemory
from mnnn.models.lm_baselines import LSTMLM
from tests.harness import rel_err


def _hyena_run(m, x, one_by_one):
    if not one_by_one:
        return m(x)[0]
    state, ys = None, []
    for t in range(x.shape[1]):
        y, state = m(x[:, t:t + 1], state)
        ys.append(y)
    return torch.cat(ys, 1)


def test_hyena_step_equals_fft_outputs_and_grads():
    torch.manual_seed(0)
    m = Hyena(6, max_len=5).double()  # T > max_len: the history window slides
    x = torch.randn(2, 9, 6, dtype=torch.double)
    outs = []
    for one in (False, True):
        m.zero_grad()
        y = _hyena_run(m, x, one)
        (y * torch.linspace(-1, 1, y.numel(), dtype=torch.double).view_as(y)).sum().backward()
        outs.append((y.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}))
    assert rel_err(outs[1][0], outs[0][0]) < 1e-12
    for name, g in outs[0][1].items():
        assert rel_err(outs[1][1][name], g) < 1e-10, name


def test_s4d_step_equals_fft():
    torch.manual_seed(0)
    m = S4D(4, d_state=8).double()
    u = torch.randn(3, 7, 4, dtype=torch.double)
    y, h = m(u)
    state, ys = None, []
    for t in range(7):
        yt, state = m(u[:, t:t + 1], state)
        ys.append(yt)
    assert rel_err(torch.cat(ys, 1), y) < 1e-10
    assert rel_err(state, h) < 1e-10


def test_hyena_filter_cache_follows_updates():
    torch.manual_seed(0)
    m = Hyena(4, max_len=6)
    with torch.no_grad():
        h1 = m.long_filter()
        assert m.long_filter() is h1  # reused while nothing changes
        assert torch.equal(m.long_filter(reversed_taps=True), h1.flip(0))
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    m.long_filter().sum().backward()
    opt.step()  # in-place update of the filter network
    with torch.no_grad():
        h2 = m.long_filter()
        t = torch.arange(6, dtype=torch.float32)[:, None]
        assert torch.equal(h2, m.filter(m.pos) * torch.exp(-m.alpha[None] * t))
        assert not torch.equal(h2, h1)
        m.load_state_dict({k: v * 0.5 for k, v in m.state_dict().items()})
        assert torch.equal(m.long_filter(), m.filter(m.pos) * torch.exp(-m.alpha[None] * t))


def _dense_mixture(lp_lm, ids, w, log_lam, log_1m):
    p_mem = torch.zeros_like(lp_lm).scatter_add(-1, ids, w)
    return torch.logaddexp(log_1m[..., None] + lp_lm, log_lam[..., None] + p_mem.clamp_min(_TINY).log())


def test_output_memory_sparse_mixture_equals_dense_with_duplicate_ids():
    torch.manual_seed(0)
    V, D = 7, 5  # a small vocabulary: retrieved ids repeat
    mem = OutputMemory(D, memory_size=16, top_k=6).double()
    with torch.no_grad():
        mem.gate.weight.normal_()
    tokens = torch.randint(0, V, (2, 12))
    feats = torch.randn(2, 12, D, dtype=torch.double, requires_grad=True)
    logits = torch.randn(2, 12, V, dtype=torch.double, requires_grad=True)
    out, _ = mem(feats, tokens, logits, mem.init_state(2))
    # the dense reference, from the same candidates
    q = F.normalize(feats, dim=-1)
    scores = (q @ q[:, :11].transpose(1, 2)).masked_fill(~torch.ones(12, 11, dtype=torch.bool).tril(-1), float("-inf"))
    top, idx = scores.topk(6, dim=-1)
    valid = torch.isfinite(top)
    ids = tokens[:, 1:][:, None, :].expand(2, 12, 11).gather(-1, idx)
    w = torch.softmax((mem.log_theta.exp() * top.masked_fill(~valid, 0)).masked_fill(~valid, -1e4), -1) * valid
    a = mem.gate(feats).squeeze(-1)
    ref = _dense_mixture(F.log_softmax(logits, -1), ids, w, F.logsigmoid(a), F.logsigmoid(-a))
    ref = torch.where(valid[..., :1], ref, F.log_softmax(logits, -1))
    assert (ids[..., :, None] == ids[..., None, :]).sum() > ids.numel()  # duplicates were retrieved
    assert rel_err(out, ref) < 1e-12
    g = torch.randn_like(out)
    got = torch.autograd.grad((out * g).sum(), (feats, logits, mem.log_theta, mem.gate.weight))
    want = torch.autograd.grad((ref * g).sum(), (feats, logits, mem.log_theta, mem.gate.weight))
    for a_, b_ in zip(got, want):
        assert rel_err(a_, b_) < 1e-10


def test_cached_head_follows_weight_updates():
    torch.manual_seed(0)
    m = LSTMLM(40, embed_dim=8, hidden_dim=8)
    x = torch.randn(1, 8)
    with torch.no_grad():
        assert torch.allclose(m.head(x), x @ m.embed.weight.T, atol=1e-6)
        m.embed.weight.mul_(2.0)  # an in-place update, as an optimizer makes
        assert torch.allclose(m.head(x), x @ m.embed.weight.T, atol=1e-6)
        big = torch.randn(3, 8)  # more rows: the plain product
        assert torch.allclose(m.head(big), big @ m.embed.weight.T, atol=1e-6)
