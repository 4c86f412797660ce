"""Pure functions over tensors. Each recurrence has a folder with ``naive.py`` (a plain loop over
time: the reference) and a fast form; the layout is ``[B, T, ...]`` everywhere."""

from mnnn.ops.decay_attention import decay_attention, decay_attention_naive
from mnnn.ops.lif import lif, lif_naive
from mnnn.ops.scan import linear_scan, linear_scan_naive
from mnnn.ops.synaptic import synaptic_memory, synaptic_memory_naive, synaptic_step
from mnnn.ops.window_attention import window_attention, window_attention_naive, window_attention_step

__all__ = [
    "decay_attention", "decay_attention_naive", "lif", "lif_naive", "linear_scan", "linear_scan_naive",
    "synaptic_memory", "synaptic_memory_naive", "synaptic_step", "window_attention",
    "window_attention_naive", "window_attention_step",
]
