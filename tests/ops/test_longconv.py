import pytest
import torch

from mnnn.ops.longconv import long_conv_fft, long_conv_naive
from tests.harness import check_against_reference


@pytest.mark.parametrize("T, L", [(1, 5), (63, 20), (63, 200)], ids=["T1", "T63-L20", "T63-L200"])
@pytest.mark.parametrize("history", [False, True], ids=["fresh", "history"])
def test_fft_matches_direct_sum(T, L, history):
    torch.manual_seed(0)
    z, h = torch.randn(2, T, 5), torch.randn(L, 5)
    inputs = [z, h] + ([torch.randn(2, L - 1, 5)] if history else [])
    check_against_reference(long_conv_fft, long_conv_naive, inputs, tol=1e-5)


def test_chunks_with_history_equal_whole():
    torch.manual_seed(0)
    z, h = torch.randn(1, 50, 3), torch.randn(16, 3)
    whole = long_conv_fft(z, h)
    first = long_conv_fft(z[:, :20], h)
    hist = z[:, 20 - 15 : 20]
    second = long_conv_fft(z[:, 20:], h, hist)
    torch.testing.assert_close(torch.cat([first, second], 1), whole, rtol=1e-5, atol=1e-5)
