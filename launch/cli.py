"""The ``terrabyte`` command: one entry point, one subcommand per job.

    terrabyte shards build|stats|verify   corpus -> zstd webdataset shards
    terrabyte pretrain                    train (one rank; launchers start one per rank)
    terrabyte generate                    sample bytes from a trained model (one prompt, or a batch)
    terrabyte eval                        bits per byte of shards or files, or lm-evaluation-harness tasks
    terrabyte export                      consolidate a run into one safetensors file
    terrabyte bench model|attention|data|quality|context|engine   benchmarks, side by side with the baselines

Bad input stops with one line, ``terrabyte: error: ...``, and exit code 2: no traceback.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from terrabyte.data_pipeline.basics.errors import ConfigError, run_guarded

log = logging.getLogger("terrabyte")

# Subcommands whose flags are parsed by the module itself (the same flags as its per-rank entry).
PASSTHROUGH = {
    "pretrain": ("terrabyte.pretrain.train.trainer", "main",
                 "pretrain a TerraByte model (see `terrabyte pretrain --help`)"),
}

# name: (module, function adding its arguments to a parser, handler taking the parsed args -> exit code, help).
# A subcommand's module is imported only when argv selects it: `terrabyte --help` imports none of them.
COMMANDS = {
    "generate": ("terrabyte.pretrain.eval.generate_cli", "add_generate_arguments", "run_generate",
                 "sample bytes from a trained model"),
    "eval": ("terrabyte.pretrain.eval.bits_per_byte", "add_arguments", "run",
             "bits-per-byte of a trained model on shards or files, or lm-evaluation-harness tasks (--tasks)"),
    "export": ("terrabyte.pretrain.eval.generate_cli", "add_export_arguments", "run_export",
               "write a run's model as one safetensors file"),
    "launch": ("terrabyte.launch.launchers", "add_arguments", "run",
               "print or run the deepspeed/torchrun/mpirun command for N nodes"),
    "slurm": ("terrabyte.launch.slurm", "add_arguments", "run",
              "write (and submit) a SLURM job script with preemption and requeue"),
}

# `terrabyte bench WHAT`: (module, help) of modules exposing add_arguments(parser) and run(args) -> int.
BENCHES = {
    "model": ("terrabyte.pretrain.bench.model", "training and generation speed vs megabyte-pytorch"),
    "attention": ("terrabyte.kernels.tools.bench", "sparse attention kernels vs FlexAttention and dense SDPA"),
    "data": ("terrabyte.data_pipeline.bench", "shard builder and loader throughput vs plain zstd"),
    "quality": ("terrabyte.pretrain.bench.quality", "bits per byte at equal steps and equal time vs megabyte-pytorch"),
    "context": ("terrabyte.pretrain.bench.context", "training step time and peak RSS from 8 KiB to 16 MiB contexts vs megabyte-pytorch"),
    "engine": ("terrabyte.pretrain.bench.engine", "the parallel layouts on 2 CPU ranks against one; the model's build memory; MFU on a GPU"),
}


def _add_lazy(sub, name: str, module: str, help: str, selected: bool, setup: str = "add_arguments",
              handler: str = "run"):
    """A subcommand listed with its help; its module is imported, and its options added, only when
    ``selected`` (argv names it)."""
    parser = sub.add_parser(name, help=help, description=help)
    if not selected:
        return parser
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:  # a missing optional piece must not break the other commands
        parser.set_defaults(func=lambda _args, exc=exc: _missing(name, exc))
        return parser
    getattr(mod, setup)(parser)
    parser.set_defaults(func=getattr(mod, handler))
    return parser


def _words(argv: list[str], count: int) -> list[str]:
    """The first ``count`` words of argv that are not options (the subcommand and its choice)."""
    return [a for a in argv if not a.startswith("-")][:count]


def _eval(args) -> int:
    """``terrabyte eval``: bits per byte of --data (pretrain/eval/bits_per_byte.py), or --tasks through
    lm-evaluation-harness (pretrain/eval/harness.py, which needs the optional `eval` extra)."""
    if not getattr(args, "tasks", None):
        from terrabyte.pretrain.eval.bits_per_byte import run

        return run(args)
    try:
        from terrabyte.pretrain.eval.harness import run_cli
    except ImportError as exc:
        raise ConfigError(f"--tasks needs lm-evaluation-harness ({exc}): pip install 'terrabyte[eval]'") from None
    return run_cli(args)


def _missing(name: str, exc: Exception) -> int:
    raise ConfigError(f"`terrabyte {name}` is unavailable: {exc}")


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The whole command line, every subcommand listed with its help; only the one ``argv`` selects
    (``generate``, ``bench model``, ...) has its module imported and its options added."""
    words = _words(argv or [], 2)
    command, what = (words + [None, None])[:2]
    parser = argparse.ArgumentParser(prog="terrabyte", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    from terrabyte.data_pipeline.cli import add_subcommands as add_shards  # argparse only: its work is lazy

    add_shards(sub)
    for name, (_, _, help) in PASSTHROUGH.items():
        sub.add_parser(name, help=help, add_help=False)
    for name, (module, setup, handler, help) in COMMANDS.items():
        _add_lazy(sub, name, module, help, command == name, setup=setup, handler=handler)
    if command == "eval":
        sub.choices["eval"].set_defaults(func=_eval)
    bench = sub.add_parser("bench", help="benchmarks that print a side-by-side table")
    bench_sub = bench.add_subparsers(dest="bench", metavar="WHAT", required=True)
    for name, (module, help) in BENCHES.items():
        _add_lazy(bench_sub, name, module, help, command == "bench" and what == name)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in PASSTHROUGH:
        module, func, _ = PASSTHROUGH[argv[0]]
        return run_guarded(getattr(importlib.import_module(module), func), argv[1:])
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    return run_guarded(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
