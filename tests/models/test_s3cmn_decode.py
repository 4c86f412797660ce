"""S3CMNDecoder: the lean one-token path gives model.step's logits and state, to float rounding."""

import pytest
import torch

from mnnn.models.s3cmn import S3CMN
from mnnn.models.s3cmn_decode import DecodeState, S3CMNDecoder, decoder_for
from tests.harness import greedy_reference

V = 50


def _model(**kw) -> S3CMN:
    torch.manual_seed(0)
    cfg = dict(vocab_size=V, embedding_dim=16, hidden_dim=24, num_layers=2, memory_size=12, d_state=8, max_len=20,
               memory_top_k=4, threshold=0.3)
    model = S3CMN(**{**cfg, **kw}).eval()
    if model.output_memory is not None:
        with torch.no_grad():  # an opened gate: the memory's share is large enough to show
            model.output_memory.gate.bias.fill_(0.0)
    return model


def _steps(step, tokens, state):
    outs = []
    for t in range(tokens.shape[1]):
        out, state = step(tokens[:, t], state)
        outs.append(out)
    return torch.stack(outs, 1), state


def _close(a, b, tol=1e-4):
    assert a.shape == b.shape
    if a.numel():
        assert (a - b).abs().max() <= tol * (1 + b.abs().max()), float((a - b).abs().max())


def _states_close(a, b):
    ta, tb = a.tensors(), b.tensors()
    assert ta.keys() == tb.keys()
    for key in ta:
        assert ta[key].shape == tb[key].shape and ta[key].dtype == tb[key].dtype, key
        if ta[key].is_floating_point() or ta[key].is_complex():
            _close(ta[key], tb[key])
        else:
            assert torch.equal(ta[key], tb[key]), key


@pytest.mark.parametrize("kw", [{}, {"use_memory": False}])
@torch.no_grad()
def test_decoder_equals_model_step_past_eviction_and_hands_its_state_back(kw):
    """From a context read by the parallel forward, decode past the Hyena filter's support and
    the output cache's capacity (both rings wrap, the cache evicts): logits == model.step's; the
    state converted back == model.step's; the parallel forward continues from it identically."""
    model = _model(**kw)
    dec = S3CMNDecoder(model)
    x = torch.randint(0, V, (2, 70), generator=torch.Generator().manual_seed(1))
    _, ctx = model(x[:, :9])
    want, st = _steps(model.step, x[:, 9:60], ctx)
    got, ds = _steps(dec.step, x[:, 9:60], dec.from_state(ctx))
    _close(got, want)
    back = dec.to_state(ds)
    _states_close(back, st)
    _close(model(x[:, 60:], back)[0], model(x[:, 60:], st)[0])
    if model.output_memory is not None:  # the memory was read: its entries moved the logits
        with torch.no_grad():
            model.set_memory_enabled(False)
            off, _ = _steps(model.step, x[:, 9:60], ctx)
            model.set_memory_enabled(True)
        assert (off - want).abs().max() > 1e-3


@torch.no_grad()
def test_decoder_from_scratch_with_memory_off_zero_reset_and_new_weights():
    """From an empty state (the first token has nothing to read); with the memory switched off
    (the cache stays untouched); with the spiking layers' 'zero' reset; and after the weights
    change (derived S4D / Hyena / theta values are recomputed)."""
    model = _model()
    dec = S3CMNDecoder(model)
    x = torch.randint(0, V, (2, 30), generator=torch.Generator().manual_seed(2))
    _close(_steps(dec.step, x, dec.init_state(2))[0], _steps(model.step, x, model.init_state(2))[0])
    model.set_memory_enabled(False)
    got, ds = _steps(dec.step, x, dec.init_state(2))
    _close(got, _steps(model.step, x, model.init_state(2))[0])
    assert int(ds.count) == 0 and not ds.keys.any()
    model.set_memory_enabled(True)
    for block in model.blocks:
        block.spiking.reset = "zero"
    _close(_steps(dec.step, x, dec.init_state(2))[0], _steps(model.step, x, model.init_state(2))[0])
    for p in model.parameters():
        p.add_(0.01 * torch.randn_like(p))
    _close(_steps(dec.step, x, dec.init_state(2))[0], _steps(model.step, x, model.init_state(2))[0])
    # each tensor a derived value comes from, changed alone, is seen
    for p in (model.blocks[1].ssm.log_dt, model.hyena.filter[0].weight, model.hyena.short.weight,
              model.output_memory.log_theta):
        p.add_(0.1)
        _close(_steps(dec.step, x, dec.init_state(2))[0], _steps(model.step, x, model.init_state(2))[0])


@torch.no_grad()
def test_decoder_streams_are_independent_and_its_state_is_updated_in_place():
    model = _model()
    dec = S3CMNDecoder(model)
    x = torch.randint(0, V, (2, 40), generator=torch.Generator().manual_seed(3))
    both, _ = _steps(dec.step, x, dec.init_state(2))
    alone, _ = _steps(dec.step, x[:1], dec.init_state(1))
    _close(both[:1], alone)
    y = x.clone()
    y[1] = (y[1] + 1) % V
    _close(_steps(dec.step, y, dec.init_state(2))[0][0], both[0])
    state = dec.init_state(1)
    kept = state.clone()
    logits, same = dec.step(x[0, :1], state)
    assert same is state and int(state.pos) == 1 and int(kept.pos) == 0
    # ordinary tensors out (the step runs under inference mode): usable where autograd saves them
    assert not logits.is_inference() and not any(t.is_inference() for t in state.tensors().values())
    with torch.enable_grad():
        w = torch.ones(V, requires_grad=True)
        (logits * w).sum().backward()
    assert torch.equal(w.grad, logits[0])
    assert isinstance(kept, DecodeState)


@torch.no_grad()
def test_decoder_records_spike_statistics_when_asked():
    model = _model()
    x = torch.randint(0, V, (2, 30), generator=torch.Generator().manual_seed(4))
    _steps(model.step, x, model.init_state(2))
    want = model.get_stats()
    model.reset_stats()
    dec = S3CMNDecoder(model)
    _steps(dec.step, x, dec.init_state(2))
    assert model.get_stats() != want  # nothing recorded
    model.reset_stats()
    dec = S3CMNDecoder(model, record_stats=True)
    _steps(dec.step, x, dec.init_state(2))
    got = model.get_stats()
    _steps(model.step, x[:, :3], model.init_state(2))  # the counts (made under inference mode) add up on
    assert model.get_stats()["blocks"][0]["spikes"]["steps"] == got["blocks"][0]["spikes"]["steps"] + 6
    assert abs(got["spike_rate"] - want["spike_rate"]) < 1e-6 and want["spike_rate"] > 0
    for a, b in zip(got["blocks"], want["blocks"]):
        for key in ("spikes_per_token", "silent_fraction", "steps", "first_spike_time"):
            assert abs(a["spikes"][key] - b["spikes"][key]) < 1e-6, key


@torch.no_grad()
def test_generate_steps_through_the_decoder_and_falls_back_without_one():
    """``mnnn.lm.generate`` on an S3CMN decodes through S3CMNDecoder: greedy, it continues as the
    model's own step loop does, past the cache's capacity; ``decoder_for`` names the models it
    leaves to their own step (the membrane memory, an attached datastore, other LMs)."""
    from mnnn.lm import generate
    from mnnn.memory.datastore import build_datastore
    from mnnn.models.lm_baselines import LSTMLM

    model = _model()
    prompt = torch.randint(0, V, (9,), generator=torch.Generator().manual_seed(5)).tolist()
    assert isinstance(decoder_for(model), S3CMNDecoder)
    assert generate(model, prompt, 20, temperature=0) == greedy_reference(model, prompt, 20)
    assert decoder_for(_model(memory_fusion="membrane")) is None and decoder_for(LSTMLM(V, 8, 8)) is None
    store = build_datastore(model, torch.randint(0, V, (200,), generator=torch.Generator().manual_seed(6)),
                            batch_size=2, seq_len=16)
    model.attach_datastore(store)
    assert decoder_for(model) is None
    assert generate(model, prompt, 5, temperature=0) == greedy_reference(model, prompt, 5)


def test_decoder_refuses_what_it_does_not_cover():
    with pytest.raises(ValueError, match="memory_fusion='membrane'"):
        S3CMNDecoder(_model(memory_fusion="membrane"))
    with pytest.raises(TypeError, match="needs an S3CMN"):
        S3CMNDecoder(torch.nn.Linear(2, 2))
    dec = S3CMNDecoder(_model())
    state = dec.init_state(2)
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 50\)"):
        dec.step(torch.tensor([0, V]), state)
    with pytest.raises(ValueError, match=r"token must be \[2\] integer ids"):
        dec.step(torch.tensor([0.0, 1.0]), state)
    with pytest.raises(ValueError, match=r"token must be \[2\] integer ids"):
        dec.step(torch.tensor([[0, 1]]), state)
    with pytest.raises(TypeError, match="DecodeState"):
        dec.step(torch.tensor([0, 1]), dec.model.init_state(2))
    with pytest.raises(TypeError, match="S3CMNState"):
        dec.from_state(state)
