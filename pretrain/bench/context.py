"""How training cost grows with the context: ``terrabyte bench context``.

One table: for each context (8 KiB to 16 MiB by default, CPU) one training step of batch 1 of
- ``tb_sparse``: TerraByte, three stages, sparse global stage (configs/long_cpu.yaml with
  ``max_seq_len[0] = context / 64``), lower stages in chunks under recomputation;
- ``tb_dense``: TerraByte, two stages (the first and last dims of that config, patches of 8), dense
  global attention, chunked lower stage: what the sparse stage and the third stage buy;
- ``megabyte``: MEGABYTE-pytorch 0.3.6 (optional peer) with the same two-stage shape.

Method:
- A step is forward + backward + AdamW step. Every (model, context) runs in a fresh spawned
  process (``common.spawn_child``: glibc's mmap threshold pinned), after a warm-up step on two
  global patches (imports, AdamW state, library workspaces). The time is that of one step, the
  fastest of ``SMALL_REPEATS`` up to ``SMALL_CONTEXT`` (noise from other processes only adds time);
  expect +-20% on a shared machine all the same.
- Peak RSS is the child's own high-water mark (``VmHWM``), the whole process: interpreter, torch,
  weights, optimizer state and the step. Not ``ru_maxrss``, which Linux carries over from the
  parent across fork + exec.
- The child runs under an address-space limit (``--memory-limit``, default the memory available at
  start) so a model that outgrows the machine fails its allocation ("out of memory") instead of
  waking the kernel's OOM killer on a shared machine.
- A model stops at the first context where a step passes ``--time-cap`` seconds
  (the child is killed there), runs out of memory or crashes; its larger contexts are skipped.
- The exponent is the least-squares slope of log(seconds) against log(context) over the contexts a
  model completed: about 1 for linear cost, 2 for quadratic. Small contexts are dominated by fixed
  costs, so the exponent over a range that starts small understates the asymptotic growth.

``--gpu``: on one CUDA device, one process at exactly 2^30 bytes of configs/long_1g.yaml's shape
(patches of 64 x 64 bytes, bf16 autocast): its step time and peak memory
(``torch.cuda.max_memory_allocated``) against the ``--dry-run`` estimate; then doubling the context
while ``--budget`` seconds are left, until one fails: the longest context one GPU trains.
``--longest`` is the same walk on ``--device`` from ``--first`` (the CPU rehearsal of the GPU check).

``--estimate``: the ``--dry-run`` peak-memory estimate (``train/dry_run.py``: model states + activations,
plus the process's own footprint before the model exists) against the measured peak, for
``long_cpu`` and ``tb_python`` (a model built in Python with default settings, issue #22's shape:
dims 128/64/32, depths 2/1/1, patches 8 x 8, 4 heads of 32 in every stage, long_cpu's sparse global
pattern), at ``--contexts`` (default 4M,16M). ``tb_python`` runs in a plain child (glibc's
default malloc settings, as a user's script has them).
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

import torch

from terrabyte.data_pipeline.basics.errors import ConfigError
from terrabyte.data_pipeline.basics.system import atomic_write, describe_machine
from terrabyte.data_pipeline.cli import parse_size

from ..train.config import Config, load_config
from ..model.terrabyte import available_memory_bytes
from .common import GB, PEER_INSTALL, PLOT_INSTALL, megabyte_class, pyplot, save_figure, with_sections
from .context_measure import (GIB, KIB, MIB, MODELS, SMALL_CONTEXT, SMALL_REPEATS, describe_model, measure,
                              model_config)

logger = logging.getLogger(__name__)

DEFAULT_CONTEXTS = "8K,32K,128K,256K,512K,2M,8M,16M"
# the targets of issue #12 for the sparse model
TARGET_CONTEXT, TARGET_RSS_GB, TARGET_EXPONENT = 16 * MIB, 12.0, 1.1
TARGET_SPEED_CONTEXT, TARGET_SPEEDUP = 256 * KIB, 5.0
GPU_CONFIG, GPU_LAST, GPU_STEP_CONTEXT = "long_1g", 64 * GIB, GIB
ESTIMATE_CONTEXTS, ESTIMATE_TOLERANCE = "4M,16M", 0.25
ESTIMATE_MODELS = ("tb_sparse", "tb_python")
SWEEP_MODELS = "tb_sparse,tb_dense,megabyte"  # the default rows of the context sweep


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--contexts", default=DEFAULT_CONTEXTS,
                        help=f"comma-separated context lengths in bytes, K/M/G suffixes (default: {DEFAULT_CONTEXTS})")
    parser.add_argument("--models", default=SWEEP_MODELS,
                        help=f"comma-separated rows to measure, of {','.join(MODELS)} (default: {SWEEP_MODELS}; "
                             f"--estimate: {','.join(ESTIMATE_MODELS)})")
    parser.add_argument("--time-cap", type=float, default=300.0,
                        help="seconds a step may take; a model that passes it stops there (default: 300)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="torch CPU threads in each child (default: all cores, %(default)s here)")
    parser.add_argument("--memory-limit", type=float, default=None, metavar="GB",
                        help="address-space limit of each CPU child in GB (default: memory available at start; 0: none)")
    parser.add_argument("--config", default=None,
                        help=f"config of the sparse three-stage model, the others derive from it (default: long_cpu; "
                             f"with --gpu {GPU_CONFIG})")
    parser.add_argument("--out", default="runs/bench_context/context.json",
                        help="JSON of every measurement, rewritten after each (default: %(default)s)")
    parser.add_argument("--png", default="runs/bench_context/context.png",
                        help="seconds per step against context, log-log (default: %(default)s)")
    parser.add_argument("--gpu", action="store_true",
                        help=f"on a CUDA device: one {fmt_bytes(GPU_STEP_CONTEXT)} step of {GPU_CONFIG}'s shape, then doubling "
                             "while --budget lasts: the longest context one GPU trains")
    parser.add_argument("--longest", action="store_true",
                        help="--gpu's walk on --device from --first (the CPU rehearsal: --device cpu --first 64K)")
    parser.add_argument("--device", default=None, help="device of --longest (default: cuda)")
    parser.add_argument("--first", default=None,
                        help=f"first context of --gpu/--longest (default: {fmt_bytes(GPU_STEP_CONTEXT)})")
    parser.add_argument("--budget", type=float, default=240.0,
                        help="--gpu/--longest: seconds for the whole walk; no larger context starts once the last "
                             "one's time would not fit what is left (default: 240)")
    parser.add_argument("--estimate", action="store_true",
                        help="the --dry-run memory estimate against the measured peak (long_cpu and tb_python at --contexts, "
                             f"default {ESTIMATE_CONTEXTS})")
    parser.add_argument("overrides", nargs=argparse.REMAINDER,
                        help="config overrides after `--`, e.g. -- --model.dim 64,32,16")


# ---------------------------------------------------------------- options


def parse_contexts(text: str, unit: int) -> list[int]:
    """'8K,2M' -> [8192, 2097152], sorted; each a positive multiple of ``unit`` (the sparse model's
    global patch, so every model gets whole patches)."""
    contexts = []
    for item in (s.strip() for s in text.split(",")):
        try:
            n = parse_size(item)
        except Exception:
            raise ConfigError(f"--contexts: {item!r} is not a size (examples: 8K, 512K, 2M)") from None
        if n < unit or n % unit:
            raise ConfigError(f"--contexts: {item!r} must be a positive multiple of the global patch ({unit} bytes)")
        contexts.append(n)
    return sorted(set(contexts))


def parse_models(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown or not names:
        raise ConfigError(f"--models: unknown {unknown or text!r}; choose from {', '.join(MODELS)}")
    return [n for n in MODELS if n in names]


def default_memory_limit_gb() -> float:
    """MemAvailable now, in GB: a child may take what the machine has free, no more."""
    return available_memory_bytes(torch.device("cpu")) / GB


def fmt_bytes(n: int) -> str:
    for size, unit in ((GIB, "GiB"), (MIB, "MiB"), (KIB, "KiB")):
        if n >= size and n % size == 0:
            return f"{n // size} {unit}"
    return f"{n} B"


# ---------------------------------------------------------------- the sweep


def sweep(base: Config, kinds: list[str], contexts: list[int], device: str, threads: int,
          memory_limit_gb: float, time_cap: float, on_result=None) -> list[dict]:
    """Every (context, model), contexts in order; a model that stopped is skipped after that."""
    from tqdm.auto import tqdm

    stopped = {}  # kind -> why, at which context
    results = []
    with tqdm(total=len(kinds) * len(contexts), desc="bench context", unit="step", file=sys.stderr) as bar:
        for context in contexts:
            for kind in kinds:
                row = {"context": context, "model": kind}
                if kind in stopped:
                    row.update(status=f"skipped ({stopped[kind]})", seconds=None)
                else:
                    bar.set_postfix_str(f"{kind} at {fmt_bytes(context)}")
                    cfg = model_config(base, kind, context)
                    row.update(measure(kind, cfg, context, device, threads, memory_limit_gb, time_cap))
                    logger.info("%s at %s: %s%s", kind, fmt_bytes(context), row["status"],
                                f", {row['seconds']:.2f} s" if row.get("seconds") is not None else "")
                    if row["status"] != "ok":
                        stopped[kind] = f"{row['status']} at {fmt_bytes(context)}"
                results.append(row)
                bar.update(1)
                if on_result:
                    on_result(results)
    return results


def fit_exponent(points: list[tuple[int, float]]) -> float | None:
    """Least-squares slope of log(seconds) against log(context); None below two contexts."""
    if len(points) < 2:
        return None
    xs = [math.log(n) for n, _ in points]
    ys = [math.log(t) for _, t in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else None


def completed(results: list[dict], kind: str) -> list[tuple[int, float]]:
    return [(r["context"], r["seconds"]) for r in results if r["model"] == kind and r["status"] == "ok"]


def fits(results: list[dict], kinds: list[str]) -> dict:
    """kind -> {"exponent", "from", "to"} over the contexts it completed."""
    out = {}
    for kind in kinds:
        points = completed(results, kind)
        out[kind] = {"exponent": fit_exponent(points), "from": points[0][0] if points else None,
                     "to": points[-1][0] if points else None}
    return out


# ---------------------------------------------------------------- report


def format_table(results: list[dict]) -> str:
    lines = ["| context | model | s/step | µs/byte | peak RSS (GB) | status |", "|---|---|---|---|---|---|"]
    for r in results:
        t, peak = r.get("seconds"), r.get("peak_bytes")
        cells = [fmt_bytes(r["context"]), MODELS[r["model"]],
                 f"{t:.3f}" if t is not None else "", f"{1e6 * t / r['context']:.2f}" if t is not None else "",
                 f"{peak / GB:.2f}" if peak is not None else "", r["status"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def format_fits(fitted: dict) -> str:
    lines = []
    for kind, f in fitted.items():
        if f["exponent"] is None:
            lines.append(f"- {kind}: no exponent (fewer than two contexts completed)")
        else:
            lines.append(f"- {kind}: time ~ context^{f['exponent']:.2f} over {fmt_bytes(f['from'])} to {fmt_bytes(f['to'])}")
    return "Fitted exponents (least squares of log s/step against log context, completed contexts):\n" + "\n".join(lines) + "\n"


def _row(results, kind, context):
    return next((r for r in results if r["model"] == kind and r["context"] == context), None)


def target_checks(results: list[dict], time_cap: float) -> list[str]:
    """Issue #12's three targets for the sparse model, each PASS / FAIL / not measured."""
    lines = []
    at = _row(results, "tb_sparse", TARGET_CONTEXT)
    if at and at["status"] == "ok":
        gb = at["peak_bytes"] / GB
        lines.append(f"{'PASS' if gb <= TARGET_RSS_GB else 'FAIL'}: tb_sparse at {fmt_bytes(TARGET_CONTEXT)} "
                     f"peaks at {gb:.2f} GB RSS (target <= {TARGET_RSS_GB:g} GB)")
    else:
        lines.append(f"not measured: tb_sparse at {fmt_bytes(TARGET_CONTEXT)} peak RSS <= {TARGET_RSS_GB:g} GB "
                     f"({at['status'] if at else 'context not in the run'})")
    points = [(n, t) for n, t in completed(results, "tb_sparse") if 8 * KIB <= n <= TARGET_CONTEXT]
    span = f"{fmt_bytes(8 * KIB)} to {fmt_bytes(TARGET_CONTEXT)}"
    exponent = fit_exponent(points)
    if points and points[0][0] == 8 * KIB and points[-1][0] == TARGET_CONTEXT and exponent is not None:
        lines.append(f"{'PASS' if exponent <= TARGET_EXPONENT else 'FAIL'}: tb_sparse exponent {exponent:.2f} "
                     f"over {span} (target <= {TARGET_EXPONENT:g})")
    else:
        got = f"{exponent:.2f} over {fmt_bytes(points[0][0])} to {fmt_bytes(points[-1][0])} only" if exponent is not None else "too few contexts"
        lines.append(f"not measured: tb_sparse exponent <= {TARGET_EXPONENT:g} over {span} ({got})")
    lines.append(_speedup_check(results, time_cap))
    return lines


def _speedup_check(results: list[dict], time_cap: float) -> str:
    where = fmt_bytes(TARGET_SPEED_CONTEXT)
    sparse, peer = _row(results, "tb_sparse", TARGET_SPEED_CONTEXT), _row(results, "megabyte", TARGET_SPEED_CONTEXT)
    if not sparse or sparse["status"] != "ok" or not peer:
        return f"not measured: tb_sparse >= {TARGET_SPEEDUP:g}x MEGABYTE-pytorch's bytes/s at {where}"
    if peer["status"] == "ok":
        ratio = peer["seconds"] / sparse["seconds"]
        return (f"{'PASS' if ratio >= TARGET_SPEEDUP else 'FAIL'}: at {where} tb_sparse trains {ratio:.2f}x "
                f"MEGABYTE-pytorch's bytes/s (target >= {TARGET_SPEEDUP:g}x)")
    if peer["status"].startswith("stopped"):  # its step took longer than the cap: a lower bound
        ratio = time_cap / sparse["seconds"]
        return (f"{'PASS' if ratio >= TARGET_SPEEDUP else 'UNDECIDED'}: at {where} tb_sparse trains more than "
                f"{ratio:.2f}x MEGABYTE-pytorch's bytes/s (its step passed the {time_cap:g} s cap; target >= {TARGET_SPEEDUP:g}x)")
    return f"PASS: at {where} MEGABYTE-pytorch does not train ({peer['status']}); tb_sparse does"


def plot(results: list[dict], kinds: list[str], time_cap: float, path: Path) -> bool:
    """Seconds per step against context, log-log, one line per model; False without matplotlib."""
    plt = pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for kind in kinds:
        points = completed(results, kind)
        if points:
            ax.plot([n for n, _ in points], [t for _, t in points], "o-", label=MODELS[kind])
    if time_cap > 0:
        ax.axhline(time_cap, color="gray", ls="--", lw=0.8, label=f"time cap {time_cap:g} s")
    ax.set_xscale("log", base=2)
    if ax.has_data():  # a log axis or a legend over nothing warns
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    ax.set_xlabel("context (bytes)")
    ax.set_ylabel("seconds per training step (batch 1)")
    ax.grid(alpha=0.3, which="both")
    save_figure(fig, path)
    return True


def _write_json(path: str, header: dict, results: list[dict], **extra) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps({**header, **extra, "results": results}, indent=1))


# ---------------------------------------------------------------- entry points


def _base_config(args) -> Config:
    overrides = [a for a in (args.overrides or []) if a != "--"]
    return load_config(args.config or (GPU_CONFIG if args.gpu else "long_cpu"), overrides)


def estimate_bytes(cfg: Config, checkpoint: bool, chunk_bytes: int | None, base_bytes: float = 0.0) -> float:
    """``--dry-run``'s peak for one step of ``cfg`` as it ran (checkpointing and chunk as the model
    chose them): model states + activations (``train/dry_run.py``), plus the process's footprint before
    the model existed (interpreter and libraries: in RSS, not in device memory)."""
    from ..train.dry_run import activation_bytes, meta_model, model_state_bytes

    ran = with_sections(cfg, model={"checkpoint_activations": checkpoint, "chunk_bytes": chunk_bytes})
    model = meta_model(ran)
    return base_bytes + model_state_bytes(model, ran) + activation_bytes(model, ran)


def with_estimate(row: dict, cfg: Config) -> dict:
    """The row with its estimate and the ratio measured / estimate (when it completed)."""
    if row.get("status") == "ok" and row.get("peak_bytes") and row.get("checkpoint") is not None:
        est = estimate_bytes(cfg, row["checkpoint"], row["chunk_bytes"], row.get("base_bytes", 0))
        row.update(estimate_bytes=est, ratio=row["peak_bytes"] / est)
    return row


def format_estimate_table(results: list[dict], peak: str = "peak RSS") -> str:
    lines = [f"| context | model | checkpointing | chunk bytes | s/step | estimate (GB) | {peak} (GB) | measured / estimate | status |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        est, peak_b, t = r.get("estimate_bytes"), r.get("peak_bytes"), r.get("seconds")
        cells = [fmt_bytes(r["context"]), r["model"], {True: "on", False: "off"}.get(r.get("checkpoint"), ""),
                 str(r.get("chunk_bytes") or ""), f"{t:.2f}" if t is not None else "",
                 f"{est / GB:.2f}" if est else "", f"{peak_b / GB:.2f}" if peak_b else "",
                 f"{r['ratio']:.2f}" if r.get("ratio") else "", r["status"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run(args) -> int:
    if args.time_cap < 0:
        raise ConfigError(f"--time-cap must be >= 0 seconds, got {args.time_cap:g}")
    if args.threads < 1:
        raise ConfigError(f"--threads must be at least 1, got {args.threads}")
    if args.budget <= 0:
        raise ConfigError(f"--budget must be > 0 seconds, got {args.budget:g}")
    if args.gpu or args.longest:
        return run_longest(args)
    if args.estimate:
        return run_estimate(args)
    base = _base_config(args)
    contexts = parse_contexts(args.contexts, math.prod(base.model.max_seq_len[1:]))
    kinds = parse_models(args.models)
    if "megabyte" in kinds and megabyte_class() is None:
        logger.warning("MEGABYTE-pytorch is not installed, its rows are skipped; `%s`", PEER_INSTALL)
        kinds.remove("megabyte")
    limit = default_memory_limit_gb() if args.memory_limit is None else args.memory_limit
    header = {"machine": describe_machine(), "date": datetime.date.today().isoformat(), "threads": args.threads,
              "time_cap_s": args.time_cap, "memory_limit_gb": limit, "contexts": contexts, "models": kinds,
              "configs": {k: describe_model(k, model_config(base, k, contexts[0])) for k in kinds}}
    results = sweep(base, kinds, contexts, "cpu", args.threads, limit, args.time_cap,
                    on_result=lambda rows: _write_json(args.out, header, rows))
    fitted = fits(results, kinds)
    checks = target_checks(results, args.time_cap)
    _write_json(args.out, header, results, fits=fitted, checks=checks)
    text = (f"Machine: {header['machine']}; date: {header['date']}; one training step (forward + backward + AdamW "
            f"step), batch 1, {args.threads} threads, each in a fresh process (address space <= "
            f"{limit:.1f} GB) after a warm-up step on two patches; fastest of {SMALL_REPEATS} steps up to "
            f"{fmt_bytes(SMALL_CONTEXT)}; time cap {args.time_cap:g} s.\n\n"
            + "\n".join(f"- {line}" for line in header["configs"].values()) + "\n\n"
            + format_table(results) + "\n" + format_fits(fitted) + "\nTargets (issue #12):\n"
            + "\n".join(f"- {line}" for line in checks) + "\n")
    png = Path(args.png)
    text += f"\nCurves: {png}\n" if plot(results, kinds, args.time_cap, png) else f"\n(no PNG: `{PLOT_INSTALL}`)\n"
    sys.stdout.write(text)
    return 0


def run_estimate(args) -> int:
    """The --dry-run estimate against the measured peak: every model of ESTIMATE_MODELS at every
    context, each in its own child; PASS when measured / estimate is within ESTIMATE_TOLERANCE."""
    base = _base_config(args)
    contexts = parse_contexts(args.contexts if args.contexts != DEFAULT_CONTEXTS else ESTIMATE_CONTEXTS,
                              math.prod(base.model.max_seq_len[1:]))
    limit = default_memory_limit_gb() if args.memory_limit is None else args.memory_limit
    header = {"machine": describe_machine(), "date": datetime.date.today().isoformat(), "threads": args.threads,
              "memory_limit_gb": limit, "contexts": contexts, "tolerance": ESTIMATE_TOLERANCE,
              "configs": {k: describe_model(k, model_config(base, k, contexts[0])) for k in ESTIMATE_MODELS}}
    kinds = ESTIMATE_MODELS if args.models == SWEEP_MODELS else [
        k for k in parse_models(args.models) if k in ESTIMATE_MODELS] or list(ESTIMATE_MODELS)
    results = []
    for context in contexts:
        for kind in kinds:
            cfg = model_config(base, kind, context)
            row = {"context": context, "model": kind}
            row.update(measure(kind, cfg, context, "cpu", args.threads, limit, args.time_cap))
            results.append(with_estimate(row, cfg))
            logger.info("%s at %s: %s", kind, fmt_bytes(context), row["status"])
            _write_json(args.out, header, results)
    ok = [r for r in results if r.get("ratio")]
    within = [r for r in ok if abs(r["ratio"] - 1) <= ESTIMATE_TOLERANCE]
    verdict = (f"{'PASS' if ok and len(within) == len(results) else 'FAIL'}: {len(within)} of {len(results)} "
               f"measured peaks within {ESTIMATE_TOLERANCE:.0%} of the estimate")
    _write_json(args.out, header, results, verdict=verdict)
    sys.stdout.write(
        f"Machine: {header['machine']}; date: {header['date']}; one training step (forward + backward + AdamW), "
        f"batch 1, {args.threads} threads, fp32, each in a fresh process; estimate: `--dry-run`'s model states + "
        "activations for the checkpointing and chunk the model used, plus the process's RSS before the model "
        "was built; measured: the child's peak RSS (VmHWM).\n\n"
        + "\n".join(f"- {line}" for line in header["configs"].values()) + "\n\n"
        + format_estimate_table(results) + f"\n{verdict}\n")
    return 0 if ok and len(within) == len(results) else 1


def run_longest(args) -> int:
    """One step at --first (default: exactly 1 GiB of long_1g's shape on the GPU), then doubling
    while the budget lasts, until one fails: the longest context that trains, each step's time and
    peak memory against the estimate. The JSON is rewritten after each context."""
    device = "cuda" if args.gpu else (args.device or "cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"{'--gpu' if args.gpu else '--device cuda'} needs a CUDA device; torch sees none")
    base = _base_config(args)
    unit = math.prod(base.model.max_seq_len[1:])
    first = GPU_STEP_CONTEXT if args.first is None else parse_contexts(args.first, unit)[0]
    if first % unit:
        raise ConfigError(f"--first: {first} bytes must be a multiple of the global patch ({unit} bytes)")
    name = args.config or (GPU_CONFIG if args.gpu else "long_cpu")
    started = time.monotonic()
    header = {"machine": describe_machine(device), "date": datetime.date.today().isoformat(), "device": device,
              "budget_s": args.budget, "config": name, "first": first}
    results, context, last = [], first, 0.0
    while context <= GPU_LAST:
        left = args.budget - (time.monotonic() - started)
        # a doubled context costs about twice the last one, start-up included
        if results and left < 2.2 * last:
            logger.info("%s: %.0f s left, the last context took %.0f s: no larger context", fmt_bytes(context), left, last)
            break
        cfg = model_config(base, "tb_sparse", context)
        t0 = time.monotonic()
        row = {"context": context, "model": "tb_sparse"}
        # the first context is the measurement asked for: only --time-cap stops it; the doubling ones
        # stop when the budget is spent too
        cap = args.time_cap if not results else min(args.time_cap, max(left, 1.0))
        row.update(measure("tb_sparse", cfg, context, device, args.threads, 0, cap))
        last = time.monotonic() - t0
        results.append(with_estimate(row, cfg))
        _write_json(args.out, header, results)
        logger.info("%s at %s: %s (%.0f s with start-up)", name, fmt_bytes(context), row["status"], last)
        if row["status"] != "ok":
            break
        context *= 2
    longest = max((n for n, _ in completed(results, "tb_sparse")), default=None)
    _write_json(args.out, header, results, longest=longest)
    peak = "peak CUDA" if device.startswith("cuda") else "peak RSS"
    text = (f"Machine: {header['machine']}; date: {header['date']}; {name} shape, one step (forward + backward + "
            f"AdamW), batch 1{', bf16 autocast' if device.startswith('cuda') else ''}; from {fmt_bytes(first)}, "
            f"doubling while {args.budget:g} s last; {peak}: "
            f"{'torch.cuda.max_memory_allocated' if device.startswith('cuda') else 'VmHWM'}; estimate: --dry-run's.\n\n"
            + format_estimate_table(results, peak)
            + f"\nLongest context that trains here: {fmt_bytes(longest) if longest else 'none'}\n")
    sys.stdout.write(text)
    return 0 if longest else 1


def main(argv: list[str] | None = None) -> int:
    """``python -m terrabyte.pretrain.bench.context``: the same flags as ``terrabyte bench context``."""
    from terrabyte.data_pipeline.basics.errors import run_guarded

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="python -m terrabyte.pretrain.bench.context",
                                     description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run_guarded(run, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
