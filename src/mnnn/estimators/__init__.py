"""scikit-learn style estimators over the models, and the ``create_model`` registry."""

from __future__ import annotations

from mnnn.estimators.amn import AMN
from mnnn.estimators.amrc import AMRC
from mnnn.estimators.base import SequenceEstimator
from mnnn.estimators.baselines import GRURegressor, LSTMRegressor
from mnnn.estimators.pmrc import PMRC
from mnnn.estimators.ssmn import SparseStreamMemoryNetwork

MODELS: dict[str, type[SequenceEstimator]] = {
    "amrc": AMRC,
    "pmrc": PMRC,
    "amn": AMN,
    "lstm": LSTMRegressor,
    "gru": GRURegressor,
    "ssmn": SparseStreamMemoryNetwork,
}


def create_model(model_type: str, **kwargs) -> SequenceEstimator:
    """Build an estimator by name: ``create_model('amrc', input_size=10, hidden_size=20, output_size=5)``.

    Raises ``KeyError`` listing the known names for an unknown one."""
    key = model_type.lower() if isinstance(model_type, str) else model_type
    if key not in MODELS:
        raise KeyError(f"unknown model {model_type!r}; known models: {sorted(MODELS)}")
    return MODELS[key](**kwargs)


__all__ = ["AMN", "AMRC", "GRURegressor", "LSTMRegressor", "MODELS", "PMRC", "SequenceEstimator", "SparseStreamMemoryNetwork",
           "create_model"]
