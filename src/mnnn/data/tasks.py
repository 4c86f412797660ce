"""Synthetic token tasks for memory benchmarks, generated locally (no download).

Every generator returns ``inputs [N, L]`` (long) and ``labels [N, L]`` (long, ``-100`` where
nothing is scored): ``labels[:, t]`` is the token the model must predict after reading
``inputs[:, : t + 1]``, so a causal model is scored on next-token prediction at chosen positions.
"""

from __future__ import annotations

import numpy as np
import torch

IGNORE = -100


def _check(name: str, value: int, minimum: int = 1) -> None:
    if not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def mqar(num_examples: int, vocab_size: int = 8192, seq_len: int = 64, num_kv_pairs: int = 4,
         power_a: float = 0.01, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Multi-query associative recall as zoology generates it (Arora et al. 2023).

    The sequence opens with ``num_kv_pairs`` pairs ``k v`` (keys drawn without replacement from
    ``[1, V/2)``, values from ``[V/2, V)``); the rest is filler token 0 in which every key is asked
    once more, followed by its value, at a position drawn by a power law over the gap
    (``p(g) ~ g^(power_a - 1)``: most queries come soon after the pairs). Only the value after a
    queried key is scored.
    """
    for name, v in (("num_examples", num_examples), ("vocab_size", vocab_size), ("seq_len", seq_len),
                    ("num_kv_pairs", num_kv_pairs)):
        _check(name, v)
    if vocab_size // 2 - 1 < num_kv_pairs:
        raise ValueError(f"vocab_size {vocab_size} has too few keys for {num_kv_pairs} pairs")
    space = (seq_len - 2 * num_kv_pairs) // 2
    if space < num_kv_pairs:
        raise ValueError(f"seq_len {seq_len} too short for {num_kv_pairs} pairs and their queries "
                         f"(needs >= {4 * num_kv_pairs})")
    rng = np.random.default_rng(seed)
    keys = np.argsort(rng.random((num_examples, vocab_size // 2 - 1)), axis=1)[:, :num_kv_pairs] + 1
    values = rng.integers(vocab_size // 2, vocab_size, (num_examples, num_kv_pairs))
    inputs = np.zeros((num_examples, seq_len), dtype=np.int64)
    labels = np.full((num_examples, seq_len), IGNORE, dtype=np.int64)
    inputs[:, 0 : 2 * num_kv_pairs : 2], inputs[:, 1 : 2 * num_kv_pairs : 2] = keys, values
    p = power_a * np.arange(1, space + 1, dtype=np.float64) ** (power_a - 1)
    p /= p.sum()
    rows = np.arange(num_examples)[:, None]
    gaps = np.stack([rng.choice(space, num_kv_pairs, replace=False, p=p) for _ in range(num_examples)])
    pos = 2 * num_kv_pairs + 2 * gaps
    inputs[rows, pos], inputs[rows, pos + 1] = keys, values
    labels[rows, pos] = values
    return torch.from_numpy(inputs), torch.from_numpy(labels)


def copy_task(num_examples: int, num_tokens: int = 8, delay: int = 16, vocab_size: int = 16,
              seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Copy across a delay: ``num_tokens`` data tokens from ``[3, V)``, ``delay`` blanks (0), a
    go marker (1), then the model must emit the data in order (its inputs there are blanks, so
    nothing can be read off the recent tokens). Scored: the ``num_tokens`` outputs."""
    for name, v in (("num_examples", num_examples), ("num_tokens", num_tokens), ("vocab_size", vocab_size)):
        _check(name, v)
    _check("delay", delay, 0)
    if vocab_size < 4:
        raise ValueError(f"vocab_size must be >= 4 (3 reserved tokens), got {vocab_size}")
    rng = np.random.default_rng(seed)
    data = rng.integers(3, vocab_size, (num_examples, num_tokens))
    L = 2 * num_tokens + delay + 1
    inputs = np.zeros((num_examples, L), dtype=np.int64)
    labels = np.full((num_examples, L), IGNORE, dtype=np.int64)
    inputs[:, :num_tokens] = data
    go = num_tokens + delay
    inputs[:, go] = 1
    labels[:, go : go + num_tokens] = data
    return torch.from_numpy(inputs), torch.from_numpy(labels)


def selective_copy(num_examples: int, num_tokens: int = 8, seq_len: int = 64, vocab_size: int = 16,
                   seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Selective copy (Gu & Dao 2023): ``num_tokens`` data tokens at random positions among
    ``seq_len`` noise tokens (2), then a go marker (1): the model must emit the data tokens in
    their order of appearance. Content-aware memory is needed: the positions change per example."""
    for name, v in (("num_examples", num_examples), ("num_tokens", num_tokens), ("seq_len", seq_len),
                    ("vocab_size", vocab_size)):
        _check(name, v)
    if seq_len < num_tokens:
        raise ValueError(f"seq_len {seq_len} shorter than num_tokens {num_tokens}")
    if vocab_size < 4:
        raise ValueError(f"vocab_size must be >= 4 (3 reserved tokens), got {vocab_size}")
    rng = np.random.default_rng(seed)
    data = rng.integers(3, vocab_size, (num_examples, num_tokens))
    L = seq_len + 1 + num_tokens
    inputs = np.full((num_examples, L), 0, dtype=np.int64)
    inputs[:, :seq_len] = 2
    pos = np.sort(np.argsort(rng.random((num_examples, seq_len)), axis=1)[:, :num_tokens], axis=1)
    rows = np.arange(num_examples)[:, None]
    inputs[rows, pos] = data
    inputs[:, seq_len] = 1
    labels = np.full((num_examples, L), IGNORE, dtype=np.int64)
    labels[:, seq_len : seq_len + num_tokens] = data
    return torch.from_numpy(inputs), torch.from_numpy(labels)
