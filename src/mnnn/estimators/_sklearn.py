"""scikit-learn integration kept optional: with scikit-learn installed the estimators derive from
its ``BaseEstimator``/``RegressorMixin``; without it, a small stand-in gives the same
``get_params``/``set_params`` contract so ``clone``-style code keeps working."""

from __future__ import annotations

import inspect

try:
    from sklearn.base import BaseEstimator, RegressorMixin
    from sklearn.exceptions import NotFittedError
    from sklearn.utils.validation import check_is_fitted

    HAVE_SKLEARN = True
except ImportError:  # pragma: no cover - exercised only without scikit-learn
    HAVE_SKLEARN = False

    class NotFittedError(ValueError, AttributeError):
        """Raised when a method needs a fitted estimator."""

    class BaseEstimator:
        @classmethod
        def _get_param_names(cls) -> list[str]:
            sig = inspect.signature(cls.__init__)
            return sorted(p for p in sig.parameters if p != "self")

        def get_params(self, deep: bool = True) -> dict:
            return {name: getattr(self, name) for name in self._get_param_names()}

        def set_params(self, **params):
            valid = self._get_param_names()
            for key, value in params.items():
                if key not in valid:
                    raise ValueError(f"invalid parameter {key!r} for {type(self).__name__}; valid: {valid}")
                setattr(self, key, value)
            return self

    class RegressorMixin:
        _estimator_type = "regressor"

    def check_is_fitted(estimator, attributes=None):
        if not any(k.endswith("_") and not k.startswith("__") for k in vars(estimator)):
            raise NotFittedError(
                f"This {type(estimator).__name__} instance is not fitted yet; call fit first."
            )

__all__ = ["BaseEstimator", "HAVE_SKLEARN", "NotFittedError", "RegressorMixin", "check_is_fitted"]
