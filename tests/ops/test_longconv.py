import pytest
import torch

from mnnn.ops.longconv import fft_size, long_conv_fft, long_conv_naive
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


@pytest.mark.parametrize("P", [3, 40, 100], ids=["short", "filter-1", "longer"])
def test_fft_with_any_history_length_matches_direct_sum(P):
    # the transform length shrinks with the history (outputs at history positions are dropped);
    # a history longer than the filter must still give the exact sum
    torch.manual_seed(0)
    z, h, hist = torch.randn(2, 24, 4), torch.randn(41, 4), torch.randn(2, P, 4)
    torch.testing.assert_close(long_conv_fft(z, h, hist), long_conv_naive(z, h, hist), rtol=1e-5, atol=1e-5)


def test_fft_size_is_the_next_5_smooth_number():
    def smooth(m):
        for p in (2, 3, 5):
            while m % p == 0:
                m //= p
        return m == 1

    for n in range(1, 1200):
        m = fft_size(n)
        assert m >= n and smooth(m) and not any(smooth(j) for j in range(n, m)), n
    assert fft_size(639) == 640 and fft_size(383) == 384
