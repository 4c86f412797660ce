import pytest
import torch

from mnnn.layers import SpikingLayer
from mnnn.memory import Memory
from tests.harness import check_streaming


def test_matches_snntorch_leaky():
    snn = pytest.importorskip("snntorch")
    torch.manual_seed(0)
    layer = SpikingLayer(5, 7, beta=0.95, threshold=1.0, spike_grad="fast_sigmoid")
    fc = torch.nn.Linear(5, 7)
    fc.load_state_dict(layer.fc.state_dict())
    leaky = snn.Leaky(beta=0.95, threshold=1.0, reset_mechanism="subtract",
                      spike_grad=snn.surrogate.fast_sigmoid(slope=25))
    x = torch.randn(4, 40, 5) * 2
    upstream = torch.randn(4, 40, 7)
    ours, _ = layer(x)
    (ours * upstream).sum().backward()
    mem = leaky.init_leaky()
    cur = fc(x)
    ref = []
    for t in range(x.shape[1]):
        s, mem = leaky(cur[:, t], mem)
        ref.append(s)
    ref = torch.stack(ref, 1)
    (ref * upstream).sum().backward()
    assert ours.sum() > 0
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)
    for a, b in ((layer.fc.weight.grad, fc.weight.grad), (layer.fc.bias.grad, fc.bias.grad)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("reset", ["subtract", "zero"])
def test_whole_equals_chunks_equals_steps(reset):
    torch.manual_seed(0)
    layer = SpikingLayer(4, 6, reset=reset, spike_grad="atan").double()
    check_streaming(layer, torch.randn(2, 30, 4, dtype=torch.float64) * 2, tol=1e-10)


def test_memory_read_is_fused_into_the_membrane():
    torch.manual_seed(0)
    memory = Memory(16, 4, compressed_dim=4, quantize=False, value_dim=3)
    layer = SpikingLayer(4, 6, memory=memory)
    x = torch.randn(2, 5, 4)
    base = layer.input_current(x)
    memory.add_to_memory(torch.randn(8, 4), torch.randn(8, 3))
    torch.testing.assert_close(layer.input_current(x), base)  # W_m starts at zero
    torch.nn.init.normal_(layer.mem_proj.weight)
    assert (layer.input_current(x) - base).abs().max() > 0
    spikes, _ = layer(x)
    spikes.sum().backward()
    assert layer.mem_proj.weight.grad is not None and memory.proj.weight.grad is not None
    with pytest.raises(ValueError, match="embedding_dim"):
        SpikingLayer(5, 6, memory=memory)


def test_stats():
    layer = SpikingLayer(3, 4)
    assert layer.get_stats()["spike_rate"] == 0.0
    with torch.no_grad():
        layer.fc.weight.zero_()
        layer.fc.bias.copy_(torch.tensor([0.6, 0.0, 0.0, 2.0]))
    layer(torch.zeros(2, 10, 3))
    stats = layer.get_stats()
    assert stats["silent_fraction"] == 0.5
    assert stats["first_spike_time"] >= 0 and stats["spikes_per_token"] > 0
    assert 0 < stats["spike_rate"] < 1
    layer.reset_state()
    assert layer.get_stats()["steps"] == 0


def test_bad_arguments():
    with pytest.raises(ValueError, match="spike_grad"):
        SpikingLayer(2, 2, spike_grad="nope")
    with pytest.raises(ValueError, match="beta"):
        SpikingLayer(2, 2, beta=1.5)
    with pytest.raises(ValueError, match="shape"):
        SpikingLayer(2, 2)(torch.zeros(3, 5))  # [B, F] is one step; F must be in_features


def test_statistics_take_constant_memory_and_stay_exact():
    """Spike statistics are running sums: 500 step calls leave no per-call record behind, and the
    mean first-spike step equals the one computed from the recorded spikes."""
    import torch

    from mnnn.layers.spiking import SpikingLayer

    torch.manual_seed(0)
    layer = SpikingLayer(4, 6)
    x = torch.randn(2, 9, 4) * 3
    spikes, _ = layer(x)
    fired = spikes.any(1)
    expected = spikes.argmax(1).float()[fired].mean()
    assert abs(layer.get_stats()["first_spike_time"] - float(expected)) < 1e-6
    state = layer.init_state(2)
    for _ in range(500):
        _, state = layer.step(torch.randn(2, 4), state)
    assert not any(isinstance(v, (list, dict)) and len(v) > 10 for v in vars(layer).values())


def test_one_step_input_and_kept_membrane():
    """[B, F] is one time step; with init_hidden=True calls without a state continue the membrane
    (== one call over the whole sequence) until reset_state()."""
    import torch

    from mnnn.layers.spiking import SpikingLayer

    torch.manual_seed(0)
    layer = SpikingLayer(4, 6, init_hidden=True)
    x = torch.randn(2, 7, 4) * 2
    whole, _ = layer(x)
    layer.reset_state()
    steps = torch.stack([layer(x[:, t])[0] for t in range(7)], 1)
    assert torch.equal(steps, whole)
    layer.reset_state()
    first, _ = layer(x[:, 0])
    assert torch.equal(first, whole[:, 0])
    fresh = SpikingLayer(4, 6)
    fresh.load_state_dict(layer.state_dict())
    a, _ = fresh(x[:, :3])
    b, _ = fresh(x[:, :3])
    assert torch.equal(a, b)  # without init_hidden every call starts from zero
