import pytest
import torch

from mnnn.layers import LRU
from mnnn.models import AMNNetwork, AMRCNetwork, PMRCNetwork, RNNNetwork
from mnnn.ops.scan import linear_scan_naive
from tests.harness import check_against_reference, check_streaming

NETWORKS = {
    "amrc": lambda: AMRCNetwork(3, 8, 2),
    "pmrc": lambda: PMRCNetwork(3, 8, 2),
    "pmrc-gates-outmem": lambda: PMRCNetwork(3, 8, 2, use_learnable_gates=True, use_output_memory=True),
    "pmrc-no-recurrent": lambda: PMRCNetwork(3, 8, 2, use_recurrent=False),
    "amn": lambda: AMNNetwork(3, 8, 2, memory_manifold_size=5),
    "lstm": lambda: RNNNetwork(3, 8, 2, kind="lstm"),
    "gru": lambda: RNNNetwork(3, 8, 2, kind="gru"),
}


@pytest.mark.parametrize("name", sorted(NETWORKS))
@pytest.mark.parametrize("T", [25, 63], ids=lambda t: f"T{t}")
def test_whole_equals_chunks_equals_steps(name, T):
    # float64: the check is about equal computation, so float32 rounding must not hide behind tol
    torch.manual_seed(0)
    net = NETWORKS[name]().double()
    if name == "amn":  # give the manifold read a non-zero weight so its path is exercised
        torch.nn.init.normal_(net.read_proj.weight)
    check_streaming(net, torch.randn(2, T, 3, dtype=torch.float64), splits=(1, 7, 20), tol=1e-10)


@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_state_detach_cuts_graph(name):
    net = NETWORKS[name]()
    _, state = net(torch.randn(1, 4, 3))
    for t in state.detach().tensors().values():
        assert not t.requires_grad


@pytest.mark.parametrize("T", [63, 1024], ids=lambda t: f"T{t}")
def test_lru_parallel_scan_matches_loop(T):
    torch.manual_seed(0)
    lru = LRU(6)

    def naive(x):
        lam, bx = lru._input(x)
        l, _ = linear_scan_naive(lam, bx)
        return lru._output(l, x)

    check_against_reference(lambda x: lru(x)[0], naive, [torch.randn(2, T, 6)], tol=1e-5)


def test_lru_is_stable_and_ring_initialised():
    lru = LRU(64, r_min=0.4, r_max=0.99)
    mag = lru.lambda_().abs()
    assert mag.min() >= 0.4 - 1e-6 and mag.max() <= 0.99 + 1e-6


def test_amrc_closed_form_single_step():
    net = AMRCNetwork(1, 1, 1, beta=0.5, alpha=0.25)
    with torch.no_grad():
        net.cell.W.weight.fill_(1.0)
        net.cell.W.bias.zero_()
        net.readout.weight.fill_(1.0)
        net.readout.bias.zero_()
    x = torch.tensor([[[0.5], [0.5]]])
    y, state = net(x)
    n0 = torch.tanh(torch.tensor(0.5))
    n1 = torch.tanh(0.5 + 0.25 * n0)
    torch.testing.assert_close(y[0, :, 0], torch.stack([n0, n1 + 0.5 * n0]))
    torch.testing.assert_close(state.m[0, 0], 0.75 * 0.25 * n0 + 0.25 * n1)
