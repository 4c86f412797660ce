from mnnn.ops.decay_attention.chunked import decay_attention
from mnnn.ops.decay_attention.naive import decay_attention_naive

__all__ = ["decay_attention", "decay_attention_naive"]
