"""Data: synthetic tasks and (later) WikiText-2 with the BERT-uncased tokenizer."""

from mnnn.data.synthetic import noisy_sine

__all__ = ["noisy_sine"]
