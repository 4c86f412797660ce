"""Rotary tables against the direct computation; statistics computed when read equal the
values of the step that produced them."""

import math

import pytest
import torch

from mnnn.layers import rotary
from mnnn.layers.rotary import rotate, rotate_span
from mnnn.layers.synaptic import SynapticMemory
from mnnn.layers.window_attention import WindowAttention


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("start,T", [(0, 7), (5, 1), (250, 20), (1000, 3)])
def test_rotate_span_is_rotate_bitwise(dtype, start, T):
    g = torch.Generator().manual_seed(start)
    x = torch.randn(2, T, 3, 8, generator=g, dtype=dtype)
    assert torch.equal(rotate_span(x, start), rotate(x, torch.arange(start, start + T)))


def test_rotate_span_past_the_table_limit_and_with_an_extra_axis(monkeypatch):
    monkeypatch.setattr(rotary, "TABLE_LIMIT", 16)
    x = torch.randn(1, 4, 2, 3, 8)  # [B, T, (q, k), H, D]: q and k in one call
    for start in (10, 14, 40):  # inside the table, straddling its limit, beyond it
        want = torch.stack([rotate(x[:, :, i], torch.arange(start, start + 4)) for i in range(2)], dim=2)
        assert torch.equal(rotate_span(x, start), want)


def test_rotated_dot_products_depend_on_the_offset_only():
    q, k = torch.randn(1, 1, 1, 16, dtype=torch.float64), torch.randn(1, 1, 1, 16, dtype=torch.float64)
    dots = [float((rotate_span(q, i + d) * rotate_span(k, i)).sum()) for i in (0, 37, 900) for d in (3,)]
    assert dots[0] == pytest.approx(dots[1], abs=1e-10) and dots[0] == pytest.approx(dots[2], abs=1e-10)
    assert float((rotate_span(q, 3) * rotate_span(k, 0)).sum()) != pytest.approx(float((q * k).sum()))


def test_step_entropy_of_uniform_attention_is_log_n():
    layer = WindowAttention(8, 2, window=4)
    with torch.no_grad():
        layer.qkv.weight.zero_()  # every score 0: uniform weights over the valid slots
        layer.qkv.bias.zero_()
    cache = layer.init_state(1)
    with torch.no_grad():
        for n in range(1, 7):
            _, cache = layer.step(torch.randn(1, 8), cache)
            assert layer.last_entropy == pytest.approx(math.log(min(n, 4)), abs=1e-6)


@pytest.mark.parametrize("rule", ["delta", "hebbian"])
def test_synaptic_stats_read_late_are_those_of_the_last_step(rule):
    torch.manual_seed(0)
    mem = SynapticMemory(8, 2, eta=0.5, plasticity_rule=rule)
    state = mem.init_state(1)
    with torch.no_grad():
        for _ in range(3):
            prev = state[0]
            _, state = mem.step(torch.randn(1, 8), state)
    stats = mem.stats
    assert stats["synaptic_energy"] == pytest.approx(float(state[0].pow(2).mean()), rel=1e-6)
    assert stats["synaptic_update_magnitude"] == pytest.approx(float((state[0] - prev).pow(2).mean().sqrt()),
                                                              rel=1e-4)
    assert stats["synaptic_update_magnitude"] > 0
    assert mem.stats == stats  # a second read gives the same values
