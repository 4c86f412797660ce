import pytest
import torch

from mnnn.ops.lif import SURROGATES, lif, lif_naive, spike
from tests.harness import check_against_reference


@pytest.mark.parametrize("reset", ["subtract", "zero"])
@pytest.mark.parametrize("surrogate", sorted(SURROGATES))
@pytest.mark.parametrize("T", [1, 63], ids=lambda t: f"T{t}")
def test_fused_matches_naive(reset, surrogate, T):
    torch.manual_seed(T)
    current = torch.randn(3, T, 6) * 0.9
    u0 = torch.randn(3, 6)
    check_against_reference(
        lambda c, u: lif(c, u, 0.9, 1.0, surrogate, reset),
        lambda c, u: lif_naive(c, u, 0.9, 1.0, surrogate, reset),
        [current, u0], tol=1e-6,
    )


@pytest.mark.parametrize("reset", ["subtract", "zero"])
def test_fused_gradcheck_float64(reset):
    torch.manual_seed(0)
    # keep membranes away from the threshold so the Heaviside forward is locally constant
    current = (torch.rand(2, 12, 3, dtype=torch.float64) * 0.6).requires_grad_()
    u0 = (torch.rand(2, 3, dtype=torch.float64) * 0.5).requires_grad_()
    assert torch.autograd.gradcheck(lambda c, u: lif(c, u, 0.9, 1.0, "atan", reset)[1], (current, u0))


@pytest.mark.parametrize("name", sorted(SURROGATES))
def test_surrogate_backward_is_its_formula(name):
    x = torch.linspace(-2, 2, 41, dtype=torch.float64, requires_grad=True)
    spike(x, name).sum().backward()
    torch.testing.assert_close(x.grad, SURROGATES[name](x.detach()))
    assert torch.equal(spike(x, name).detach(), (x > 0).double())


def test_surrogate_closed_forms():
    x = torch.tensor([0.0, 0.04], dtype=torch.float64)
    torch.testing.assert_close(SURROGATES["fast_sigmoid"](x), 1 / (25 * x.abs() + 1) ** 2)
    assert SURROGATES["atan"](torch.tensor(0.0)) == 1.0
    assert SURROGATES["sigmoid"](torch.tensor(0.0)) == 25 * 0.25
    assert SURROGATES["triangular"](torch.tensor(0.5)) == 0.5


def test_hand_computed_trace():
    # beta 0.5, threshold 1, constant current 0.6: u = 0.6, 0.9, 1.05 (spike), 0.525 - 1 + 0.6 ...
    s, u, _ = lif(torch.full((1, 4, 1), 0.6), beta=0.5)
    torch.testing.assert_close(u[0, :, 0], torch.tensor([0.6, 0.9, 1.05, 0.125]))
    torch.testing.assert_close(s[0, :, 0], torch.tensor([0.0, 0.0, 1.0, 0.0]))


def test_bad_arguments():
    with pytest.raises(ValueError, match="spike_grad"):
        lif(torch.zeros(1, 2, 3), spike_grad="relu")
    with pytest.raises(ValueError, match="reset"):
        lif(torch.zeros(1, 2, 3), reset="none")
