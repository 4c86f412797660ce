from mnnn.ops.lif.fused import lif
from mnnn.ops.lif.naive import lif_naive
from mnnn.ops.lif.surrogates import SURROGATES, spike, surrogate_derivative

__all__ = ["SURROGATES", "lif", "lif_naive", "spike", "surrogate_derivative"]
