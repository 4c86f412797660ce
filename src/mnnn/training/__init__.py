"""One training loop for every model."""

from mnnn.training.loop import TrainHistory, train_epochs

__all__ = ["TrainHistory", "train_epochs"]
