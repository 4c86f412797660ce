"""AMN estimator: the seed's ``AMN`` API on :class:`mnnn.models.AMNNetwork`."""

from __future__ import annotations

import numpy as np
import torch

from mnnn.estimators._sklearn import check_is_fitted
from mnnn.estimators.base import SequenceEstimator
from mnnn.models.amn import AMNNetwork

MEMORY_DECAY_RANGE = (0.9, 0.9999)


class AMN(SequenceEstimator):
    """Adaptive Memory Network regressor (seeds/003): liquid time-constant neurons, a Linear
    Recurrent Unit and an associative memory manifold, trained in parallel.

    Args:
        input_size, hidden_size, output_size: sizes (``None``: from the data).
        memory_manifold_size: slots of the associative manifold.
        learning_rate: AdamW step size (seed default 0.001).
        dt: liquid-neuron time step (read-write between fits).
        memory_decay: manifold decay in [0.9, 0.9999] (read-write between fits).
        bptt, weight_decay, grad_clip, warm_start, random_state, device: as in :class:`AMRC`.
    """

    _default_reset_memory = True
    _default_batch_size = 32
    _arch_params = ("input_size", "hidden_size", "output_size", "memory_manifold_size")

    def __init__(self, input_size=None, hidden_size=32, output_size=None, memory_manifold_size=64,
                 learning_rate=0.001, dt=0.1, memory_decay=0.995, bptt=64, weight_decay=0.0,
                 grad_clip=1.0, warm_start=True, random_state=None, device="cpu"):
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.output_size = output_size
        self.memory_manifold_size = memory_manifold_size
        self.learning_rate = learning_rate
        self.dt = dt
        self.memory_decay = memory_decay
        self.bptt = bptt
        self.weight_decay = weight_decay
        self.grad_clip = grad_clip
        self.warm_start = warm_start
        self.random_state = random_state
        self.device = device

    def _validate_params(self) -> None:
        super()._validate_params()
        lo, hi = MEMORY_DECAY_RANGE
        if not isinstance(self.memory_decay, (int, float)) or not lo <= self.memory_decay <= hi:
            raise ValueError(f"memory_decay must be in [{lo}, {hi}], got {self.memory_decay!r}")
        if not isinstance(self.dt, (int, float)) or not self.dt > 0:
            raise ValueError(f"dt must be > 0, got {self.dt!r}")
        if not isinstance(self.memory_manifold_size, (int, np.integer)) or self.memory_manifold_size < 1:
            raise ValueError(f"memory_manifold_size must be a positive int, got {self.memory_manifold_size!r}")

    def _build(self, input_size, output_size):
        return AMNNetwork(input_size, self.hidden_size, output_size,
                          memory_manifold_size=self.memory_manifold_size, dt=self.dt,
                          memory_decay=self.memory_decay)

    def _sync(self) -> None:
        self._validate_params()
        self.network_.liquid.dt = float(self.dt)
        self.network_.manifold.memory_decay = float(self.memory_decay)

    def _stat(self, name: str) -> float:
        if not hasattr(self, "network_"):
            return 0.0
        return self.network_.stats.get(name, 0.0)

    @property
    def avg_manifold_energy(self) -> float:
        """Mean |M| of the manifold after the last processed sequence."""
        return self._stat("avg_manifold_energy")

    @property
    def avg_lru_magnitude(self) -> float:
        """Mean |l_t| of the LRU states over the last processed sequence."""
        return self._stat("avg_lru_magnitude")

    @property
    def avg_lc_timescale(self) -> float:
        """Mean liquid time constant 1 / (A + B |f_t|) over the last processed sequence."""
        return self._stat("avg_lc_timescale")

    def get_manifold_state(self) -> np.ndarray:
        """The manifold ``[memory_manifold_size, hidden_size]``."""
        check_is_fitted(self, "network_")
        return self._memory.manifold[0, 0].detach().cpu().numpy().copy()

    def set_manifold_state(self, manifold) -> None:
        """Set the manifold returned by :meth:`get_manifold_state` (``[memory_manifold_size,
        hidden_size]``, finite). With ``set_memory_state`` it restores the whole state, so
        predictions continue exactly as from the saved point."""
        check_is_fitted(self, "network_")
        current = self._memory.manifold
        arr = np.asarray(manifold, dtype=np.float32)
        if arr.shape != tuple(current.shape[2:]):
            raise ValueError(f"manifold must have shape {tuple(current.shape[2:])} "
                             f"(memory_manifold_size, hidden_size), got {arr.shape}")
        if not np.isfinite(arr).all():
            raise ValueError("manifold contains NaN or infinity")
        self._memory.manifold = torch.from_numpy(arr.copy()).to(current).reshape(current.shape)

    def reset_manifold(self) -> None:
        """Zero the manifold only (liquid and LRU states are kept)."""
        check_is_fitted(self, "network_")
        self._memory.manifold = self._memory.manifold.new_zeros(self._memory.manifold.shape)

    def print_info(self) -> None:
        """Print sizes, training progress and the three diagnostics."""
        print(f"AMN(input_size={getattr(self, 'n_features_in_', self.input_size)}, "
              f"hidden_size={self.hidden_size}, output_size={getattr(self, 'n_outputs_', self.output_size)}, "
              f"memory_manifold_size={self.memory_manifold_size})")
        print(f"  dt={self.dt}  memory_decay={self.memory_decay}  learning_rate={self.learning_rate}")
        if hasattr(self, "network_"):
            n_params = sum(p.numel() for p in self.network_.parameters())
            print(f"  parameters={n_params}  training_steps={self.training_steps}  last_loss={self.last_loss:.6f}")
            print(f"  manifold_energy={self.avg_manifold_energy:.6f}  lru_magnitude={self.avg_lru_magnitude:.6f}"
                  f"  lc_timescale={self.avg_lc_timescale:.6f}")
        else:
            print("  (not fitted)")
