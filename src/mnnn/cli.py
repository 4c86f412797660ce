"""The ``mnnn`` command: a thin layer over the library."""

from __future__ import annotations

import argparse
import sys


def _cmd_demo(args: argparse.Namespace) -> int:
    from mnnn.demo import run_demo

    run_demo(args.out, epochs=args.epochs, seed=args.seed, verbose=0 if args.quiet else 1)
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from mnnn.bench import SUITES, get_suite

    names = sorted(SUITES) if args.suite == "all" else [args.suite]
    for name in names:
        try:
            run = get_suite(name, args.preset)
        except (KeyError, ValueError) as err:
            print(f"error: {err.args[0]}", file=sys.stderr)
            return 2
        payload = run(args.out, preset=args.preset, progress=not args.quiet)
        print(f"{name}: results written to {args.out} ({len(payload['results'])} rows)")
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
    bench.add_argument("suite", help="suite name ('estimators', 'memory', 'ssmn', 'lm') or 'all'")
    bench.add_argument("--out", default="runs/bench", help="output folder (default: runs/bench)")
    bench.add_argument("--preset", choices=["default", "toy", "gpu"], default="default",
                       help="'default' sizes for this CPU, 'toy' (seconds, used by the tests), or 'gpu' (lm suite only: the full recipe)")
    bench.add_argument("--quiet", action="store_true", help="no progress bar")
    bench.set_defaults(func=_cmd_bench)

    info = sub.add_parser("info", help="versions, device and data location")
    info.set_defaults(func=_cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
