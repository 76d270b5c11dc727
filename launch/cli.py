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

from terrabyte.data_pipeline.errors import ConfigError, run_guarded

log = logging.getLogger("terrabyte")

# Subcommands whose flags are parsed by the module itself (the same flags as its per-rank entry).
PASSTHROUGH = {
    "pretrain": ("terrabyte.pretrain.trainer", "main", "pretrain a TerraByte model (see `terrabyte pretrain --help`)"),
}

# (module, help) of modules exposing add_arguments(parser) and run(args) -> int.
BENCHES = {
    "model": ("terrabyte.pretrain.bench_model", "training and generation speed vs megabyte-pytorch"),
    "attention": ("terrabyte.kernels.bench", "sparse attention kernels vs FlexAttention and dense SDPA"),
    "data": ("terrabyte.data_pipeline.bench", "shard builder and loader throughput vs plain zstd"),
    "quality": ("terrabyte.pretrain.bench_quality", "bits per byte at equal steps and equal time vs megabyte-pytorch"),
    "context": ("terrabyte.pretrain.bench_context", "training step time and peak RSS from 8 KiB to 16 MiB contexts vs megabyte-pytorch"),
    "engine": ("terrabyte.pretrain.bench_engine", "the parallel layouts on 2 CPU ranks against one; the model's build memory; MFU on a GPU"),
}


def _add_lazy(sub, name: str, module: str, help: str, setup: str = "add_arguments", handler: str = "run"):
    """A subcommand whose module is imported only when it is used or its help is asked for."""
    parser = sub.add_parser(name, help=help, description=help)
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:  # a missing optional piece must not break the other commands
        parser.set_defaults(func=lambda _args, exc=exc: _missing(name, exc))
        return parser
    getattr(mod, setup)(parser)
    parser.set_defaults(func=getattr(mod, handler))
    return parser


def _eval(args) -> int:
    """``terrabyte eval``: bits per byte of --data (pretrain/evaluate.py), or --tasks through
    lm-evaluation-harness (pretrain/harness.py, which needs the optional `eval` extra)."""
    if not getattr(args, "tasks", None):
        from terrabyte.pretrain.evaluate import run

        return run(args)
    try:
        from terrabyte.pretrain.harness import run_cli
    except ImportError as exc:
        raise ConfigError(f"--tasks needs lm-evaluation-harness ({exc}): pip install 'terrabyte[eval]'") from None
    return run_cli(args)


def _missing(name: str, exc: Exception) -> int:
    raise ConfigError(f"`terrabyte {name}` is unavailable: {exc}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="terrabyte", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    from terrabyte.data_pipeline.cli import add_subcommands as add_shards

    add_shards(sub)
    for name, (_, _, help) in PASSTHROUGH.items():
        sub.add_parser(name, help=help, add_help=False)
    _add_lazy(sub, "generate", "terrabyte.pretrain.inference", "sample bytes from a trained model",
              setup="add_generate_arguments", handler="run_generate")
    _add_lazy(sub, "eval", "terrabyte.pretrain.evaluate",
              "bits-per-byte of a trained model on shards or files, or lm-evaluation-harness tasks (--tasks)")
    sub.choices["eval"].set_defaults(func=_eval)
    _add_lazy(sub, "export", "terrabyte.pretrain.inference", "write a run's model as one safetensors file",
              setup="add_export_arguments", handler="run_export")
    _add_lazy(sub, "launch", "terrabyte.launch.launchers", "print or run the deepspeed/torchrun/mpirun command for N nodes")
    _add_lazy(sub, "slurm", "terrabyte.launch.slurm", "write (and submit) a SLURM job script with preemption and requeue")
    bench = sub.add_parser("bench", help="benchmarks that print a side-by-side table")
    bench_sub = bench.add_subparsers(dest="bench", metavar="WHAT", required=True)
    for name, (module, help) in BENCHES.items():
        _add_lazy(bench_sub, name, module, help)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in PASSTHROUGH:
        module, func, _ = PASSTHROUGH[argv[0]]
        return run_guarded(getattr(importlib.import_module(module), func), argv[1:])
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    return run_guarded(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
