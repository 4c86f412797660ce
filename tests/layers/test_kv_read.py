import pytest
import torch

from mnnn.layers.kv_read import KVMemoryRead, kv_read_reference, local_attention


def _inputs(seed, B=2, T=9, N=7, H=3, D=4):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, T, H, D, generator=g) for _ in range(3))
    mem_k, mem_v = torch.randn(B, N, H, D, generator=g), torch.randn(B, N, H, D, generator=g)
    picked = torch.rand(B, T, N, generator=g) < 0.5
    picked[0, 2] = False  # a position that reads nothing
    key_mask = torch.ones(B, T, dtype=torch.bool)
    key_mask[1, :2] = False  # left padding in stream 1
    score_bias = torch.randn(B, T, N, generator=g)
    return q, k, v, mem_k, mem_v, picked, key_mask, score_bias


def _trained_reader(seed, with_bias, with_mask):
    """A reader with non-zero memory weights and query map, and inputs (mask and score bias only
    where asked)."""
    torch.manual_seed(0)
    reader = KVMemoryRead(3, 4)
    with torch.no_grad():
        reader.bias.copy_(torch.tensor([0.5, -1.0, 2.0]))
        reader.query_adapter.normal_(0, 0.3)
    q, k, v, mem_k, mem_v, picked, key_mask, score_bias = _inputs(seed)
    return reader, (q, k, v, mem_k, mem_v, picked, key_mask if with_mask else None,
                    score_bias if with_bias else None)


@pytest.mark.parametrize("with_bias", [False, True], ids=["no_score_bias", "score_bias"])
@pytest.mark.parametrize("with_mask", [False, True], ids=["unpadded", "padded"])
def test_kv_read_equals_one_softmax_over_local_and_picked_keys(with_bias, with_mask):
    reader, (q, k, v, mem_k, mem_v, picked, key_mask, score_bias) = _trained_reader(1, with_bias, with_mask)
    leaves = [t.requires_grad_() for t in (q, k, v, mem_k, mem_v)]
    scale = 0.5
    fast = reader(local_attention(q, k, v, scale, key_mask), q, k, mem_k, mem_v, picked, scale, key_mask, score_bias)
    ref = kv_read_reference(reader, q, k, v, mem_k, mem_v, picked, scale, key_mask, score_bias)
    if with_mask:  # padded query positions see no local key: compare the real ones
        keep = key_mask[..., None].expand_as(fast)
        fast, ref = torch.where(keep, fast, 0.0), torch.where(keep, ref, 0.0)
    assert (fast - ref).norm() / ref.norm() < 1e-6
    grad = torch.randn_like(fast)
    params = [*leaves, reader.bias, reader.query_adapter]
    g_fast = torch.autograd.grad(fast, params, grad)
    g_ref = torch.autograd.grad(ref, params, grad)
    for name, a, b in zip(["q", "k", "v", "mem_k", "mem_v", "bias", "query_adapter"], g_fast, g_ref):
        assert (a - b).norm() / b.norm().clamp_min(1e-12) < 1e-5, name


def test_closed_read_returns_its_input_and_no_memory_is_the_local_output():
    reader = KVMemoryRead(3, 4)
    q, k, v, mem_k, mem_v, picked, _, _ = _inputs(2)
    a = local_attention(q, k, v, 0.5)
    with torch.no_grad():
        reader.bias.fill_(float("-inf"))
    assert reader.closed and reader(a, q, k, mem_k, mem_v, picked, 0.5) is a
    with torch.no_grad():
        reader.bias.zero_()
    out = reader(a, q, k, mem_k, mem_v, torch.zeros_like(picked), 0.5)
    assert torch.equal(out, a)  # nothing picked anywhere: the base's output, bitwise


@pytest.mark.parametrize("with_bias", [False, True], ids=["no_score_bias", "score_bias"])
@pytest.mark.parametrize("with_mask", [False, True], ids=["unpadded", "padded"])
def test_fused_inference_path_equals_the_explicit_form(with_bias, with_mask):
    """Without gradients the read runs through the fused attention kernel: the same output."""
    from mnnn.layers import kv_read

    if kv_read._FUSED is None:
        pytest.skip("this torch has no fused CPU attention with log-sum-exp")
    reader, (q, k, v, mem_k, mem_v, picked, key_mask, score_bias) = _trained_reader(3, with_bias, with_mask)
    a = local_attention(q, k, v, 0.5, key_mask)
    explicit = reader(a, q, k, mem_k, mem_v, picked, 0.5, key_mask, score_bias)  # grad mode: the explicit form
    with torch.no_grad():
        fused = reader(a, q, k, mem_k, mem_v, picked, 0.5, key_mask, score_bias)
        none = reader(a, q, k, mem_k, mem_v, torch.zeros_like(picked), 0.5, key_mask, score_bias)
    if with_mask:
        keep = key_mask[..., None].expand_as(fused)
        fused, explicit = torch.where(keep, fused, 0.0), torch.where(keep, explicit, 0.0)
    torch.testing.assert_close(fused, explicit.detach(), rtol=1e-5, atol=1e-6)
    assert torch.equal(fused[0, 2], explicit[0, 2].detach())  # a position that reads nothing keeps the base's
    assert torch.equal(none, a)
