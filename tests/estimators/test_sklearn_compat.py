"""scikit-learn interoperability: clone, GridSearchCV, get/set_params, check_estimator."""

import warnings

import numpy as np
import pytest

from mnnn import AMN, AMRC, PMRC
from mnnn.estimators import (GRURegressor, LSTMRegressor, SparseStreamMemoryNetwork,
                             expected_failed_checks)

sklearn = pytest.importorskip("sklearn")
from sklearn.base import clone  # noqa: E402
from sklearn.model_selection import GridSearchCV, KFold  # noqa: E402
from sklearn.utils.estimator_checks import check_estimator  # noqa: E402

def test_get_set_params_and_clone():
    model = PMRC(hidden_size=12, use_learnable_gates=True, learning_rate=0.003)
    params = model.get_params()
    assert params["hidden_size"] == 12 and params["use_learnable_gates"] is True
    twin = clone(model)
    assert twin.get_params() == params and twin is not model
    model.set_params(hidden_size=7, beta=0.5)
    assert model.hidden_size == 7 and model.beta == 0.5
    with pytest.raises(ValueError):
        model.set_params(not_a_param=1)


def test_clone_of_fitted_is_unfitted():
    X = np.random.default_rng(0).standard_normal((30, 2)).astype(np.float32)
    model = AMRC(hidden_size=4, random_state=0).fit(X, X[:, 0], epochs=1)
    assert not hasattr(clone(model), "network_")


def test_grid_search():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((120, 3)).astype(np.float32)
    y = X @ np.array([1.0, -2.0, 0.5], dtype=np.float32)
    search = GridSearchCV(
        AMN(random_state=0, bptt=16),
        {"learning_rate": [0.001, 0.01], "hidden_size": [4, 8]},
        cv=KFold(2),
    )
    search.fit(X, y, epochs=3)
    assert set(search.best_params_) == {"learning_rate", "hidden_size"}
    assert len(search.cv_results_["mean_test_score"]) == 4


# Small sizes keep each run short; the SSMN needs a little width to fit sklearn's regression data.
CHECKED = {
    "AMRC": lambda: AMRC(hidden_size=4, random_state=0, bptt=8),
    "PMRC": lambda: PMRC(hidden_size=4, random_state=0, bptt=8),
    "AMN": lambda: AMN(hidden_size=4, memory_manifold_size=8, random_state=0),
    "SSMN": lambda: SparseStreamMemoryNetwork(hidden_dim=32, num_layers=1, window_size=32, random_state=0),
    "LSTM": lambda: LSTMRegressor(hidden_size=4, random_state=0, bptt=8),
    "GRU": lambda: GRURegressor(hidden_size=4, random_state=0, bptt=8),
}


@pytest.mark.parametrize("name", list(CHECKED))
def test_check_estimator_has_no_failures(name):
    """scikit-learn's whole check_estimator suite: nothing fails. The checks a stateful sequence
    model cannot pass are skipped by its tags (non_deterministic) or declared, with the reason,
    by ``expected_failed_checks``."""
    est = CHECKED[name]()
    declared = expected_failed_checks(est)
    assert all(isinstance(reason, str) and reason for reason in declared.values())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = check_estimator(est, on_fail=None, expected_failed_checks=declared)
    by_status: dict[str, list[str]] = {}
    for r in results:
        by_status.setdefault(r["status"], []).append(r["check_name"])
    assert not by_status.get("failed"), f"{name}: failing sklearn checks {by_status.get('failed')}"
    assert len(by_status.get("passed", [])) >= 45
    # each declared failure really fails (else the declaration should go)
    assert sorted(by_status.get("xfail", [])) == sorted(declared)


def test_tags_declare_a_stateful_multi_output_regressor():
    from sklearn.utils import get_tags

    tags = get_tags(AMRC())
    assert tags.non_deterministic and tags.target_tags.multi_output and tags.target_tags.single_output
    assert "check_supervised_y_2d" not in expected_failed_checks(AMRC(warm_start=False))


def test_predict_dtype_follows_input():
    X = np.random.default_rng(0).standard_normal((30, 2))
    model = AMRC(hidden_size=4, random_state=0).fit(X, X[:, 0], epochs=1)
    assert model.predict(X).dtype == np.float64
    assert model.predict(X.astype(np.float32)).dtype == np.float32
    assert model.predict(X.tolist()).dtype == np.float64
