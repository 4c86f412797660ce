import pytest
import torch

from mnnn.ops.ssm import discretize, s4d_fft, s4d_naive
from tests.harness import check_against_reference


def _params(H=4, N=3, seed=0):
    torch.manual_seed(seed)
    return (torch.randn(H) - 2, torch.randn(H, N) * 0.5, torch.randn(H, N),
            torch.randn(H, N, dtype=torch.cfloat), torch.randn(H, N, dtype=torch.cfloat), torch.randn(H))


@pytest.mark.parametrize("T", [1, 63, 512], ids=lambda t: f"T{t}")
@pytest.mark.parametrize("with_h0", [False, True], ids=["h0=None", "h0"])
def test_fft_matches_recurrence(T, with_h0):
    log_dt, A_re, A_im, B, C, D = _params()
    u = torch.randn(2, T, 4)
    h0 = torch.randn(2, 4, 3, dtype=torch.cfloat) if with_h0 else None

    def run(fn):
        def f(u, log_dt, A_re, A_im, D, *rest):
            Ab, Bb, Cc = discretize(log_dt, A_re, A_im, B, C)
            return fn(u, Ab, Bb, Cc, D, rest[0] if rest else None)
        return f

    inputs = [u, log_dt, A_re, A_im, D] + ([h0] if with_h0 else [])
    check_against_reference(run(s4d_fft), run(s4d_naive), inputs, tol=1e-4)
