"""Pure functions over tensors. Each recurrence has a folder with ``naive.py`` (a plain loop over
time: the reference) and a fast form; the layout is ``[B, T, ...]`` everywhere."""

from mnnn.ops.decay_attention import decay_attention, decay_attention_naive
from mnnn.ops.scan import linear_scan, linear_scan_naive

__all__ = ["decay_attention", "decay_attention_naive", "linear_scan", "linear_scan_naive"]
