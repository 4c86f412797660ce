import math
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from mnnn.memory import Memory, dequantize_rows, quantize_rows


def brute_force_topk(memory: Memory, query: torch.Tensor, k: int):
    with torch.no_grad():
        scores = memory.proj(query) @ memory.proj(memory.stored_keys()).T / math.sqrt(memory.compressed_dim)
    return scores.topk(k, dim=1)


def test_topk_equals_brute_force_fp32():
    torch.manual_seed(0)
    m = Memory(256, 32, compressed_dim=16, quantize=False)
    m.add_to_memory(torch.randn(200, 32), torch.randn(200, 32))
    q = torch.randn(10, 32)
    read = m.search(q, top_k=7)
    ref_scores, ref_idx = brute_force_topk(m, q, 7)
    assert torch.equal(read.indices, ref_idx)
    torch.testing.assert_close(read.scores, ref_scores, rtol=1e-5, atol=1e-5)
    values = m.stored_values()[ref_idx]
    torch.testing.assert_close(read.values, (torch.softmax(ref_scores, 1)[..., None] * values).sum(1),
                               rtol=1e-5, atol=1e-5)


def test_gradients_reach_query_and_projection():
    m = Memory(16, 8, compressed_dim=4, quantize=False)
    m.add_to_memory(torch.randn(10, 8), torch.randn(10, 8))
    q = torch.randn(3, 8, requires_grad=True)
    m.get_memory(q, 3).sum().backward()
    assert q.grad.abs().sum() > 0 and m.proj.weight.grad.abs().sum() > 0


def test_int8_recall_and_bytes():
    torch.manual_seed(0)
    n, d = 100_000, 128
    keys = F.normalize(torch.randn(n, d), dim=1)
    vals = torch.arange(n)
    fp = Memory(n, d, compressed_dim=d, quantize=False, value_dim=1)
    q8 = Memory(n, d, compressed_dim=d, quantize=True, quantization_bits=8, value_dim=1)
    q8.proj.load_state_dict(fp.proj.state_dict())
    fp.add_to_memory(keys, vals)
    q8.add_to_memory(keys, vals)
    queries = F.normalize(keys[:200] + 0.3 * torch.randn(200, d), dim=1)
    a, b = fp.search(queries, 5).indices, q8.search(queries, 5).indices
    recall = sum(len(set(x.tolist()) & set(y.tolist())) for x, y in zip(a, b)) / a.numel()
    assert recall >= 0.95, recall
    # compression_ratio = fp32 key bytes / stored key bytes (int8 codes + a float32 scale per row)
    assert fp.get_memory_stats()["compression_ratio"] == 1.0
    assert q8.get_memory_stats()["compression_ratio"] >= 3.5


@settings(max_examples=50, deadline=None)
@given(rows=st.integers(1, 5), dim=st.integers(1, 33), bits=st.sampled_from([4, 8]),
       scale=st.floats(1e-3, 1e3), seed=st.integers(0, 2**16))
def test_quantization_error_bounded_by_half_scale(rows, dim, bits, scale, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, dim, generator=g) * scale
    codes, scales = quantize_rows(x, bits)
    back = dequantize_rows(codes, scales, bits, dim)
    assert (back - x).abs().le(scales[:, None] / 2 * (1 + 1e-5) + 1e-6 * scale).all()
    # no wrap-around: the largest element keeps its sign and magnitude
    i = x.abs().argmax(dim=1)
    assert torch.all(torch.sign(back.gather(1, i[:, None])) == torch.sign(x.gather(1, i[:, None])))


def test_int4_packs_two_per_byte():
    m = Memory(8, 33, compressed_dim=8, quantization_bits=4)
    assert m.key_codes.shape[1] == 17 and m.key_codes.dtype == torch.uint8


def test_growth_then_pruning_then_eviction_order():
    m = Memory(4, 4, compressed_dim=4, quantize=False, max_size=6, growth_factor=1.5, prune_threshold=0.5,
               value_dim=1, eviction="utility")
    keys = torch.eye(4).repeat(2, 1)[:6] * 10
    m.add_to_memory(keys[:4], torch.arange(4))
    assert m.capacity == 4
    m.add_to_memory(keys[4:6], torch.tensor([4, 5]))  # grows 4 -> 6
    assert m.capacity == 6 and len(m) == 6 and m.get_memory_stats()["expansions"] == 1
    # hand-made usage: entries 0..5 get 5, 0, 3, 0, 4, 2 over 10 reads
    with torch.no_grad():
        m.usage[:6] = torch.tensor([5.0, 0.0, 3.0, 0.0, 4.0, 2.0])
        m.clock.fill_(10)
    # full at max_size: prune removes utility < 0.5 * mean (mean 0.233): the two zeros
    m.add_to_memory(torch.randn(1, 4), torch.tensor([6]))
    ids = m.stored_values()[:, 0].tolist()
    assert sorted(ids) == [0, 2, 4, 5, 6] and m.get_memory_stats()["pruned"] == 2
    m.prune_threshold = 0.0  # nothing falls below the prune bar any more
    m.add_to_memory(torch.randn(1, 4), torch.tensor([7]))
    # full, nothing to prune: evict the lowest utility, the oldest first among ties (6 before 7)
    m.add_to_memory(torch.randn(1, 4), torch.tensor([8]))
    ids = m.stored_values()[:, 0].tolist()
    assert 6 not in ids and 7 in ids and 8 in ids and m.get_memory_stats()["evicted"] == 1


def test_lru_eviction_keeps_recent_writes_and_entries_reads_use():
    m = Memory(4, 4, compressed_dim=4, quantize=False, max_size=4, value_dim=1)  # eviction='lru'
    m.add_to_memory(torch.eye(4) * 10, torch.arange(4))  # entries 0..3, full
    m.get_memory(torch.eye(4)[[0]] * 10, top_k=1)  # reads entry 0: it is now the most recently used
    m.add_to_memory(torch.ones(2, 4), torch.tensor([4, 5]))  # evicts the two least recently used: 1, 2
    assert sorted(m.stored_values()[:, 0].tolist()) == [0, 3, 4, 5]
    m.add_to_memory(torch.ones(1, 4), torch.tensor([6]))  # then 3 (written before 4, 5 and never read)
    assert sorted(m.stored_values()[:, 0].tolist()) == [0, 4, 5, 6]
    assert m.get_memory_stats()["evicted"] == 3 and m.get_memory_stats()["pruned"] == 0
    m.add_to_memory(torch.randn(6, 4), torch.arange(10, 16))  # larger than the store: its last 4 rows
    assert sorted(m.stored_values()[:, 0].tolist()) == [12, 13, 14, 15]
    assert m.get_memory_stats()["evicted"] == 3 + 4 + 2  # the 4 held entries and the batch's 2 first rows
    with pytest.raises(ValueError, match="eviction must be"):
        Memory(4, 4, eviction="fifo")


def test_store_saved_before_lru_loads_with_last_used_from_born():
    m = Memory(4, 8, compressed_dim=4)
    m.add_to_memory(torch.randn(3, 8), torch.randn(3, 8))
    old = {k: v for k, v in m.state_dict().items() if k != "last_used"}
    fresh = Memory(4, 8, compressed_dim=4)
    fresh.load_state_dict(old)
    assert torch.equal(fresh.last_used, fresh.born) and len(fresh) == 3


def test_state_dict_round_trip_restores_store():
    torch.manual_seed(0)
    m = Memory(4, 8, compressed_dim=4, quantization_bits=8)
    m.add_to_memory(torch.randn(10, 8), torch.randn(10, 8))  # grew past initial_size
    m.get_memory(torch.randn(3, 8))
    fresh = Memory(4, 8, compressed_dim=4, quantization_bits=8)
    fresh.load_state_dict(m.state_dict())
    assert len(fresh) == 10 and fresh.capacity == m.capacity
    for name, buf in m.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], buf), name
    q = torch.randn(2, 8)
    torch.testing.assert_close(fresh.get_memory(q), m.get_memory(q))


def test_stats_hits_and_empty_reads():
    m = Memory(8, 4, compressed_dim=4, quantize=False, similarity_threshold=0.9)
    out = m.get_memory(torch.randn(2, 4))
    assert out.shape == (2, 4) and out.abs().sum() == 0
    stats = m.get_memory_stats()
    assert stats["reads"] == 2 and stats["hit_rate"] == 0.0
    key = torch.randn(1, 4)
    m.add_to_memory(key, torch.ones(1, 4))
    m.get_memory(key)  # exact match: cosine 1 -> hit
    m.get_memory(-key)  # opposite: cosine -1 -> miss
    assert m.get_memory_stats()["hit_rate"] == pytest.approx(1 / 4)
    read = m.search(key, top_k=5)  # more than stored: returns what exists
    assert read.indices.shape == (1, 1)


def test_bad_input():
    m = Memory(8, 4, compressed_dim=4)
    with pytest.raises(ValueError, match=r"\[N, 4\]"):
        m.add_to_memory(torch.randn(2, 5), torch.randn(2, 4))
    with pytest.raises(ValueError, match="NaN"):
        m.add_to_memory(torch.full((1, 4), float("nan")), torch.randn(1, 4))
    with pytest.raises(ValueError, match="top_k"):
        m.get_memory(torch.randn(1, 4), top_k=0)
    with pytest.raises(ValueError, match="quantization_bits"):
        Memory(8, 4, quantization_bits=3)
    with pytest.raises(ValueError, match="rank"):
        Memory(8, 4, world_size=2, rank=2)
    with pytest.raises(ValueError, match="torch.distributed"):
        Memory(8, 4, distributed=True, world_size=2, rank=0)
    with pytest.raises(ValueError, match="same number of rows"):
        m.add_to_memory(torch.randn(2, 4), torch.randn(3, 4))


def _distributed_worker(rank, world, port, keys, vals, queries, out):
    import torch.distributed as dist

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    m = Memory(64, keys.shape[1], compressed_dim=8, quantize=False, distributed=True,
               world_size=world, rank=rank)
    m.add_to_memory(keys, vals)
    read = m.search(queries, top_k=5)
    out[rank] = (read.indices.clone(), read.values.detach().clone(), len(m))
    dist.destroy_process_group()


def test_distributed_two_gloo_ranks_equal_one_process():
    import socket

    import torch.multiprocessing as mp

    torch.manual_seed(1)
    keys, vals, queries = torch.randn(50, 12), torch.randn(50, 12), torch.randn(6, 12)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(_distributed_worker, args=(2, port, keys, vals, queries, out), nprocs=2, join=True)
    torch.manual_seed(0)
    single = Memory(64, 12, compressed_dim=8, quantize=False)
    single.add_to_memory(keys, vals)
    ref = single.search(queries, top_k=5)
    assert out[0][2] + out[1][2] == 50  # each entry lives on exactly one rank
    for rank in (0, 1):
        idx, values, _ = out[rank]
        assert torch.equal(idx, ref.indices)
        torch.testing.assert_close(values, ref.values.detach(), rtol=1e-5, atol=1e-6)


def test_pca_refit_every_compression_interval():
    torch.manual_seed(0)
    # keys live in a 3-dimensional subspace of R^16: PCA must find it
    basis = torch.linalg.qr(torch.randn(16, 3))[0]
    keys = torch.randn(40, 3) @ basis.T
    m = Memory(64, 16, compressed_dim=3, quantize=False, pca_refit=True, compression_interval=20)
    before = m.proj.weight.clone()
    m.add_to_memory(keys[:10], torch.randn(10, 16))
    assert torch.equal(m.proj.weight, before)  # 10 writes: no refit yet
    m.add_to_memory(keys[10:], torch.randn(30, 16))  # crosses 20 writes: refit
    rows = m.proj.weight / m.proj.weight.norm(dim=1, keepdim=True)
    # every projection row lies in the keys' subspace
    torch.testing.assert_close(rows @ basis @ basis.T, rows, atol=1e-4, rtol=1e-4)


def test_compression_interval_refits_only_when_asked():
    m = Memory(64, 16, compressed_dim=3, quantize=False, compression_interval=5)  # pca_refit False
    before = m.proj.weight.clone()
    m.add_to_memory(torch.randn(30, 16), torch.randn(30, 16))
    assert torch.equal(m.proj.weight, before)  # the learned projection is left to the optimizer


def test_groups_isolate_streams():
    m = Memory(16, 4, compressed_dim=4, quantize=False, value_dim=1)
    keys = torch.randn(6, 4)
    m.add_to_memory(keys[:3], torch.tensor([0, 1, 2]), group=0)
    m.add_to_memory(keys[3:], torch.tensor([3, 4, 5]), group=1)
    read = m.search(keys, top_k=6, group=torch.tensor([0, 0, 0, 1, 1, 1]))
    ids = read.entry_values[..., 0]
    for row in range(6):
        picked = ids[row][read.weights[row] > 0].tolist()
        assert set(picked) == ({0, 1, 2} if row < 3 else {3, 4, 5})
    empty = m.search(keys[:1], top_k=3, group=torch.tensor([7]))  # a group with no entries
    assert empty.values.abs().sum() == 0 and not torch.isnan(empty.values).any()
    q = torch.randn(1, 4, requires_grad=True)
    m.search(q, 3, group=torch.tensor([7])).values.sum().backward()
    assert not torch.isnan(q.grad).any()


def test_array_likes_are_accepted_and_complex_refused():
    import numpy as np

    from mnnn.memory import Memory

    mem = Memory(16, 4, compressed_dim=4, quantize=False)
    keys = np.eye(4)
    mem.add_to_memory(keys, keys * 2)  # float64 NumPy in, stored in the default dtype
    assert len(mem) == 4
    np.testing.assert_allclose(mem.get_memory([[1.0, 0, 0, 0]], top_k=1).detach().numpy(), [[2.0, 0, 0, 0]], atol=1e-6)
    assert mem.get_memory(torch.eye(4, dtype=torch.float64)[:1], top_k=1).shape == (1, 4)  # any float dtype
    with pytest.raises(TypeError, match="real numbers"):
        mem.add_to_memory(np.eye(4) * 1j, np.eye(4))
