"""Standard SSMN estimator: the seed's ``SparseStreamMemoryNetwork`` API (seeds/002)."""

from __future__ import annotations

from typing import Any

import numpy as np

from mnnn.estimators._sklearn import check_is_fitted
from mnnn.estimators.base import SequenceEstimator
from mnnn.models.ssmn import SSMNNetwork, analyze_synaptic_state
from mnnn.validation import check_bool, check_int, check_real


class SparseStreamMemoryNetwork(SequenceEstimator):
    """Sliding-window attention + plastic synaptic memory, as a scikit-learn style regressor.

    Args:
        input_dim, hidden_dim, output_dim: sizes (``None``: from the data at the first fit).
        window_size: attention window (rows).
        plasticity_eta, decay_lambda: the Hebbian rule's fast-weight write rate and decay;
            ``plasticity_eta=0`` switches the synaptic memory's writes off under every rule (the
            delta rules learn their write strength and decay, so there only 0 vs > 0 matters).
        num_layers, plastic_ratio: blocks, and the plastic fraction (0.2: the seed's 80/20 split;
            any ratio gives the seed's "custom SSMN").
        num_heads: attention and synaptic heads.
        importance_gating: learned write gates g_t (Text-Native SSMN has them; the seed's Standard
            SSMN writes at every step, the default here too).
        plasticity_rule: 'gated_delta' (default: the error-correcting delta rule with a learned
            decay, which wins the Standard SSMN's measurements in ``mnnn bench ssmn``), 'delta',
            or 'hebbian' (the seed's rule); see :class:`mnnn.layers.synaptic.SynapticMemory`.
        learning_rate, bptt, weight_decay, grad_clip, warm_start, random_state, device: as in
            :class:`mnnn.AMRC`.
    """

    _input_param, _hidden_param, _output_param = "input_dim", "hidden_dim", "output_dim"
    _arch_params = ("input_dim", "hidden_dim", "output_dim", "window_size", "num_layers", "plastic_ratio",
                    "num_heads", "importance_gating", "plasticity_rule")
    _default_batch_size = 256

    def __init__(self, input_dim=None, hidden_dim=256, output_dim=None, window_size=512, plasticity_eta=0.01,
                 decay_lambda=0.001, num_layers=5, plastic_ratio=0.2, num_heads=4, importance_gating=False,
                 plasticity_rule="gated_delta", learning_rate=1e-3,
                 bptt=128, weight_decay=0.0, grad_clip=1.0, warm_start=True, random_state=None, device="cpu"):
        self.input_dim = input_dim
        self.hidden_dim = hidden_dim
        self.output_dim = output_dim
        self.window_size = window_size
        self.plasticity_eta = plasticity_eta
        self.decay_lambda = decay_lambda
        self.num_layers = num_layers
        self.plastic_ratio = plastic_ratio
        self.num_heads = num_heads
        self.importance_gating = importance_gating
        self.plasticity_rule = plasticity_rule
        self.learning_rate = learning_rate
        self.bptt = bptt
        self.weight_decay = weight_decay
        self.grad_clip = grad_clip
        self.warm_start = warm_start
        self.random_state = random_state
        self.device = device

    def _validate_params(self) -> None:
        super()._validate_params()
        if not isinstance(self.window_size, (int, np.integer)) or self.window_size < 1:
            raise ValueError(f"window_size must be a positive int, got {self.window_size!r}")
        check_real("plasticity_eta", self.plasticity_eta, 0.0)
        if self.plasticity_rule not in ("hebbian", "delta", "gated_delta"):
            raise ValueError(f"plasticity_rule must be 'hebbian', 'delta' or 'gated_delta', got {self.plasticity_rule!r}")
        check_real("decay_lambda", self.decay_lambda, 0.0, 1.0)
        check_int("num_layers", self.num_layers)
        check_int("num_heads", self.num_heads)
        check_real("plastic_ratio", self.plastic_ratio, 0.0, 1.0)
        check_bool("importance_gating", self.importance_gating)  # hidden_dim vs num_heads: SSMNCore checks

    def _build(self, input_size, output_size):
        return SSMNNetwork(input_size, output_size, hidden_dim=self.hidden_dim, window_size=self.window_size,
                           plasticity_eta=self.plasticity_eta, decay_lambda=self.decay_lambda,
                           num_layers=self.num_layers, plastic_ratio=self.plastic_ratio, num_heads=self.num_heads,
                           importance_gating=self.importance_gating, plasticity_rule=self.plasticity_rule)

    def _sync(self) -> None:
        self._validate_params()
        self.network_.core.set_plasticity(self.plasticity_eta, self.decay_lambda)

    def _stat(self, key: str) -> float:
        check_is_fitted(self, "network_")
        return self.network_.core.stats(self._memory).get(key, 0.0)

    @property
    def synaptic_energy(self) -> float:
        """mean(W^2) of the fast weights after the last processed step."""
        return self._stat("synaptic_energy")

    @property
    def synaptic_update_magnitude(self) -> float:
        """RMS of the last fast-weight update dW."""
        return self._stat("synaptic_update_magnitude")

    @property
    def attention_entropy(self) -> float:
        """Entropy (nats) of the newest position's window attention, mean over blocks and heads."""
        return self._stat("attention_entropy")

    @property
    def window_fill(self) -> float:
        """Fraction of the attention window holding real positions."""
        return self._stat("window_fill")

    def analyze_synaptic_state(self) -> dict[str, Any]:
        """energy, num_active_modes, spectral_radius, sparsity, mean/std weight of the fast weights."""
        check_is_fitted(self, "network_")
        return analyze_synaptic_state(self._memory)
