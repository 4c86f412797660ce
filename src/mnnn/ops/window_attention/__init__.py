from mnnn.ops.window_attention.blocked import window_attention, window_attention_step
from mnnn.ops.window_attention.cache import WindowCache
from mnnn.ops.window_attention.naive import window_attention_naive

__all__ = ["WindowCache", "window_attention", "window_attention_naive", "window_attention_step"]
