"""Episodic stores that live outside autograd."""

from mnnn.memory.episodic import Memory, MemoryRead
from mnnn.memory.quantize import dequantize_rows, quantize_rows

__all__ = ["Memory", "MemoryRead", "dequantize_rows", "quantize_rows"]
