"""The parallel layouts side by side: ``terrabyte bench engine``.

CPU (default): one table per layout of a small config (``tiny`` at its test sizes unless given),
every layout on the same global batch in the same run: one rank under ZeRO-3, then ZeRO-3,
pipeline, tensor (AutoTP) and sequence (Ulysses) parallelism over 2 ranks. Per rank: the step time
(median of the timed optimizer steps, after warm-up steps), bytes per second (the global batch's
bytes over that time) and peak host memory (the process's ``VmHWM``: interpreter, torch, DeepSpeed,
model, optimizer state and the steps; and that peak less the RSS before the build), each also as a
ratio to the one-rank run. Every layout runs
in its own processes (``torchrun``; one rank: a plain process), glibc's mmap threshold pinned so
that RSS follows live memory (``common.MALLOC_ENV``); batches are random bytes, the same on
the ranks of a replica.

Then ``--build`` (default ``1b``): the model built, nothing else, by one rank (the plain, unsharded
build) and by 2 ranks under ZeRO-3 (``engine.build_model``: ``deepspeed.zero.Init``, each
parameter partitioned as its module is built, initialised one module at a time). Peak RSS per
rank against the process's RSS before the build (imports, process group: the fixed overhead) and
against the fp32 model's bytes.

``--gpu``: on one CUDA device, the MFU of slices of ``small`` and ``1b`` (their widths, fewer
global blocks; ``GPU_SLICES``) under ZeRO-3 in bf16, a few steps each: model FLOPs per second
(``dry_run.flops_per_byte``, the trainer's count) over the device's peak (``metrics.PEAK_TFLOPS``).
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from terrabyte.data_pipeline.basics.errors import ConfigError
from terrabyte.data_pipeline.basics.system import describe_machine, free_port

from ..train.config import load_config
from ..engine.ds_seams import held_numel
from .common import GB, MALLOC_ENV, status_bytes

log = logging.getLogger(__name__)

# The default config: tiny at the multi-rank tests' sizes, a global batch of 4 sequences of 2 KiB.
SMALL = ["--model.dim", "128,64", "--model.depth", "4,2", "--model.max_seq_len", "256,8", "--model.dim_head", "32",
         "--model.heads", "4", "--train.micro_batch", "2", "--train.global_batch", "4"]
# name: (ranks, overrides, description)
LAYOUTS = {
    "one": (1, [], "1 rank, ZeRO-3"),
    "zero3": (2, [], "ZeRO-3, 2 ranks (data parallel)"),
    "pipeline": (2, ["--parallel.pipeline_stages", "2", "--parallel.zero_stage", "1"],
                 "pipeline, 2 stages (ZeRO-1)"),
    "tensor": (2, ["--parallel.tensor_parallel", "2"], "tensor parallel (AutoTP), 2 ranks, ZeRO-3"),
    "sequence": (2, ["--parallel.sequence_parallel", "2"], "sequence parallel (Ulysses), 2 ranks, ZeRO-3"),
}
# --gpu: (config, overrides): the widths of the named config, fewer global blocks so a step is short
GPU_SLICES = {
    "small": ("small", ["--train.micro_batch", "8", "--train.global_batch", "8"]),
    "1b slice": ("1b", ["--model.depth", "6,8", "--train.micro_batch", "4", "--train.global_batch", "4"]),
}
# --gpu --device cpu: the same table at CPU scale (the rehearsal of launch/gpu/check.sh)
CPU_SLICES = {"tiny": ("tiny", [*SMALL[:8], "--train.micro_batch", "1", "--train.global_batch", "1"])}
ZERO_STAGES = (3, 0)  # --gpu: each slice with and without ZeRO-3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="tiny", help="config of the layout tables (default: tiny, at SMALL's sizes)")
    parser.add_argument("--layouts", default=",".join(LAYOUTS),
                        help=f"comma-separated layouts (default: {','.join(LAYOUTS)}; 'one' is always run)")
    parser.add_argument("--steps", type=int, default=5, help="timed optimizer steps per layout (default: 5)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps first (default: 2)")
    parser.add_argument("--build", default="1b",
                        help="config whose build memory is measured on 1 and 2 ranks (default: 1b; 'none' skips)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds one launch may take (default: 900)")
    parser.add_argument("--out", default="runs/bench_engine/engine.json", help="JSON of every measurement")
    parser.add_argument("--gpu", action="store_true",
                        help="on a CUDA device: MFU of slices of small and 1b, with and without ZeRO-3")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="--gpu's device; cpu: the same table for a tiny slice (a rehearsal, no MFU)")
    parser.add_argument("--ceiling-tflops", type=float, default=None,
                        help="--gpu: the measured bf16 matmul ceiling of this device; MFU is also given against it")
    parser.add_argument("overrides", nargs=argparse.REMAINDER,
                        help="config overrides after `--` (replace SMALL's), e.g. -- --model.dim 64,32")


# ---------------------------------------------------------------- options


def parse_layouts(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [n for n in names if n not in LAYOUTS]
    if unknown:
        raise ConfigError(f"--layouts: unknown {unknown}; choose from {', '.join(LAYOUTS)}")
    return ["one"] + [n for n in LAYOUTS if n in names and n != "one"]


def _overrides(args) -> list[str]:
    extra = [o for o in args.overrides if o != "--"]
    return extra if extra else (SMALL if args.config == "tiny" else [])


# ---------------------------------------------------------------- the ranks' side


def _setup(config: str, overrides: list[str]):
    from ..engine import engine as eng
    from ..parallel.layout import plan_layout
    from ..train.trainer import setup_logging

    rank, world = eng.init_distributed()
    cfg = load_config(config, overrides)
    setup_logging("warning", rank)
    layout = plan_layout(cfg, world, rank)
    torch.manual_seed(cfg.run.seed)
    return cfg, layout


def train_worker(config: str, overrides: list[str], steps: int, warmup: int, result_dir: Path) -> None:
    """One rank of one layout: build, wrap, warm-up steps, timed steps; writes rank<r>.json."""
    from ..engine import engine as eng

    cfg, layout = _setup(config, overrides)
    before = status_bytes("VmRSS")
    model = eng.build_model(cfg, layout)
    built = status_bytes("VmHWM")
    engine = eng.wrap(model, cfg, layout)
    del model
    # random bytes, seeded by the data-parallel rank: the ranks of one replica get the same batch
    gen = torch.Generator().manual_seed(1000 + layout.dp_rank)
    device = eng.compute_device()

    def batch():
        return [torch.randint(0, 256, (cfg.train.micro_batch, cfg.model.seq_len), generator=gen).to(device)
                for _ in range(layout.accumulation)]

    times = []
    for i in range(warmup + steps):
        micro = batch()
        eng.barrier()
        t0 = time.perf_counter()
        eng.train_batch(engine, micro)
        eng.barrier()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    out = {"rank": layout.rank, "layout": layout.describe(), "step_s": statistics.median(times), "times": times,
           "peak_rss": status_bytes("VmHWM"), "rss_before_build": before, "build_peak_rss": built,
           "bytes_per_step": cfg.train.global_batch * cfg.model.seq_len}
    (result_dir / f"rank{layout.rank}.json").write_text(json.dumps(out))


def build_worker(config: str, overrides: list[str], result_dir: Path) -> None:
    """One rank that only builds the model (``engine.build_model``); writes rank<r>.json."""
    from ..engine import engine as eng

    cfg, layout = _setup(config, overrides)
    before = status_bytes("VmRSS")
    t0 = time.perf_counter()
    model = eng.build_model(cfg, layout)
    seconds = time.perf_counter() - t0
    local = sum(held_numel(p) for p in model.parameters())
    out = {"rank": layout.rank, "world": layout.world, "partitioned": eng.builds_partitioned(cfg, layout),
           "parameters": eng.parameter_count(model), "local_parameters": local, "seconds": seconds,
           "rss_before_build": before, "build_peak_rss": status_bytes("VmHWM")}
    (result_dir / f"rank{layout.rank}.json").write_text(json.dumps(out))


def worker_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m terrabyte.pretrain.bench.engine")
    parser.add_argument("--worker", choices=("train", "build"), required=True)
    parser.add_argument("--config", required=True)
    parser.add_argument("--result-dir", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    args, overrides = parser.parse_known_args(argv)
    if args.worker == "train":
        train_worker(args.config, overrides, args.steps, args.warmup, args.result_dir)
    else:
        build_worker(args.config, overrides, args.result_dir)
    return 0


# ---------------------------------------------------------------- the launcher's side


def launch(ranks: int, worker_args: list[str], timeout: float) -> list[dict]:
    """``ranks`` processes of this module's worker (torchrun for several); their rank<r>.json."""
    with tempfile.TemporaryDirectory(prefix="bench_engine_") as tmp:
        args = ["-m", "terrabyte.pretrain.bench.engine", "--result-dir", tmp, *worker_args]
        if ranks == 1:
            cmd = [sys.executable, *args]
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={ranks}",
                   "--master_addr=127.0.0.1", f"--master_port={free_port()}", *args]
        env = dict(os.environ, **MALLOC_ENV, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(name, None)  # a bench run inside a launched job must not join that job's group
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            raise ConfigError(f"bench engine: `{' '.join(worker_args)}` on {ranks} rank(s) passed --timeout "
                              f"{timeout:g} s") from None
        results = [json.loads(p.read_text()) for p in sorted(Path(tmp).glob("rank*.json"))]
    if proc.returncode != 0 or len(results) != ranks:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise RuntimeError(f"bench engine: {' '.join(cmd)} exited {proc.returncode}:\n{tail}")
    return sorted(results, key=lambda r: r["rank"])


def _ratio(value: float, reference: float) -> str:
    return f"{value / reference:.2f}x" if reference else "-"


def layout_table(name: str, rows: list[dict], one: dict) -> str:
    ranks, _, description = LAYOUTS[name]
    lines = [f"{description}: {rows[0]['layout']}", "",
             "| rank | step (s) | bytes/s | peak RSS (GB) | above start-up (GB) | step vs 1 rank | bytes/s vs 1 rank "
             "| peak RSS vs 1 rank |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        rate, base_rate = r["bytes_per_step"] / r["step_s"], one["bytes_per_step"] / one["step_s"]
        lines.append(f"| {r['rank']} | {r['step_s']:.3f} | {rate:,.0f} | {r['peak_rss'] / GB:.2f} | "
                     f"{(r['peak_rss'] - r['rss_before_build']) / GB:.3f} | {_ratio(r['step_s'], one['step_s'])} | "
                     f"{_ratio(rate, base_rate)} | {_ratio(r['peak_rss'], one['peak_rss'])} |")
    return "\n".join(lines) + "\n"


def build_table(config: str, plain: dict, sharded: list[dict]) -> str:
    fp32 = plain["parameters"] * 4
    lines = [f"build of `{config}` ({plain['parameters']:,} parameters, fp32 {fp32 / GB:.2f} GB), nothing else:", "",
             "| build | rank | seconds | parameters held | RSS before (GB) | peak RSS (GB) | peak - before (GB) | "
             "(peak - before) / fp32 model |", "|---|---|---|---|---|---|---|---|"]
    for label, rows in (("1 rank, unsharded", [plain]), ("ZeRO-3, 2 ranks, zero.Init", sharded)):
        for r in rows:
            grown = r["build_peak_rss"] - r["rss_before_build"]
            lines.append(f"| {label} | {r['rank']} | {r['seconds']:.1f} | {r['local_parameters']:,} | "
                         f"{r['rss_before_build'] / GB:.2f} | {r['build_peak_rss'] / GB:.2f} | {grown / GB:.2f} | "
                         f"{grown / fp32:.0%} |")
    return "\n".join(lines) + "\n"


def run(args) -> int:
    if args.gpu:
        return run_gpu(args)
    if args.steps < 1 or args.warmup < 0:
        raise ConfigError(f"--steps {args.steps} must be >= 1 and --warmup {args.warmup} >= 0")
    layouts = parse_layouts(args.layouts)
    overrides = _overrides(args)
    load_config(args.config, overrides)  # bad input stops here, before any rank starts
    header = {"machine": describe_machine(), "date": datetime.date.today().isoformat(), "config": args.config,
              "overrides": overrides, "steps": args.steps, "warmup": args.warmup}
    results: dict = {"header": header, "layouts": {}}
    sys.stdout.write(f"Machine: {header['machine']}; date: {header['date']}; config {args.config} "
                     f"{' '.join(overrides)}; median of {args.steps} optimizer steps after {args.warmup} warm-up; "
                     f"peak RSS: VmHWM of each rank's process ({os.environ.get('OMP_NUM_THREADS', '1')} torch thread(s) per rank); above start-up: that peak less "
                     f"the RSS before the model is built (interpreter, torch, DeepSpeed, process group)\n\n")
    for name in layouts:
        ranks, extra, _ = LAYOUTS[name]
        log.info("bench engine: %s on %d rank(s)", name, ranks)
        worker = ["--worker", "train", "--config", args.config, "--steps", str(args.steps),
                  "--warmup", str(args.warmup), *overrides, *extra]
        results["layouts"][name] = launch(ranks, worker, args.timeout)
        sys.stdout.write(layout_table(name, results["layouts"][name], results["layouts"]["one"][0]) + "\n")
        sys.stdout.flush()
    if args.build != "none":
        load_config(args.build)
        worker = ["--worker", "build", "--config", args.build]
        log.info("bench engine: building %s on 1 rank, then on 2", args.build)
        plain = launch(1, worker, args.timeout)[0]
        sharded = launch(2, worker, args.timeout)
        results["build"] = {"config": args.build, "plain": plain, "sharded": sharded}
        sys.stdout.write(build_table(args.build, plain, sharded))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


# ---------------------------------------------------------------- --gpu


def gpu_slice(name: str, steps: int, warmup: int, zero: int = 3, slices: dict = GPU_SLICES) -> dict:
    """One slice in this process (a world of one) under ZeRO stage ``zero``: bytes/s, model TFLOP/s
    and MFU (on a CUDA device; ``slices``: CPU_SLICES rehearse the same code on the CPU)."""
    from ..engine import engine as eng
    from ..train.dry_run import flops_per_byte, meta_model
    from ..train.metrics import peak_tflops
    from ..parallel.layout import plan_layout

    config, overrides = slices[name]
    on_gpu = torch.cuda.is_available() and slices is GPU_SLICES
    cfg = load_config(config, [*overrides, "--train.precision", "bf16" if on_gpu else "fp32",
                               "--parallel.zero_stage", str(zero)])
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    layout = plan_layout(cfg, 1, 0)
    torch.manual_seed(cfg.run.seed)
    engine = eng.wrap(eng.build_model(cfg, layout), cfg, layout)
    device = eng.compute_device()
    x = torch.randint(0, 256, (cfg.train.micro_batch, cfg.model.seq_len), device=device)
    times = []
    for i in range(warmup + steps):
        sync()
        t0 = time.perf_counter()
        eng.train_batch(engine, [x])
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    step = statistics.median(times)
    model = meta_model(cfg)
    rate = cfg.train.micro_batch * cfg.model.seq_len / step
    tflops = sum(flops_per_byte(model, cfg)) * rate / 1e12
    peak = peak_tflops(None, True) if on_gpu else None
    out = {"slice": name, "zero_stage": zero, "parameters": sum(p.numel() for p in model.parameters()), "step_s": step,
           "bytes_per_s": rate, "model_tflops": tflops, "peak_tflops": peak, "mfu": tflops / peak if peak else None,
           "micro_batch": cfg.train.micro_batch, "seq_len": cfg.model.seq_len,
           "peak_gb": (torch.cuda.max_memory_allocated() if on_gpu else status_bytes("VmHWM")) / GB}
    del engine
    if on_gpu:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return out


def run_gpu(args) -> int:
    on_gpu = args.device == "cuda"
    if on_gpu and not torch.cuda.is_available():
        raise ConfigError("--gpu needs a CUDA device; torch sees none (--device cpu: the rehearsal)")
    from ..engine import engine as eng
    from ..train.trainer import setup_logging

    eng.init_distributed()
    setup_logging("warning", 0)
    slices = GPU_SLICES if on_gpu else CPU_SLICES
    ceiling = args.ceiling_tflops
    lines = [f"Machine: {describe_machine(args.device)}; date: {datetime.date.today().isoformat()}; one "
             f"{'GPU, bf16' if on_gpu else 'CPU process, fp32 (rehearsal: no MFU)'}, median of {args.steps} steps "
             f"after {args.warmup} warm-up; MFU: model TFLOP/s over the datasheet peak, and over the measured "
             f"bf16 matmul ceiling ({f'{ceiling:.0f} TFLOP/s' if ceiling else 'not measured'})", "",
             "| slice | ZeRO | parameters | micro-batch x bytes | step (s) | bytes/s | model TFLOP/s | MFU (datasheet) "
             "| MFU (measured ceiling) | peak memory (GB) |", "|---|---|---|---|---|---|---|---|---|---|"]
    sys.stdout.write("\n".join(lines) + "\n")
    rows = []
    for name in slices:
        for zero in ZERO_STAGES:
            try:
                r = gpu_slice(name, args.steps, args.warmup, zero, slices)
            except Exception as exc:  # noqa: BLE001 - one slice's failure (out of memory) is a row
                log.warning("bench engine --gpu: %s ZeRO-%d failed: %s", name, zero, exc)
                sys.stdout.write(f"| {name} | {zero} | failed: {type(exc).__name__}: {str(exc).splitlines()[0][:80] if str(exc) else ''} |\n")
                continue
            rows.append(r)
            mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
            vs_ceiling = f"{r['model_tflops'] / ceiling:.1%}" if ceiling else "-"
            sys.stdout.write(f"| {name} | {zero} | {r['parameters']:,} | {r['micro_batch']} x {r['seq_len']} | "
                             f"{r['step_s']:.3f} | {r['bytes_per_s']:,.0f} | {r['model_tflops']:.3g} | {mfu} | "
                             f"{vs_ceiling} | {r['peak_gb']:.2f} |\n")
            sys.stdout.flush()
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps({"gpu": rows, "ceiling_tflops": ceiling}, indent=1))
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(worker_main())
