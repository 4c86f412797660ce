"""WikiText-2 with the BERT-uncased WordPiece tokenizer, cached as token ids.

The data folder is found from an explicit path, else ``MNNN_DATA_DIR``; it must hold
``wikitext-2/{train,valid,test}.txt`` and ``bert-base-uncased/vocab.txt``. Nothing is downloaded.
Token ids are cached in ``MNNN_CACHE_DIR`` (default ``~/.cache/mnnn``) under a key made of the
text file's and the vocabulary's SHA-256, so a second run loads in well under a second.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

SPLITS = ("train", "valid", "test")
SEP_ID = 102  # [SEP] ends every line (the <eos> of word-level WikiText)


class DataNotFoundError(FileNotFoundError):
    """Raised when WikiText-2 or the vocabulary cannot be found."""


def find_data_dir(path: str | os.PathLike | None = None) -> Path:
    """Resolve the data folder: ``path``, else ``$MNNN_DATA_DIR``."""
    candidate = path if path is not None else os.environ.get("MNNN_DATA_DIR")
    if candidate is None:
        raise DataNotFoundError(
            "WikiText-2 data not found: set MNNN_DATA_DIR to a folder holding wikitext-2/{train,valid,test}.txt "
            "and bert-base-uncased/vocab.txt (for example MNNN_DATA_DIR=../shared/data), or pass data_dir=")
    root = Path(candidate).expanduser()
    missing = [str(root / "wikitext-2" / f"{s}.txt") for s in SPLITS if not (root / "wikitext-2" / f"{s}.txt").is_file()]
    if not (root / "bert-base-uncased" / "vocab.txt").is_file():
        missing.append(str(root / "bert-base-uncased" / "vocab.txt"))
    if missing:
        source = "data_dir" if path is not None else "MNNN_DATA_DIR"
        raise DataNotFoundError(f"{source}={root} is missing: {', '.join(missing)}; point MNNN_DATA_DIR "
                                "at a folder with wikitext-2/ and bert-base-uncased/")
    return root


def load_tokenizer(data_dir: str | os.PathLike | None = None):
    """The BERT-uncased WordPiece tokenizer (``tokenizers.BertWordPieceTokenizer``)."""
    from tokenizers import BertWordPieceTokenizer

    vocab = find_data_dir(data_dir) / "bert-base-uncased" / "vocab.txt"
    return BertWordPieceTokenizer(str(vocab), lowercase=True)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _cache_dir() -> Path:
    return Path(os.environ.get("MNNN_CACHE_DIR", Path.home() / ".cache" / "mnnn"))


def tokenize_lines(lines: list[str], tokenizer) -> np.ndarray:
    """WordPiece ids of non-empty lines, each followed by [SEP]; WikiText's ``<unk>`` becomes
    ``[UNK]`` (otherwise WordPiece splits it into four pieces)."""
    texts = [line.strip().replace("<unk>", "[UNK]") for line in lines]
    texts = [t for t in texts if t]
    ids: list[int] = []
    for enc in tokenizer.encode_batch(texts, add_special_tokens=False):
        ids.extend(enc.ids)
        ids.append(SEP_ID)
    return np.asarray(ids, dtype=np.int32)


def load_split(split: str, data_dir: str | os.PathLike | None = None, use_cache: bool = True) -> np.ndarray:
    """Token ids of one split (``'train' | 'valid' | 'test'``), int32."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    root = find_data_dir(data_dir)
    text = root / "wikitext-2" / f"{split}.txt"
    vocab = root / "bert-base-uncased" / "vocab.txt"
    key = f"wikitext2-{split}-{_sha256(text)[:16]}-{_sha256(vocab)[:16]}.npy"
    cached = _cache_dir() / key
    if use_cache and cached.is_file():
        return np.load(cached)
    with open(text, encoding="utf-8") as fh:
        ids = tokenize_lines(fh.readlines(), load_tokenizer(root))
    if use_cache:
        from mnnn.serialization import atomic_write

        atomic_write(cached, lambda tmp: np.save(open(tmp, "wb"), ids))
    return ids


def unigram_perplexity(train_ids: np.ndarray, eval_ids: np.ndarray, vocab_size: int = 30522) -> float:
    """Perplexity of an add-one smoothed unigram model fitted on ``train_ids`` (a floor reference)."""
    counts = np.bincount(train_ids, minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(np.exp(-logp[eval_ids].mean()))
