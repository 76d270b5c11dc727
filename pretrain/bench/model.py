"""Benchmark the TerraByte model: ``terrabyte bench model``.

Rows: training throughput (forward + backward + AdamW step) and peak memory at two sequence shapes,
and generation speed at a short and a long context. When ``MEGABYTE_pytorch`` is importable
(optional, never a dependency) the same rows are measured for it on the same configuration, with
its rotary embeddings and SDPA attention switched on, and a feed-forward width chosen for TerraByte
so both parameter counts are within 5%.

Method, so the numbers survive a shared machine:
- Timings interleave the two models step by step and report the fastest repeat (min of N): noise
  from other processes only ever adds time.
- Peak memory is measured in a fresh spawned process per (model, shape), after one warm-up step on
  a short sequence (so weights, AdamW state and library workspaces already exist): on CUDA the
  growth of ``torch.cuda.max_memory_allocated`` over the allocated memory before the step; on CPU
  the growth of the peak RSS (``VmHWM`` in /proc/self/status, reset before the step) over the RSS
  before the step, with glibc's mmap threshold pinned (``common.MALLOC_ENV``) so freed blocks leave RSS.
  Not ``getrusage().ru_maxrss``: Linux carries the parent's RSS into it across fork + exec, so a
  spawned child would report the benchmark process's size. Either way: what one training step at that shape adds
  (activations, gradients, temporaries).
- Generation: TerraByte uses its KV-cached ``generate``; MEGABYTE-pytorch re-runs its full forward
  per byte (what its ``generate`` does). "decode" excludes the prompt pass (time to first byte,
  reported separately); "end-to-end" includes it. EOS is ignored so lengths are fixed.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import logging
import math
import queue as queue_mod
import statistics
import sys
import time
from dataclasses import dataclass

import torch

from terrabyte.data_pipeline.basics.errors import ConfigError
from terrabyte.data_pipeline.basics.system import describe_machine

from ..model.terrabyte import TerraByte
from .common import emit, megabyte_class, peak_growth, spawn_child, sync, train_step

logger = logging.getLogger(__name__)

BENCH_CONFIG = dict(num_tokens=256, dim=(256, 128), depth=(4, 2), max_seq_len=(4096, 4), dim_head=32, heads=8)
PARAM_TOLERANCE = 0.05


@dataclass(frozen=True)
class Shapes:
    train: tuple  # ((seq_len, batch), ...)
    generate: tuple  # ((prompt_len, new_bytes), ...)
    train_repeats: int
    gen_repeats: int


FULL = Shapes(train=((4096, 4), (16384, 1)), generate=((64, 256), (4032, 64)), train_repeats=3, gen_repeats=5)
QUICK = Shapes(train=((512, 2),), generate=((16, 16), (256, 8)), train_repeats=1, gen_repeats=1)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="tiny shapes (seconds), for smoke tests")
    parser.add_argument("--out", metavar="FILE", help="also write the markdown table to FILE")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda when available)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--no-baseline", action="store_true", help="skip MEGABYTE-pytorch even if installed")
    parser.add_argument("--no-flash", action="store_true", help="build TerraByte with flash_attn=False")
    parser.add_argument("--long-prompts", action="store_true",
                        help="only the long-prompt rows: decode steps of a sparse global stage after "
                             f"{' and '.join(f'{n // 1024} KiB' for n in LONG_PROMPTS)} prompts, and "
                             "prefill peak memory in pieces and at once")


# ---------------------------------------------------------------- models

def _n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _build(kind: str, ff_mult: float, flash: bool, device: str, seed: int = 0):
    torch.manual_seed(seed)
    if kind == "terrabyte":
        model = TerraByte(**BENCH_CONFIG, ff_mult=ff_mult, flash_attn=flash)
    else:
        model = megabyte_class()(**BENCH_CONFIG, flash_attn=True, rel_pos=True)
    return model.to(device)


def match_ff_mult(target: int) -> float:
    """ff_mult for TerraByte whose parameter count is closest to ``target`` (bisection)."""
    def count(mult):
        with torch.device("meta"):
            return _n_params(TerraByte(**BENCH_CONFIG, ff_mult=mult))
    lo, hi = 0.5, 16.0
    for _ in range(30):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if count(mid) < target else (lo, mid)
    return min((lo, hi), key=lambda m: abs(count(m) - target))


# ---------------------------------------------------------------- measurements

def _memory_child(kind, ff_mult, flash, device, seq_len, batch, threads, queue):
    if threads:
        torch.set_num_threads(threads)
    model = _build(kind, ff_mult, flash, device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    # warm-up on one short sequence: weights, AdamW state and library workspaces exist before the
    # baseline, so the growth measured is what the sequence shape costs (activations, gradients)
    short = math.prod(BENCH_CONFIG["max_seq_len"][1:]) * 2
    train_step(model, opt, torch.randint(0, 256, (1, short), device=device))
    x = torch.randint(0, 256, (batch, seq_len), device=device)
    queue.put(peak_growth(device, functools.partial(train_step, model, opt, x)))


def peak_train_memory(kind, ff_mult, flash, device, seq_len, batch, threads) -> int:
    return _in_child(_memory_child, (kind, ff_mult, flash, device, seq_len, batch, threads), kind)


def _in_child(target, args: tuple, what: str):
    """target(*args, queue) in a fresh spawned process (see ``spawn_child``): what it puts."""
    proc, queue = spawn_child(target, args)
    while True:  # a child that dies (out of memory, import error) must not hang the benchmark
        try:
            result = queue.get(timeout=1.0)
            break
        except queue_mod.Empty:
            if not proc.is_alive():
                raise RuntimeError(f"memory measurement for {what} exited with code {proc.exitcode}") from None
    proc.join()
    return result


def time_train(models: dict, device: str, seq_len: int, batch: int, repeats: int) -> dict:
    """Bytes/s per model, min over interleaved repeats (after one warm-up step each)."""
    x = torch.randint(0, 256, (batch, seq_len), device=device)
    steps = {}
    for name, model in models.items():
        model.train()
        steps[name] = functools.partial(train_step, model, torch.optim.AdamW(model.parameters(), lr=1e-4), x)
        steps[name]()
    best = {name: math.inf for name in models}
    for _ in range(repeats):
        for name, step in steps.items():
            sync(device)
            t0 = time.perf_counter()
            step()
            sync(device)
            best[name] = min(best[name], time.perf_counter() - t0)
    for model in models.values():
        model.zero_grad(set_to_none=True)
    return {name: batch * seq_len / t for name, t in best.items()}


def _megabyte_generate(model, prime, new_bytes, temperature=1.0, filter_thres=0.9):
    """MEGABYTE-pytorch's generate loop (full forward per byte), bounded to new_bytes.
    Returns (time to first byte, total time)."""
    seq = prime
    t0 = time.perf_counter()
    first = None
    for _ in range(new_bytes):
        logits = model(seq)[:, -1]
        k = max(int((1 - filter_thres) * logits.shape[-1]), 1)
        val, ind = torch.topk(logits, k)
        logits = torch.full_like(logits, float("-inf")).scatter_(1, ind, val)
        gumbel = -torch.log(-torch.log(torch.rand_like(logits).clamp(min=1e-20)).clamp(min=1e-20))
        sample = ((logits / temperature) + gumbel).argmax(dim=-1, keepdim=True)
        seq = torch.cat((seq, sample), dim=-1)
        if first is None:
            sync(str(seq.device))
            first = time.perf_counter() - t0
    sync(str(seq.device))
    return first, time.perf_counter() - t0


def _terrabyte_generate(model, prime, new_bytes, temperature=1.0, filter_thres=0.9):
    first = None
    t0 = time.perf_counter()

    def on_byte(_):
        nonlocal first
        if first is None:
            sync(str(prime.device))
            first = time.perf_counter() - t0

    model.generate(prime, max_new_bytes=new_bytes, temperature=temperature, filter_thres=filter_thres,
                   ignore_eos=True, callback=on_byte)
    sync(str(prime.device))
    return first, time.perf_counter() - t0


def time_generate(models: dict, device: str, prompt_len: int, new_bytes: int, repeats: int) -> dict:
    """{name: (time to first byte s, decode bytes/s, end-to-end bytes/s)}, best of repeats."""
    torch.manual_seed(0)
    prime = torch.randint(0, 256, (1, prompt_len), device=device)
    fns = {name: _terrabyte_generate if name == "terrabyte" else _megabyte_generate for name in models}
    runs = {name: [] for name in models}
    with torch.no_grad():
        for name, model in models.items():
            model.eval()
            fns[name](model, prime[:, :16], 2)  # warm-up
        for _ in range(repeats):  # interleaved, like the training rows
            for name, model in models.items():
                runs[name].append(fns[name](model, prime, new_bytes))
    out = {}
    for name in models:
        first = min(r[0] for r in runs[name])
        total = min(r[1] for r in runs[name])
        decode = min(r[1] - r[0] for r in runs[name])
        out[name] = (first, (new_bytes - 1) / decode, new_bytes / total)
    return out


def decode_gemv_floor(model: TerraByte, device: str, repeats: int, patches: int = 64) -> float:
    """Bytes/s of TerraByte's decode matrix-vector products alone, batch 1: per top-level patch,
    each stage's fused decode matrices (and patch-embedding projection) once per unit of that
    stage, with no other op in between. Batch-1 decoding streams every weight once per token, so
    generation cannot beat this rate on the machine: it bounds the generation rows."""
    model.eval()
    per_patch = []  # (matrix, times per top-level patch)
    for stage, plan in zip(model.stages, model._decode_plans()):
        mats = [w for layer in plan.layers for w in (layer.wqkv, layer.wo, layer.wgu, layer.wdown)]
        mats.append(plan.w_out)
        if stage.embed.proj is not None:
            mats.append(stage.embed.proj.weight.detach().t())
        per_patch += [(w, model.unit_sizes[0] // stage.unit_size) for w in mats]
    rows = {w.shape[0]: torch.randn(1, w.shape[0], device=device, dtype=w.dtype) for w, _ in per_patch}

    def run():
        for _ in range(patches):
            for w, times in per_patch:
                for _ in range(times):
                    torch.mm(rows[w.shape[0]], w)
        sync(device)

    run()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t0)
    return patches * model.unit_sizes[0] / best


# ---------------------------------------------------------------- long prompts

# A small model whose global stage is sparse (local window, a sink token, a LongNet segment) over
# 128 KiB: long prompts without the big model's cost.
LONG_CONFIG = dict(num_tokens=256, dim=(128, 64), depth=(2, 1), max_seq_len=(32768, 4), dim_head=32, heads=4,
                   attention=({"kind": "sparse", "pattern": {"local": 64, "global_tokens": 1,
                                                            "dilated": [[1024, 16]], "block": 64}}, None))
LONG_PROMPTS = (4096, 65536)
LONG_NEW_BYTES = 128
# prefill memory at once and in pieces; at once the PyTorch sparse reference (CPU) holds
# (heads, n, n) masks and scores, so the prompt stays at 16 KiB there
LONG_MEMORY_PROMPT = {"cpu": 16384, "cuda": 65536}


def _long_model(device: str) -> TerraByte:
    torch.manual_seed(0)
    return TerraByte(**LONG_CONFIG).to(device).eval()


def time_decode_steps(model: TerraByte, prompt: torch.Tensor, new_bytes: int, repeats: int,
                      mask_rows: bool = False) -> tuple[float, float]:
    """Median seconds of the decode steps after the prompt (greedy) that run the global stage (one
    byte in a patch) and of the others, best of repeats. ``mask_rows``: the sparse stage's steps
    build an O(context) mask row and sort it (the path before key lists, kept for callables
    without one) instead of gathering the attended keys."""
    device, patch = str(prompt.device), model.unit_sizes[0]
    best = [float("inf"), float("inf")]
    for _ in range(repeats):
        for plan in model._decode_plans():
            plan.keys = None if mask_rows else plan.keys
        cache = model.init_cache(prompt.shape[0])
        logits = model.forward_cached(prompt, cache)
        times = ([], [])  # (global-stage steps, the others)
        for _ in range(new_bytes):
            sync(device)
            t0 = time.perf_counter()
            logits = model.forward_cached(logits.argmax(-1, keepdim=True), cache)
            sync(device)
            times[cache.length % patch != 0].append(time.perf_counter() - t0)
        best = [min(b, statistics.median(t)) for b, t in zip(best, times)]
        model._plans = None  # fresh plans (and key listers) for the next run
    return best[0], best[1]


def _prefill_memory_child(device, prompt_len, chunk_bytes, threads, queue):
    if threads:
        torch.set_num_threads(threads)
    model = _long_model(device)
    with torch.no_grad():
        model.forward_cached(torch.randint(0, 256, (1, 64), device=device), model.init_cache(1))  # warm-up
        cache = model.init_cache(1, prefill_chunk_bytes=chunk_bytes)
        for st in cache.stages:
            st.kv.zero_()  # the caches' pages exist before the baseline: what follows are temporaries
        prompt = torch.randint(0, 256, (1, prompt_len), device=device)
        queue.put(peak_growth(device, functools.partial(model.forward_cached, prompt, cache)))


def long_prompt_rows(device: str, threads, repeats: int = 3) -> list:
    """(metric, value) rows: decode time per byte after short and long prompts, with key lists and
    with mask rows, then prefill peak memory growth beyond the KV caches, at once and in pieces."""
    model = _long_model(device)
    rows = []
    g = torch.Generator().manual_seed(0)
    for n in LONG_PROMPTS:
        prompt = torch.randint(0, 256, (1, n), generator=g).to(device)
        for mask_rows in (False, True):
            how = "mask rows (before)" if mask_rows else "attended keys"
            step, other = time_decode_steps(model, prompt, LONG_NEW_BYTES, repeats, mask_rows)
            rows.append((f"decode step with the sparse global stage after a {n // 1024} KiB prompt, {how} (ms)",
                         f"{1e3 * step:.3f}"))
            rows.append((f"decode step without it after a {n // 1024} KiB prompt, {how} (ms)", f"{1e3 * other:.3f}"))
    at_once = LONG_MEMORY_PROMPT["cuda" if device.startswith("cuda") else "cpu"]
    what = "peak CUDA memory growth" if device.startswith("cuda") else "peak RSS growth"
    for n, label, chunk in ((at_once, "at once (before)", at_once), (at_once, "in automatic pieces", None),
                            (LONG_PROMPTS[-1], "in automatic pieces", None)):
        mem = _in_child(_prefill_memory_child, (device, n, chunk, threads), "prefill")
        rows.append((f"prefill {what} beyond the KV caches, {n // 1024} KiB prompt, {label}", _fmt_mib(mem)))
    kv = sum(st.kv.numel() * st.kv.element_size() for st in model.init_cache(1).stages)
    rows.append(("KV caches of that model (whole context, batch 1)", _fmt_mib(kv)))
    return rows


def run_long_prompts(args, device: str) -> int:
    rows = long_prompt_rows(device, args.threads)
    lines = [f"Machine: {describe_machine(device)}; date: {datetime.date.today().isoformat()}; "
             f"config: {LONG_CONFIG}, {LONG_NEW_BYTES} new bytes, greedy", "",
             "| metric | terrabyte |", "|---|---|"]
    lines += [f"| {metric} | {value} |" for metric, value in rows]
    table = "\n".join(lines) + "\n"
    emit(table, args.out)
    return 0


# ---------------------------------------------------------------- report

def _fmt_rate(v: float) -> str:
    return f"{v:,.0f}"


def _fmt_mib(v: int) -> str:
    return f"{v / 2**20:,.0f} MiB"


def run(args) -> int:
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda was given but CUDA is not available; use --device cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.long_prompts:
        return run_long_prompts(args, device)
    shapes = QUICK if args.quick else FULL
    flash = not args.no_flash
    baseline = None if args.no_baseline else megabyte_class()
    if baseline is None and not args.no_baseline:
        logger.info("MEGABYTE_pytorch is not installed: TerraByte rows only")

    ff_mult = 4.0
    counts = {}
    if baseline is not None:
        counts["megabyte"] = _n_params(_build("megabyte", ff_mult, flash, "meta"))
        ff_mult = match_ff_mult(counts["megabyte"])
    models = {"terrabyte": _build("terrabyte", ff_mult, flash, device)}
    counts["terrabyte"] = _n_params(models["terrabyte"])
    if baseline is not None:
        models["megabyte"] = _build("megabyte", ff_mult, flash, device)
        gap = counts["terrabyte"] / counts["megabyte"] - 1
        if abs(gap) > PARAM_TOLERANCE:
            logger.warning("parameter counts differ by %.1f%% (> 5%%)", 100 * gap)

    rows = []  # (metric, {name: value str}, ratio str)

    def add(metric, values: dict, fmt, higher_is_better=True):
        cells = {k: fmt(v) for k, v in values.items()}
        ratio = ""
        if "megabyte" in values and values["megabyte"]:
            r = values["terrabyte"] / values["megabyte"]
            ratio = f"{r:.2f}x" if higher_is_better else f"{r:.2f}x (lower is better)"
        rows.append((metric, cells, ratio))

    for seq_len, batch in shapes.train:
        logger.info("training %d bytes x batch %d", seq_len, batch)
        rates = time_train(models, device, seq_len, batch, shapes.train_repeats)
        add(f"train bytes/s, {seq_len} B x batch {batch} (fwd+bwd+AdamW)", rates, _fmt_rate)
        mem = {name: peak_train_memory(name, ff_mult, flash, device, seq_len, batch, args.threads) for name in models}
        what = "peak CUDA memory growth" if device.startswith("cuda") else "peak RSS growth"
        add(f"{what}, {seq_len} B x batch {batch}", mem, _fmt_mib, higher_is_better=False)
    first_decode = None  # (shape tag, MEGABYTE-pytorch decode bytes/s) of the first generation row
    for prompt_len, new_bytes in shapes.generate:
        logger.info("generating %d bytes after %d", new_bytes, prompt_len)
        res = time_generate(models, device, prompt_len, new_bytes, shapes.gen_repeats)
        tag = f"{new_bytes} B after a {prompt_len} B prompt"
        add(f"generate {tag}: decode bytes/s", {k: v[1] for k, v in res.items()}, _fmt_rate)
        add(f"generate {tag}: end-to-end bytes/s", {k: v[2] for k, v in res.items()}, _fmt_rate)
        add(f"generate {tag}: time to first byte (s)", {k: v[0] for k, v in res.items()},
            lambda v: f"{v:.3f}", higher_is_better=False)
        if first_decode is None:
            first_decode = (tag, res.get("megabyte", (0, 0))[1])
    if shapes.generate:
        floor = decode_gemv_floor(models["terrabyte"], device, shapes.gen_repeats)
        tag, baseline_rate = first_decode
        rows.append(("decode bound: the decode GEMVs alone, no other op (bytes/s)", {"terrabyte": _fmt_rate(floor)},
                     f"{floor / baseline_rate:.2f}x at most ({tag})" if baseline_rate else ""))

    names = list(models)
    header = ["metric", *(f"{n} ({counts[n]:,} params)" for n in names)]
    if baseline is not None:
        header.append("terrabyte / megabyte")
    lines = [
        f"Machine: {describe_machine(device)}; date: {datetime.date.today().isoformat()}; "
        f"config: {BENCH_CONFIG}, terrabyte ff_mult={ff_mult:.3f}, flash_attn={flash}"
        + (" (quick shapes)" if args.quick else ""),
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for metric, cells, ratio in rows:
        line = [metric, *(cells.get(n, "") for n in names)] + ([ratio] if baseline is not None else [])
        lines.append("| " + " | ".join(line) + " |")
    table = "\n".join(lines) + "\n"
    emit(table, args.out)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
