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
    phase: float = 0.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Next-step prediction on a noisy sine, the foundation issue's task.

    ``s_t = sin(2 pi t / period + phase) + noise * eps_t`` (``seed`` draws the noise); row t of X
    holds ``s_{t-window..t-1}``, y the next value ``s_t``. Rows are consecutive time steps; the
    test rows follow the training rows. Predicting the last value gives R^2 ~ 0.89; the noise
    floor is R^2 ~ 0.995.

    Returns ``X_train [n_train, window], y_train [n_train], X_test, y_test`` (float32).
    """
    rng = np.random.default_rng(seed)
    n = n_train + n_test + window
    t = np.arange(n)
    s = np.sin(2 * np.pi * t / period + phase) + noise * rng.standard_normal(n)
    X = np.lib.stride_tricks.sliding_window_view(s[:-1], window).astype(np.float32)
    y = s[window:].astype(np.float32)
    return X[:n_train], y[:n_train], X[n_train:], y[n_train:]


def delayed_recall(
    n_episodes: int = 200, episode_len: int = 40, min_delay: int = 16, seed: int = 0, noise: float = 0.5
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hold a value seen many steps earlier (beyond a short attention window).

    Each episode: step 0 shows ``[v, 1]`` (a value and a "store" marker); the other steps show
    ``[noise, 0]`` distractors, and every one of them has target ``v``. Rows at least
    ``min_delay`` steps after the store are the scored ones: with a window of w and L stacked
    attention layers a network sees at most L (w - 1) steps back, so for ``min_delay`` beyond
    that only a memory can answer. Episodes follow each other in one row sequence.

    Returns ``X [n, 2]``, ``y [n]`` and a boolean mask of the scored rows.
    """
    rng = np.random.default_rng(seed)
    X = np.zeros((n_episodes, episode_len, 2), dtype=np.float32)
    values = rng.uniform(-1, 1, n_episodes).astype(np.float32)
    X[:, 1:, 0] = noise * rng.standard_normal((n_episodes, episode_len - 1))
    X[:, 0, 0], X[:, 0, 1] = values, 1.0
    y = np.repeat(values[:, None], episode_len, axis=1)
    y[:, 0] = 0.0
    scored = np.zeros((n_episodes, episode_len), dtype=bool)
    scored[:, min_delay:] = True
    return X.reshape(-1, 2), y.reshape(-1), scored.reshape(-1)
