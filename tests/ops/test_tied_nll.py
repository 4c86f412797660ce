import pytest
import torch

from mnnn.ops.tied_nll import tied_nll, tied_nll_naive
from tests.harness import rel_err


@pytest.mark.parametrize("shape", [(5,), (2, 7), (3, 1)])
def test_outputs_and_grads_equal_the_reference(shape):
    torch.manual_seed(0)
    V, E = 11, 4
    feats = torch.randn(*shape, E, dtype=torch.double, requires_grad=True)
    weight = torch.randn(V, E, dtype=torch.double, requires_grad=True)
    targets = torch.randint(0, V, shape)
    g = torch.randn(shape, dtype=torch.double)
    outs = []
    for fn in (tied_nll, tied_nll_naive):
        y = fn(feats, weight, targets)
        outs.append((y.detach(), *torch.autograd.grad((y * g).sum(), (feats, weight))))
    for a, b in zip(*outs):
        assert rel_err(a, b) < 1e-12


def test_gradcheck():
    torch.manual_seed(0)
    feats = torch.randn(4, 3, dtype=torch.double, requires_grad=True)
    weight = torch.randn(6, 3, dtype=torch.double, requires_grad=True)
    targets = torch.randint(0, 6, (4,))
    assert torch.autograd.gradcheck(lambda f, w: tied_nll(f, w, targets), (feats, weight))


def test_reused_workspace_never_corrupts_a_pending_backward():
    torch.manual_seed(0)
    V, E = 50, 8
    weight = torch.randn(V, E, requires_grad=True)
    feats = [torch.randn(6, E, requires_grad=True) for _ in range(3)]
    targets = torch.randint(0, V, (6,))
    # three forwards, an inference-only call between them, then the backwards in another order
    losses = [tied_nll(f, weight, targets).sum() for f in feats]
    with torch.no_grad():
        tied_nll(torch.randn(6, E), weight, targets)
    got = [torch.autograd.grad(losses[i], feats[i], retain_graph=False)[0] for i in (2, 0, 1)]
    want = [torch.autograd.grad(tied_nll_naive(feats[i], weight, targets).sum(), feats[i])[0] for i in (2, 0, 1)]
    for a, b in zip(got, want):
        assert rel_err(a, b) < 1e-5
    again = [tied_nll(f, weight, targets) for f in feats]  # pooled workspaces give the same values
    for f, a in zip(feats, again):
        assert rel_err(a, tied_nll_naive(f, weight, targets)) < 1e-5


def test_half_inputs_take_float32():
    torch.manual_seed(0)
    feats, weight = torch.randn(3, 4).bfloat16(), torch.randn(9, 4).bfloat16()
    targets = torch.randint(0, 9, (3,))
    y = tied_nll(feats, weight, targets)
    assert y.dtype == torch.float32
    assert rel_err(y, tied_nll_naive(feats.float(), weight.float(), targets)) < 1e-6


def test_bad_input():
    f, w = torch.randn(3, 4), torch.randn(9, 4)
    with pytest.raises(ValueError, match="share E"):
        tied_nll(f, torch.randn(9, 5), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="targets must have shape"):
        tied_nll(f, w, torch.zeros(4, dtype=torch.long))
    with pytest.raises(TypeError, match="integer token ids"):
        tied_nll(f, w, torch.zeros(3))
