"""mnnn: Memory-Native Neural Networks."""

from mnnn.estimators import AMN, AMRC, PMRC, create_model

__version__ = "0.1.0"

__all__ = ["AMN", "AMRC", "PMRC", "__version__", "create_model"]
