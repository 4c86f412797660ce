import math

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from mnnn.bench.cmr_checks import open_reads  # noqa: E402  (a non-zero output projection, open gates)
from mnnn.memory.layered import LayeredMemoryBuffer  # noqa: E402
from mnnn.memory.retrieval import ContextualScorer, Retriever  # noqa: E402
from mnnn.models.cmr import CMRConfig, CMRModel, FullCMRModel, IntegratedCMRModel, find_blocks, train_cmr  # noqa: E402


def tiny_gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=64, n_positions=64, n_embd=32, n_layer=3, n_head=4)
    return transformers.GPT2LMHeadModel(cfg).eval()


def tiny_llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


BASES = {"gpt2": tiny_gpt2, "llama": tiny_llama}


def _segments(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 64, (2, 16), generator=g), torch.randint(0, 64, (2, 16), generator=g)


@pytest.mark.parametrize("mode", ["token", "segment"])
@pytest.mark.parametrize("base", sorted(BASES))
def test_untrained_cmr_equals_base(base, mode):
    model = CMRModel(BASES[base](), {"relevance_threshold": 0.0, "similarity_threshold": -1.0,
                                     "retrieval_mode": mode})
    s1, s2 = _segments()
    with torch.no_grad():
        model(s1)
        out = model(s2, return_memory_info=True)
        ref = model.base(input_ids=s2).logits
        off = model(s2, use_memory=False).logits
    assert out["memory_info"]["retrieved_entries"] > 0  # memory was really read
    torch.testing.assert_close(out.logits, ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(off, ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("mode", ["token", "segment"])
@pytest.mark.parametrize("base", sorted(BASES))
@pytest.mark.parametrize("j", [0, 7, 15])
def test_causal_with_memory(base, j, mode):
    model = CMRModel(BASES[base](), {"relevance_threshold": 0.0, "similarity_threshold": -1.0,
                                     "retrieval_mode": mode})
    open_reads(model)
    s1, s2 = _segments()
    with torch.no_grad():
        model.reset_memory()
        model(s1)
        a = model(s2).logits
        ref = model.base(input_ids=s2).logits
        s2b = s2.clone()
        s2b[:, j] = (s2b[:, j] + 1) % 64
        model.reset_memory()
        model(s1)
        b = model(s2b).logits
    assert (a - ref).abs().max() > 1e-4  # memory changes the output once the gate is open
    torch.testing.assert_close(a[:, :j], b[:, :j], rtol=0, atol=1e-6)
    assert (a[:, j] - b[:, j]).abs().max() > 0


@pytest.mark.parametrize("mode", ["token", "segment"])
@pytest.mark.parametrize("strategy", ["semantic", "contextual", "multi_criteria", "hierarchical"])
def test_every_retrieval_strategy_reads_memory(strategy, mode):
    model = CMRModel(tiny_gpt2(), {"retrieval_strategy": strategy, "similarity_threshold": -1.0, "retrieval_mode": mode,
                                   "relevance_threshold": 0.0, "retrieval_budget": 5, "max_clusters": 3})
    s1, s2 = _segments()
    with torch.no_grad():
        model(s1)
        info = model(s2, return_memory_info=True)["memory_info"]
    per_read = 2 * 16 if mode == "token" else 2  # token mode: every position of both streams reads
    assert info["retrieved_entries"] == 2 * per_read * 5  # 2 layers x reads x budget


def _stream_outputs(model, segs):
    model.reset_memory()
    with torch.no_grad():
        for s in segs[:-1]:
            model(s)
        return model(segs[-1]).logits


def _assert_streams_isolated(model):
    """Four segments of three streams, eviction active: stream 0 is unchanged when streams 1 and
    2 change everywhere, and stream 1 read alone equals stream 1 in the batch."""
    g = torch.Generator().manual_seed(5)
    segs = [torch.randint(0, 64, (3, 16), generator=g) for _ in range(4)]
    full = _stream_outputs(model, segs)
    assert model.buffer.evictions > 0
    other = [s.clone() for s in segs]
    for s in other:
        s[1:] = torch.randint(0, 64, s[1:].shape, generator=g)
    torch.testing.assert_close(_stream_outputs(model, other)[0], full[0], rtol=0, atol=1e-5)
    alone = _stream_outputs(model, [s[1:2] for s in segs])
    torch.testing.assert_close(alone[0], full[1], rtol=0, atol=1e-5)
    return segs, full


@pytest.mark.parametrize("kv", [False, True], ids=["cross_attention", "kv_read"])
@pytest.mark.parametrize("strategy", ["semantic", "contextual", "multi_criteria", "hierarchical"])
def test_token_retrieval_isolates_streams_and_ignores_batch_size(strategy, kv):
    # capacity 20 per stream and layer with 16 entries written per segment: eviction is active
    model = CMRModel(tiny_gpt2(), {**(KV if kv else {}), "retrieval_strategy": strategy, "similarity_threshold": -1.0,
                                   "relevance_threshold": 0.0, "retrieval_budget": 6, "max_clusters": 3,
                                   "max_entries_per_layer": 20})
    if kv:
        _open_kv(model)
    else:
        open_reads(model)
    segs, full = _assert_streams_isolated(model)
    assert (full - model.base(input_ids=segs[-1]).logits).abs().max() > 1e-4  # the memory is read
    assert model.retrieval_stats()["retrieved_per_position"] == 6


def test_batch_optimisation_off_gives_the_same_outputs():
    outs = []
    for batched in (True, False):
        model = CMRModel(tiny_gpt2(), {"retrieval_strategy": "multi_criteria", "relevance_threshold": 0.0,
                                       "retrieval_budget": 4, "enable_batch_optimization": batched})
        open_reads(model)
        outs.append(_stream_outputs(model, list(_segments())))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=1e-6)


def test_hierarchical_after_clear_and_evict_equals_a_fresh_retriever():
    torch.manual_seed(0)
    cfg = {"retrieval_strategy": "hierarchical", "similarity_threshold": -1.0, "relevance_threshold": 0.0,
           "retrieval_budget": 4, "max_clusters": 3, "max_entries_per_layer": 24}
    used = CMRModel(tiny_gpt2(), cfg)
    open_reads(used)
    g = torch.Generator().manual_seed(1)
    old = [torch.randint(0, 64, (2, 16), generator=g) for _ in range(3)]
    new = [torch.randint(0, 64, (2, 16), generator=g) for _ in range(3)]
    _stream_outputs(used, old)  # fills the cluster cache, with evictions (16 per segment, 24 kept)
    assert used.buffer.evictions > 0
    after = _stream_outputs(used, new)  # reset_memory() clears, then the same writes as a fresh model
    fresh = CMRModel(tiny_gpt2(), cfg)
    fresh.load_state_dict(used.state_dict())
    torch.testing.assert_close(after, _stream_outputs(fresh, new), rtol=0, atol=0)
    with torch.no_grad():  # and the segment-level path after clear()
        used.buffer.clear()
        r = used.retriever
        buf = LayeredMemoryBuffer([0], 4)
        buf.add(0, torch.randn(12, 4), torch.rand(12), 0, torch.zeros(12))
        q = torch.randn(4)
        first = r.retrieve(buf, 0, 0, q, 1)
        buf.clear()
        buf.add(0, torch.randn(5, 4), torch.rand(5), 0, torch.zeros(5))
        assert torch.equal(r.retrieve(buf, 0, 0, q, 1), Retriever("hierarchical", -1.0, 4, max_clusters=3).retrieve(
            buf, 0, 0, q, 1))
        assert first.numel() > 0


def test_hit_rate_is_recall_at_k_beside_its_chance():
    model = CMRModel(tiny_gpt2(), {"retrieval_strategy": "semantic", "similarity_threshold": -1.0,
                                   "relevance_threshold": 0.0, "retrieval_budget": 4})
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _ in range(6):
            info = model(torch.randint(0, 64, (4, 16), generator=g), return_memory_info=True)
    stats = info["retrieval_stats"]
    assert 0 < stats["hit_rate_chance"] < 0.5  # 4 draws among ~64 tokens
    assert stats["hit_rate"] <= 2 * stats["hit_rate_chance"]  # untrained, uniform tokens: near chance
    assert stats["coverage"] > 0.5  # coverage is reported apart from the hit rate
    # a planted repeat: the same segment again hits far above chance
    model.reset_memory()
    seg = torch.randint(0, 64, (4, 16), generator=g)
    with torch.no_grad():
        model(seg)
        model.reset_stats()
        stats = model(seg, return_memory_info=True)["retrieval_stats"]
    assert stats["hit_rate"] > 0.9 and stats["hit_rate"] > 3 * stats["hit_rate_chance"]


def test_the_seeds_calls_run_as_written():
    cfg = transformers.GPT2Config(vocab_size=64, n_positions=64, n_embd=32, n_layer=12, n_head=4)
    cmr_config = {"target_layers": [4, 8, 12], "max_entries_per_layer": 1000, "scoring_method": "hybrid",
                  "retrieval_strategy": "multi_criteria"}
    model = FullCMRModel(cfg, cmr_config)
    assert model.target_layers == [3, 7, 11]
    input_ids = torch.randint(0, 64, (1, 12))
    outputs = model.forward(input_ids, return_memory_info=True)
    assert outputs["last_hidden_state"].shape == (1, 12, 32)
    memory_stats = {k: outputs[k] for k in ("memory_stats", "performance_stats", "retrieval_stats") if k in outputs}
    assert set(memory_stats) == {"memory_stats", "performance_stats", "retrieval_stats"}
    out = model(input_ids, output_hidden_states=True)
    assert len(out["hidden_states"]) == 13 and out["hidden_states"][-1] is out["last_hidden_state"]
    assert FullCMRModel(cfg).config.scoring_method == "attention_based"
    assert IntegratedCMRModel(cfg).config.scoring_method == "hybrid"
    built = CMRModel.from_config(cfg, {"memory_config": {"target_layers": [0, 11]},
                                       "retrieval_config": {"strategy": "semantic"},
                                       "optimization_config": {"enable_adaptive_thresholds": True,
                                                               "enable_batch_optimization": True}})
    assert built.target_layers == [0, 11] and built.config.retrieval_strategy == "semantic"
    with pytest.raises(ValueError, match="layer_indexing='hidden_states'"):
        CMRModel(model.base, {"target_layers": [4, 8, 12]})
    for key in ("enable_prefetching", "enable_background_optimization"):
        with pytest.raises(ValueError, match=key):
            CMRModel(model.base, {key: True})
    with pytest.raises(TypeError, match="from_pretrained"):
        CMRModel("gpt2", {})


def test_adaptive_threshold_tracks_the_target_share():
    model = CMRModel(tiny_gpt2(), {"enable_adaptive_thresholds": True, "target_keep_fraction": 0.25,
                                   "relevance_threshold": 0.0})
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for _ in range(40):
            model(torch.randint(0, 64, (4, 16), generator=g))
        model.stats["stored"] = model.stats["offered"] = 0
        for _ in range(20):
            model(torch.randint(0, 64, (4, 16), generator=g))
    share = model.memory_stats()["stored_fraction"]
    assert abs(share - 0.25) < 0.1, share


def test_streams_do_not_share_memories():
    model = CMRModel(tiny_gpt2(), {"relevance_threshold": 0.0, "retrieval_strategy": "semantic",
                                   "similarity_threshold": -1.0})
    s1, _ = _segments()
    with torch.no_grad():
        model(s1)
    rows = model.buffer.data[model.target_layers[0]]["row"]
    picked = model.retriever.retrieve(model.buffer, model.target_layers[0], 1, torch.randn(32), 1)
    assert (rows[picked] == 1).all()


def test_training_moves_only_cmr_parameters():
    model = CMRModel(tiny_gpt2(), {"relevance_threshold": 0.0, "similarity_threshold": -1.0})
    base_before = {k: v.clone() for k, v in model.base.state_dict().items()}
    cmr_before = [p.detach().clone() for p in model.cmr_parameters()]
    losses = train_cmr(model, torch.randint(0, 64, (2000,)), segment_len=16, steps=6, learning_rate=1e-2)
    assert all(torch.isfinite(torch.tensor(losses)))
    for k, v in model.base.state_dict().items():
        assert torch.equal(v, base_before[k]), k
    assert any(not torch.equal(a, b.detach()) for a, b in zip(cmr_before, model.cmr_parameters()))


def test_bad_configs_and_models():
    with pytest.raises(ValueError, match="out of range"):
        CMRModel(tiny_gpt2(), {"target_layers": [3]})
    with pytest.raises(ValueError, match="retrieval_strategy"):
        CMRConfig(retrieval_strategy="telepathy")
    with pytest.raises(ValueError, match="scoring_method"):
        CMRConfig(scoring_method="random")
    with pytest.raises(ValueError, match="unknown CMR config keys"):
        CMRConfig.from_dict({"target_layer": [1]})
    with pytest.raises(ValueError, match="no transformer block list"):
        find_blocks(nn.Sequential(nn.Linear(2, 2)))
    cfg = CMRConfig.from_dict({"retrieval_config": {"strategy": "semantic", "similarity_threshold": 0.2}})
    assert cfg.retrieval_strategy == "semantic" and cfg.similarity_threshold == 0.2


def test_buffer_eviction_orders_and_save_load(tmp_path):
    for strategy, expected_gone in (("relevance", {1}), ("lru", {0}), ("lru_relevance", {0})):
        buf = LayeredMemoryBuffer([0], 2, max_entries_per_layer=3, max_total_entries=10, eviction_strategy=strategy)
        # entries 0, 1, 2 written at segments 0, 1, 2; relevance 0.6, 0.1, 0.9
        for seg, rel in enumerate((0.6, 0.1, 0.9)):
            buf.add(0, torch.full((1, 2), float(seg)), torch.tensor([rel]), seg, torch.tensor([0]))
        buf.touch(0, torch.tensor([1]), 3)  # entry 1 was retrieved recently
        buf.add(0, torch.full((1, 2), 3.0), torch.tensor([0.5]), 4, torch.tensor([0]))
        left = set(buf.data[0]["states"][:, 0].long().tolist())
        assert left == {0, 1, 2, 3} - expected_gone, (strategy, left)
        assert buf.evictions == 1
    buf.save(tmp_path / "buf.safetensors")
    loaded = LayeredMemoryBuffer.load(tmp_path / "buf.safetensors")
    for key, value in buf.data[0].items():
        assert torch.equal(loaded.data[0][key], value)
    from mnnn.serialization import load_tensors, save_tensors

    tensors, meta = load_tensors(tmp_path / "buf.safetensors")
    old = {k: v for k, v in tensors.items() if k.split("/")[1] not in ("values", "position", "next_token")}
    save_tensors(tmp_path / "old.safetensors", old, meta)  # a file from before those fields were stored
    legacy = LayeredMemoryBuffer.load(tmp_path / "old.safetensors")
    assert torch.equal(legacy.data[0]["values"], buf.data[0]["states"])
    assert (legacy.data[0]["next_token"] == -1).all() and (legacy.data[0]["position"] == -1).all()
    tensors["0/states"][1, 0] = float("nan")
    save_tensors(tmp_path / "bad.safetensors", tensors, meta)
    with pytest.raises(ValueError, match="bad.safetensors: layer 0 holds NaN or infinite"):  # checked as a state is
        LayeredMemoryBuffer.load(tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="stream index >= 0"):  # refused before anything is written
        buf.add(0, torch.zeros(1, 2), torch.ones(1), 5, torch.tensor([-1]))
    with pytest.raises(ValueError, match="one stream index"):
        buf.add(0, torch.zeros(2, 2), torch.ones(2), 5, torch.tensor([0]))
    assert buf.size(0) == loaded.size(0)


def test_retrieval_cache_invalidated_by_writes():
    buf = LayeredMemoryBuffer([0], 4)
    buf.add(0, torch.randn(10, 4), torch.rand(10), 0, torch.zeros(10))
    r = Retriever("semantic", similarity_threshold=-1.0, budget=3)
    q = torch.randn(4)
    first = r.retrieve(buf, 0, 0, q, 1)
    assert torch.equal(r.retrieve(buf, 0, 0, q, 1), first) and r.cache_hits == 1
    buf.add(0, q[None] * 10, torch.ones(1), 1, torch.zeros(1))  # a perfect match arrives
    again = r.retrieve(buf, 0, 0, q, 1)
    assert r.cache_misses == 2 and 10 in again.tolist()
    with pytest.raises(ValueError, match="criteria"):
        Retriever("multi_criteria", criteria_weights={"novelty": 1.0})


@pytest.mark.parametrize("method", ["cross_attention", "kv_attention"])
def test_remove_hooks_gives_the_base_back_bare(method):
    """``remove_hooks`` takes every hook the CMR put on its base off again (a base wrapped by one
    CMR after another, as the benchmarks do, carries no dead hooks) and the base computes what it
    did before it was wrapped."""
    base = tiny_gpt2()

    def hooks():
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in base.modules())

    s1, s2 = _segments()
    with torch.no_grad():
        bare = base(input_ids=s2).logits
    before = hooks()
    model = CMRModel(base, {"relevance_threshold": 0.0, "similarity_threshold": -1.0,
                            "reconstruction_method": method})
    ours = len(model.target_layers) * (2 if method == "kv_attention" else 1)
    assert hooks() == before + ours
    with torch.no_grad():
        model(s1)
        model(s2)
    live = hooks()  # transformers may add its own (hidden-state recording); those stay
    model.remove_hooks()
    model.remove_hooks()  # harmless twice
    assert hooks() == live - ours
    with torch.no_grad():
        torch.testing.assert_close(base(input_ids=s2).logits, bare, rtol=0, atol=0)


def test_switching_multi_criteria_equals_a_retriever_built_with_it():
    """``set_multi_criteria`` on a retriever that has cached picks: the next picks are those of a
    retriever built with the new settings (the cache was dropped), and the settings are validated."""
    torch.manual_seed(0)
    buf = LayeredMemoryBuffer([0], 8)
    for seg in range(3):
        buf.add(0, torch.randn(12, 8), torch.rand(12), seg, torch.zeros(12))
    q = torch.randn(8)
    r = Retriever("multi_criteria", budget=4)
    seed = r.retrieve(buf, 0, 0, q, 3)
    recency_only = Retriever("multi_criteria", budget=4, criteria_weights={"recency": 1.0}).retrieve(buf, 0, 0, q, 3)
    assert not torch.equal(seed, recency_only)
    r.set_multi_criteria({"recency": 2.0})
    assert r.weights == {"relevance": 0.0, "similarity": 0.0, "recency": 1.0, "diversity": 0.0}
    assert torch.equal(r.retrieve(buf, 0, 0, q, 3), recency_only)
    for bad in ({"novelty": 1.0}, {"recency": -1.0, "similarity": 2.0}, {"recency": 0.0}):
        with pytest.raises(ValueError, match="criteria"):
            r.set_multi_criteria(bad)
    with pytest.raises(ValueError, match="recency_from must be one of"):
        r.set_multi_criteria(recency_from="read")
    with pytest.raises(ValueError, match="recency_from must be one of"):
        CMRConfig(recency_from="read")


@pytest.mark.parametrize("mode", ["token", "segment"])
def test_recency_counts_from_the_last_retrieval_or_the_write(mode):
    """Recency alone, budget 1: with ``recency_from='access'`` an old entry retrieved in the last
    segment is as recent as one written then; with ``'write'`` the newest write always wins. The
    per-segment cache is keyed on the access clock, so a retrieval changes the next pick."""
    buf = LayeredMemoryBuffer([0], 4)
    buf.add(0, torch.eye(4)[:1], torch.ones(1), 0, torch.zeros(1))  # entry 0, written in segment 0
    buf.add(0, torch.eye(4)[1:2], torch.ones(1), 2, torch.zeros(1))  # entry 1, written in segment 2
    q = torch.eye(4)[2]  # orthogonal to both: only recency (and ties) decide
    weights = {"recency": 1.0}

    def pick(r):
        if mode == "segment":
            return r.retrieve(buf, 0, 0, q, 4).tolist()
        view = buf.padded(0, 1)
        idx, valid, _ = r.retrieve_tokens(view, q[None, None], 4, 0, buf.version[0])
        return view["index"][0, idx[0, 0][valid[0, 0]]].tolist()

    by_write = Retriever("multi_criteria", budget=1, criteria_weights=weights, recency_from="write")
    by_access = Retriever("multi_criteria", budget=1, criteria_weights=weights)
    assert pick(by_write) == [1] and pick(by_access) == [1]
    buf.touch(0, torch.tensor([0]), 3)  # entry 0 retrieved in segment 3: now the more recent by access
    assert pick(by_write) == [1] and pick(by_access) == [0]


@pytest.mark.parametrize("dense_ratio", [0, 100], ids=["gather", "dense"])
@pytest.mark.parametrize("read_values", [False, True], ids=["keys", "values"])
def test_per_token_reweaving_equals_a_loop_over_positions(dense_ratio, read_values):
    from mnnn.layers.reweave import ReweaveLayer

    torch.manual_seed(0)
    layer = ReweaveLayer(16, heads=4).double()
    layer.dense_ratio = dense_ratio  # both ways of reading the store
    with torch.no_grad():
        layer.gate.fill_(0.7)
        layer.attn.in_proj_bias.normal_()
        layer.attn.out_proj.weight.normal_()
        layer.attn.out_proj.bias.normal_()
    B, T, N, k = 2, 5, 7, 3
    h = torch.randn(B, T, 16, dtype=torch.float64, requires_grad=True)
    memory = torch.randn(B, N, 16, dtype=torch.float64, requires_grad=True)
    idx = torch.randint(0, N, (B, T, k))
    valid = torch.rand(B, T, k) > 0.3
    valid[0, 0] = False  # a position with nothing retrieved keeps its state
    bias = torch.randn(B, T, k, dtype=torch.float64, requires_grad=True)
    similarity = torch.rand(B, T, k, dtype=torch.float64)
    values = torch.randn(B, N, 16, dtype=torch.float64, requires_grad=True) if read_values else None
    fast = layer.forward_tokens(h, memory, idx, valid, bias, values, similarity=similarity)
    rows = []
    for b in range(B):
        for t in range(T):
            if not valid[b, t].any():
                rows.append(h[b, t])
                continue
            m = layer.norm_memory(memory[b, idx[b, t][valid[b, t]]])[None]
            v = m if values is None else layer.norm_memory(values[b, idx[b, t][valid[b, t]]])[None]
            logit_bias = bias[b, t] + layer.similarity_scale * similarity[b, t]
            attn_mask = logit_bias[valid[b, t]][None, None].expand(4, 1, -1)  # float mask = logit bias
            out, _ = layer.attn(layer.norm(h[b, t])[None, None], m, v, attn_mask=attn_mask, need_weights=False)
            rows.append(h[b, t] + torch.tanh(layer.gate) * out[0, 0])
    slow = torch.stack(rows).view(B, T, 16)
    torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(fast)
    wrt = [h, memory, bias, layer.gate, layer.similarity_scale, layer.attn.in_proj_weight,
           layer.norm_memory.weight] + ([values] if read_values else [])
    grads_fast = torch.autograd.grad((fast * g).sum(), wrt)
    grads_slow = torch.autograd.grad((slow * g).sum(), wrt)
    for a, b in zip(grads_fast, grads_slow):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_an_entry_is_read_as_the_state_that_followed_it():
    model = CMRModel(tiny_gpt2(), {"relevance_threshold": 0.0, "target_layers": [1]})
    seg = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        model(seg)
        h = model.base(input_ids=seg, output_hidden_states=True).hidden_states[2]  # block 1's output
    d = model.buffer.data[1]
    assert d["states"].shape[0] == 2 * 15  # the last position waits for a successor
    for row, pos, key, value in zip(d["row"], d["position"], d["states"], d["values"]):
        torch.testing.assert_close(key, h[row, pos], rtol=0, atol=1e-5)
        torch.testing.assert_close(value, h[row, pos + 1], rtol=0, atol=1e-5)
    tok = CMRModel(tiny_gpt2(), {"relevance_threshold": 0.0, "target_layers": [1], "memory_values": "next_token"})
    with torch.no_grad():
        tok(seg)
    d = tok.buffer.data[1]
    wte = tok.base.get_input_embeddings().weight
    for row, pos, value in zip(d["row"], d["position"], d["values"]):
        torch.testing.assert_close(value, wte[seg[row, pos + 1]], rtol=0, atol=0)
    own = CMRModel(tiny_gpt2(), {"relevance_threshold": 0.0, "target_layers": [1], "memory_values": "self"})
    with torch.no_grad():
        own(seg)
    assert torch.equal(own.buffer.data[1]["states"], own.buffer.data[1]["values"])


def _greedy_diverse(base, unit, pool, k, w):
    """The greedy diversity rule, one candidate at a time: ``base`` and ``unit`` of one position."""
    chosen: list[int] = []
    for _ in range(k):
        def score(i):
            div = 1 - max([float((unit[i] @ unit[j]).clamp_min(0)) for j in chosen], default=0.0)
            return float(base[i]) + w * div
        chosen.append(max((i for i in pool if i not in chosen), key=score))
    return chosen


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("T", [3, 20])  # both row sources: each pick against its pool / the Gram matrix
def test_diverse_topk_equals_a_greedy_loop(T, masked):
    torch.manual_seed(0)
    r = Retriever("multi_criteria", budget=4)
    B, N, k = 2, 12, 4
    states = torch.randn(B, N, 16, dtype=torch.float64)
    base = torch.rand(B, T, N, dtype=torch.float64)
    if masked:  # entries a position may not read (padding, other streams) score -inf; 2k stay finite
        base[:, :, [1, 5, 9]] = float("-inf")
    fast = r._diverse_topk(base, states, k)
    if masked:
        assert not bool(torch.isin(fast, torch.tensor([1, 5, 9])).any())
    unit = torch.nn.functional.normalize(states, dim=-1)
    for b in range(B):
        for t in range(T):
            pool = base[b, t].topk(2 * k).indices.tolist()
            assert fast[b, t].tolist() == _greedy_diverse(base[b, t], unit[b], pool, k, r.weights["diversity"])


def test_the_per_segment_multi_criteria_rule_is_the_greedy_loop_over_every_entry():
    torch.manual_seed(1)
    r = Retriever("multi_criteria", budget=6)
    query, states = torch.randn(16, dtype=torch.float64), torch.randn(20, 16, dtype=torch.float64)
    relevance, since = torch.rand(20, dtype=torch.float64), torch.randint(0, 4, (20,))
    picked = r._multi(query, states, relevance, since, segment=4)
    cos = torch.nn.functional.cosine_similarity(query[None], states, dim=-1)
    base = (0.4 * relevance + 0.3 * (cos + 1) / 2 + 0.2 * torch.exp(-(4 - since).double() / 4.0))
    unit = torch.nn.functional.normalize(states, dim=-1)
    assert picked.tolist() == _greedy_diverse(base, unit, range(20), 6, r.weights["diversity"])


def test_generate_reads_memory_per_token_and_the_switch_gives_the_base():
    model = CMRModel(tiny_gpt2(), {"relevance_threshold": 0.0, "similarity_threshold": -1.0})
    open_reads(model)
    s1, s2 = _segments()
    with torch.no_grad():
        model(s1)
    kwargs = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
    off = model.generate(s2[:, :4], use_memory=False, **kwargs)
    assert torch.equal(off, model.base.generate(input_ids=s2[:, :4], **kwargs))
    before = model.stats["retrieved"]
    on = model.generate(s2[:, :4], **kwargs)
    assert on.shape == off.shape and model.stats["retrieved"] > before
    assert model.buffer.size(model.target_layers[0]) == 2 * 15  # generating stores nothing


# ---- reconstruction_method='kv_attention' ---------------------------------------------------------
KV = {"reconstruction_method": "kv_attention", "relevance_threshold": 0.0, "similarity_threshold": -1.0}


def _open_kv(model):
    """What training does: a non-zero query map (the memory weight starts open at 0)."""
    g = torch.Generator().manual_seed(12)
    with torch.no_grad():
        for r in model.kv_readers.values():
            r.query_adapter.copy_(torch.randn(r.query_adapter.shape, generator=g) * 0.3)
            r.bias.copy_(torch.randn(r.bias.shape, generator=g))


def test_kv_read_of_every_entry_is_the_base_attending_over_the_earlier_segment():
    base = tiny_gpt2()
    model = CMRModel(base, {**KV, "retrieval_budget": 64, "target_layers": [0, 1, 2]})
    s1, s2 = _segments()
    with torch.no_grad():
        model(s1)
        out = model(s2).logits
        past = base(input_ids=s1, use_cache=True).past_key_values
        ref = base(input_ids=s2, past_key_values=past, position_ids=torch.arange(16).expand(2, 16),
                   attention_mask=torch.ones(2, 32)).logits
    assert (out - base(input_ids=s2).logits).abs().max() > 1e-3  # memory changes the output
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


def test_kv_read_closed_or_switched_off_is_the_base_bitwise():
    model = CMRModel(tiny_gpt2(), {**KV, "retrieval_budget": 5})
    _open_kv(model)
    s1, s2 = _segments()
    with torch.no_grad():
        model(s1)
        ref = model.base(input_ids=s2).logits
        assert torch.equal(model(s2, use_memory=False).logits, ref)
        for r in model.kv_readers.values():
            r.bias.fill_(float("-inf"))
        model.reset_memory()
        model(s1)
        assert torch.equal(model(s2).logits, ref)


@pytest.mark.parametrize("j", [0, 7, 15])
def test_kv_read_is_causal(j):
    model = CMRModel(tiny_gpt2(), {**KV, "retrieval_budget": 5})
    _open_kv(model)
    s1, s2 = _segments()
    s2b = s2.clone()
    s2b[:, j] = (s2b[:, j] + 1) % 64
    a, b = _stream_outputs(model, [s1, s2]), _stream_outputs(model, [s1, s2b])
    assert (a - model.base(input_ids=s2).logits).abs().max() > 1e-4
    torch.testing.assert_close(a[:, :j], b[:, :j], rtol=0, atol=1e-6)
    assert (a[:, j] - b[:, j]).abs().max() > 0


def test_kv_read_trains_its_own_parameters_and_generates():
    model = CMRModel(tiny_gpt2(), {**KV, "retrieval_strategy": "contextual", "retrieval_budget": 4})
    before = {n: p.clone() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(3)
    train_cmr(model, torch.randint(0, 64, (400,), generator=g), segment_len=16, steps=4, batch_size=2)
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert any(n.startswith("kv_readers.") for n in moved) and any(n.startswith("scorer.") for n in moved)
    assert not any(n.startswith("base.") for n in moved)
    prompt = torch.randint(0, 64, (2, 5), generator=g)
    out = model.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 9)
    with pytest.raises(ValueError, match="use_cache"):
        model.generate(prompt, max_new_tokens=2, use_cache=True)


def test_kv_read_contextual_scorer_starts_as_the_mean_attention_logit():
    base = tiny_gpt2()
    model = CMRModel(base, {**KV, "retrieval_strategy": "contextual", "context_heads": base.config.n_head})
    heads, head_dim, scale = model._taps[model.target_layers[0]]
    g = torch.Generator().manual_seed(4)
    q, k = torch.randn(2, 5, heads * head_dim, generator=g), torch.randn(2, 7, heads * head_dim, generator=g)
    logits = torch.einsum("bthd,bnhd->bhtn", q.view(2, 5, heads, head_dim), k.view(2, 7, heads, head_dim)) * scale
    torch.testing.assert_close(model.scorer.score_tokens(q, k), logits.mean(1))
    assert CMRModel(tiny_gpt2(), {"retrieval_strategy": "contextual"}).scorer.q.weight.abs().sum() > 0
    with pytest.raises(ValueError, match="divisible"):
        ContextualScorer(10, 3, init="identity")
    with pytest.raises(ValueError, match="'random' or 'identity'"):
        ContextualScorer(8, 2, init="zeros")


def test_kv_read_bad_configs():
    with pytest.raises(ValueError, match="retrieval_mode must be 'token'"):
        CMRConfig(reconstruction_method="kv_attention", retrieval_mode="segment")
    with pytest.raises(ValueError, match="memory_values"):
        CMRConfig(reconstruction_method="kv_attention", memory_values="next")
    assert CMRConfig().memory_values == "next" and CMRConfig(reconstruction_method="kv_attention").memory_values == "self"
    with pytest.raises(ValueError, match="GPT-2-style attention"):
        CMRModel(tiny_llama(), {"reconstruction_method": "kv_attention"})
    model = CMRModel(tiny_gpt2(), KV)
    with pytest.raises(ValueError, match="past_key_values"):
        model(_segments()[0], past_key_values=object())


def test_train_cmr_gives_the_contextual_scorer_its_own_learning_rate():
    from mnnn.models.cmr import train_cmr

    base = tiny_gpt2()
    model = CMRModel(base, {**KV, "retrieval_strategy": "contextual", "context_heads": base.config.n_head})
    groups = model.optimizer_groups(3e-3, 3e-4)
    scorer = {id(p) for p in model.scorer.parameters()}
    assert [g["lr"] for g in groups] == [3e-3, 3e-4] and {id(p) for p in groups[1]["params"]} == scorer
    assert sum(len(g["params"]) for g in groups) == len(model.cmr_parameters())
    assert len(model.optimizer_groups(3e-3)) == 1  # no scorer rate: one group, as before
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.randint(0, 64, (400,), generator=torch.Generator().manual_seed(5))
    train_cmr(model, ids, segment_len=8, steps=6, learning_rate=1e-2, batch_size=2, scorer_learning_rate=0.0)
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert any(n.startswith("kv_readers.") for n in moved)
    assert not any(n.startswith("scorer.") or n.startswith("base.") for n in moved)  # rate 0: the scorer stays
    with pytest.raises(ValueError, match="scorer_learning_rate"):
        model.optimizer_groups(1e-3, -1.0)
    with pytest.raises(ValueError, match="learning_rate"):
        model.optimizer_groups(0.0)


# ---- memory_fusion='output': the retrieved entries' next tokens mixed into p(next) --------------------
OUT = {"memory_fusion": "output", "relevance_threshold": 0.0, "similarity_threshold": -1.0}


@pytest.mark.parametrize("centered", [False, True])
def test_output_read_equals_a_loop_over_positions_with_gradients(centered):
    from mnnn.layers.output_read import OutputRead

    torch.manual_seed(3)
    B, T, N, D, V, k = 2, 5, 7, 6, 11, 4
    read = OutputRead(D, theta=3.0, lambda_init=0.2)
    with torch.no_grad():
        read.gate.weight.normal_()
        read.proj.weight.add_(0.3 * torch.randn(D, D))
    logits = torch.randn(B, T, V, requires_grad=True)
    query, states = torch.randn(B, T, D), torch.randn(B, N, D)
    next_token = torch.randint(0, 3, (B, N))  # few tokens: entries share them
    next_token[0, 2] = -1  # unknown next token: never read
    idx = torch.randint(0, N, (B, T, k))
    idx[0, 1] = 2  # every pick unknown: the position keeps p_LM
    valid = torch.rand(B, T, k) > 0.3
    valid[1, 3] = False  # nothing picked
    center = torch.randn(B, 1, D) if centered else None
    score_bias = torch.randn(B, T, k, requires_grad=True)  # a learned retrieval score of each pick
    with torch.no_grad():
        read.raw_score_scale.fill_(0.7)  # s = softplus(0.7) = 1.10
    out, lam = read(logits, query, states, next_token, idx, valid, center, score_bias=score_bias)
    ref, ref_lam = torch.empty(B, T, V), torch.zeros(B, T)
    for b in range(B):
        for t in range(T):
            p_lm = torch.softmax(logits[b, t], -1)
            picks = [int(i) for i, ok in zip(idx[b, t], valid[b, t]) if ok and next_token[b, i] >= 0]
            if not picks:
                ref[b, t] = torch.log(p_lm)
                continue
            c = center[b, 0] if centered else torch.zeros(D)
            W = read.proj.weight
            q = W @ (query[b, t] - c)
            q = q / q.norm()
            cos = torch.stack([q @ (W @ (states[b, i] - c)) / (W @ (states[b, i] - c)).norm() for i in picks])
            r = torch.stack([score_bias[b, t, j] for j, (i, ok) in enumerate(zip(idx[b, t], valid[b, t]))
                             if ok and next_token[b, i] >= 0])
            w = torch.softmax(read.log_theta.exp() * cos + read.score_scale * r, 0)
            p_mem = torch.zeros(V)
            for wi, i in zip(w, picks):
                p_mem = p_mem + wi * nn.functional.one_hot(next_token[b, i], V)
            g = torch.sigmoid(read.gate(q)[0])
            ref[b, t] = torch.log((1 - g) * p_lm + g * p_mem + 1e-30 * g)
            ref_lam[b, t] = g
    torch.testing.assert_close(out.log_softmax(-1), ref, rtol=1e-5, atol=1e-5)  # logits of the mixture
    assert torch.equal(out[0, 1], logits[0, 1]) and torch.equal(out[1, 3], logits[1, 3])  # nothing read: the base's
    assert ((out != logits).sum(-1) <= k).all()  # only the picked tokens' logits move
    torch.testing.assert_close(lam, ref_lam.detach(), rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # no gradients: the same logits, corrected in place
        inplace = logits.detach().clone()
        same, _ = read(inplace, query, None, next_token, idx, valid, center, keys=read.keys(states, center),
                       score_bias=score_bias)
    assert same is inplace
    torch.testing.assert_close(same, out.detach(), rtol=1e-6, atol=1e-6)
    target = torch.randint(0, 3, (B, T))
    params = [logits, read.log_theta, read.gate.weight, read.proj.weight, read.raw_score_scale, score_bias]
    grads = torch.autograd.grad(out.log_softmax(-1).gather(-1, target[..., None]).sum(), params)
    ref_grads = torch.autograd.grad(ref.gather(-1, target[..., None]).sum(), params)
    for a, r in zip(grads, ref_grads):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-5)


def test_output_read_switch_first_segment_and_loss():
    model = CMRModel(tiny_gpt2(), OUT)
    s1, s2 = _segments()
    with torch.no_grad():
        first = model(s1).logits
        assert torch.equal(first, model.base(input_ids=s1).logits)  # nothing stored yet: the base, bitwise
        off = model(s2, use_memory=False).logits
        assert torch.equal(off, model.base(input_ids=s2).logits)
        out = model(s2, labels=s2)
    mixed = out.logits
    base = model.base(input_ids=s2).logits
    assert (mixed - base).abs().max() > 1e-3  # memory read
    assert ((mixed != base).sum(-1) <= model.config.retrieval_budget).all()  # at the picked tokens only
    ref = nn.functional.cross_entropy(mixed[:, :-1].reshape(-1, 64), s2[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, ref)
    stats = model.retrieval_stats()
    assert abs(stats["output_lambda"] - 0.05) < 1e-6 and abs(stats["output_theta"] - 10.0) < 1e-5


def test_output_read_copies_a_repeated_segment():
    model = CMRModel(tiny_gpt2(), {**OUT, "retrieval_strategy": "semantic", "output_lambda_init": 0.5,
                                   "center_keys": False})
    s1, _ = _segments()
    with torch.no_grad():
        model(s1)
        mixed = model(s1).logits.log_softmax(-1)  # the same tokens again: each position's nearest entry is itself
        base = model.base(input_ids=s1).logits.log_softmax(-1)
    nll = -mixed[:, :-1].gather(-1, s1[:, 1:, None]).mean()
    assert nll < -base[:, :-1].gather(-1, s1[:, 1:, None]).mean() - 0.5


@pytest.mark.parametrize("fusion", ["output", "both"])
@pytest.mark.parametrize("j", [0, 7, 15])
def test_output_read_is_causal(fusion, j):
    model = CMRModel(tiny_gpt2(), {**OUT, "memory_fusion": fusion})
    if fusion == "both":
        open_reads(model)
    s1, s2 = _segments()
    with torch.no_grad():
        model(s1)
        a = model(s2).logits
        s2b = s2.clone()
        s2b[:, j] = (s2b[:, j] + 1) % 64
        model.reset_memory()
        model(s1)
        b = model(s2b).logits
    torch.testing.assert_close(a[:, :j], b[:, :j], rtol=0, atol=1e-6)
    assert (a[:, j] - b[:, j]).abs().max() > 0


@pytest.mark.parametrize("strategy", ["semantic", "multi_criteria", "hierarchical"])
def test_output_read_isolates_streams_and_ignores_batch_size(strategy):
    model = CMRModel(tiny_gpt2(), {**OUT, "retrieval_strategy": strategy, "retrieval_budget": 6, "max_clusters": 3,
                                   "max_entries_per_layer": 20})
    _assert_streams_isolated(model)


def test_output_read_generates_what_the_forward_predicts_and_trains():
    model = CMRModel(tiny_gpt2(), {**OUT, "output_lambda_init": 0.6})
    s1, s2 = _segments()
    with torch.no_grad():
        model(s1)
        stored = model.buffer.size(model.read_layer)
        gen = model.generate(s2[:, :6], max_new_tokens=1, do_sample=False, pad_token_id=0)
        assert model.buffer.size(model.read_layer) == stored  # generating stores nothing
        nxt = model(s2[:, :6]).logits[:, -1].argmax(-1)
    assert torch.equal(gen[:, -1], nxt)
    base = {n: p.clone() for n, p in model.base.named_parameters()}
    theta = model.output_read.theta
    train_cmr(model, torch.randint(0, 64, (400,)), 16, 6, learning_rate=1e-2, batch_size=2)
    assert model.output_read.theta != theta
    assert all(torch.equal(p, base[n]) for n, p in model.base.named_parameters())


def test_output_read_layer_picks_the_block_it_queries():
    s1, s2 = _segments()
    for extra, block in (({}, 2), ({"output_read_layer": 0}, 0),
                         ({"output_read_layer": 2, "layer_indexing": "hidden_states", "target_layers": [1, 2, 3]}, 1)):
        model = CMRModel(tiny_gpt2(), {**OUT, "target_layers": [0, 1, 2], **extra})
        assert model.read_layer == block
        with torch.no_grad():
            model(s1)
            assert set(model._token_views(2)) == {block}  # 'output' alone: no other layer retrieves
            model(s2)
        assert set(model.last_retrieval) == {block}
    both = CMRModel(tiny_gpt2(), {**OUT, "memory_fusion": "both", "target_layers": [0, 1, 2], "output_read_layer": 0})
    with torch.no_grad():
        both(s1)
    assert set(both._token_views(2)) == set(both.target_layers)  # the reweaving reads every target layer


def test_output_read_centres_as_the_retrieval_does():
    s1, s2 = _segments()
    logits = {}
    for center in (True, False):
        model = CMRModel(tiny_gpt2(), {**OUT, "retrieval_strategy": "semantic", "center_keys": center,
                                       "retrieval_budget": 64})  # every entry: the same picks either way
        with torch.no_grad():
            model(s1)
            logits[center] = model(s2).logits
    assert (logits[True] - logits[False]).abs().max() > 1e-4


def test_train_mode_leaves_the_frozen_base_in_eval_mode():
    base = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=64, n_positions=64, n_embd=32, n_layer=3,
                                                                n_head=4, resid_pdrop=0.5))
    model = CMRModel(base, OUT)
    model.train()
    assert model.training and model.output_read.training and not any(m.training for m in model.base.modules())
    s1, _ = _segments()
    with torch.no_grad():  # dropout off: two training-mode passes of the base agree
        assert torch.equal(model(s1, use_memory=False).logits, model(s1, use_memory=False).logits)
    train_cmr(model, torch.randint(0, 64, (400,)), 16, 2, batch_size=2)
    assert not model.base.training
    info = model.memory_info()
    assert info["output_theta"] == model.output_read.theta and 0 < info["output_lambda"] < 1  # a mean of sigmoids


def test_output_read_bad_configs():
    for bad, match in (({"memory_fusion": "output", "output_read_layer": 5}, "output_read_layer"),
                       ({"memory_fusion": "output", "target_layers": [0, 2], "output_read_layer": 1},
                        "output_read_layer"),({"memory_fusion": "logits"}, "memory_fusion must be one of"),
                       ({"memory_fusion": "output", "retrieval_mode": "segment"}, "retrieval_mode='token'"),
                       ({"memory_fusion": "both", "reconstruction_method": "kv_attention"}, "cross_attention"),
                       ({"memory_fusion": "output", "output_lambda_init": 1.0}, "output_lambda_init"),
                       ({"memory_fusion": "output", "output_theta": float("nan")}, "output_theta")):
        with pytest.raises(ValueError, match=match):
            CMRModel(tiny_gpt2(), bad)


def test_output_read_state_saved_before_the_learned_map_loads_as_identity():
    from mnnn.layers.output_read import OutputRead

    old = {k: v for k, v in OutputRead(6).state_dict().items() if k != "proj.weight"}
    read = OutputRead(6)
    with torch.no_grad():
        read.proj.weight.normal_()
    read.load_state_dict(old)  # strict: the missing W is filled in, not reported
    assert torch.equal(read.proj.weight, torch.eye(6))


def test_output_read_score_scale_stays_positive_and_old_scales_load():
    """The score scale is ``softplus(raw)``: positive whatever the optimiser does. A state that
    held the scale itself loads as the same scale (a positive one exactly, 0 or none as the start:
    only the contextual scorer's score uses it), and a negative one is refused with the reason."""
    from mnnn.layers.output_read import OutputRead

    read = OutputRead(6)
    assert 0 < float(read.score_scale.detach()) < 0.01
    with torch.no_grad():
        read.raw_score_scale.fill_(-50.0)
    assert float(read.score_scale.detach()) > 0
    state = {k: v for k, v in OutputRead(6).state_dict().items() if k != "raw_score_scale"}
    for old, want in ((0.7, 0.7), (0.0, float(OutputRead(6).score_scale.detach())), (None, float(OutputRead(6).score_scale.detach()))):
        fresh = OutputRead(6)
        fresh.load_state_dict(state if old is None else {**state, "score_scale": torch.tensor(old)})
        assert math.isclose(float(fresh.score_scale.detach()), want, rel_tol=1e-6)
    with pytest.raises(ValueError, match="score_scale.*negative"):
        OutputRead(6).load_state_dict({**state, "score_scale": torch.tensor(-0.4)})


def test_output_read_stores_only_its_layer_and_trains_the_contextual_scorer():
    model = CMRModel(tiny_gpt2(), {**OUT, "retrieval_strategy": "contextual", "target_layers": [0, 1, 2],
                                   "output_read_layer": 1})
    s1, s2 = _segments()
    with torch.no_grad():
        model(s1)
    assert model.buffer.size(1) > 0 and model.buffer.size(0) == model.buffer.size(2) == 0  # nothing else is read
    # relevance threshold 0: every position with a next token is stored (the last of a segment waits)
    assert model.memory_stats()["stored_fraction"] == (s1.shape[1] - 1) / s1.shape[1] == model.buffer.size(1) / s1.numel()
    out = model(s2, labels=s2)
    grads = torch.autograd.grad(out.loss, [model.output_read.raw_score_scale, *model.scorer.parameters()])
    assert grads[0].abs() > 0  # the scale learns first (0.0025 at the start: the scorer changes little yet)
    with torch.no_grad():
        model.output_read.raw_score_scale.fill_(1.0)
    model.reset_memory()
    with torch.no_grad():
        model(s1)
    out = model(s2, labels=s2)
    assert all(g.abs().sum() > 0 for g in torch.autograd.grad(out.loss, list(model.scorer.parameters())))
