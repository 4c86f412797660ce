"""scikit-learn style estimators over the models, and the ``create_model`` registry."""

from __future__ import annotations

from mnnn.estimators.amn import AMN
from mnnn.estimators.amrc import AMRC
from mnnn.estimators.base import SequenceEstimator, expected_failed_checks
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


_ALIASES = {"input": ("input_size", "input_dim"), "hidden": ("hidden_size", "hidden_dim"),
            "output": ("output_size", "output_dim")}


def create_model(model_type: str, **kwargs) -> SequenceEstimator:
    """Build an estimator by name: ``create_model('amrc', input_size=10, hidden_size=20, output_size=5)``.

    One vocabulary for every model: ``input_size`` / ``input_dim``, ``hidden_size`` /
    ``hidden_dim`` and ``output_size`` / ``output_dim`` are aliases, translated to the names the
    chosen model's seed uses (the SSMN takes ``*_dim``, the others ``*_size``); giving both names of
    one pair is a ``ValueError``. Raises ``KeyError`` listing the known names for an unknown model."""
    key = model_type.lower() if isinstance(model_type, str) else model_type
    if key not in MODELS:
        raise KeyError(f"unknown model {model_type!r}; known models: {sorted(MODELS)}")
    cls = MODELS[key]
    for role, names in _ALIASES.items():
        given = [n for n in names if n in kwargs]
        if len(given) > 1:
            raise ValueError(f"give one of {names[0]!r} / {names[1]!r}, got both "
                             f"({names[0]}={kwargs[names[0]]!r}, {names[1]}={kwargs[names[1]]!r})")
        target = getattr(cls, f"_{role}_param", names[0])
        if given and given[0] != target:
            kwargs[target] = kwargs.pop(given[0])
    return cls(**kwargs)


__all__ = ["AMN", "AMRC", "GRURegressor", "LSTMRegressor", "MODELS", "PMRC", "SequenceEstimator", "SparseStreamMemoryNetwork",
           "create_model", "expected_failed_checks"]
