"""``mnnn export``: a training checkpoint as a Hugging Face directory.

The directory is written next to ``out`` under a temporary name and renamed into place, so an
interrupted export never leaves a half-written model where a complete one is expected.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Iterator


def export_checkpoint(checkpoint: str | Path, fmt: str, out: str | Path) -> Iterator[str]:
    """Export ``checkpoint`` as ``fmt`` ('hf') into ``out``; yields progress lines."""
    if fmt != "hf":
        raise ValueError(f"unknown export format {fmt!r}; known: ['hf']")
    try:
        from mnnn.hf import MnnnForCausalLM, save_tokenizer
    except ImportError as err:
        raise ImportError(f"--format hf needs transformers: pip install 'mnnn[hf]' ({err})") from err
    from mnnn.lm import load_checkpoint_model

    model, meta = load_checkpoint_model(checkpoint)
    cfg = meta["config"]
    hf = MnnnForCausalLM.from_mnnn(model, {"model": cfg.get("model", {}), "memory": cfg.get("memory", {})})
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        hf.save_pretrained(tmp)
        yield f"weights and config ({hf.config.model_type}, step {meta.get('step')})"
        save_tokenizer(tmp)
        yield "tokenizer (BERT uncased)"
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    yield f"Hugging Face directory in {out}"
