"""The seed's MNNN API (seeds/003) on mnnn's estimators."""

import warnings

import numpy as np
import pytest
import torch

from mnnn import AMN, AMRC, PMRC, create_model
from mnnn.data import noisy_sine
from mnnn.estimators import GRURegressor, LSTMRegressor
from mnnn.estimators._sklearn import NotFittedError

SMALL = {
    "amrc": lambda **kw: AMRC(hidden_size=8, random_state=0, **kw),
    "pmrc": lambda **kw: PMRC(hidden_size=8, random_state=0, use_learnable_gates=True,
                              use_output_memory=True, **kw),
    "amn": lambda **kw: AMN(hidden_size=8, memory_manifold_size=4, random_state=0, **kw),
    "lstm": lambda **kw: LSTMRegressor(hidden_size=8, random_state=0, **kw),
}


@pytest.fixture(scope="module")
def sine():
    return noisy_sine(seed=0)


@pytest.fixture
def xy():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((60, 3)).astype(np.float32)
    y = rng.standard_normal((60, 2)).astype(np.float32)
    return X, y


@pytest.mark.parametrize("name", ["amrc", "pmrc", "amn"])
def test_sine_r2_at_defaults(name, sine):
    Xtr, ytr, Xte, yte = sine
    model = create_model(name, random_state=0).fit(Xtr, ytr, epochs=100)
    r2 = model.score(Xte, yte)
    assert r2 >= 0.95, f"{name}: R^2 {r2:.4f}"


def test_create_model_unknown_name_lists_known():
    with pytest.raises(KeyError, match="amrc"):
        create_model("transformer-xl")


@pytest.mark.parametrize("name", sorted(SMALL))
def test_fit_returns_self_and_shapes(name, xy):
    X, y = xy
    model = SMALL[name]()
    assert model.fit(X, y, epochs=2) is model
    assert model.predict(X[:5]).shape == (5, 2)
    assert model.n_features_in_ == 3 and model.training_steps > 0
    model1 = SMALL[name]().fit(X, y[:, 0], epochs=1)
    assert model1.predict(X[:5]).shape == (5,)
    for metric in ("r2", "mse", "mae"):
        assert np.isfinite(model.score(X, y, metric=metric))


def test_seeded_fits_are_reproducible(xy):
    X, y = xy
    a = AMRC(hidden_size=8, random_state=3).fit(X, y, epochs=3).predict(X)
    b = AMRC(hidden_size=8, random_state=3).fit(X, y, epochs=3).predict(X)
    np.testing.assert_array_equal(a, b)


def test_memory_is_carried_between_predicts(xy):
    X, y = xy
    model = AMRC(hidden_size=8, random_state=0).fit(X, y, epochs=2)
    model.reset_memory()
    whole = model.predict(X)
    model.reset_memory()
    parts = np.concatenate([model.predict(X[:25]), model.predict(X[25:])])
    np.testing.assert_allclose(parts, whole, rtol=1e-5, atol=1e-6)
    fresh = model.predict(X[25:], reset_memory=True)
    assert not np.allclose(fresh[:3], whole[25:28])


def test_memory_state_get_set(xy):
    X, y = xy
    model = PMRC(hidden_size=8, random_state=0).fit(X, y, epochs=1)
    snap = model.get_memory_state()
    assert snap.shape == (8 * 3 + 2,)  # h, m, gates, previous output
    first = model.predict(X[:10])
    model.set_memory_state(snap)
    np.testing.assert_allclose(model.predict(X[:10]), first, rtol=1e-6)
    model.reset_memory()
    assert np.all(model.get_memory_state() == 0)
    amn = AMN(hidden_size=8, random_state=0).fit(X, y, epochs=1)
    snap = amn.get_memory_state()
    assert snap.shape == (8 + 2 * 8,)  # liquid, LRU real and imaginary parts
    first = amn.predict(X[:10])
    amn.set_memory_state(snap)
    np.testing.assert_allclose(amn.predict(X[:10]), first, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="shape"):
        model.set_memory_state(np.zeros(3))


def test_hyperparameters_settable_between_fits(xy):
    X, y = xy
    model = AMRC(hidden_size=8, beta=0.1, random_state=0).fit(X, y, epochs=1)
    model.beta = 0.7
    model.learning_rate = 0.001
    model.fit(X, y, epochs=1)
    assert model.network_.cell.beta == 0.7
    amn = AMN(hidden_size=8, random_state=0).fit(X, y, epochs=1)
    amn.dt, amn.memory_decay = 0.05, 0.9995
    amn.fit(X, y, epochs=1)
    assert amn.network_.liquid.dt == 0.05 and amn.network_.manifold.memory_decay == 0.9995
    amn.memory_decay = 0.5
    with pytest.raises(ValueError, match="memory_decay"):
        amn.fit(X, y, epochs=1)


@pytest.mark.parametrize("name", ["amrc", "pmrc", "amn", "ssmn", "lstm", "gru"])
def test_memory_state_round_trip_after_training(name, xy):
    """get/set_memory_state (+ the AMN manifold) restore the predictions exactly after real
    training, when every part of the state is far from zero."""
    X, y = xy
    size = {"hidden_dim": 16, "num_layers": 2, "window_size": 8} if name == "ssmn" else {"hidden_size": 8}
    model = create_model(name, random_state=0, **size).fit(X, y, epochs=20)
    snap = model.get_memory_state().copy()
    manifold = model.get_manifold_state().copy() if name == "amn" else None
    first = model.predict(X)
    model.predict(X[::-1])  # the state moves on
    assert not np.array_equal(model.get_memory_state(), snap)
    model.set_memory_state(snap)
    if name == "amn":
        assert np.abs(manifold).max() > 1e-3
        np.testing.assert_raises(AssertionError, np.testing.assert_array_equal, model.predict(X[:5]), first[:5])
        model.set_memory_state(snap)
        model.set_manifold_state(manifold)
    np.testing.assert_array_equal(model.predict(X), first)


def test_set_manifold_state_refuses_bad_input(xy):
    X, y = xy
    model = AMN(hidden_size=8, memory_manifold_size=4, random_state=0).fit(X, y, epochs=1)
    with pytest.raises(ValueError, match=r"shape \(4, 8\)"):
        model.set_manifold_state(np.zeros((8, 4)))
    with pytest.raises(ValueError, match="NaN"):
        model.set_manifold_state(np.full((4, 8), np.nan))


def test_amn_diagnostics_and_manifold(xy, capsys):
    X, y = xy
    model = AMN(hidden_size=8, memory_manifold_size=4, random_state=0).fit(X, y, epochs=2)
    model.predict(X)
    assert model.avg_manifold_energy > 0 and model.avg_lru_magnitude > 0 and model.avg_lc_timescale > 0
    assert model.get_manifold_state().shape == (4, 8)
    lru = model.get_memory_state().copy()
    model.reset_manifold()
    assert np.all(model.get_manifold_state() == 0)
    np.testing.assert_array_equal(model.get_memory_state(), lru)
    model.print_info()
    assert "manifold_energy" in capsys.readouterr().out


def test_pmrc_gates(xy):
    X, y = xy
    model = PMRC(hidden_size=8, use_learnable_gates=True, random_state=0).fit(X, y, epochs=2)
    gates = model.get_gate_state()
    assert gates.shape == (8,) and np.all((gates > 0) & (gates < 1))
    assert abs(model.avg_gate_value - gates.mean()) < 1e-6
    with pytest.raises(ValueError, match="use_learnable_gates"):
        PMRC(hidden_size=8, random_state=0).fit(X, y, epochs=1).get_gate_state()


# ---- freezing --------------------------------------------------------------------------------
def _params(model):
    return {k: v.detach().clone() for k, v in model.network_.named_parameters()}


def test_amrc_freeze_layers_bit_identical(xy):
    X, y = xy
    model = AMRC(hidden_size=8, random_state=0, weight_decay=0.1).fit(X, y, epochs=1)
    model.freeze_hidden_layer()
    before = _params(model)
    model.fit(X, y, epochs=3)
    after = _params(model)
    assert torch.equal(before["cell.W.weight"], after["cell.W.weight"])
    assert torch.equal(before["cell.W.bias"], after["cell.W.bias"])
    assert not torch.equal(before["readout.weight"], after["readout.weight"])
    model.unfreeze_hidden_layer()
    model.freeze_output_layer()
    before = _params(model)
    model.fit(X, y, epochs=2)
    after = _params(model)
    assert torch.equal(before["readout.weight"], after["readout.weight"])
    assert not torch.equal(before["cell.W.weight"], after["cell.W.weight"])


def test_pmrc_partial_freezing_exact_fraction(xy):
    X, y = xy
    model = PMRC(hidden_size=200, random_state=0).fit(X, y, epochs=1)
    model.freeze_hidden_percentage(0.5)
    rows = ~model._masks["cell.W.weight"].all(dim=1)
    assert int(rows.sum()) == 100  # the seed froze 79 of 200 (sampling with replacement)
    before = _params(model)
    model.fit(X, y, epochs=2)
    after = _params(model)
    w0, w1 = before["cell.W.weight"], after["cell.W.weight"]
    assert torch.equal(w0[rows], w1[rows]) and not torch.equal(w0[~rows], w1[~rows])


def test_pmrc_freeze_output_percentage_and_gates_and_magnitude(xy):
    X, y = xy
    model = PMRC(hidden_size=8, use_learnable_gates=True, random_state=0).fit(X, y, epochs=1)
    model.freeze_output_percentage(0.5)
    model.freeze_memory_gates()
    before = _params(model)
    model.fit(X, y, epochs=2)
    after = _params(model)
    rows = ~model._masks["readout.bias"]
    assert int(rows.sum()) == 1
    assert torch.equal(before["readout.weight"][rows], after["readout.weight"][rows])
    for name in PMRC._gate_params:
        assert torch.equal(before[name], after[name])
    model.unfreeze_memory_gates()
    model.freeze_by_magnitude(0.2, freeze_large=False)
    small = {k: v.abs() < 0.2 for k, v in after.items()}
    model.fit(X, y, epochs=1)
    final = _params(model)
    for k in after:
        assert torch.equal(after[k][small[k]], final[k][small[k]])


# ---- persistence -----------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(SMALL))
@pytest.mark.parametrize("method", ["custom", "joblib", "pickle"])
def test_save_load_round_trip(name, method, xy, tmp_path):
    X, y = xy
    model = SMALL[name]().fit(X, y, epochs=2)
    if name == "pmrc":
        model.freeze_hidden_percentage(0.25)
    path = tmp_path / f"model.{method}"
    model.save(path, method=method)
    expected = model.predict(X[:10])
    cls = type(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = cls.load(path, method=method)
    assert any("executes code" in str(w.message) for w in caught) == (method != "custom")
    np.testing.assert_array_equal(loaded.predict(X[:10]), expected)
    if name == "pmrc":
        assert set(loaded._masks) == set(model._masks)
    # instance-style load, as in the seed: model.load(path)
    other = SMALL[name]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert other.load(path, method=method) is other
    np.testing.assert_array_equal(other.predict(X[:10]), expected)


def test_load_rejects_truncated_foreign_and_mismatched(xy, tmp_path):
    X, y = xy
    model = AMRC(hidden_size=8, random_state=0).fit(X, y, epochs=1)
    path = tmp_path / "m.bin"
    model.save(path)
    data = path.read_bytes()
    (tmp_path / "trunc.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or foreign"):
        AMRC.load(tmp_path / "trunc.bin")
    (tmp_path / "junk.bin").write_bytes(b"not a model at all")
    with pytest.raises(ValueError, match="truncated or foreign"):
        AMRC.load(tmp_path / "junk.bin")
    with pytest.raises(ValueError, match="holds a 'AMRC' model"):
        PMRC.load(path)
    with pytest.raises(ValueError, match="size mismatch"):
        AMRC(hidden_size=16).load(path)
    with pytest.raises(FileNotFoundError):
        AMRC.load(tmp_path / "missing.bin")
    with pytest.raises(ValueError, match="method"):
        model.save(path, method="hdf5")


def test_save_is_atomic_no_temp_left(xy, tmp_path):
    X, y = xy
    AMRC(hidden_size=8, random_state=0).fit(X, y, epochs=1).save(tmp_path / "m.bin")
    assert [p.name for p in tmp_path.iterdir()] == ["m.bin"]


# ---- bad input -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "X, y, match",
    [
        (np.zeros(10), np.zeros(10), "2-D"),
        (np.zeros((0, 3)), np.zeros(0), "0 sample"),
        (np.array([[np.nan, 1, 2]] * 4), np.zeros(4), "NaN"),
        (np.array([[np.inf, 1, 2]] * 4), np.zeros(4), "NaN or infinity"),
        (np.zeros((10, 3)), np.zeros(9), "different lengths"),
        (np.zeros((10, 3)), np.zeros((10, 2, 2)), "1-D or 2-D"),
        (np.zeros((10, 3)), None, "y is None"),
    ],
    ids=["1d", "empty", "nan", "inf", "lengths", "y3d", "ynone"],
)
def test_bad_fit_input(X, y, match):
    with pytest.raises(ValueError, match=match):
        AMRC(hidden_size=4).fit(X, y, epochs=1)


def test_wrong_feature_count_and_types(xy):
    X, y = xy
    with pytest.raises(ValueError, match="Expected input_size=5, got 3"):
        AMRC(input_size=5, hidden_size=4).fit(X, y, epochs=1)
    model = AMRC(hidden_size=4, random_state=0).fit(X, y, epochs=1)
    with pytest.raises(ValueError, match="Expected input_size=3, got 4"):
        model.predict(np.zeros((2, 4)))
    with pytest.raises(TypeError, match="numbers"):
        model.predict(np.array([["a", "b", "c"]]))
    # float64 and int are converted, not refused; predictions are float64 unless X is float32
    assert model.predict(X.astype(np.float64)).dtype == np.float64
    assert model.predict(np.ones((2, 3), dtype=np.int64)).shape == (2, 2)
    with pytest.raises(ValueError, match="metric"):
        model.score(X, y, metric="accuracy")


def test_predict_before_fit_and_bad_params(xy):
    X, y = xy
    with pytest.raises(NotFittedError):
        AMRC().predict(X)
    with pytest.raises(ValueError, match="beta"):
        AMRC(beta=1.5).fit(X, y, epochs=1)
    with pytest.raises(ValueError, match="hidden_size"):
        AMRC(hidden_size=0).fit(X, y, epochs=1)
    with pytest.raises(ValueError, match="learning_rate"):
        AMRC(learning_rate=-1).fit(X, y, epochs=1)
    with pytest.raises(ValueError, match="validation_split"):
        AMRC().fit(X, y, epochs=1, validation_split=1.0)


def test_validation_split_records_history(xy):
    X, y = xy
    model = GRURegressor(hidden_size=8, random_state=0).fit(X, y, epochs=3, validation_split=0.2)
    assert len(model.history_["val_loss"]) == 3 and len(model.history_["train_loss"]) == 3


@pytest.mark.parametrize("rule", ["hebbian", "delta"])
def test_ssmn_memory_state_round_trip_restores_predictions(rule):
    """The SSMN's state (stacked ring buffers, a 0-dim position counter, fast weights, the delta
    rule's convolution inputs) survives get/set exactly: the same predictions afterwards."""
    from mnnn import SparseStreamMemoryNetwork

    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(80, 3)), rng.normal(size=(80, 1))
    model = SparseStreamMemoryNetwork(hidden_dim=16, window_size=8, num_layers=2, num_heads=2, random_state=0,
                                      plasticity_rule=rule).fit(X, y, epochs=2)
    snap = model.get_memory_state()
    first = model.predict(X[:10])
    model.set_memory_state(snap)
    np.testing.assert_array_equal(model.predict(X[:10]), first)
    with pytest.raises(ValueError, match="memory must have shape"):
        model.set_memory_state(snap[:-1])


def test_create_model_speaks_both_vocabularies():
    from mnnn import create_model

    ssmn = create_model("ssmn", input_size=3, hidden_size=16, output_size=1)
    assert (ssmn.input_dim, ssmn.hidden_dim, ssmn.output_dim) == (3, 16, 1)
    amrc = create_model("amrc", input_dim=3, hidden_dim=16, output_dim=2)
    assert (amrc.input_size, amrc.hidden_size, amrc.output_size) == (3, 16, 2)
    with pytest.raises(ValueError, match="got both"):
        create_model("amn", input_size=3, input_dim=4)
