import pytest
import torch
import torch.nn.functional as F

from mnnn.ops.delta_rule import delta_rule, delta_rule_naive, delta_rule_step
from tests.harness import check_against_reference


def _inputs(T, gated, initial, B=2, H=2, K=8, V=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(B, T, H, K, generator=g, dtype=torch.double), dim=-1)
    k = F.normalize(torch.randn(B, T, H, K, generator=g, dtype=torch.double), dim=-1)
    v = torch.randn(B, T, H, V, generator=g, dtype=torch.double)
    beta = torch.rand(B, T, H, generator=g, dtype=torch.double) * 1.8 + 0.1  # (0, 2): eigenvalues in (-1, 1)
    alpha = torch.rand(B, T, H, generator=g, dtype=torch.double) * 0.2 + 0.8 if gated else None
    s0 = torch.randn(B, H, K, V, generator=g, dtype=torch.double) if initial else None
    return q, k, v, beta, alpha, s0


@pytest.mark.parametrize("gated", [False, True], ids=["delta", "gated_delta"])
@pytest.mark.parametrize("initial", [False, True], ids=["zero-state", "initial-state"])
@pytest.mark.parametrize("T,chunk", [(63, 16), (63, 64), (63, 5), (1000, 64), (1000, 100)])
def test_chunked_equals_naive_outputs_and_gradients(T, chunk, gated, initial):
    q, k, v, beta, alpha, s0 = _inputs(T, gated, initial)
    inputs = [q, k, v, beta] + ([alpha] if gated else []) + ([s0] if initial else [])

    def call(fn, **kw):
        def run(q, k, v, beta, *rest):
            rest = list(rest)
            a = rest.pop(0) if gated else None
            s = rest.pop(0) if initial else None
            return fn(q, k, v, beta, a, s, **kw)
        return run

    check_against_reference(call(delta_rule, chunk_size=chunk), call(delta_rule_naive), inputs, tol=1e-9)


def test_delta_rule_recalls_what_additive_writes_lose():
    """Store 16 key -> value pairs in 8 dimensions then write 16 more over the first 8 keys:
    with beta = 1 and orthonormal keys the delta rule returns exactly the last value of each key."""
    K = 8
    keys = torch.eye(K, dtype=torch.double)[None, :, None].expand(1, K, 1, K)
    keys = torch.cat([keys, keys], 1)
    vals = torch.randn(1, 2 * K, 1, 4, dtype=torch.double)
    beta = torch.ones(1, 2 * K, 1, dtype=torch.double)
    _, S = delta_rule(keys, keys, vals, beta * 0.999999 + 1e-7, chunk_size=5)
    read = torch.einsum("bhk,bhkv->bhv", torch.eye(K, dtype=torch.double)[None, None, 0], S)
    torch.testing.assert_close(read[0, 0], vals[0, K, 0], rtol=1e-5, atol=1e-5)


def test_step_equals_forward():
    q, k, v, beta, alpha, s0 = _inputs(20, True, True)
    o, S = delta_rule(q, k, v, beta, alpha, s0, chunk_size=8)
    state, outs = s0, []
    for t in range(20):
        o_t, state = delta_rule_step(q[:, t], k[:, t], v[:, t], beta[:, t], alpha[:, t], state)
        outs.append(o_t)
    torch.testing.assert_close(torch.stack(outs, 1), o)
    torch.testing.assert_close(state, S)


def test_bad_input():
    q, k, v, beta, alpha, s0 = _inputs(10, True, True)
    with pytest.raises(ValueError, match=r"beta must lie in \(0, 2\)"):
        delta_rule(q, k, v, beta * 0 + 2.5)
    with pytest.raises(ValueError, match=r"alpha must lie in \(0, 1\]"):
        delta_rule(q, k, v, beta, alpha + 1)
    with pytest.raises(ValueError, match="chunk_size must be a positive int, got 0"):
        delta_rule(q, k, v, beta, chunk_size=0)
    with pytest.raises(ValueError, match="state must be"):
        delta_rule(q, k, v, beta, state=s0[:, :1])
    with pytest.raises(ValueError, match="beta must be"):
        delta_rule(q, k, v, beta[:, :3])
