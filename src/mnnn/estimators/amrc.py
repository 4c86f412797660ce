"""AMRC estimator: the seed's ``AMRC`` API on :class:`mnnn.models.AMRCNetwork`."""

from __future__ import annotations

from mnnn.estimators.base import SequenceEstimator
from mnnn.models.amrc import AMRCNetwork


def _check_unit(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a float in [0, 1], got {value!r}")


class AMRC(SequenceEstimator):
    """Adaptive Memory Recurrent Cell regressor (seeds/003).

    Args:
        input_size, hidden_size, output_size: layer sizes (``None``: from the data).
        beta: memory-preserving echo, ``h_t = n_t + beta h_{t-1}``.
        alpha: stateful-neuron memory rate, ``m_t = (1 - alpha) m_{t-1} + alpha n_t``.
            The seed's guide says ``beta=0`` gives a feed-forward network, but in its own equations
            ``m`` still carries the past into ``n_t = tanh(W x_t + b + m_{t-1})``; ``beta=0, alpha=0``
            is the feed-forward network (PMRC also ``use_recurrent=False``, no output memory).
        learning_rate: AdamW step size.
        bptt: window length (rows) of truncated backpropagation through time.
        weight_decay, grad_clip: AdamW weight decay and gradient-norm clip.
        warm_start: a second ``fit`` continues from the current weights (seed behaviour).
        random_state: seeds initialisation and window order.
        device: torch device.
    """

    _hidden_params = ("cell.W.weight", "cell.W.bias")
    _output_params = ("readout.weight", "readout.bias")

    def __init__(self, input_size=None, hidden_size=32, output_size=None, beta=0.3, alpha=0.1,
                 learning_rate=0.01, bptt=32, weight_decay=0.0, grad_clip=1.0, warm_start=True,
                 random_state=None, device="cpu"):
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.output_size = output_size
        self.beta = beta
        self.alpha = alpha
        self.learning_rate = learning_rate
        self.bptt = bptt
        self.weight_decay = weight_decay
        self.grad_clip = grad_clip
        self.warm_start = warm_start
        self.random_state = random_state
        self.device = device

    def _validate_params(self) -> None:
        super()._validate_params()
        _check_unit("beta", self.beta)
        _check_unit("alpha", self.alpha)

    def _build(self, input_size, output_size):
        return AMRCNetwork(input_size, self.hidden_size, output_size, beta=self.beta, alpha=self.alpha)

    def _sync(self) -> None:
        self._validate_params()
        self.network_.cell.beta, self.network_.cell.alpha = float(self.beta), float(self.alpha)

    def freeze_hidden_layer(self) -> None:
        """Keep the hidden (input-to-hidden) weights fixed in later fits."""
        for name in self._hidden_params:
            self._freeze(name)

    def unfreeze_hidden_layer(self) -> None:
        self._unfreeze(self._hidden_params)

    def freeze_output_layer(self) -> None:
        """Keep the read-out weights fixed in later fits."""
        for name in self._output_params:
            self._freeze(name)

    def unfreeze_output_layer(self) -> None:
        self._unfreeze(self._output_params)
