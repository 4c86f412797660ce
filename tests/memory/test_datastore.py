import math

import pytest
import torch
import torch.nn.functional as F

from mnnn.memory.datastore import Datastore, build_datastore, model_fingerprint
from mnnn.models.lm_baselines import LSTMLM
from mnnn.models.memory_lm import OutputMemoryLM
from mnnn.models.s3cmn import S3CMN
from mnnn.state import step_through

V = 40


def _s3cmn(**kw):
    torch.manual_seed(0)
    args = dict(vocab_size=V, embedding_dim=16, hidden_dim=16, num_layers=1, memory_size=24, max_len=32,
                memory_top_k=4, d_state=8)
    args.update(kw)
    m = S3CMN(**args).double().eval()
    if m.output_memory is not None:  # a gate that depends on the position
        torch.nn.init.normal_(m.output_memory.gate.weight, std=0.5)
    return m


def _lstm():
    torch.manual_seed(1)
    return OutputMemoryLM(LSTMLM(V, embed_dim=16, hidden_dim=16), memory_size=24, memory_top_k=4).double().eval()


def _store(model, n=600, seed=3):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (n,), generator=gen)
    return build_datastore(model, ids, batch_size=3, seq_len=16, meta={"split": "train"})


def test_exact_search_equals_brute_force_across_blocks():
    gen = torch.Generator().manual_seed(0)
    keys, values = torch.randn(1000, 8, generator=gen), torch.randint(0, V, (1000,), generator=gen)
    store = Datastore(keys, values, V)
    q = F.normalize(torch.randn(50, 8, generator=gen), dim=-1)
    scores, ids = store.search(q, 7, block=128)
    full = q @ store.keys.float().T
    ref_s, ref_i = full.topk(7, dim=-1)
    assert torch.allclose(scores, ref_s) and torch.equal(ids, values[ref_i])
    # a key finds itself first, with cosine 1 (up to float16 storage)
    s, i = store.search(store.keys[:20].float(), 1)
    assert torch.equal(i[:, 0], values[:20]) and float((s - 1).abs().max()) < 2e-3
    assert store.search(q, 5000)[0].shape == (50, 1000)  # k is capped at the store's size


def test_faiss_search_with_every_list_probed_is_exact():
    pytest.importorskip("faiss")
    gen = torch.Generator().manual_seed(1)
    store = Datastore(torch.randn(2000, 8, generator=gen), torch.randint(0, V, (2000,), generator=gen), V)
    q = F.normalize(torch.randn(30, 8, generator=gen), dim=-1)
    store.build_faiss(nlist=8, nprobe=8)
    s_f, i_f = store.search(q, 5, search="faiss")
    s_e, i_e = store.search(q, 5)
    assert torch.allclose(s_f, s_e, atol=1e-5) and torch.equal(i_f, i_e)


def test_save_load_round_trip_and_foreign_files(tmp_path):
    store = _store(_s3cmn())
    path = store.save(tmp_path / "ds.safetensors")
    back = Datastore.load(path)
    assert torch.equal(back.keys, store.keys) and torch.equal(back.values, store.values)
    assert back.meta["split"] == "train" and back.meta["fingerprint"] == store.meta["fingerprint"]
    assert [p.name for p in tmp_path.iterdir()] == ["ds.safetensors"]  # no temporary file left
    from mnnn.serialization import save_tensors

    save_tensors(tmp_path / "other.safetensors", {"w": torch.zeros(2)}, {"kind": "model"})
    with pytest.raises(ValueError, match="not an mnnn datastore"):
        Datastore.load(tmp_path / "other.safetensors")
    (tmp_path / "torn.safetensors").write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="not a readable"):
        Datastore.load(tmp_path / "torn.safetensors")


@pytest.mark.parametrize("keys, values, vocab, match", [
    (torch.full((3, 4), float("nan")), torch.zeros(3, dtype=torch.long), V, "NaN"),
    (torch.zeros(3, 4), torch.zeros(3, dtype=torch.long), V, "nonzero"),
    (torch.ones(3, 4), torch.tensor([0, 1, V]), V, r"\[0, 40\)"),
    (torch.ones(3, 4), torch.zeros(2, dtype=torch.long), V, "same number"),
    (torch.ones(3), torch.zeros(3, dtype=torch.long), V, r"\[N, D\]"),
    (torch.ones(3, 4), torch.zeros(3), V, "integer"),
    (torch.ones(3, 4), torch.zeros(3, dtype=torch.long), 0, "vocab_size"),
])
def test_bad_datastores_are_refused(keys, values, vocab, match):
    with pytest.raises((ValueError, TypeError), match=match):
        Datastore(keys, values, vocab)


def test_attach_refuses_other_vocabulary_dimension_weights_and_split():
    model = _s3cmn()
    store = _store(model)
    with pytest.raises(ValueError, match="vocabulary of 40 tokens; this model has 41"):
        _s3cmn(vocab_size=V + 1).attach_datastore(store)
    with pytest.raises(ValueError, match="16 features; this model's memory queries have 32"):
        _s3cmn(embedding_dim=32).attach_datastore(store)
    other = _s3cmn()
    with torch.no_grad():
        other.down.weight.add_(0.01)
    assert model_fingerprint(other) != model_fingerprint(model)
    with pytest.raises(ValueError, match="other weights"):
        other.attach_datastore(store)
    with pytest.raises(ValueError, match="built from the train split"):
        model.attach_datastore(store, split="train")
    with pytest.raises(ValueError, match="has none"):
        _s3cmn(memory_fusion="membrane").attach_datastore(store)
    for kwargs, match in (({"lam": 1.0}, "lambda"), ({"top_k": 0}, "top_k"), ({"search": "annoy"}, "search"),
                          ({"theta": float("nan")}, "theta")):
        with pytest.raises(ValueError, match=match):
            model.attach_datastore(store, **kwargs)
    model.attach_datastore(store, split="valid")  # another split: accepted


@pytest.mark.parametrize("make", [_s3cmn, _lstm], ids=["s3cmn", "lstm+memory"])
def test_with_datastore_whole_equals_chunks_equals_steps_and_is_causal(make):
    model = make()
    model.attach_datastore(_store(model), top_k=6)
    tok = torch.randint(0, V, (2, 30), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        whole, _ = model(tok)
        a, st = model(tok[:, :11])
        b, _ = model(tok[:, 11:], st)
        steps, _ = step_through(model, tok)
        assert float((torch.cat([a, b], 1) - whole).abs().max()) < 1e-9
        assert float((steps - whole).abs().max()) < 1e-9
        assert torch.allclose(whole.exp().sum(-1), torch.ones(2, 30, dtype=whole.dtype))
        j = 17
        changed = tok.clone()
        changed[:, j] = (changed[:, j] + 1) % V
        assert float((model(changed)[0][:, :j] - whole[:, :j]).abs().max()) < 1e-10  # FFT round-off only
        assert float((model(changed)[0][:, j:] - whole[:, j:]).abs().max()) > 1e-6
        # the NLL path scores what the log-probability path gives
        nll, _, _ = model(tok[:, :-1], targets=tok[:, 1:])
        lp, _ = model(tok[:, :-1])
        assert torch.allclose(nll, -lp.gather(-1, tok[:, 1:, None])[..., 0])


def test_datastore_switches_and_the_four_readings_of_one_pass():
    model = _s3cmn()
    tok = torch.randint(0, V, (2, 40), generator=torch.Generator().manual_seed(6))
    x, y = tok[:, :-1], tok[:, 1:]
    with torch.no_grad():
        cache_nll, lm_nll, _ = model(x, targets=y)
        model.attach_datastore(_store(model))
        model.reset_stats()
        both, lm2, _ = model(x, targets=y)
        assert torch.equal(lm_nll, lm2) and not torch.allclose(both, cache_nll)
        ds = model.get_stats()["output_memory"]["datastore"]
        n = y.numel()
        assert math.isclose(ds["nll_cache"], float(cache_nll.sum()) / n, rel_tol=1e-9)
        assert math.isclose(ds["nll_lm"], float(lm_nll.sum()) / n, rel_tol=1e-9)
        assert math.isclose(ds["nll_both"], float(both.sum()) / n, rel_tol=1e-9)
        assert 0 <= ds["hit_rate_chance"] <= 1 and 0 <= ds["retrieval_accuracy_chance"] <= 1
        model.set_memory_enabled(False)  # the switch turns the datastore read off too
        off, _ = model(x)
        model.set_memory_enabled(True)
        assert torch.equal(off, torch.log_softmax(model.head(model.features(x)[0]), -1))
        model.attach_datastore(None)  # detached: the cache alone again
        again, _, _ = model(x, targets=y)
        assert torch.equal(again, cache_nll)


def test_untrained_datastore_hit_rate_is_near_chance_on_random_tokens():
    model = _s3cmn(vocab_size=V)
    model.attach_datastore(_store(model, n=3000), top_k=8)
    tok = torch.randint(0, V, (4, 200), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        model.reset_stats()
        model(tok[:, :-1], targets=tok[:, 1:])
    ds = model.get_stats()["output_memory"]["datastore"]
    assert ds["hit_rate_chance"] > 0.05
    assert ds["hit_rate_chance"] / 2 <= ds["hit_rate"] <= 2 * ds["hit_rate_chance"]


def test_lambda_grid_scores_other_weights_on_the_same_pass():
    model = _s3cmn()
    store = _store(model)
    tok = torch.randint(0, V, (2, 40), generator=torch.Generator().manual_seed(8))
    with pytest.raises(ValueError, match="lambda_grid"):
        model.attach_datastore(store, lambda_grid=(0.5, 1.0))
    model.attach_datastore(store, lam=0.25, lambda_grid=(0.1, 0.25, 0.6))
    with torch.no_grad():
        model.reset_stats()
        model(tok[:, :-1], targets=tok[:, 1:])
        ds = model.get_stats()["output_memory"]["datastore"]
        assert math.isclose(ds["nll_both_by_lambda"][0.25], ds["nll_both"], rel_tol=1e-9)
        model.attach_datastore(store, lam=0.6)
        model.reset_stats()
        model(tok[:, :-1], targets=tok[:, 1:])
        assert math.isclose(model.get_stats()["output_memory"]["datastore"]["nll_both"], ds["nll_both_by_lambda"][0.6],
                            rel_tol=1e-9)
