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

import dataclasses
import itertools
import random
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
        self._held: int | None = None  # id of the memory state last handed out, while the buffer holds it

    def set_memory_enabled(self, enabled: bool) -> None:
        """Reads and writes on (True) or off (False: the bare base model, bit for bit)."""
        if not isinstance(enabled, bool):
            raise TypeError(f"enabled must be True or False, got {enabled!r}")
        self.memory_enabled = enabled

    def reset_stats(self) -> None:
        self.cmr.reset_stats()

    def init_state(self, batch_size: int) -> "CMRMemoryState":
        """New streams: the memory is emptied (a stream never reads another set of streams)."""
        self.reset_memory()
        return self._memory_state()

    def reset_memory(self) -> None:
        self.cmr.reset_memory()
        self._held = None

    def forward(self, tokens: torch.Tensor,
                state: "CMRMemoryState | NoState | None" = None) -> tuple[torch.Tensor, "CMRMemoryState"]:
        """One segment of each stream: it reads the memories of the stream's earlier segments,
        then is stored for the later ones (memory on). ``state`` is the memory the segment reads
        (:class:`CMRMemoryState`, as the previous call returned it or a checkpoint restored it);
        ``None`` or a :class:`NoState` read what the model holds now. Returns the logits and the
        memory after this segment."""
        _check_tokens(tokens, self.max_len, "cmr")
        if isinstance(state, CMRMemoryState):
            self._load_memory(state)
        elif state is not None and not isinstance(state, NoState):
            raise TypeError(f"cmr: state must be a CMRMemoryState (from init_state or the previous call), "
                            f"got {type(state).__name__}")
        logits = self.cmr(tokens, use_memory=self.memory_enabled).logits
        if self.training and torch.is_grad_enabled() and not logits.requires_grad:
            # a stream's first segment reads no memory, so nothing trainable touched the logits;
            # the LM trainer still calls backward(): give it a zero path to one CMR parameter
            logits = logits + 0.0 * self.cmr.cmr_parameters()[0].reshape(-1)[0]
        return logits, self._memory_state()

    # ---- the memory as a carried state -------------------------------------------------------------
    def _memory_state(self) -> "CMRMemoryState":
        """The memory the model holds now, as tensors. They share storage with the buffer, except
        ``last_access``, which reads update in place (copied, so the state stays as it was)."""
        cmr, buf = self.cmr, self.cmr.buffer
        memory = {name: value.clone() if name.endswith("/last_access") else value
                  for name, value in buf.tensors().items()}
        memory.update({f"summary/{layer}": value for layer, value in getattr(cmr, "_summary", {}).items()})
        memory["segment"] = torch.tensor(cmr.segment, dtype=torch.long)
        memory["evictions"] = torch.tensor(buf.evictions, dtype=torch.long)
        memory["relevance_threshold"] = torch.tensor(cmr.relevance_threshold, dtype=torch.float64)
        self._held = next(_MEMORY_IDS)
        memory["id"] = torch.tensor(self._held, dtype=torch.long)
        return CMRMemoryState(memory)

    def _load_memory(self, state: "CMRMemoryState") -> None:
        """Make ``state`` the memory the model reads. Free when it is what the model holds (the
        previous call's state); else (a checkpoint, a state kept from earlier, after an evaluation
        pass) the buffer takes its tensors under new versions, so no retrieval cache outlives it."""
        memory = state.memory
        if not memory:  # an empty state (e.g. a checkpoint written before memories were carried)
            self.reset_memory()
            return
        missing = [key for key in ("segment", "evictions", "relevance_threshold") if key not in memory]
        if missing:
            raise ValueError(f"cmr: the memory state has no {missing} (a tampered or cut state?); it holds "
                             f"{sorted(memory)[:8]}")
        held = memory.get("id")
        if held is not None and self._held is not None and int(held) == self._held \
                and int(memory["segment"]) == self.cmr.segment:
            return
        cmr, device = self.cmr, next(self.parameters()).device
        cmr.buffer.load_tensors(memory, "cmr: the memory state", device)
        cmr._summary = {int(key.split("/", 1)[1]): value.to(device) for key, value in memory.items()
                        if key.startswith("summary/")}
        cmr.segment = int(memory["segment"])
        cmr.buffer.evictions = int(memory["evictions"])
        cmr.relevance_threshold = float(memory["relevance_threshold"])
        self._held = None  # a load is not a state this model handed out

    def get_stats(self) -> dict[str, Any]:
        """The CMR memory's statistics since the last reset (``mnnn eval`` resets them first)."""
        return {"cmr": self.cmr.memory_info()}

    def train(self, mode: bool = True) -> "CMRLanguageModel":
        super().train(mode)
        self.cmr.base.eval()  # the frozen base keeps its inference behaviour (no dropout)
        return self


# ids of the memory states a CMRLanguageModel hands out: unique in the process, and started at a
# random point, so a state restored from another process's checkpoint is never taken for the held one
_MEMORY_IDS = itertools.count(random.SystemRandom().randrange(1 << 40, 1 << 62))


@dataclasses.dataclass(eq=False)
class CMRMemoryState(NoState):
    """A :class:`CMRLanguageModel`'s memory between segments, as named tensors: each stored layer's
    buffer fields (``"<layer>/<field>"``, variable length), the per-segment summaries, the segment
    counter, the eviction count, the (adaptive) relevance threshold and the id the model gave it.
    The LM trainer carries it like any recurrent state, so a checkpoint holds the memory (resume
    continues it) and an evaluation pass, which starts its own streams, leaves it untouched.

    It is a :class:`NoState`: the base carries no recurrent summary of the tokens it read, so a
    caller that continues a text (``generate``, the serving engine) re-reads the context window."""

    memory: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)

    def map(self, fn):
        return CMRMemoryState({key: fn(value) for key, value in self.memory.items()})

    def tensors(self) -> dict[str, torch.Tensor]:
        return dict(self.memory)

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "CMRMemoryState":
        return cls(dict(tensors))



def _memory_equal(self: CMRMemoryState, other: object) -> bool:
    if type(other) is not CMRMemoryState:
        return NotImplemented
    return self.memory.keys() == other.memory.keys() and all(
        a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.cpu(), b.cpu())
        for a, b in zip(self.memory.values(), (other.memory[key] for key in self.memory)))


CMRMemoryState.__eq__ = _memory_equal  # TensorState's field-wise equality cannot compare a dict of tensors


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
