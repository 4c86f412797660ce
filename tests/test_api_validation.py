"""The hostile probes of the reliability issue, re-run: each bad argument to a public entry point
is a clear ValueError/TypeError naming it, never a silent acceptance."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mnnn import AMN, AMRC, PMRC, Memory, SparseStreamMemoryNetwork, SpikingLayer, TextNativeSSMN

X = np.random.default_rng(0).standard_normal((40, 3)).astype(np.float32)
y = X[:, 0].copy()


@pytest.mark.parametrize("cls", [AMRC, PMRC, AMN])
@pytest.mark.parametrize("grad_clip", [-1, 0, float("nan"), float("inf")])
def test_grad_clip_must_be_positive_and_finite_or_none(cls, grad_clip):
    with pytest.raises(ValueError, match="grad_clip"):
        cls(hidden_size=4, grad_clip=grad_clip).fit(X, y, epochs=1)
    cls(hidden_size=4, grad_clip=None, random_state=0).fit(X, y, epochs=1)  # None: no clipping


def test_ssmn_grad_clip_nan_and_learning_rate_inf_are_refused():
    for kwargs in ({"grad_clip": float("nan")}, {"learning_rate": float("inf")}):
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            SparseStreamMemoryNetwork(hidden_dim=8, num_layers=1, num_heads=2, **kwargs).fit(X, y, epochs=1)


@pytest.mark.parametrize("weights", [np.full(40, np.nan), np.zeros(40), -np.ones(40), np.ones(39)])
def test_score_sample_weight_checked(weights):
    model = AMRC(hidden_size=4, random_state=0).fit(X, y, epochs=1)
    with pytest.raises(ValueError, match="sample_weight"):
        model.score(X, y, sample_weight=weights)
    assert np.isfinite(model.score(X, y, sample_weight=np.ones(40)))


def test_freeze_by_magnitude_nan_refused():
    model = PMRC(hidden_size=4, random_state=0).fit(X, y, epochs=1)
    with pytest.raises(ValueError, match="threshold"):
        model.freeze_by_magnitude(float("nan"))


def test_non_finite_prediction_raises_and_keeps_the_memory():
    model = SparseStreamMemoryNetwork(hidden_dim=8, num_layers=1, num_heads=2, random_state=0).fit(X, y, epochs=1)
    before = model.get_memory_state().copy()
    huge = X.copy()
    huge[3, 0] = 3e38
    with pytest.raises(ValueError, match="memory is unchanged"):
        model.predict(huge)
    np.testing.assert_array_equal(model.get_memory_state(), before)
    assert np.isfinite(model.predict(X)).all()


@pytest.mark.parametrize("kwargs, match", [({"prune_threshold": float("nan")}, "prune_threshold"),
                                           ({"value_dim": 0}, "value_dim")])
def test_memory_constructor_checks(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Memory(10, 8, **kwargs)


def test_memory_group_must_be_integer_ids():
    memory = Memory(10, 8, compressed_dim=4)
    with pytest.raises(ValueError, match="group"):
        memory.add_to_memory(torch.randn(2, 8), torch.randn(2, 8), group=1.7)
    memory.add_to_memory(torch.randn(2, 8), torch.randn(2, 8), group=3)


def test_spiking_layer_refuses_nan_input_unless_told_not_to_check():
    with pytest.raises(ValueError, match="NaN"):
        SpikingLayer(4, 3)(torch.full((2, 4), float("nan")))
    spikes, _ = SpikingLayer(4, 3, check_finite=False)(torch.full((2, 4), float("nan")))
    assert spikes.shape == (2, 3)


def test_text_native_refuses_a_batch_of_prompts():
    net = TextNativeSSMN(50, embed_dim=8, hidden_dim=8, window_size=4, num_layers=1, num_heads=2)
    with pytest.raises(ValueError, match="one sequence"):
        net.generate([[1, 2], [3, 4]])
    assert net.generate(torch.tensor([[1, 2]])).shape == (50,)  # a [1, T] tensor is one prompt


@pytest.mark.parametrize("kwargs, match", [({"num_layers": 0}, "num_layers"), ({"num_heads": 3}, "divisible"),
                                           ({"plasticity_eta": float("nan")}, "plasticity_eta"),
                                           ({"reread_iterations": -1}, "reread_iterations")])
def test_text_native_constructor_checks(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TextNativeSSMN(50, **{"embed_dim": 8, "hidden_dim": 8, "window_size": 4, "num_heads": 2, **kwargs})


@pytest.mark.parametrize("prompt, error, match", [
    ([1, 2, 99], ValueError, r"in \[0, 50\), got min 1, max 99"),
    ([-1], ValueError, r"in \[0, 50\)"),
    ([], ValueError, "empty"),
    ([[1, 2], [3, 4]], ValueError, "one prompt per call"),
    ([1.5, 2], TypeError, "dtype float64"),
    ([True, 2], TypeError, "booleans"),
    ("the city", TypeError, "predict"),
    ([[1], [2, 3]], TypeError, "integer token ids"),
    (None, TypeError, "integer token ids"),
])
def test_lm_generate_refuses_bad_prompts(prompt, error, match):
    from mnnn.lm import build_model, generate

    model = build_model({"model": {"name": "lstm", "vocab_size": 50, "embed_dim": 8, "hidden_dim": 8},
                         "memory": {}, "training": {}})
    with pytest.raises(error, match=match):
        generate(model, prompt, max_new_tokens=2)


def test_lm_generate_takes_every_form_of_one_prompt():
    from mnnn.lm import build_model, generate

    model = build_model({"model": {"name": "lstm", "vocab_size": 50, "embed_dim": 8, "hidden_dim": 8},
                         "memory": {}, "training": {}})
    ref = generate(model, [3, 4], max_new_tokens=3, temperature=0.0)
    for same in ((3, 4), np.array([3, 4], dtype=np.int32), np.uint8([3, 4]), torch.tensor([3, 4]),
                 torch.tensor([[3, 4]]), [[3, 4]]):
        assert generate(model, same, max_new_tokens=3, temperature=0.0) == ref
