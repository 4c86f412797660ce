"""Hugging Face integration: mnnn's language models as ``PretrainedConfig`` / ``PreTrainedModel``.

``import mnnn`` registers them with ``AutoConfig``, ``AutoModel`` and ``AutoModelForCausalLM``
(at once if transformers is already imported, otherwise the moment it is), so a saved directory
loads offline with the Auto classes::

    hf = MnnnForCausalLM.from_mnnn(model, config)        # an mnnn LM and its config dict
    hf.save_pretrained("out"); save_tokenizer("out")     # safetensors, config.json, tokenizer files
    model = AutoModelForCausalLM.from_pretrained("out")
    model.generate(ids, max_new_tokens=20, do_sample=False)  # the recurrent state is the cache

Model types: ``mnnn_s3cmn``, ``mnnn_text_native_ssmn``, ``mnnn_transformer``, ``mnnn_lstm``. The
config carries mnnn's own config sections (``mnnn_config``), so the model is rebuilt by
:func:`mnnn.lm.build_model` exactly as training built it.

``generate`` passes the model's recurrent state between steps as ``state`` (as RWKV does in
transformers): after the prompt, each step reads one token. Models without a recurrent state (the
Transformer baseline) re-read their context. Greedy and sampling (temperature, top-k, top-p) work;
beam search and left padding do not (a recurrent state cannot skip pad tokens): a batch's prompts
must have one length.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput

from mnnn.models.lm_baselines import NoState

MODEL_TYPES = {"s3cmn": "mnnn_s3cmn", "text_native_ssmn": "mnnn_text_native_ssmn",
               "transformer": "mnnn_transformer", "lstm": "mnnn_lstm"}


class MnnnConfig(PretrainedConfig):
    """``mnnn_config``: mnnn's config sections ``{"model": {name, ...}, "memory": {...}}``."""

    model_type = "mnnn_s3cmn"

    def __init__(self, mnnn_config: dict[str, Any] | None = None, **kwargs):
        cfg = copy.deepcopy(mnnn_config) if mnnn_config is not None else {"model": {"name": self._mnnn_name()}}
        if not isinstance(cfg, dict) or not isinstance(cfg.get("model"), dict):
            raise ValueError(f"mnnn_config must be a dict with a 'model' section, got {mnnn_config!r}")
        cfg.setdefault("memory", {})
        name = cfg["model"].setdefault("name", self._mnnn_name())
        if MODEL_TYPES.get(name) != self.model_type:
            raise ValueError(f"mnnn model {name!r} does not belong to config type {self.model_type!r}")
        self.mnnn_config = {"model": cfg["model"], "memory": cfg["memory"]}
        kwargs.setdefault("vocab_size", int(cfg["model"].get("vocab_size", 30522)))
        kwargs.setdefault("tie_word_embeddings", False)  # mnnn ties inside its own head
        super().__init__(**kwargs)

    @classmethod
    def _mnnn_name(cls) -> str:
        return next(k for k, v in MODEL_TYPES.items() if v == cls.model_type)


class MnnnS3CMNConfig(MnnnConfig):
    model_type = "mnnn_s3cmn"


class MnnnTextNativeSSMNConfig(MnnnConfig):
    model_type = "mnnn_text_native_ssmn"


class MnnnTransformerConfig(MnnnConfig):
    model_type = "mnnn_transformer"


class MnnnLSTMConfig(MnnnConfig):
    model_type = "mnnn_lstm"


CONFIGS = {c.model_type: c for c in (MnnnS3CMNConfig, MnnnTextNativeSSMNConfig, MnnnTransformerConfig,
                                     MnnnLSTMConfig)}


@dataclass
class MnnnCausalLMOutput(ModelOutput):
    """``logits`` ``[B, T, V]`` (S3CMN with its output memory: the mixture's log-probabilities);
    ``state``: the recurrent state after the input (pass it back to continue)."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    state: Any = None


class MnnnPreTrainedModel(PreTrainedModel):
    config_class = MnnnConfig
    base_model_prefix = "mnnn"
    main_input_name = "input_ids"
    _is_stateful = True
    _no_split_modules: list[str] = []

    def _init_weights(self, module):
        # mnnn's modules initialise their weights when built; from_pretrained hands back their
        # non-saved buffers as empty tensors, which the module recomputes
        if hasattr(module, "reset_buffers"):
            module.reset_buffers()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:  # the recurrent state is the cache, not a KV cache
        return False


class MnnnForCausalLM(MnnnPreTrainedModel, GenerationMixin):
    """An mnnn language model (``self.lm``) behind the transformers causal-LM interface."""

    def __init__(self, config: MnnnConfig):
        super().__init__(config)
        from mnnn.lm import build_model

        # from_pretrained builds models on the meta device; mnnn's modules compute buffers (Hyena's
        # positional features, S4D's init) when built, so build them for real on the CPU
        on_meta = torch.empty(0).device.type == "meta"
        with torch.device("cpu") if on_meta else contextlib.nullcontext():
            self.lm = build_model(copy.deepcopy(config.mnnn_config))
        self.stateless = isinstance(self.lm.init_state(1), NoState)
        self.post_init()

    @classmethod
    def from_mnnn(cls, model: torch.nn.Module, mnnn_config: dict[str, Any], **config_kwargs) -> "MnnnForCausalLM":
        """Wrap a trained mnnn model (its weights copied) given the config sections it was built from."""
        name = mnnn_config.get("model", {}).get("name", "s3cmn")
        if name not in MODEL_TYPES:
            raise ValueError(f"no Hugging Face wrapper for mnnn model {name!r}; known: {sorted(MODEL_TYPES)}")
        config = CONFIGS[MODEL_TYPES[name]](mnnn_config={"model": dict(mnnn_config["model"]),
                                                         "memory": dict(mnnn_config.get("memory") or {})},
                                            **config_kwargs)
        hf = MODELS[config.model_type](config) if cls is MnnnForCausalLM else cls(config)
        hf.lm.load_state_dict(model.state_dict())
        if hasattr(model, "memory_enabled") and hasattr(hf.lm, "set_memory_enabled"):
            hf.lm.set_memory_enabled(model.memory_enabled)
        return hf.eval()

    def get_input_embeddings(self):
        return self.lm.embed

    def set_input_embeddings(self, value):
        self.lm.embed = value

    def get_output_embeddings(self):
        return None  # the head is the input embedding, inside the mnnn model

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                state: Any = None, labels: torch.LongTensor | None = None, use_cache: bool | None = None,
                return_dict: bool | None = None, inputs_embeds: torch.Tensor | None = None, **kwargs):
        if inputs_embeds is not None:
            raise ValueError("inputs_embeds is not supported: mnnn models read token ids (input_ids)")
        if input_ids is None:
            raise ValueError("input_ids is required")
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("attention_mask with zeros (padding) is not supported: a recurrent state reads every "
                             "token; give prompts of one length or generate them one at a time")
        if self.stateless:
            state = None
            input_ids = input_ids[:, -getattr(self.lm, "max_len", input_ids.shape[1]):]
        logits, new_state = self.lm(input_ids, state)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
        out = MnnnCausalLMOutput(loss=loss, logits=logits, state=None if self.stateless else new_state)
        return out if return_dict is not False else out.to_tuple()

    def prepare_inputs_for_generation(self, input_ids, state=None, attention_mask=None, **kwargs):
        if state is not None:  # the state has read everything but the newest token
            input_ids = input_ids[:, -1:]
            attention_mask = None
        return {"input_ids": input_ids, "state": state, "attention_mask": attention_mask}

    def _reorder_cache(self, *args, **kwargs):
        raise NotImplementedError("beam search is not supported by mnnn's recurrent state")


class MnnnS3CMNForCausalLM(MnnnForCausalLM):
    config_class = MnnnS3CMNConfig


class MnnnTextNativeSSMNForCausalLM(MnnnForCausalLM):
    config_class = MnnnTextNativeSSMNConfig


class MnnnTransformerForCausalLM(MnnnForCausalLM):
    config_class = MnnnTransformerConfig


class MnnnLSTMForCausalLM(MnnnForCausalLM):
    config_class = MnnnLSTMConfig


MODELS = {m.config_class.model_type: m for m in (MnnnS3CMNForCausalLM, MnnnTextNativeSSMNForCausalLM,
                                                 MnnnTransformerForCausalLM, MnnnLSTMForCausalLM)}


def save_tokenizer(directory: str | Path, data_dir: str | Path | None = None) -> Path:
    """Write the BERT-uncased tokenizer files (tokenizer.json, tokenizer_config.json, ...) into
    ``directory`` from ``vocab.txt`` under ``MNNN_DATA_DIR`` (or ``data_dir``). Like mnnn's own
    pipeline (and the WikiText-2 training data), encoding adds no [CLS]/[SEP] around a prompt."""
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    from mnnn.data.wikitext import load_tokenizer

    backend = load_tokenizer(data_dir)._tokenizer  # the BERT-uncased WordPiece of training
    backend.post_processor = TemplateProcessing(single="$A", pair="$A $B")
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]",
                                  cls_token="[CLS]", mask_token="[MASK]")
    tok.save_pretrained(str(directory))
    return Path(directory)


def register() -> None:
    """Register the configs and models with transformers' Auto classes (idempotent)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    for model_type, config in CONFIGS.items():
        try:
            AutoConfig.register(model_type, config)
        except ValueError:  # already registered
            pass
        model = MODELS[model_type]
        for auto in (AutoModel, AutoModelForCausalLM):
            try:
                auto.register(config, model)
            except ValueError:
                pass
