"""Synthetic tasks generated locally (nothing is downloaded)."""

from __future__ import annotations

import numpy as np


def noisy_sine(
    n_train: int = 1000,
    n_test: int = 200,
    window: int = 10,
    period: float = 20.0,
    noise: float = 0.05,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Next-step prediction on a noisy sine, the foundation issue's task.

    ``s_t = sin(2 pi t / period) + noise * eps_t``; row t of X holds ``s_{t-window..t-1}``, y the
    next value ``s_t``. Rows are consecutive time steps; the test rows follow the training rows.
    Predicting the last value gives R^2 ~ 0.89; the noise floor is R^2 ~ 0.995.

    Returns ``X_train [n_train, window], y_train [n_train], X_test, y_test`` (float32).
    """
    rng = np.random.default_rng(seed)
    n = n_train + n_test + window
    t = np.arange(n)
    s = np.sin(2 * np.pi * t / period) + noise * rng.standard_normal(n)
    X = np.lib.stride_tricks.sliding_window_view(s[:-1], window).astype(np.float32)
    y = s[window:].astype(np.float32)
    return X[:n_train], y[:n_train], X[n_train:], y[n_train:]
