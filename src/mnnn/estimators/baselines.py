"""LSTM and GRU regressors with the same estimator API, for benchmarks."""

from __future__ import annotations

from mnnn.estimators.base import SequenceEstimator
from mnnn.models.baselines import RNNNetwork


class _RNNRegressor(SequenceEstimator):
    _kind = "lstm"

    def __init__(self, input_size=None, hidden_size=32, output_size=None, learning_rate=0.01,
                 bptt=32, weight_decay=0.0, grad_clip=1.0, warm_start=True, random_state=None,
                 device="cpu"):
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.output_size = output_size
        self.learning_rate = learning_rate
        self.bptt = bptt
        self.weight_decay = weight_decay
        self.grad_clip = grad_clip
        self.warm_start = warm_start
        self.random_state = random_state
        self.device = device

    def _build(self, input_size, output_size):
        return RNNNetwork(input_size, self.hidden_size, output_size, kind=self._kind)


class LSTMRegressor(_RNNRegressor):
    """``torch.nn.LSTM`` regressor trained exactly like the memory-native estimators."""

    _kind = "lstm"


class GRURegressor(_RNNRegressor):
    """``torch.nn.GRU`` regressor trained exactly like the memory-native estimators."""

    _kind = "gru"
