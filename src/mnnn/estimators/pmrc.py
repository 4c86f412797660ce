"""PMRC estimator: the seed's ``PMRC`` API on :class:`mnnn.models.PMRCNetwork`."""

from __future__ import annotations

import numpy as np
import torch

from mnnn.estimators._sklearn import check_is_fitted
from mnnn.estimators.amrc import AMRC, _check_unit
from mnnn.models.pmrc import PMRCNetwork
from mnnn.validation import check_real


class PMRC(AMRC):
    """Persistent Memory Recurrent Cell regressor (seeds/003): AMRC plus recurrence, learnable
    memory gates, output-layer memory and fine-grained freezing.

    Args (beyond :class:`AMRC`):
        output_beta: output-layer memory, ``o_t = V h_t + c + output_beta o_{t-1}``.
        use_recurrent: add ``U h_{t-1}`` to the hidden pre-activation.
        use_learnable_gates: memory update by learned gates instead of ``alpha``.
        use_output_memory: enable the output-layer memory.
    """

    _arch_params = ("input_size", "hidden_size", "output_size", "use_recurrent",
                    "use_learnable_gates", "use_output_memory")
    _gate_params = ("cell.W_g.weight", "cell.W_g.bias", "cell.U_g.weight", "cell.W_c.weight",
                    "cell.W_c.bias")

    def __init__(self, input_size=None, hidden_size=32, output_size=None, beta=0.3, alpha=0.1,
                 output_beta=0.2, use_recurrent=True, use_learnable_gates=False,
                 use_output_memory=False, learning_rate=0.01, bptt=32, weight_decay=0.0,
                 grad_clip=1.0, warm_start=True, random_state=None, device="cpu"):
        super().__init__(input_size=input_size, hidden_size=hidden_size, output_size=output_size,
                         beta=beta, alpha=alpha, learning_rate=learning_rate, bptt=bptt,
                         weight_decay=weight_decay, grad_clip=grad_clip, warm_start=warm_start,
                         random_state=random_state, device=device)
        self.output_beta = output_beta
        self.use_recurrent = use_recurrent
        self.use_learnable_gates = use_learnable_gates
        self.use_output_memory = use_output_memory

    @property
    def _hidden_params(self):
        names = ["cell.W.weight", "cell.W.bias"]
        return tuple(names + (["cell.U.weight"] if self.use_recurrent else []))

    def _validate_params(self) -> None:
        super()._validate_params()
        _check_unit("output_beta", self.output_beta)

    def _build(self, input_size, output_size):
        return PMRCNetwork(input_size, self.hidden_size, output_size, beta=self.beta,
                           alpha=self.alpha, output_beta=self.output_beta,
                           use_recurrent=self.use_recurrent,
                           use_learnable_gates=self.use_learnable_gates,
                           use_output_memory=self.use_output_memory)

    def _sync(self) -> None:
        super()._sync()
        self.network_.output_beta = float(self.output_beta)

    # ---- gates ----------------------------------------------------------------------------------
    def _require_gates(self) -> None:
        check_is_fitted(self, "network_")
        if not self.network_.cell.use_learnable_gates:
            raise ValueError("this PMRC has no learnable gates; construct it with use_learnable_gates=True")

    def get_gate_state(self) -> np.ndarray:
        """The memory gates g of the last processed step, one per hidden unit."""
        self._require_gates()
        return self._memory.cell.g[0].detach().cpu().numpy().copy()

    @property
    def avg_gate_value(self) -> float:
        """Mean of :meth:`get_gate_state` (the fraction of memory rewritten per step)."""
        if not hasattr(self, "network_"):
            return 0.0
        return float(self._memory.cell.g.mean())

    def freeze_memory_gates(self) -> None:
        self._require_gates()
        for name in self._gate_params:
            self._freeze(name)

    def unfreeze_memory_gates(self) -> None:
        self._require_gates()
        self._unfreeze(self._gate_params)

    # ---- partial freezing -------------------------------------------------------------------------
    def _pick_rows(self, n: int, percentage: float) -> torch.Tensor:
        if not isinstance(percentage, (int, float)) or not 0.0 <= percentage <= 1.0:
            raise ValueError(f"percentage must be in [0, 1], got {percentage!r}")
        k = int(round(percentage * n))
        seed = self.random_state if isinstance(self.random_state, int) else None
        rng = np.random.default_rng(seed)
        rows = torch.zeros(n, dtype=torch.bool)
        rows[torch.as_tensor(rng.choice(n, size=k, replace=False), dtype=torch.long)] = True
        return rows

    def freeze_hidden_percentage(self, percentage: float) -> None:
        """Freeze exactly ``round(percentage * hidden_size)`` hidden neurons (their incoming
        weights and bias), chosen without replacement (seeded by ``random_state``)."""
        check_is_fitted(self, "network_")
        rows = self._pick_rows(self.network_.cell.hidden_size, percentage)
        for name in self._hidden_params:
            shape = dict(self.network_.named_parameters())[name].shape
            self._freeze(name, rows.view(-1, *([1] * (len(shape) - 1))))

    def freeze_output_percentage(self, percentage: float) -> None:
        """Freeze exactly ``round(percentage * output_size)`` output neurons."""
        check_is_fitted(self, "network_")
        rows = self._pick_rows(self.n_outputs_, percentage)
        self._freeze("readout.weight", rows[:, None])
        self._freeze("readout.bias", rows)

    def freeze_by_magnitude(self, threshold: float, freeze_large: bool = True) -> None:
        """Freeze every weight with ``|w| > threshold`` (``freeze_large``) or ``|w| < threshold``."""
        check_is_fitted(self, "network_")
        check_real("threshold", threshold, 0.0)
        for name, p in self.network_.named_parameters():
            mag = p.detach().abs()
            self._freeze(name, mag > threshold if freeze_large else mag < threshold)
