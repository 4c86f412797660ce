"""R^2 and the ridge-on-lags baseline, shared by the series, robustness and ssmn suites (kept apart
from any suite, so that a change to one suite does not make the others' tables stale)."""

from __future__ import annotations

import numpy as np


def r2(y, p) -> float:
    y, p = np.asarray(y, np.float64).ravel(), np.asarray(p, np.float64).ravel()
    return float(1 - ((y - p) ** 2).sum() / ((y - y.mean()) ** 2).sum())


def ridge_predict(Xtr, ytr, Xte) -> tuple[np.ndarray, float]:
    """Ridge on the lags with an intercept; alpha picked on a time-ordered holdout."""
    def fit(X, y, alpha):
        A = np.c_[X, np.ones(len(X))].astype(np.float64)
        reg = alpha * np.eye(A.shape[1])
        reg[-1, -1] = 0.0
        return np.linalg.solve(A.T @ A + reg, A.T @ y)

    def pred(w, X):
        return np.c_[X, np.ones(len(X))] @ w

    cut = int(0.8 * len(Xtr))
    alphas = [1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0]
    best = max(alphas, key=lambda a: r2(ytr[cut:], pred(fit(Xtr[:cut], ytr[:cut], a), Xtr[cut:])))
    return pred(fit(Xtr, ytr, best), Xte), best
