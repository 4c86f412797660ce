"""The ``mnnn`` command: a thin layer over the library."""

from __future__ import annotations

import argparse
import sys


def _cmd_demo(args: argparse.Namespace) -> int:
    from mnnn.demo import run_demo

    run_demo(args.out, epochs=args.epochs, seed=args.seed, verbose=0 if args.quiet else 1)
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from mnnn.bench.runner import run_suites

    return run_suites(args.suite, args.out, preset=args.preset, progress=not args.quiet)


def _load_data(split: str):
    from mnnn.data.wikitext import load_split

    return load_split(split)


_STAT_KEYS = ("memory_hit_rate", "memory_hit_rate_chance", "retrieval_accuracy", "retrieval_accuracy_chance",
              "memory_gain_nats", "mean_lambda", "spike_rate", "blocks", "output_memory", "cmr")


def _summary(model, ev: dict) -> dict:
    """What an evaluation pass measured (statistics were reset at its start)."""
    out = {"valid_ppl": ev["ppl"]}
    if "ppl_no_memory" in ev:
        out.update(valid_ppl_no_memory=ev["ppl_no_memory"], ppl_ratio=ev["ppl"] / ev["ppl_no_memory"])
    if hasattr(model, "get_stats"):
        stats = model.get_stats()
        out.update({k: stats[k] for k in _STAT_KEYS if k in stats})
        if "output_memory" in stats:
            out.update(memory_theta=stats["output_memory"]["theta"], memory_top_k=stats["output_memory"]["top_k"])
    return out


def _print_summary(summary: dict, tokens: int) -> None:
    if "valid_ppl_no_memory" in summary:
        print(f"valid perplexity {summary['valid_ppl']:.2f} with memory, {summary['valid_ppl_no_memory']:.2f} "
              f"without (same pass; ratio {summary['ppl_ratio']:.3f}) over {tokens:,} tokens")
        om = summary.get("output_memory", {})
        print(f"memory hit rate (true next token in the top-{om.get('top_k')}) {summary['memory_hit_rate']:.3f} "
              f"(chance {summary['memory_hit_rate_chance']:.3f}); retrieval accuracy "
              f"{summary['retrieval_accuracy']:.3f} (chance {summary['retrieval_accuracy_chance']:.3f}); "
              f"mean lambda {summary['mean_lambda']:.3f}, theta {om.get('theta', float('nan')):.2f}")
    else:
        print(f"valid perplexity {summary['valid_ppl']:.2f} over {tokens:,} tokens (exp of total NLL / tokens)")
    if "spike_rate" in summary:
        print(f"spike rate {summary['spike_rate']:.3f}")
    cmr = summary.get("cmr")
    if cmr and cmr.get("hit_rate") is not None:
        lam = cmr.get("output_lambda")
        print(f"CMR memory: hit rate (a retrieved entry's next token is the true one) {cmr['hit_rate']:.3f} "
              f"(chance {cmr['hit_rate_chance']:.3f}); positions that read an entry {cmr['coverage']:.3f}"
              + (f"; mean lambda {lam:.3f}, theta {cmr['output_theta']:.2f}" if lam is not None else "")
              + f"; retrieval {cmr['retrieval_ms_per_segment']:.1f} ms/segment")


def run_training(cfg: dict, out_dir=None, resume: bool = True, quiet: bool = False, sample: bool = True) -> dict:
    """Train the LM a config describes, evaluate it on valid, write eval.json; return the summary."""
    import json
    from pathlib import Path

    from mnnn.data.wikitext import load_tokenizer
    from mnnn.lm import build_model, predict
    from mnnn.training.lm import evaluate_lm, seed_everything, train_lm

    tr = dict(cfg["training"])
    out_dir = Path(out_dir or tr.get("out_dir") or "runs/train")
    tr.pop("out_dir", None)
    prompt = tr.pop("sample_prompt", "the history of the city")
    eval_bs = tr.pop("eval_batch_size", 4)
    eval_tokens = tr.pop("eval_tokens", None)  # None: the whole valid split
    seed_everything(int(tr.get("seed", 0)))  # the initialisation too: same config, same run
    model = build_model(cfg)  # a bad model or memory key fails here, before any data is read
    train_ids, valid_ids = _load_data("train"), _load_data("valid")
    print(f"{cfg['model'].get('name', 's3cmn')}: {sum(p.numel() for p in model.parameters()):,} parameters; "
          f"training on {len(train_ids):,} WikiText-2 tokens -> {out_dir}")
    hist = train_lm(model, train_ids, valid_ids=valid_ids[:20000] if tr.get("eval_every") else None,
                    out_dir=out_dir, resume=resume, config=cfg, progress=not quiet, **tr)
    print(f"trained {hist['steps']} steps, {hist['tokens']:,} tokens at {hist['tokens'] / hist['seconds']:.0f} tokens/s")
    import time

    t0 = time.perf_counter()
    ev = evaluate_lm(model, valid_ids[:eval_tokens], batch_size=eval_bs, seq_len=tr.get("seq_len", 128),
                     progress=not quiet)
    eval_s = time.perf_counter() - t0
    summary = _summary(model, ev)
    summary.update(steps=hist["steps"], train_tokens_per_s=hist["tokens"] / hist["seconds"], valid_tokens=ev["tokens"],
                   eval_tokens_per_s=ev["tokens"] / eval_s)
    (out_dir / "eval.json").write_text(json.dumps(summary, indent=2))
    _print_summary(summary, ev["tokens"])
    if sample:
        text = predict(model, load_tokenizer(), prompt, max_new_tokens=30, seed=0)
        print(f"sample: {prompt} ... {text}")
    print(f"checkpoint, metrics.jsonl, curves.png and eval.json in {out_dir}")
    return summary


_MODEL_HELP = ("the embedded config of a model, by name (as --config NAME): s3cmn (the default), gpt2 (a GPT-2 "
               "baseline), cmr (CMR around a trained gpt2 checkpoint, base frozen), s3cmn_gpu (S3CMN at GPU sizes)")


def _config_arg(args: argparse.Namespace) -> str | None:
    """``--config PATH`` or ``--model NAME`` (an embedded config by name), not both."""
    from mnnn.lm import embedded_configs

    if args.model is None:
        return args.config
    if args.config is not None:
        raise ValueError(f"--model {args.model} and --config {args.config} both pick a config; give one")
    if args.model not in embedded_configs():
        raise ValueError(f"--model must name an embedded config, one of {embedded_configs()}, got {args.model!r}")
    return args.model


def _cmd_train(args: argparse.Namespace) -> int:
    from mnnn.lm import load_config

    run_training(load_config(_config_arg(args), args.set), args.out, resume=not args.no_resume, quiet=args.quiet)
    return 0


def _cmd_tune(args: argparse.Namespace) -> int:
    """Grid search: every combination of the grid's values, one training run each, one table."""
    import itertools
    import json
    from pathlib import Path

    import yaml

    from mnnn.bench.common import markdown_table
    from mnnn.lm import load_config

    grid = yaml.safe_load(Path(args.grid).read_text()) or {}
    if not isinstance(grid, dict) or not grid or not all(isinstance(v, list) and v for v in grid.values()):
        raise ValueError(f"{args.grid} must map section.key to a non-empty list of values")
    keys = list(grid)
    rows = []
    out = Path(args.out)
    for i, values in enumerate(itertools.product(*(grid[k] for k in keys))):
        overrides = list(args.set) + [f"{k}={json.dumps(v)}" for k, v in zip(keys, values)]
        cfg = load_config(_config_arg(args), overrides)
        summary = run_training(cfg, out / f"run{i:03d}", resume=True, quiet=args.quiet, sample=False)
        row = {"run": i, **dict(zip(keys, values)), "valid_ppl": summary["valid_ppl"],
               "tokens_per_s": summary["train_tokens_per_s"]}
        row.update({k: summary[k] for k in ("memory_hit_rate", "spike_rate") if k in summary})
        rows.append(row)
    columns = ["run", *keys, "valid_ppl", "tokens_per_s"] + [c for c in ("memory_hit_rate", "spike_rate") if c in rows[0]]
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    (out / "results.md").write_text(markdown_table(rows, columns))
    best = min(rows, key=lambda r: r["valid_ppl"])
    print(markdown_table(rows, columns))
    print(f"best: run {best['run']} (valid ppl {best['valid_ppl']:.2f}); table in {out / 'results.md'}")
    return 0


def _cmd_index(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mnnn.lm import load_checkpoint_model
    from mnnn.memory.datastore import build_datastore

    _check_flags(("--max-tokens", args.max_tokens, 2, True), ("--batch-size", args.batch_size, 1, False))
    model, meta = load_checkpoint_model(args.checkpoint)
    ids = _load_data(args.split)[: args.max_tokens]
    store = build_datastore(model, ids, batch_size=args.batch_size, seq_len=meta["config"].get("seq_len", 128),
                            progress=not args.quiet,
                            meta={"split": args.split, "checkpoint": str(args.checkpoint), "step": meta["step"]})
    out = Path(args.out) if args.out else Path(args.checkpoint).with_name("datastore.safetensors")
    store.save(out)
    print(f"datastore: {store.size:,} entries x {store.dim} features from the {args.split} split "
          f"({out.stat().st_size / 2**20:.1f} MiB) -> {out}")
    return 0


def _attach_datastore(model, args: argparse.Namespace, split: str | None) -> None:
    """--datastore and its options (eval, generate): load, check against the model, attach."""
    if args.datastore is None:
        for flag, value, default in (("--datastore-lambda", args.datastore_lambda, 0.25),
                                     ("--datastore-k", args.datastore_k, 32), ("--faiss", args.faiss, False)):
            if value != default:
                raise ValueError(f"{flag} applies with --datastore PATH, which was not given")
        return
    from mnnn.memory.datastore import Datastore

    _check_flags(("--datastore-k", args.datastore_k, 1, False))
    if not 0 < args.datastore_lambda < 1:
        raise ValueError(f"--datastore-lambda must be in (0, 1), got {args.datastore_lambda}")
    store = Datastore.load(args.datastore)
    model.attach_datastore(store, lam=args.datastore_lambda, top_k=args.datastore_k,
                           search="faiss" if args.faiss else "exact", split=split)


def _add_datastore_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--datastore", default=None, metavar="PATH",
                        help="also read a datastore written by `mnnn index` (kNN-LM): p = (1 - lambda) p_cache + "
                        "lambda p_datastore")
    parser.add_argument("--datastore-lambda", type=float, default=0.25,
                        help="the datastore's fixed mixture weight, in (0, 1) (default: 0.25, kNN-LM's)")
    parser.add_argument("--datastore-k", type=int, default=32, help="datastore entries read per position (default: 32)")
    parser.add_argument("--faiss", action="store_true",
                        help="search the datastore through a faiss inverted-file index (approximate, for large "
                        "stores; needs faiss-cpu) instead of exactly")


def _cmd_eval(args: argparse.Namespace) -> int:
    import json

    from mnnn.lm import load_checkpoint_model
    from mnnn.training.lm import evaluate_lm

    _check_flags(("--max-tokens", args.max_tokens, 2, True), ("--batch-size", args.batch_size, 1, False))
    model, meta = load_checkpoint_model(args.checkpoint)
    _attach_datastore(model, args, args.split)
    if args.no_memory:
        if not hasattr(model, "set_memory_enabled"):
            raise ValueError("--no-memory: this model has no memory to switch off")
        model.set_memory_enabled(False)
    ids = _load_data(args.split)[: args.max_tokens]
    ev = evaluate_lm(model, ids, batch_size=args.batch_size, seq_len=meta["config"].get("seq_len", 128),
                     progress=True)
    summary = _summary(model, ev)
    summary.update(split=args.split, tokens=ev["tokens"], step=meta["step"])
    ds = summary.get("output_memory", {}).get("datastore")
    if ds is not None:  # the same pass read four ways: none, cache, datastore, both
        import math

        summary["datastore"] = {**{k: v for k, v in ds.items() if not k.startswith("nll")},
                                **{f"ppl_{k[4:]}": math.exp(v) for k, v in ds.items()
                                   if k.startswith("nll") and isinstance(v, float)}}
    print(json.dumps({k: v for k, v in summary.items() if k not in ("blocks", "output_memory")}, indent=2))
    return 0


def _check_flags(*specs: tuple) -> None:
    """``(flag, value, lowest, may be None[, highest])`` each: a ValueError naming the flag and the
    value, before anything is loaded."""
    for flag, value, low, nullable, *high in specs:
        if value is None and nullable:
            continue
        if value is None or value < low or (high and value > high[0]):
            bound = f"in [{low}, {high[0]}]" if high else f">= {low}"
            raise ValueError(f"{flag} must be an integer {bound}, got {value}")


def _cmd_generate(args: argparse.Namespace) -> int:
    from mnnn.data.wikitext import load_tokenizer
    from mnnn.lm import load_checkpoint_model, predict

    _check_flags(("--max-new-tokens", args.max_new_tokens, 1, False), ("--top-k", args.top_k, 1, True))
    if not args.temperature >= 0:
        raise ValueError(f"--temperature must be >= 0 (below 1e-5: greedy), got {args.temperature}")
    model, _ = load_checkpoint_model(args.checkpoint)
    _attach_datastore(model, args, None)
    text = predict(model, load_tokenizer(), args.text, max_new_tokens=args.max_new_tokens,
                   temperature=args.temperature, top_k=args.top_k, seed=args.seed)
    print(f"{args.text} {text}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from mnnn.deploy.export import export_checkpoint

    options = {}
    if args.format != "hf":
        options = dict(memory=not args.no_memory, int8=args.int8, verify_steps=args.verify_steps,
                       eval_tokens=args.eval_tokens)
    elif args.int8 or args.no_memory:
        raise ValueError("--int8 and --no-memory apply to --format onnx|torch-export, got --format hf")
    for line in export_checkpoint(args.checkpoint, args.format, args.out, **options):
        print(line)
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from mnnn.deploy.server import serve

    # checked before the checkpoint is loaded, so a typo costs no model load
    _check_flags(("--port", args.port, 0, False, 65535), ("--max-sessions", args.max_sessions, 1, False),
                 ("--max-new-tokens", args.max_new_tokens, 1, False))
    serve(args.checkpoint, host=args.host, port=args.port, max_sessions=args.max_sessions,
          max_new_tokens=args.max_new_tokens)
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    import os

    import torch

    import mnnn

    print(f"mnnn {mnnn.__version__}  torch {torch.__version__}  threads {torch.get_num_threads()}")
    print(f"CUDA available: {torch.cuda.is_available()}")
    print(f"MNNN_DATA_DIR: {os.environ.get('MNNN_DATA_DIR', '(not set)')}")
    from mnnn.estimators import MODELS

    print("estimators: " + ", ".join(sorted(MODELS)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mnnn", description="Memory-Native Neural Networks: train, evaluate and benchmark.")
    parser.add_argument("--debug", action="store_true",
                        help="show the Python traceback of an error instead of the one-line message")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="train AMRC, PMRC and AMN on the noisy sine task (the main job)",
                          description="Train the three estimators on the noisy sine task, print test "
                          "R^2 and diagnostics, save models (safetensors) and a predictions plot.")
    demo.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    demo.add_argument("--epochs", type=int, default=100, help="training epochs per model (default: 100)")
    demo.add_argument("--seed", type=int, default=0, help="data and model seed (default: 0)")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(func=_cmd_demo)

    bench = sub.add_parser("bench", help="run a benchmark suite",
                           description="Verify correctness, then time models against baselines in the "
                           "same process; writes <suite>.json, <suite>.md and <suite>.png.")
    from mnnn.bench import SUITES

    bench.add_argument("suite", help=f"suite name ({', '.join(SUITES)}) or 'all' (every suite in that order; "
                       "lm and cmr-wikitext need MNNN_DATA_DIR)")
    bench.add_argument("--out", default="runs/bench", help="output folder (default: runs/bench)")
    bench.add_argument("--preset", default="default",
                       help="'default' sizes for this CPU, 'toy' (seconds, used by the tests), or 'gpu' (the full recipe on a "
                       "CUDA machine; suites: lm, mqar, copy, selective-copy, streaming); mqar also has 'steps' (every "
                       "model the same optimizer steps, best of a learning-rate sweep) and 'steps-small' (its first "
                       "cell at d_model 128); an unknown preset is refused with the suite's list")
    bench.add_argument("--quiet", action="store_true", help="no progress bar")
    bench.set_defaults(func=_cmd_bench)

    train = sub.add_parser("train", help="train a language model on WikiText-2 (default: the S3CMN config)",
                           description="Train an LM from a YAML config (sections model, memory, training), "
                           "checkpointing atomically and resuming when a checkpoint exists; then evaluate on "
                           "the valid split, print perplexity, memory and spike statistics, and a sample.")
    train.add_argument("--config", default=None, help="YAML config (default: the embedded configs/s3cmn.yaml)")
    train.add_argument("--model", default=None, metavar="NAME", help=_MODEL_HELP)
    train.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override a config value, e.g. --set training.max_steps=200 (repeatable)")
    train.add_argument("--out", default=None, help="output folder (default: training.out_dir of the config)")
    train.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint in the output folder")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.set_defaults(func=_cmd_train)

    tune = sub.add_parser("tune", help="grid search over config values, one row per run",
                          description="Train once per combination of a YAML grid ({section.key: [values]}), "
                          "evaluate each on valid, and write results.md / results.json.")
    tune.add_argument("grid", help="YAML file mapping section.key to a list of values")
    tune.add_argument("--config", default=None, help="base config (default: the embedded configs/s3cmn.yaml)")
    tune.add_argument("--model", default=None, metavar="NAME", help=_MODEL_HELP)
    tune.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                      help="override applied to every run (repeatable)")
    tune.add_argument("--out", default="runs/tune", help="output folder (default: runs/tune)")
    tune.add_argument("--quiet", action="store_true", help="no progress bars")
    tune.set_defaults(func=_cmd_tune)

    ev = sub.add_parser("eval", help="perplexity and statistics of a checkpoint",
                        description="Evaluate a training checkpoint on a WikiText-2 split: perplexity = exp(total "
                        "NLL / predicted tokens) over the whole split, memory hit rate, retrieval accuracy, spikes.")
    ev.add_argument("checkpoint", help="path to checkpoint.safetensors")
    ev.add_argument("--split", choices=["valid", "test", "train"], default="valid", help="split (default: valid)")
    ev.add_argument("--batch-size", type=int, default=4, help="parallel streams (default: 4)")
    ev.add_argument("--max-tokens", type=int, default=None,
                    help="score only the first N tokens of the split (default: the whole split)")
    ev.add_argument("--no-memory", action="store_true",
                    help="switch every memory read and write off (the same checkpoint, its no-memory ablation)")
    _add_datastore_flags(ev)
    ev.set_defaults(func=_cmd_eval)

    idx = sub.add_parser("index", help="build a datastore (kNN-LM) for a checkpoint's output memory",
                         description="Run a checkpoint over a WikiText-2 split (train by default) and store one "
                         "entry per position: the unit feature vector its output memory queries with, and the token "
                         "that followed. `mnnn eval/generate --datastore PATH` then read it beside the stream's own "
                         "cache. The file records the vocabulary, feature size, split and a fingerprint of the "
                         "weights; another model, or an evaluation on the same split, is refused.")
    idx.add_argument("checkpoint", help="path to checkpoint.safetensors (a model with an output memory)")
    idx.add_argument("--split", choices=["train", "valid", "test"], default="train",
                     help="the split to store (default: train)")
    idx.add_argument("--max-tokens", type=int, default=None,
                     help="store only the first N tokens of the split (default: the whole split; 2.1M train "
                     "tokens x 128 features take 0.5 GiB)")
    idx.add_argument("--batch-size", type=int, default=16, help="parallel streams (default: 16)")
    idx.add_argument("--out", default=None,
                     help="output file (default: datastore.safetensors beside the checkpoint)")
    idx.add_argument("--quiet", action="store_true", help="no progress bar")
    idx.set_defaults(func=_cmd_index)

    gen = sub.add_parser("generate", help="continue a text with a checkpoint",
                         description="Tokenize TEXT (BERT uncased), continue it by sampling, print the result.")
    gen.add_argument("checkpoint", help="path to checkpoint.safetensors")
    gen.add_argument("text", help="the prompt")
    gen.add_argument("--max-new-tokens", type=int, default=50, help="tokens to generate (default: 50)")
    gen.add_argument("--temperature", type=float, default=0.8,
                     help="sampling temperature >= 0; below 1e-5 decoding is greedy (default: 0.8)")
    gen.add_argument("--top-k", type=int, default=50, help="sample among the k most likely tokens (default: 50)")
    gen.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    _add_datastore_flags(gen)
    gen.set_defaults(func=_cmd_generate)

    exp = sub.add_parser("export", help="export a checkpoint (Hugging Face directory, ONNX or torch.export step)",
                         description="Export a training checkpoint. --format hf writes a Hugging Face directory "
                         "(model.safetensors, config.json, generation_config.json and the BERT-uncased tokenizer "
                         "from MNNN_DATA_DIR) that AutoModelForCausalLM.from_pretrained and "
                         "pipeline('text-generation') load offline after `import mnnn`. --format onnx and "
                         "--format torch-export write the recurrent step (token, state...) -> (logits, state...) "
                         "with fixed-size state tensors (S3CMN with the output memory or none, the Text-Native SSMN and "
                         "the LSTM; the manifest with names, shapes and config is inside the file). The ONNX graph is "
                         "checked with onnxruntime against PyTorch before it is kept (needs mnnn[deploy]).")
    exp.add_argument("checkpoint", help="path to checkpoint.safetensors (from mnnn train)")
    exp.add_argument("--format", choices=["hf", "onnx", "torch-export"], default="hf",
                     help="hf: Hugging Face directory; onnx: ONNX step graph (.onnx); torch-export: "
                     "torch.export program of the step (.pt2) (default: hf)")
    exp.add_argument("--no-memory", action="store_true",
                     help="step formats: export the memory-off step (same weights; the ring is carried unchanged)")
    exp.add_argument("--int8", action="store_true",
                     help="onnx: also write a dynamically quantised int8 copy (NAME.int8.onnx) and print its size, "
                     "ms/step and perplexity beside the float one")
    exp.add_argument("--verify-steps", type=int, default=256,
                     help="onnx: steps over which onnxruntime must match PyTorch within 1e-4 (default: 256)")
    exp.add_argument("--eval-tokens", type=int, default=1024,
                     help="onnx: WikiText-2 valid tokens (random ids without data) for the perplexity and "
                     "ms/step figures (default: 1024)")
    exp.add_argument("out", help="output: a directory for hf (created; files in it are replaced), a file for "
                     "onnx/torch-export (replaced atomically)")
    exp.set_defaults(func=_cmd_export)

    srv = sub.add_parser("serve", help="serve a checkpoint over HTTP (sessions keep the model's memory)",
                         description="Serve a training checkpoint with FastAPI + uvicorn (needs mnnn[serve]). "
                         "POST /v1/generate {prompt | prompt_ids, max_new_tokens, temperature, top_k, top_p, seed, "
                         "session_id, stream}; POST /v1/sessions creates a session whose recurrent state and episodic "
                         "memory are kept between requests (a follow-up costs only its own tokens), DELETE "
                         "/v1/sessions/ID drops it; GET /metrics (Prometheus) and /healthz. Text prompts need the "
                         "tokenizer from MNNN_DATA_DIR; without it the server takes prompt_ids only. Ctrl-C or "
                         "SIGTERM stops it after the requests in flight.")
    srv.add_argument("checkpoint", help="path to checkpoint.safetensors (from mnnn train)")
    srv.add_argument("--host", default="127.0.0.1",
                     help="address to listen on (default: 127.0.0.1, this machine only; 0.0.0.0 exposes it)")
    srv.add_argument("--port", type=int, default=8000, help="TCP port (default: 8000)")
    srv.add_argument("--max-sessions", type=int, default=64,
                     help="sessions kept; past it the least recently used is dropped (default: 64)")
    srv.add_argument("--max-new-tokens", type=int, default=256,
                     help="the most tokens one request may ask for (default: 256)")
    srv.set_defaults(func=_cmd_serve)

    info = sub.add_parser("info", help="versions, device and data location")
    info.set_defaults(func=_cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    from mnnn.data.wikitext import DataNotFoundError
    from mnnn.deploy.export import ExportCheckFailed

    args = build_parser().parse_args(argv)
    if args.debug:
        return args.func(args)
    try:
        return args.func(args)
    except (DataNotFoundError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError,
            FileExistsError, ValueError, KeyError, ImportError) as err:
        # user errors (missing data, bad config, corrupt checkpoint, an output path under a file):
        # one clear line, exit code 2
        if isinstance(err, OSError) and err.strerror:  # args[0] is the errno: say what and where
            msg = f"{err.strerror}: {err.filename}" if err.filename else err.strerror
        else:
            msg = err.args[0] if err.args else str(err)
        print(f"error: {msg}", file=sys.stderr)
        return 2
    except ExportCheckFailed as err:  # an export that does not compute what the model computes
        print(f"error: {err}", file=sys.stderr)
        return 1
    except FloatingPointError as err:  # a diverged run: it stopped and kept its last good checkpoint
        print(f"error: {err}", file=sys.stderr)
        return 1
    except Exception as err:  # a bug, not a user error: one line, the traceback with --debug
        print(f"error: unexpected {type(err).__name__}: {' '.join(str(err).split())}; "
              "run again with `mnnn --debug ...` for the traceback", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
