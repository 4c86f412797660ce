"""Fuzz the public Python API with hypothesis (issue 18, item 7): whatever a user passes to an
estimator's constructor, to ``fit``/``predict``, to the episodic ``Memory`` or to the Text-Native
SSMN's ``generate_sequence``, the call either works and gives finite numbers, or raises a
ValueError/TypeError that names what was wrong. Never a silent non-finite answer, never an error
from deep inside torch or NumPy (IndexError, RuntimeError, ZeroDivisionError, ...).

The sizes stay tiny so that a value that passes every check fits in milliseconds."""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from mnnn import AMN, AMRC, PMRC, Memory, SparseStreamMemoryNetwork, TextNativeSSMN  # noqa: E402
from mnnn.estimators import GRURegressor, LSTMRegressor  # noqa: E402

TINY = {AMRC: {"hidden_size": 4}, PMRC: {"hidden_size": 4}, AMN: {"hidden_size": 4, "memory_manifold_size": 4},
        SparseStreamMemoryNetwork: {"hidden_dim": 8, "num_layers": 1, "num_heads": 2, "window_size": 4},
        LSTMRegressor: {"hidden_size": 4}, GRURegressor: {"hidden_size": 4}}
# parameters whose legal values include anything (device strings are checked by torch itself
# with a clear message, and a legal large size is the user's call)
SKIP = {"device", "verbose"}
HOSTILE = st.one_of(
    st.integers(-3, 6), st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([None, True, False, "", "abc", "tanh", [1, 2], (3,), {"a": 1}, np.int64(3), np.float32(0.5),
                     complex(1, 2)]))
SETTINGS = settings(max_examples=50, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
# FloatingPointError: the trainer's "training diverged at epoch E (loss=inf); lower learning_rate"
CLEAR = (ValueError, TypeError, FloatingPointError)

X = np.random.default_rng(0).standard_normal((24, 3)).astype(np.float32)
Y = X[:, :1].sum(1)


def _params(cls) -> list[str]:
    return [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", *SKIP)]


def _assert_clear(err: BaseException, *names: str) -> None:
    assert isinstance(err, CLEAR), f"{type(err).__name__}: {err}"
    msg = str(err)
    if isinstance(err, FloatingPointError):
        names = ("learning_rate",)
    assert msg and any(n in msg for n in names), f"the message does not name {names}: {msg!r}"


@pytest.mark.parametrize("cls", list(TINY), ids=lambda c: c.__name__)
@SETTINGS
@given(data=st.data())
def test_constructor_parameters(cls, data):
    name = data.draw(st.sampled_from(_params(cls)), label="parameter")
    value = data.draw(HOSTILE, label="value")
    kwargs = {**TINY[cls], "random_state": 0, name: value}
    try:
        model = cls(**kwargs)
        model.fit(X, Y, epochs=1)
        pred = model.predict(X)
    except Exception as err:  # noqa: BLE001 - the property is about which exception
        _assert_clear(err, name, name.replace("_", " "))
        return
    assert np.isfinite(pred).all(), f"{cls.__name__}({name}={value!r}) predicted non-finite values"


ARRAYS = st.one_of(
    st.tuples(st.integers(0, 4), st.integers(0, 4)).map(lambda s: np.zeros(s, np.float32)),
    st.sampled_from([np.full((6, 3), np.nan), np.full((6, 3), np.inf), np.ones((6, 3, 2)), np.ones(6),
                     np.array([["a", "b", "c"]] * 6), np.ones((6, 3), dtype=complex), np.ones((6, 3), dtype=bool),
                     np.full((6, 3), 3e38), [[1, 2, 3]] * 6, None, "X", np.ones((6, 4))]))


@pytest.mark.parametrize("cls", [AMRC, AMN, SparseStreamMemoryNetwork], ids=lambda c: c.__name__)
@SETTINGS
@given(bad=ARRAYS, where=st.sampled_from(["fit_X", "fit_y", "predict_X"]))
def test_fit_and_predict_inputs(cls, bad, where):
    model = cls(**TINY[cls], random_state=0).fit(X, Y, epochs=1)
    before = np.array(model.get_memory_state(), copy=True)
    try:
        if where == "fit_X":
            model.fit(bad, Y[: len(bad)] if hasattr(bad, "__len__") and not isinstance(bad, str) else Y, epochs=1)
        elif where == "fit_y":
            model.fit(X, bad, epochs=1)
        else:
            out = model.predict(bad)
            assert np.isfinite(out).all()
    except Exception as err:  # noqa: BLE001
        _assert_clear(err, "X", "y", "input", "feature", "sample", "row", "finite", "NaN", "dtype")
        if where == "predict_X":  # a refused prediction leaves the memory as it was
            np.testing.assert_array_equal(model.get_memory_state(), before)


@SETTINGS
@given(size=HOSTILE, dim=HOSTILE, top_k=HOSTILE, rows=st.integers(0, 3))
def test_memory_api(size, dim, top_k, rows):
    try:
        mem = Memory(size, dim if isinstance(dim, int) and not isinstance(dim, bool) and 0 < dim < 64 else dim,
                     compressed_dim=4)
    except Exception as err:  # noqa: BLE001
        _assert_clear(err, "initial_size", "embedding_dim", "compressed_dim", "max_size")
        return
    d = mem.embedding_dim
    keys = torch.randn(rows, d)
    try:
        mem.add_to_memory(keys, keys)
        out = mem.get_memory(torch.randn(2, d), top_k=top_k)
    except Exception as err:  # noqa: BLE001
        _assert_clear(err, "top_k", "x", "y", "query", "empty")
        return
    assert torch.isfinite(out).all()


@pytest.fixture(scope="module")
def tiny_lm():
    torch.manual_seed(0)
    return TextNativeSSMN(20, embed_dim=8, hidden_dim=8, window_size=4, num_layers=2, num_heads=2)


PROMPTS = st.one_of(st.lists(st.integers(-2, 22), max_size=5),
                    st.sampled_from([[[1, 2], [3, 4]], [1.5, 2.0], "12", None, np.array([1, 2]), torch.tensor([[1, 2]]),
                                     [math.nan], [True, False]]))


@SETTINGS
@given(prompt=PROMPTS, max_length=HOSTILE, temperature=HOSTILE, top_k=HOSTILE)
def test_generate_sequence(tiny_lm, prompt, max_length, temperature, top_k):
    try:
        out = tiny_lm.generate_sequence(prompt, max_length=max_length, temperature=temperature, top_k=top_k, seed=0)
    except Exception as err:  # noqa: BLE001
        _assert_clear(err, "prompt", "max_length", "temperature", "top_k", "token")
        return
    assert isinstance(out, list) and len(out) == max_length and all(0 <= t < 20 for t in out)
