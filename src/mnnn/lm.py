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

from mnnn.models.lm_baselines import LSTMLM, NoState, TransformerLM
from mnnn.models.s3cmn import S3CMN
from mnnn.models.ssmn import TextNativeSSMN
from mnnn.sampling import sample_token

LANGUAGE_MODELS: dict[str, Callable[..., torch.nn.Module]] = {
    "s3cmn": S3CMN,
    "text_native_ssmn": TextNativeSSMN,
    "transformer": TransformerLM,
    "lstm": LSTMLM,
}
SECTIONS = ("model", "memory", "training")
TRAINING_KEYS = ("batch_size", "seq_len", "learning_rate", "weight_decay", "max_steps", "time_budget_s", "warmup",
                 "grad_clip", "seed", "eval_every", "checkpoint_every", "out_dir", "eval_batch_size", "eval_tokens",
                 "sample_prompt")


def default_config_path() -> Path:
    return Path(str(importlib.resources.files("mnnn") / "configs" / "s3cmn.yaml"))


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
    """Read a YAML config (the embedded default when ``path`` is None) and apply ``key=value``
    overrides (``training.max_steps=100``; values parsed as YAML)."""
    path = Path(path) if path is not None else default_config_path()
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    cfg = yaml.safe_load(path.read_text()) or {}
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
        cfg[section][name] = yaml.safe_load(value)
    bad = sorted(set(cfg["training"]) - set(TRAINING_KEYS))
    if bad:
        raise ValueError(f"unknown training keys {bad}; known: {sorted(TRAINING_KEYS)}")
    return cfg


def build_model(cfg: dict[str, Any]) -> torch.nn.Module:
    """The language model a config describes (memory keys merged into the model's)."""
    model_cfg = copy.deepcopy(cfg["model"])
    name = model_cfg.pop("name", "s3cmn")
    if name not in LANGUAGE_MODELS:
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
        if not enabled:
            if memory:
                raise ValueError(f"memory keys {sorted(memory)} given for {name!r} without memory.enabled=true")
            return base
        from mnnn.models.memory_lm import OutputMemoryLM

        try:
            return OutputMemoryLM(base, **memory)
        except TypeError as err:
            raise ValueError(f"bad memory config for model {name!r}: {err}") from err
    model_cfg.update(memory)
    try:
        model = LANGUAGE_MODELS[name](**model_cfg)
    except TypeError as err:
        raise ValueError(f"bad config for model {name!r}: {err}") from err
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


@torch.no_grad()
def generate(model: torch.nn.Module, tokens: list[int], max_new_tokens: int = 50, temperature: float = 1.0,
             top_k: int | None = 50, seed: int | None = None) -> list[int]:
    """Sample after a prompt: one parallel pass over the prompt, then one step per new token
    (models without a recurrent state re-read their context)."""
    if not tokens:
        raise ValueError("the prompt is empty: give some text to continue")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    model.eval()
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed if seed is not None else int(torch.randint(2**31, (1,))))
    context = torch.tensor([tokens], device=device)
    logits, state = model(context, model.init_state(1))
    out: list[int] = []
    for _ in range(max_new_tokens):
        tok = sample_token(logits[0, -1], temperature, top_k, None, gen)
        out.append(tok)
        if isinstance(state, NoState):
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
