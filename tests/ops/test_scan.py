import pytest
import torch

from mnnn.ops.scan import linear_scan, linear_scan_naive
from tests.harness import check_against_reference


@pytest.mark.parametrize("T", [1, 2, 63, 1024], ids=lambda t: f"T{t}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.complex64], ids=["real", "complex"])
@pytest.mark.parametrize("with_h0", [False, True], ids=["h0=None", "h0"])
def test_scan_matches_naive(T, dtype, with_h0):
    torch.manual_seed(T)
    B, D = 2, 5
    mag = torch.rand(B, T, D) * 0.98
    a = mag if dtype == torch.float32 else torch.polar(mag, torch.randn(B, T, D))
    b = torch.randn(B, T, D, dtype=dtype)
    inputs = [a, b] + ([torch.randn(B, D, dtype=dtype)] if with_h0 else [])
    check_against_reference(linear_scan, linear_scan_naive, inputs, tol=1e-5)


def test_scan_closed_form():
    # constant decay 0.5 and unit input: h_t = 2 (1 - 0.5^(t+1))
    a = torch.full((1, 6, 1), 0.5)
    b = torch.ones(1, 6, 1)
    h, last = linear_scan(a, b)
    expected = torch.tensor([2 * (1 - 0.5 ** (t + 1)) for t in range(6)])
    torch.testing.assert_close(h[0, :, 0], expected)
    torch.testing.assert_close(last[0, 0], expected[-1])


def test_scan_float64_gradcheck():
    torch.manual_seed(0)
    a = (torch.rand(1, 9, 2, dtype=torch.float64) * 0.9).requires_grad_()
    b = torch.randn(1, 9, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: linear_scan(a, b)[0], (a, b))
