"""``mnnn export``: a training checkpoint as a Hugging Face directory, or its recurrent step as a
``torch.export`` program or an ONNX graph.

Every output is written under a temporary name beside ``out`` and renamed into place, so an
interrupted export never leaves a half-written model where a complete one is expected.

The step formats (see :mod:`mnnn.deploy.step`) carry their manifest (input/output names, state
shapes, the model's configuration) inside the file: ``torch.export.save``'s ``extra_files``
(``mnnn.json``), or the ONNX model's ``metadata_props`` (key ``mnnn``). An ONNX export is checked
with onnxruntime against the model's own ``step`` over ``verify_steps`` tokens before it is kept; with
``int8`` a dynamically quantised copy (``*.int8.onnx``) is written and measured beside it.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

FORMATS = ("hf", "onnx", "torch-export")
MAX_ABS_LOGIT_ERR = 1e-4  # the ONNX step must match the PyTorch step this closely over verify_steps


class ExportCheckFailed(RuntimeError):
    """The exported graph does not compute what the model computes; nothing was written."""


def export_checkpoint(checkpoint: str | Path, fmt: str, out: str | Path, **step_options: Any) -> Iterator[str]:
    """Export ``checkpoint`` as ``fmt`` (one of :data:`FORMATS`) into ``out``; yields progress
    lines. ``step_options`` (step formats only): ``memory``, ``batch_size``, ``int8``,
    ``verify_steps``, ``eval_tokens``, ``report`` (a dict filled with the measurements)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; known: {list(FORMATS)}")
    if fmt != "hf":
        yield from export_step_checkpoint(checkpoint, fmt, out, **step_options)
        return
    if step_options:
        raise ValueError(f"--format hf takes no step options, got {sorted(step_options)}")
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


# ---- the step formats ------------------------------------------------------------------------------
def _step_args(graph, batch_size: int):
    return (torch.zeros(batch_size, dtype=torch.long), *graph.init_state(batch_size))


def _dynamic_shapes(graph):
    from mnnn.deploy.step import batch_axes

    batch = torch.export.Dim("batch", min=1, max=4096)
    return tuple({axis: batch} if axis is not None else None for axis in batch_axes(graph).values())


def export_step(graph, fmt: str, out: str | Path, man: dict[str, Any]) -> Path:
    """Write ``graph`` (a :class:`mnnn.deploy.step.StepGraph`) as ``fmt`` ('onnx' or
    'torch-export') to ``out``, with the manifest ``man`` inside; batch size dynamic. The file is
    built in a temporary directory beside ``out`` and renamed into place."""
    if fmt not in ("onnx", "torch-export"):
        raise ValueError(f"step export format must be 'onnx' or 'torch-export', got {fmt!r}")
    if fmt == "onnx":
        try:
            import onnx
            import onnxscript  # noqa: F401  (torch.onnx's exporter needs it)
        except ImportError as err:
            raise ImportError(f"--format onnx needs onnx, onnxscript and onnxruntime: pip install 'mnnn[deploy]' "
                              f"({err})") from err
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    args = _step_args(graph, 2)
    blob = json.dumps(man)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp, torch.no_grad(), _quiet():
        staged = Path(tmp) / (out.name if fmt == "onnx" or out.suffix == ".pt2" else out.name + ".pt2")
        if fmt == "torch-export":
            program = torch.export.export(graph, args, dynamic_shapes=_dynamic_shapes(graph))
            torch.export.save(program, staged, extra_files={"mnnn.json": blob})
        else:
            program = torch.onnx.export(graph, args, input_names=man["inputs"], output_names=man["outputs"],
                                        dynamic_shapes=_dynamic_shapes(graph), dynamo=True, external_data=False,
                                        verbose=False)
            proto = program.model_proto
            entry = proto.metadata_props.add()
            entry.key, entry.value = "mnnn", blob
            onnx.save_model(proto, staged)
        os.replace(staged, out)
    return out


@contextlib.contextmanager
def _quiet():
    """Hide the exporters' progress lines, deprecation notes and log lines (restored after)."""
    loggers = [logging.getLogger(n) for n in ("", "torch", "torch.onnx", "torch.export", "onnx_ir", "onnxscript")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def load_torch_export(path: str | Path):
    """``(program, manifest)`` of a ``--format torch-export`` file; ``program.module()`` is the step."""
    extra = {"mnnn.json": ""}
    program = torch.export.load(path, extra_files=extra)
    if not extra["mnnn.json"]:
        raise ValueError(f"{path} is not an mnnn step export (no mnnn.json inside)")
    return program, json.loads(extra["mnnn.json"])


class OnnxStep:
    """An exported ONNX step run by onnxruntime: ``init_state(batch_size)`` (zeros, from the
    manifest), ``step(token [B] int64, state) -> (logits [B, vocab], state)`` on NumPy arrays."""

    def __init__(self, path: str | Path, threads: int | None = None):
        try:
            import onnx
            import onnxruntime as ort
        except ImportError as err:
            raise ImportError(f"running an ONNX step needs onnx and onnxruntime: pip install 'mnnn[deploy]' ({err})") from err
        self.path = Path(path)
        meta = {p.key: p.value for p in onnx.load_model(str(path), load_external_data=False).metadata_props}
        if "mnnn" not in meta:
            raise ValueError(f"{path} is not an mnnn step export (no 'mnnn' manifest in its metadata)")
        self.manifest = json.loads(meta["mnnn"])
        opts = ort.SessionOptions()
        if threads is not None:
            opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.state_names = self.manifest["inputs"][1:]

    def init_state(self, batch_size: int = 1) -> list[np.ndarray]:
        out = []
        for name in self.state_names:
            spec, axis = self.manifest["state"][name], self.manifest["batch_axes"][name]
            shape = list(spec["shape"])
            if axis is not None:
                shape[axis] = batch_size
            out.append(np.zeros(shape, dtype=np.dtype(spec["dtype"])))
        return out

    def step(self, token: np.ndarray, state: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        feeds = {"token": np.asarray(token, dtype=np.int64), **dict(zip(self.state_names, state))}
        logits, *state = self.session.run(None, feeds)
        return logits, state


def _nll(logits: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Per-row NLL of ``target`` under ``log_softmax(logits)`` (float64)."""
    z = logits.astype(np.float64)
    z = z - z.max(-1, keepdims=True)
    return np.log(np.exp(z).sum(-1)) - z[np.arange(len(target)), target]


def measure_step(run_step, init_state, tokens: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Feed ``tokens`` (1-D) one at a time through ``run_step(token [1], state) -> (logits [1, V],
    state)`` from ``init_state(1)``: (every logits row ``[T, V]`` float32, perplexity of
    ``tokens[1:]``, median ms/step)."""
    state, logits, times = init_state(1), [], []
    for t in range(len(tokens)):
        start = time.perf_counter()
        out, state = run_step(tokens[t:t + 1], state)
        times.append(time.perf_counter() - start)
        logits.append(np.asarray(out[0], dtype=np.float32))
    logits = np.stack(logits)
    nll = _nll(logits[:-1], tokens[1:])
    return logits, float(np.exp(nll.mean())), 1e3 * statistics.median(times)


def torch_step(step):
    """Adapt a PyTorch step for :func:`measure_step`: ``step(token, state) -> (logits, state)``
    (``model.step``) or, with the state spread over arguments, ``step(token, *state) -> (logits,
    *state)`` (a :class:`mnnn.deploy.step.StepGraph` or a torch.export module); NumPy in and out."""
    def run(token: np.ndarray, state):
        if isinstance(state, tuple):
            logits, *state = step(torch.from_numpy(token), *state)
            return logits.numpy(), tuple(state)
        logits, state = step(torch.from_numpy(token), state)
        return logits.numpy(), state
    return run


def verification_tokens(vocab_size: int, n: int) -> tuple[np.ndarray, str]:
    """The first ``n`` tokens of WikiText-2 valid when MNNN_DATA_DIR has the data, else seeded
    random ids; with a word saying which."""
    try:
        from mnnn.data.wikitext import load_split

        ids = load_split("valid")
        if len(ids) >= n and int(ids[:n].max()) < vocab_size:
            return np.asarray(ids[:n], dtype=np.int64), "wikitext-2 valid"
    except (FileNotFoundError, OSError, ValueError):
        pass
    rng = np.random.default_rng(0)
    return rng.integers(0, vocab_size, n, dtype=np.int64), "random ids (seed 0; MNNN_DATA_DIR has no data)"


def export_step_checkpoint(checkpoint: str | Path, fmt: str, out: str | Path, **options: Any) -> Iterator[str]:
    """``mnnn export --format onnx|torch-export``: the checkpoint's model through :func:`export_step_model`."""
    from mnnn.lm import load_checkpoint_model

    model, meta = load_checkpoint_model(checkpoint)
    cfg = {k: meta["config"].get(k, {}) for k in ("model", "memory")}
    yield from export_step_model(model, cfg, fmt, out, checkpoint_step=meta.get("step"), **options)


def export_step_model(model, cfg: dict[str, Any], fmt: str, out: str | Path, memory: bool = True,
                      int8: bool = False, verify_steps: int = 256, eval_tokens: int = 1024,
                      report: dict[str, Any] | None = None, checkpoint_step: int | None = None) -> Iterator[str]:
    """Export ``model``'s step (config sections ``cfg`` go into the manifest) as ``fmt``; for
    ONNX, check and measure it (see the module docstring); ``report`` is filled with the figures.
    ``memory=False`` switches the model's memory off (the same weights) before exporting."""
    from mnnn.deploy.step import manifest, step_graph

    for name, value in (("verify_steps", verify_steps), ("eval_tokens", eval_tokens)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 2:
            raise ValueError(f"{name} must be an int >= 2, got {value!r}")
    if int8 and fmt != "onnx":
        raise ValueError(f"--int8 needs --format onnx (onnxruntime's dynamic quantisation), got --format {fmt}")
    model.eval()
    if hasattr(model, "set_memory_enabled"):
        model.set_memory_enabled(memory)
    graph = step_graph(model, memory=memory)
    man = manifest(graph, cfg, 1)
    man["checkpoint_step"] = checkpoint_step
    out = Path(out)
    if fmt == "torch-export":
        export_step(graph, fmt, out, man)
        yield f"torch.export program ({man['model']}, {len(graph.names)} state tensors) in {out}"
        return
    tokens, source = verification_tokens(graph.vocab_size, max(verify_steps, eval_tokens))
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        staged = export_step(graph, "onnx", Path(tmp) / out.name, man)
        yield f"ONNX graph ({man['model']}, {len(graph.names)} state tensors, {staged.stat().st_size / 2**20:.1f} MiB)"
        with torch.no_grad():  # the reference is the model's own step (the serving path), not the graph
            ref, ppl_torch, ms_torch = measure_step(torch_step(model.step), model.init_state, tokens)
        runner = OnnxStep(staged)
        got, ppl_onnx, ms_onnx = measure_step(runner.step, runner.init_state, tokens)
        err = float(np.abs(got[:verify_steps] - ref[:verify_steps]).max())
        rep = {"format": "onnx", "model": man["model"], "memory": man["memory"], "tokens": source,
               "verify_steps": verify_steps, "max_abs_logit_err": err, "eval_tokens": len(tokens),
               "fp32": {"bytes": staged.stat().st_size, "ms_per_step": ms_onnx, "ppl": ppl_onnx},
               "torch_step": {"ms_per_step": ms_torch, "ppl": ppl_torch}}
        if not err <= MAX_ABS_LOGIT_ERR:
            raise ExportCheckFailed(f"the ONNX step differs from the PyTorch step by {err:.3g} (max abs logit over "
                               f"{verify_steps} steps; allowed {MAX_ABS_LOGIT_ERR}): not written to {out}")
        yield (f"checked with onnxruntime over {verify_steps} steps ({source}): max abs logit difference "
               f"{err:.2e} <= {MAX_ABS_LOGIT_ERR}")
        os.replace(staged, out)
        if int8:
            from onnxruntime.quantization import QuantType, quantize_dynamic

            q_path = out.with_name(out.name.removesuffix(".onnx") + ".int8.onnx")
            q_tmp = Path(tmp) / q_path.name
            with _quiet():
                quantize_dynamic(str(out), str(q_tmp), weight_type=QuantType.QInt8)
            q_runner = OnnxStep(q_tmp)
            q_logits, ppl_q, ms_q = measure_step(q_runner.step, q_runner.init_state, tokens)
            rep["int8"] = {"bytes": q_tmp.stat().st_size, "ms_per_step": ms_q, "ppl": ppl_q,
                           "max_abs_logit_diff": float(np.abs(q_logits - got).max())}
            os.replace(q_tmp, q_path)
            yield (f"int8 (dynamic, weights): {q_path} {rep['int8']['bytes'] / 2**20:.1f} MiB vs "
                   f"{rep['fp32']['bytes'] / 2**20:.1f} MiB, {ms_q:.2f} vs {ms_onnx:.2f} ms/step, "
                   f"ppl {ppl_q:.2f} vs {ppl_onnx:.2f} over {len(tokens)} tokens")
    if report is not None:
        report.update(rep)
    yield f"ONNX step in {out}: {ms_onnx:.2f} ms/step (PyTorch step {ms_torch:.2f}), ppl {ppl_onnx:.2f} over {len(tokens)} tokens"
