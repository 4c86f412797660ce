import pytest
import torch

from mnnn.ops.decay_attention import decay_attention, decay_attention_naive
from tests.harness import check_against_reference


def _inputs(T, B=2, H=2, K=4, V=3, seed=0, state=True):
    torch.manual_seed(seed)
    q, k = torch.randn(B, T, H, K), torch.randn(B, T, H, K) / 2
    v = torch.randn(B, T, H, V)
    decay = 0.5 + 0.5 * torch.rand(B, T, H)
    S = torch.randn(B, H, K, V) if state else None
    return q, k, v, decay, S


@pytest.mark.parametrize("T", [1, 63, 200], ids=lambda t: f"T{t}")
@pytest.mark.parametrize("inclusive", [True, False], ids=["inclusive", "exclusive"])
@pytest.mark.parametrize("chunk", [1, 16, 64], ids=lambda c: f"C{c}")
def test_chunked_matches_naive(T, inclusive, chunk):
    q, k, v, decay, S = _inputs(T)
    check_against_reference(
        lambda *a: decay_attention(*a, inclusive=inclusive, chunk_size=chunk),
        lambda *a: decay_attention_naive(*a, inclusive=inclusive),
        [q, k, v, decay, S], tol=1e-5,
    )


def test_chunk_size_changes_nothing():
    q, k, v, decay, S = _inputs(100)
    ref = decay_attention(q, k, v, decay, S, chunk_size=100)[0]
    for c in (3, 7, 32):
        torch.testing.assert_close(decay_attention(q, k, v, decay, S, chunk_size=c)[0], ref,
                                   rtol=1e-5, atol=1e-5)


def test_exclusive_read_sees_only_the_past():
    # With zero initial state, the first exclusive read is zero and inputs at t never reach o_t.
    q, k, v, decay, _ = _inputs(10, state=False)
    o = decay_attention(q, k, v, decay, inclusive=False)[0]
    assert o[:, 0].abs().max() == 0
    v2 = v.clone()
    v2[:, 5] += 1.0
    o2 = decay_attention(q, k, v2, decay, inclusive=False)[0]
    torch.testing.assert_close(o2[:, :6], o[:, :6])
    assert (o2[:, 6] - o[:, 6]).abs().max() > 0
