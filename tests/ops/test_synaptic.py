import pytest
import torch

from mnnn.ops.synaptic import synaptic_memory, synaptic_memory_naive, synaptic_step
from tests.harness import check_against_reference, rel_err


def _inputs(T, seed=0):
    torch.manual_seed(seed)
    B, H, K = 2, 2, 4
    q = torch.nn.functional.normalize(torch.randn(B, T, H, K), dim=-1)
    k = torch.nn.functional.normalize(torch.randn(B, T, H, K), dim=-1)
    v = torch.tanh(torch.randn(B, T, H, K))
    g = torch.rand(B, T, H)
    return q, k, v, g, torch.randn(B, H, K, K)


@pytest.mark.parametrize("T", [63, 1000], ids=lambda t: f"T{t}")
@pytest.mark.parametrize("chunk", [16, 64], ids=lambda c: f"C{c}")
def test_chunked_matches_naive(T, chunk):
    q, k, v, g, W = _inputs(T)
    check_against_reference(
        lambda q, k, v, g, W: synaptic_memory(q, k, v, g, 0.3, 0.05, W, chunk_size=chunk),
        lambda q, k, v, g, W: synaptic_memory_naive(q, k, v, g, 0.3, 0.05, W), [q, k, v, g, W], tol=1e-5)


def test_step_equals_forward():
    q, k, v, g, W = _inputs(40)
    whole, W_end = synaptic_memory(q, k, v, g, 0.3, 0.05, W)
    state, outs = W, []
    for t in range(40):
        o, state = synaptic_step(q[:, t], k[:, t], v[:, t], g[:, t], 0.3, 0.05, state)
        outs.append(o)
    assert rel_err(torch.stack(outs, 1), whole) < 1e-6 and rel_err(state, W_end) < 1e-6


def test_eta_zero_is_no_memory_and_bounded_norm():
    q, k, v, g, _ = _inputs(500)
    o, W = synaptic_memory(q, k, v, g, 0.0, 0.05)
    assert o.abs().max() == 0 and W.abs().max() == 0
    _, W = synaptic_memory(q, k, v, torch.ones_like(g), 0.01, 0.001)
    bound = 0.01 / 0.001 * v.norm(dim=-1).max()  # ||W|| <= (eta / lambda) max ||v|| ||k||
    assert torch.linalg.matrix_norm(W, ord=2).max() <= bound


def test_read_sees_only_earlier_writes():
    q, k, v, g, _ = _inputs(10)
    o = synaptic_memory(q, k, v, g, 0.5, 0.1)[0]
    v2 = v.clone()
    v2[:, 4] += 1.0
    o2 = synaptic_memory(q, k, v2, g, 0.5, 0.1)[0]
    assert torch.equal(o[:, :5], o2[:, :5]) and (o[:, 5] - o2[:, 5]).abs().max() > 0
