import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from mnnn.memory.layered import LayeredMemoryBuffer  # noqa: E402
from mnnn.memory.retrieval import Retriever  # noqa: E402
from mnnn.models.cmr import CMRConfig, CMRModel, find_blocks, train_cmr  # noqa: E402


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


def _open_gates(model, value=2.0):
    with torch.no_grad():
        for r in model.reweavers.values():
            r.gate.fill_(value)


@pytest.mark.parametrize("base", sorted(BASES))
def test_untrained_cmr_equals_base(base):
    model = CMRModel(BASES[base](), {"relevance_threshold": 0.0, "similarity_threshold": -1.0})
    s1, s2 = _segments()
    with torch.no_grad():
        model(s1)
        out = model(s2, return_memory_info=True)
        ref = model.base(input_ids=s2).logits
        off = model(s2, use_memory=False).logits
    assert out["memory_info"]["retrieved_entries"] > 0  # memory was really read
    torch.testing.assert_close(out.logits, ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(off, ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("base", sorted(BASES))
@pytest.mark.parametrize("j", [0, 7, 15])
def test_causal_with_memory(base, j):
    model = CMRModel(BASES[base](), {"relevance_threshold": 0.0, "similarity_threshold": -1.0})
    _open_gates(model)
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


@pytest.mark.parametrize("strategy", ["semantic", "contextual", "multi_criteria", "hierarchical"])
def test_every_retrieval_strategy_reads_memory(strategy):
    model = CMRModel(tiny_gpt2(), {"retrieval_strategy": strategy, "similarity_threshold": -1.0,
                                   "relevance_threshold": 0.0, "retrieval_budget": 5, "max_clusters": 3})
    s1, s2 = _segments()
    with torch.no_grad():
        model(s1)
        info = model(s2, return_memory_info=True)["memory_info"]
    assert info["retrieved_entries"] == 2 * 2 * 5  # 2 layers x 2 streams x budget


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
