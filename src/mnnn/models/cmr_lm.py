"""CMR as a language model ``mnnn train`` can train: a GPT-2-architecture base, and CMR over it.

Two names in :data:`mnnn.lm.LANGUAGE_MODELS`:

* ``gpt2``: :class:`GPT2LM`, a freshly initialised Hugging Face ``GPT2LMHeadModel`` (nothing is
  downloaded) under mnnn's ``forward(tokens, state) -> (logits, state)``. Its context is the
  segment (it carries nothing across segments, like the Transformer baseline).
* ``cmr``: :class:`CMRLanguageModel`, :class:`~mnnn.models.cmr.CMRModel` around the ``gpt2`` base
  of a training checkpoint (``model.base``). The base is frozen; only the CMR parameters train.
  The streams are read in order, so each segment reads the memories of its own stream's earlier
  segments. ``set_memory_enabled(False)`` (``mnnn eval --no-memory``) makes the same checkpoint
  the bare base model, which is the on/off comparison.

Two steps on WikiText-2::

    mnnn train --config gpt2    # the base -> runs/gpt2/checkpoint.safetensors
    mnnn train --config cmr     # CMR over it (base frozen) -> runs/cmr
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from mnnn.models.lm_baselines import NoState
from mnnn.validation import check_int


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ImportError("models 'gpt2' and 'cmr' need transformers: pip install 'mnnn[cmr]'") from None
    return transformers


class GPT2LM(nn.Module):
    """A GPT-2-architecture causal LM (random initialisation) whose context is the segment.
    ``n_positions`` is the longest segment it reads; ``dropout`` sets GPT-2's three dropouts."""

    def __init__(self, vocab_size: int = 30522, n_embd: int = 128, n_layer: int = 2, n_head: int = 4,
                 n_positions: int = 128, dropout: float = 0.0):
        super().__init__()
        for name, value in (("vocab_size", vocab_size), ("n_embd", n_embd), ("n_layer", n_layer),
                            ("n_head", n_head), ("n_positions", n_positions)):
            check_int(name, value)
        if n_embd % n_head:
            raise ValueError(f"n_embd must be divisible by n_head, got n_embd={n_embd}, n_head={n_head}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")
        tf = _transformers()
        config = tf.GPT2Config(vocab_size=vocab_size, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer,
                               n_head=n_head, resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
                               bos_token_id=0, eos_token_id=0)
        self.model = tf.GPT2LMHeadModel(config)
        _store_shared_once(self)  # GPT-2 ties its head to the token embedding
        self.vocab_size, self.max_len = vocab_size, n_positions

    def init_state(self, batch_size: int) -> NoState:
        return NoState()

    def forward(self, tokens: torch.Tensor, state: NoState | None = None) -> tuple[torch.Tensor, NoState]:
        _check_tokens(tokens, self.max_len, "gpt2")
        return self.model(input_ids=tokens).logits, NoState()


class CMRLanguageModel(nn.Module):
    """CMR around the frozen ``gpt2`` base stored at ``base`` (a ``checkpoint.safetensors`` of
    ``mnnn train --config gpt2``); every other keyword is a :class:`~mnnn.models.cmr.CMRConfig`
    field. The checkpoint of this model holds the base's weights too; the base checkpoint is read
    for its architecture."""

    def __init__(self, base: str, vocab_size: int = 30522, **cmr_config: Any):
        super().__init__()
        from mnnn.lm import load_checkpoint_model  # mnnn.lm imports this module
        from mnnn.models.cmr import CMRModel

        if not isinstance(base, (str, Path)):
            raise TypeError(f"model.base must be the path of a gpt2 checkpoint, got {type(base).__name__}")
        if not Path(base).is_file():
            raise FileNotFoundError(f"model.base: no checkpoint at {base}; train the base first "
                                    "(mnnn train --config gpt2) or set model.base=PATH")
        base_model, meta = load_checkpoint_model(base)
        name = meta["config"].get("model", {}).get("name")
        if not isinstance(base_model, GPT2LM):
            raise ValueError(f"model.base must be a checkpoint of a 'gpt2' model, got one of {name!r}")
        if base_model.vocab_size != vocab_size:
            raise ValueError(f"vocab_size {vocab_size} differs from the base's {base_model.vocab_size}")
        self.cmr = CMRModel(base_model.model, cmr_config)
        _store_shared_once(self)  # the tied head, and CMRModel's second name for the base's blocks
        self.vocab_size, self.max_len = vocab_size, base_model.max_len
        self.memory_enabled = True

    def set_memory_enabled(self, enabled: bool) -> None:
        """Reads and writes on (True) or off (False: the bare base model, bit for bit)."""
        if not isinstance(enabled, bool):
            raise TypeError(f"enabled must be True or False, got {enabled!r}")
        self.memory_enabled = enabled

    def reset_memory(self) -> None:
        self.cmr.reset_memory()

    def reset_stats(self) -> None:
        self.cmr.reset_stats()

    def init_state(self, batch_size: int) -> NoState:
        """New streams: the memory is emptied (a stream never reads another set of streams)."""
        self.cmr.reset_memory()
        return NoState()

    def forward(self, tokens: torch.Tensor, state: NoState | None = None) -> tuple[torch.Tensor, NoState]:
        """One segment of each stream: it reads the memories of the stream's earlier segments,
        then is stored for the later ones (memory on)."""
        _check_tokens(tokens, self.max_len, "cmr")
        logits = self.cmr(tokens, use_memory=self.memory_enabled).logits
        if self.training and torch.is_grad_enabled() and not logits.requires_grad:
            # a stream's first segment reads no memory, so nothing trainable touched the logits;
            # the LM trainer still calls backward(): give it a zero path to one CMR parameter
            logits = logits + 0.0 * self.cmr.cmr_parameters()[0].reshape(-1)[0]
        return logits, NoState()

    def get_stats(self) -> dict[str, Any]:
        """The CMR memory's statistics since the last reset (``mnnn eval`` resets them first)."""
        return {"cmr": self.cmr.memory_info()}

    def train(self, mode: bool = True) -> "CMRLanguageModel":
        super().train(mode)
        self.cmr.base.eval()  # the frozen base keeps its inference behaviour (no dropout)
        return self


def _store_shared_once(module: nn.Module) -> None:
    """Safetensors refuses two names for one tensor: ``module``'s state dicts keep each shared
    tensor under its first name only, and loading fills the other names back in from it. The
    aliases are found once, here, from the module as built."""
    seen: dict[tuple, str] = {}
    module._aliases = {}
    for key, value in module.state_dict(keep_vars=True).items():
        identity = (value.data_ptr(), value.shape, value.dtype)
        if value.numel() and identity in seen:
            module._aliases[key] = seen[identity]
        else:
            seen.setdefault(identity, key)
    module.register_state_dict_post_hook(_drop_aliases)
    module.register_load_state_dict_pre_hook(_fill_aliases)


def _drop_aliases(module, state_dict, prefix, local_metadata) -> None:
    for key in module._aliases:
        state_dict.pop(prefix + key, None)


def _fill_aliases(module, state_dict, prefix, *args) -> None:
    for key, source in module._aliases.items():
        if prefix + key not in state_dict and prefix + source in state_dict:
            state_dict[prefix + key] = state_dict[prefix + source]


def _check_tokens(tokens: torch.Tensor, max_len: int, name: str) -> None:
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2:
        got = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        raise ValueError(f"{name}: tokens must be a [batch, seq] tensor, got {got}")
    if tokens.shape[1] > max_len:
        raise ValueError(f"{name}: segments of at most {max_len} tokens (the base's n_positions), got "
                         f"{tokens.shape[1]}; lower training.seq_len or raise model.n_positions")
