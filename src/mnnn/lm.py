"""Language models by name, configs, and text generation (the S3CMN pipeline of seeds/001).

A config is one YAML file with the seed's three parts as sections::

    model:    {name: s3cmn, embedding_dim: ..., hidden_dim: ..., num_layers: ...}
    memory:   {memory_size: ..., memory_top_k: ..., memory_interval: ...}   # merged into model
    training: {batch_size: ..., seq_len: ..., learning_rate: ..., time_budget_s: ..., ...}

Unknown keys are an error that lists the known ones. ``--set section.key=value`` overrides.
"""

from __future__ import annotations

import copy
import importlib.resources
from pathlib import Path
from typing import Any, Callable

import torch
import yaml

from mnnn.models.cmr_lm import GPT2LM, CMRLanguageModel
from mnnn.models.lm_baselines import LSTMLM, NoState, TransformerLM
from mnnn.models.s3cmn import S3CMN
from mnnn.models.ssmn import TextNativeSSMN
from mnnn.sampling import sample_token

LANGUAGE_MODELS: dict[str, Callable[..., torch.nn.Module]] = {
    "s3cmn": S3CMN,
    "text_native_ssmn": TextNativeSSMN,
    "transformer": TransformerLM,
    "lstm": LSTMLM,
    "gpt2": GPT2LM,  # a GPT-2-architecture base for CMR (Hugging Face, random init)
    "cmr": CMRLanguageModel,  # CMR around a trained gpt2 checkpoint (model.base), base frozen
}
SECTIONS = ("model", "memory", "training")
# the training section's schema: key -> (kind, lowest value, may be null, hint). Kinds: 'int'
# (bools and fractional numbers refused), 'float' (finite), 'str'.
TRAINING_SCHEMA: dict[str, tuple[str, float | None, bool, str]] = {
    "batch_size": ("int", 1, False, "streams per step"),
    "seq_len": ("int", 1, False, "tokens per stream and step"),
    "learning_rate": ("float", 0.0, False, "peak AdamW learning rate, > 0"),
    "weight_decay": ("float", 0.0, False, ">= 0; 0 switches it off"),
    "max_steps": ("int", 1, True, "optimizer steps; null: stop at time_budget_s"),
    "time_budget_s": ("float", 0.0, True, "seconds of training; null: stop at max_steps"),
    "warmup": ("int", 0, False, "warm-up steps, >= 0"),
    "grad_clip": ("float", 0.0, True, "gradient-norm clip, > 0; null switches it off"),
    "seed": ("int", 0, False, "seed of the initialisation and the data order, >= 0"),
    "eval_every": ("int", 0, True, "validate every N steps; 0 or null: never during training"),
    "checkpoint_every": ("int", 0, True, "checkpoint every N steps; 0 or null: only at the end"),
    "max_bad_steps": ("int", 1, False, "non-finite steps in a row before the run stops"),
    "keep_last": ("int", 1, False, "checkpoints kept: 1 = checkpoint.safetensors only; N > 1 also keeps the "
                  "newest N as checkpoints/step-N.safetensors"),
    "out_dir": ("str", None, False, "output folder"),
    "eval_batch_size": ("int", 1, False, "streams in the final evaluation"),
    "eval_tokens": ("int", 2, True, "valid tokens evaluated at the end; null: the whole split"),
    "sample_prompt": ("str", None, False, "text the finished model continues"),
}
TRAINING_KEYS = tuple(TRAINING_SCHEMA)
# keys whose lowest value is excluded (> rather than >=)
_STRICT = {"learning_rate", "time_budget_s", "grad_clip"}


def validate_training(tr: dict[str, Any]) -> None:
    """Check the training section against :data:`TRAINING_SCHEMA`: one ``ValueError`` of the form
    ``training.<key> must be ..., got <value>; <hint>`` for the first bad key."""
    import math
    import numbers

    bad = sorted(set(tr) - set(TRAINING_SCHEMA))
    if bad:
        raise ValueError(f"unknown training keys {bad}; known: {sorted(TRAINING_SCHEMA)}")
    for key, value in tr.items():
        kind, low, nullable, hint = TRAINING_SCHEMA[key]
        if value is None:
            if nullable:
                continue
            raise ValueError(f"training.{key} must not be null, got null; {hint}")
        if kind == "str":
            ok = isinstance(value, str)
            want = "a string"
        elif kind == "int":
            ok = isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= low
            want = f"an integer >= {low:g}"
        else:
            ok = (isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
                  and (value > low if key in _STRICT else value >= low))
            want = f"a finite number {'>' if key in _STRICT else '>='} {low:g}"
        if not ok:
            raise ValueError(f"training.{key} must be {want}, got {value!r}; {hint}")
    if "max_steps" in tr and "time_budget_s" in tr and tr["max_steps"] is None and tr["time_budget_s"] is None:
        raise ValueError("training.max_steps and training.time_budget_s are both null, got a run that never "
                         "stops; set one of them")


def default_config_path(name: str = "s3cmn") -> Path:
    return Path(str(importlib.resources.files("mnnn") / "configs" / f"{name}.yaml"))


def embedded_configs() -> list[str]:
    """Names of the configs shipped in ``mnnn/configs`` (``--config NAME`` reads one)."""
    return sorted(p.stem for p in default_config_path().parent.glob("*.yaml") if p.stem != "tune_grid")


def _config_path(path: str | Path | None) -> Path:
    if path is None:
        return default_config_path()
    if Path(path).is_file() or Path(path).suffix:
        return Path(path)
    if str(path) in embedded_configs():  # a bare name: an embedded config
        return default_config_path(str(path))
    raise FileNotFoundError(f"config file not found: {path} (embedded configs, by name: {embedded_configs()})")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
    """Read a YAML config (the embedded default when ``path`` is None; a bare name such as
    ``cmr`` reads that embedded config) and apply ``key=value`` overrides
    (``training.max_steps=100``; values parsed as YAML)."""
    path = _config_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        cfg = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"config file {path} is not valid YAML: {' '.join(str(err).split())}") from None
    except UnicodeDecodeError:
        raise ValueError(f"config file {path} is not UTF-8 text") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"config file {path} must map sections to keys, got a {type(cfg).__name__}")
    for section, body in cfg.items():
        if body is not None and not isinstance(body, dict):
            raise ValueError(f"config section {section!r} must map keys to values, got {body!r}")
    unknown = sorted(set(cfg) - set(SECTIONS))
    if unknown:
        raise ValueError(f"unknown config sections {unknown}; known: {list(SECTIONS)}")
    cfg = {s: dict(cfg.get(s) or {}) for s in SECTIONS}
    for item in overrides or []:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ValueError(f"--set expects section.key=value, got {item!r}")
        key, value = item.split("=", 1)
        section, name = key.split(".", 1)
        if section not in SECTIONS:
            raise ValueError(f"unknown config section {section!r} in --set {item!r}; known: {list(SECTIONS)}")
        try:
            cfg[section][name] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise ValueError(f"--set {item!r}: the value is not valid YAML ({str(err).splitlines()[0]}); "
                             "quote strings, e.g. key='[1'") from None
    validate_training(cfg["training"])
    return cfg


def build_model(cfg: dict[str, Any]) -> torch.nn.Module:
    """The language model a config describes (memory keys merged into the model's)."""
    model_cfg = copy.deepcopy(cfg["model"])
    name = model_cfg.pop("name", "s3cmn")
    if not isinstance(name, str) or name not in LANGUAGE_MODELS:
        raise KeyError(f"unknown model {name!r}; known: {sorted(LANGUAGE_MODELS)}")
    memory = dict(cfg.get("memory") or {})
    enabled = memory.pop("enabled", None)
    if enabled is not None and not isinstance(enabled, bool):
        raise ValueError(f"memory.enabled must be true or false, got {enabled!r}")
    model_cfg.setdefault("vocab_size", 30522)
    if name in ("transformer", "lstm"):
        # the baselines take the same output memory as a wrapper, built when memory.enabled is true
        try:
            base = LANGUAGE_MODELS[name](**model_cfg)
        except TypeError as err:
            raise ValueError(f"bad config for model {name!r}: {err}") from err
        except RuntimeError as err:
            if "allocate" not in str(err):
                raise
            raise ValueError(f"model {name!r} does not fit in memory with these sizes "
                             f"({' '.join(str(err).split())[-120:]}); reduce them") from None
        if not enabled:
            if memory:
                raise ValueError(f"memory keys {sorted(memory)} given for {name!r} without memory.enabled=true")
            return base
        from mnnn.models.memory_lm import OutputMemoryLM

        try:
            return OutputMemoryLM(base, **memory)
        except TypeError as err:
            raise ValueError(f"bad memory config for model {name!r}: {err}") from err
    both = sorted(k for k in set(model_cfg) & set(memory) if model_cfg[k] != memory[k])
    if both:  # the memory section would silently win
        raise ValueError(f"{both} given in both the model and the memory section with different values "
                         f"(model: {[model_cfg[k] for k in both]}, memory: {[memory[k] for k in both]}); "
                         "set memory keys in the memory section only")
    model_cfg.update(memory)
    try:
        model = LANGUAGE_MODELS[name](**model_cfg)
    except TypeError as err:
        raise ValueError(f"bad config for model {name!r}: {err}") from err
    except RuntimeError as err:
        if "allocate" not in str(err):
            raise
        raise ValueError(f"model {name!r} does not fit in memory with these sizes "
                         f"({' '.join(str(err).split())[-120:]}); reduce them") from None
    if enabled is not None:
        if not hasattr(model, "set_memory_enabled"):
            raise ValueError(f"memory.enabled: model {name!r} has no memory switch")
        model.set_memory_enabled(enabled)
    return model


def load_checkpoint_model(path: str | Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The model of a training checkpoint (weights and stores loaded, no optimizer) and the
    checkpoint's metadata (config, step). Loading executes no code (safetensors + JSON)."""
    from mnnn.training.checkpoint import load_checkpoint, restore

    tensors, meta = load_checkpoint(path)
    cfg = meta["config"]
    model = build_model({s: cfg.get(s, {}) for s in SECTIONS})
    restore(tensors, meta, model, None, None)
    return model, meta


def vocab_size(model: torch.nn.Module) -> int:
    """The model's vocabulary: its ``vocab_size`` or its token embedding's rows."""
    if isinstance(getattr(model, "vocab_size", None), int):
        return model.vocab_size
    for module in model.modules():  # the token embedding is every LM's first
        if isinstance(module, torch.nn.Embedding):
            return module.num_embeddings
    raise TypeError(f"{type(model).__name__} has no vocab_size and no token embedding")


def prompt_ids(tokens: Any, vocab: int) -> list[int]:
    """One prompt as a list of token ids: a list, tuple, 1-D array or tensor (``[T]`` or
    ``[1, T]``) of integers in ``[0, vocab)``. A batch of prompts, floats, booleans or ids out of
    range are refused with a ``ValueError``/``TypeError`` that names what came."""
    import numpy as np

    if isinstance(tokens, (str, bytes)):
        raise TypeError(f"the prompt must be token ids, got text {tokens[:40]!r}; use predict() for text")
    if isinstance(tokens, (list, tuple)) and not tokens:
        raise ValueError("the prompt is empty: give some text to continue")
    if isinstance(tokens, (list, tuple)) and any(isinstance(x, (bool, np.bool_)) for x in tokens):
        raise TypeError("the prompt must be integer token ids, got booleans")
    if isinstance(tokens, torch.Tensor):
        t = tokens
    else:
        try:
            a = np.asarray(tokens)
        except ValueError:  # ragged nesting
            a = np.asarray(None)
        if a.dtype.kind not in "iub":
            raise TypeError(f"the prompt must be a sequence of integer token ids, got {type(tokens).__name__}"
                            + (f" of dtype {a.dtype}" if a.dtype.kind in "fc" else f" {str(tokens)[:40]}"))
        t = torch.as_tensor(a)
    if t.numel() == 0:
        raise ValueError("the prompt is empty: give some text to continue")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"the prompt must be integer token ids, got dtype {t.dtype}")
    if t.dim() == 2 and t.shape[0] == 1:
        t = t[0]
    if t.dim() != 1:
        raise ValueError(f"the prompt must be one sequence of token ids ([T] or [1, T]), got shape "
                         f"{tuple(t.shape)}; generate one prompt per call")
    low, high = int(t.min()), int(t.max())
    if low < 0 or high >= vocab:
        raise ValueError(f"prompt token ids must be in [0, {vocab}), got min {low}, max {high}")
    return t.tolist()


@torch.no_grad()
def generate(model: torch.nn.Module, tokens: list[int], max_new_tokens: int = 50, temperature: float = 1.0,
             top_k: int | None = 50, seed: int | None = None) -> list[int]:
    """Sample after a prompt: one parallel pass over the prompt, then one step per new token
    (models without a recurrent state re-read their context; an S3CMN steps through its lean
    :class:`~mnnn.models.s3cmn_decode.S3CMNDecoder`, same logits to rounding). ``temperature``
    below 1e-5 is greedy decoding (argmax); ``top_k`` None or >= 1; ``max_new_tokens`` >= 1."""
    from mnnn.models.s3cmn_decode import decoder_for
    from mnnn.sampling import check_sampling

    tokens = prompt_ids(tokens, vocab_size(model))
    check_sampling(temperature, top_k, None)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if temperature < 1e-5:  # below this, softmax(logits / T) is the argmax up to round-off: say so
        temperature = 0.0
    model.eval()
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed if seed is not None else int(torch.randint(2**31, (1,))))
    context = torch.tensor([tokens], device=device)
    logits, state = model(context, model.init_state(1))
    decoder = decoder_for(model, record_stats=True)
    if decoder is not None:
        state = decoder.from_state(state)
    out: list[int] = []
    for _ in range(max_new_tokens):
        tok = sample_token(logits[0, -1], temperature, top_k, None, gen)
        out.append(tok)
        if decoder is not None:
            step_logits, state = decoder.step(torch.tensor([tok], device=device), state)
            logits = step_logits[:, None]
        elif isinstance(state, NoState):
            context = torch.cat([context, torch.tensor([[tok]], device=device)], 1)[:, -getattr(model, "max_len", 512):]
            logits, state = model(context, state)
        else:
            logits, state = model(torch.tensor([[tok]], device=device), state)
    return out


def predict(model: torch.nn.Module, tokenizer, text: str, max_new_tokens: int = 50, temperature: float = 0.8,
            top_k: int | None = 50, seed: int | None = None) -> str:
    """The seed's ``predict(text)``: tokenize, continue, detokenize."""
    if not text or not text.strip():
        raise ValueError("text is empty: give some text to continue")
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    return tokenizer.decode(generate(model, ids, max_new_tokens, temperature, top_k, seed))
