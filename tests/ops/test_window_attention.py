import pytest
import torch

from mnnn.ops.window_attention import WindowCache, window_attention, window_attention_naive, window_attention_step
from tests.harness import check_against_reference, rel_err


def _qkv(T, B=2, H=2, K=4, seed=0):
    torch.manual_seed(seed)
    return torch.randn(B, T, H, K), torch.randn(B, T, H, K), torch.randn(B, T, H, K)


@pytest.mark.parametrize("T", [63, 1000], ids=lambda t: f"T{t}")
@pytest.mark.parametrize("window", [1, 16, 100, 2000], ids=lambda w: f"w{w}")
def test_blocked_matches_naive(T, window):
    q, k, v = _qkv(T)
    check_against_reference(lambda *a: window_attention(*a, window)[0],
                            lambda *a: window_attention_naive(*a, window)[0], [q, k, v], tol=1e-5)


@pytest.mark.parametrize("window", [5, 64])
def test_whole_equals_chunks_equals_steps(window):
    q, k, v = _qkv(70)
    whole, cache_w = window_attention(q, k, v, window)
    outs, cache = [], None
    for s, e in ((0, 3), (3, 40), (40, 70)):
        o, cache = window_attention(q[:, s:e], k[:, s:e], v[:, s:e], window, cache)
        outs.append(o)
    assert rel_err(torch.cat(outs, 1), whole) < 1e-6
    step_cache = WindowCache.empty(2, window, 2, 4, 4, q)
    steps = []
    for t in range(70):
        o, step_cache = window_attention_step(q[:, t], k[:, t], v[:, t], step_cache)
        steps.append(o)
    assert rel_err(torch.stack(steps, 1), whole) < 1e-6
    for c in (cache, step_cache):
        assert torch.equal(c.k, cache_w.k) and int(c.count) == 70


def test_block_size_changes_nothing():
    q, k, v = _qkv(50)
    ref = window_attention(q, k, v, 8)[0]
    for c in (1, 3, 8, 50):
        torch.testing.assert_close(window_attention(q, k, v, 8, block_size=c)[0], ref, rtol=1e-5, atol=1e-6)


def test_attends_to_exactly_the_window():
    q, k, v = _qkv(30)
    o = window_attention(q, k, v, 4)[0]
    v2 = v.clone()
    v2[:, 10] += 5.0
    o2 = window_attention(q, k, v2, 4)[0]
    changed = (o2 - o).abs().amax(dim=(0, 2, 3)) > 0
    assert changed.nonzero().squeeze(1).tolist() == [10, 11, 12, 13]
