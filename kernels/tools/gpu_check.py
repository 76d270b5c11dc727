"""The one GPU check of the sparse attention kernels: correctness on the GPU, then the benchmark.

    python -m terrabyte.kernels.tools.gpu_check [--budget 170] [--out DIR]

Run it on a CUDA machine (written for an H100/H200 with torch 2.11 / triton 3.6); it aims to end
within ``--budget`` seconds (default 170) and skips the benchmark steps that no longer fit.

1. compile every kernel variant used below in parallel worker processes (they fill Triton's disk
   cache, so the checks and timings then load the binaries instead of compiling one by one);
2. correctness against ``reference_attention`` (fp32 math) of the output and the three gradients in
   bf16, fp16 and fp32, head dims 32/64/128, blocks 64 and 128, causal and not, explicit CSR, lengths
   that are not multiples of the block; the kernels' tile walk against the Python layout; a tensor
   of more than 2**31 elements (64-bit offsets), checked on slices;
3. ``terrabyte bench attention`` at 8K..1M for head dims 64 and 128.

Writes ``gpu_check.json`` and ``gpu_check.md`` (the tables for kernels/BENCHMARKS.md) to ``--out``
(default: $OUT when set, else ./gpu_check_out). Exit code 1 if a correctness check fails.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from types import SimpleNamespace

import torch


def _bootstrap() -> None:
    """Make ``terrabyte.kernels`` (and ``terrabyte.data_pipeline``, whose host helpers the benchmark
    uses) importable from a plain checkout (no pip install on the GPU box)."""
    try:
        import terrabyte.kernels  # noqa: F401
        return
    except ImportError:
        pass
    import importlib.util
    import types

    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # kernels/tools/ -> repo
    root = types.ModuleType("terrabyte")
    root.__path__ = []
    sys.modules["terrabyte"] = root
    for name in ("data_pipeline", "kernels"):
        folder = os.path.join(repo, name)
        spec = importlib.util.spec_from_file_location(f"terrabyte.{name}", os.path.join(folder, "__init__.py"),
                                                      submodule_search_locations=[folder])
        module = importlib.util.module_from_spec(spec)
        sys.modules[f"terrabyte.{name}"] = module
        spec.loader.exec_module(module)
        setattr(root, name, module)


_bootstrap()

# Correctness cases: (name, pattern config, n, head_dim, dtype, causal, heads). Few distinct kernel
# variants (dtype, head dim, block, parts present, causal): each one costs a compile.
CASES = [
    ("bf16 d64 union causal", {"local": 64, "stride": 256, "dilated": [[512, 2], [2048, 8]], "block": 64},
     2053, 64, "bf16", True, 4),
    ("fp16 d128 local+global causal", {"local": 256, "global_tokens": 4, "block": 64}, 1000, 128, "fp16", True, 2),
    ("bf16 d128 mixed heads non-causal",
     [{"local": 100, "block": 64}, {"stride": 192, "global_tokens": 8, "block": 64},
      {"dilated": [[256, 4, 1]], "block": 64}],
     1500, 128, "bf16", False, 3),
    ("fp32 d32 csr causal", "csr", 16 * 64 - 5, 32, "fp32", True, 2),
    ("bf16 d64 block128 causal", {"local": 300, "dilated": [[1024, 1]], "block": 128}, 2000, 64, "bf16", True, 2),
]
TOLERANCE = {"fp32": 1e-4, "fp16": 5e-3, "bf16": 3e-2}  # relative Frobenius error
# long_1g's global pattern (configs/long_1g.yaml): the kernel as the 1 GiB model runs it
BENCH_PATTERN = {"local": 1024, "dilated": [[8192, 8], [65536, 64]], "global_tokens": 64, "block": 64}
BENCH_LENGTHS = [8192, 32768, 131072]
CPU_BENCH_LENGTHS = [1024]  # the rehearsal: the PyTorch paths at CPU scale
CHECK_HEADER = "| check | result | relative errors (out, dq, dk, dv) or detail |\n|---|---|---|"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DEVICE = "cuda"  # --device cpu: a dry run of the checks under TRITON_INTERPRET=1, shrunk, bf16 as fp32


def say(msg: str) -> None:
    sys.stdout.write(msg + "\n")
    sys.stdout.flush()


def make_pattern(cfg, n, heads, seed=0):
    from terrabyte.kernels import SparsePattern

    if cfg == "csr":
        g = torch.Generator().manual_seed(seed)
        blocks = -(-n // 64)
        return SparsePattern.from_block_layout(torch.rand(heads, blocks, blocks, generator=g) < 0.3, block=64)
    return SparsePattern.from_config(cfg)


def shrink(cfg):
    """The dry run's version of a pattern: sizes / 8, so parts still matter at 150 positions."""
    if isinstance(cfg, list):
        return [shrink(c) for c in cfg]
    out = {k: (max(v // 8, 1) if isinstance(v, int) and k != "block" else v) for k, v in cfg.items()}
    if "dilated" in cfg:
        out["dilated"] = [[max(e[0] // 8, e[1])] + list(e[1:]) for e in cfg["dilated"]]
    out["block"] = min(cfg.get("block", 64), 32)
    return out


def _warm(job):
    """Worker: one forward+backward compiles a kernel variant into Triton's disk cache. The shapes
    are those of the later run: Triton specialises integer arguments (divisibility by 16), so
    another length could compile another binary."""
    cfg, n, head_dim, dtype, causal, heads, batch = job
    from terrabyte.kernels import sparse_attention

    pattern = make_pattern(cfg, n, heads)
    q, k, v = (torch.randn(batch, heads, n, head_dim, device="cuda", dtype=DTYPES[dtype], requires_grad=True)
               for _ in range(3))
    out = sparse_attention(q, k, v, pattern, causal=causal)
    out.sum().backward()
    torch.cuda.synchronize()
    return str(job[:1])


def warm_up(jobs) -> None:
    start = time.monotonic()
    try:
        import multiprocessing as mp

        with ProcessPoolExecutor(max_workers=min(len(jobs), max(1, (os.cpu_count() or 2) - 2)),
                                 mp_context=mp.get_context("spawn")) as pool:
            list(pool.map(_warm, jobs))
        say(f"compiled {len(jobs)} kernel variants in parallel in {time.monotonic() - start:.1f}s")
    except Exception:  # compiling in the main process later is slower but fine
        say("parallel warm-up failed, kernels compile on first use:\n" + traceback.format_exc())


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-30)).item()


@contextlib.contextmanager
def nan_outputs():
    """Every kernel output allocated inside starts as NaN, so an element a kernel never wrote shows."""
    from terrabyte.kernels.triton import function as module

    allocate = module._empty
    module._empty = lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype, device=device)
    try:
        yield
    finally:
        module._empty = allocate


def check_case(name, cfg, n, head_dim, dtype_name, causal, heads) -> bool:
    from terrabyte.kernels import reference_attention, sparse_attention

    if DEVICE == "cpu":  # dry run: the interpreter is slow and computes bf16 wrongly
        n = min(n, 200 if cfg == "csr" else 150)
        dtype_name = "fp32" if dtype_name == "bf16" else dtype_name
        cfg = cfg if cfg == "csr" else shrink(cfg)
    pattern = make_pattern(cfg, n, heads)
    dtype = DTYPES[dtype_name]
    q, k, v = (torch.randn(2, heads, n, head_dim, device=DEVICE, dtype=dtype, requires_grad=True) for _ in range(3))
    do = torch.randn(2, heads, n, head_dim, device=DEVICE, dtype=dtype)
    with nan_outputs():
        out = sparse_attention(q, k, v, pattern, causal=causal, backend="triton")
        grads = torch.autograd.grad(out, (q, k, v), do)
    rq, rk, rv = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = reference_attention(rq, rk, rv, pattern, causal=causal, chunk=512)
    ref_grads = torch.autograd.grad(ref, (rq, rk, rv), do.float())
    errs = [rel_err(a, b) for a, b in zip((out, *grads), (ref, *ref_grads))]
    finite = all(bool(torch.isfinite(t).all()) for t in (out, *grads))
    ok = finite and max(errs) < TOLERANCE[dtype_name]
    say(f"| {name} n={n} | {'ok' if ok else 'FAIL'} | " + " ".join(f"{e:.1e}" for e in errs)
        + ("" if finite else " (NaN/inf: unwritten output)") + " |")
    return ok


def check_walk() -> bool:
    from terrabyte.kernels import SparsePattern
    from terrabyte.kernels.triton.function import count_tiles

    ok = True
    for cfg, n in ((CASES[0][1], 1100), (CASES[2][1], 900)):
        if DEVICE == "cpu":
            cfg, n = shrink(cfg), n // 8
        pattern = SparsePattern.from_config(cfg)
        heads = pattern.num_heads or 2
        for causal in (True, False):
            for transposed in (False, True):
                _, visits = count_tiles(pattern, n, heads, causal, transposed, device=DEVICE, with_map=True)
                blocks = -(-n // pattern.block)
                expect = torch.zeros(heads, blocks, blocks, dtype=torch.int32)
                for h in range(heads):
                    for x in range(blocks):
                        walk = pattern.query_blocks if transposed else pattern.key_blocks
                        for b, full in walk(x, n, h, causal, with_full=True):
                            expect[h, x, b] += 1 if full else 16
                ok &= torch.equal(visits.cpu(), expect)
    say(f"| kernel tile walk equals the Python layout (forward and transposed) | {'ok' if ok else 'FAIL'} | |")
    return ok


def check_int64(n: int = (1 << 22) + 64, heads: int = 8, dtype: torch.dtype = torch.bfloat16) -> bool:
    """batch * heads * n * head_dim > 2**31: compare slices with the reference (local windows are
    translation invariant, so a slice with enough history is an exact oracle)."""
    from terrabyte.kernels import SparsePattern, reference_attention, sparse_attention

    head_dim, w = 64, 128
    pattern = SparsePattern.from_config({"local": w, "block": 64})
    q, k, v = (torch.randn(1, heads, n, head_dim, device=DEVICE, dtype=dtype, requires_grad=True)
               for _ in range(3))
    do = torch.randn_like(q)
    out = sparse_attention(q, k, v, pattern, backend="triton")
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), do)
    lo = n - 64 - w  # the slice holds every key the last 64 queries attend and every query of the last 64 keys
    sl = [t[:, -1:, lo:].detach().float().requires_grad_() for t in (q, k, v)]
    ref = reference_attention(*sl, pattern)
    rdq, rdk, rdv = torch.autograd.grad(ref, sl, do[:, -1:, lo:].float())
    pairs = [(out, ref), (dq, rdq), (dk, rdk), (dv, rdv)]
    errs = [rel_err(a[:, -1:, -64:], b[:, :, -64:]) for a, b in pairs]
    ok = max(errs) < TOLERANCE["bf16" if dtype == torch.bfloat16 else "fp32"]
    big = " (> 2**31: 64-bit offsets)" if q.numel() > 2**31 else ""
    say(f"| {q.numel()} elements per tensor{big}, last rows | {'ok' if ok else 'FAIL'} | "
        + " ".join(f"{e:.1e}" for e in errs) + " |")
    return ok


def check_grid_split(heads: int = 4, n: int = 128, head_dim: int = 32) -> bool:
    """batch x heads above CUDA's 65,535 grid limit (the model's lower stages in big chunks): the
    call is split into launches (``batch_slices``) and still equals the reference."""
    from terrabyte.kernels import SparsePattern, reference_attention, sparse_attention

    batch = 65535 // heads + 7
    pattern = SparsePattern.from_config({"local": 64, "global_tokens": 1, "block": 64})
    q, k, v = (torch.randn(batch, heads, n, head_dim, device=DEVICE, dtype=torch.bfloat16) for _ in range(3))
    out = sparse_attention(q, k, v, pattern, backend="triton")
    rows = torch.tensor([0, batch // 2, batch - 1], device=DEVICE)
    ref = reference_attention(q[rows].float(), k[rows].float(), v[rows].float(), pattern)
    err = rel_err(out[rows], ref)
    ok = err < TOLERANCE["bf16"]
    say(f"| batch {batch} x {heads} heads > 65,535 grid rows | {'ok' if ok else 'FAIL'} | {err:.1e} |")
    return ok


def bench(head_dim: int, deadline: float, max_flex: int, on_rows=None) -> dict | None:
    """Times (ms) at BENCH_LENGTHS of our kernel on long_1g's pattern, FlexAttention and dense
    causal SDPA, and the dense causal control: our kernel on a fully dense causal pattern (its time
    over SDPA's is the "% of dense" figure; compare times, not FLOP rates: partly masked tiles count
    differently in each). ``on_rows(report)`` after each length."""
    from terrabyte.kernels import SparsePattern
    from terrabyte.kernels.tools.bench import Bench, Report, format_table

    gpu = DEVICE == "cuda"
    pattern = SparsePattern.from_config(BENCH_PATTERN if gpu else shrink(BENCH_PATTERN))
    report = Report(device=torch.cuda.get_device_name() if gpu else "cpu (PyTorch paths: rehearsal)",
                    dtype="bf16" if gpu else "fp32", batch=1, heads=8 if gpu else 2, head_dim=head_dim,
                    causal=True, pattern=pattern.to_config())
    args = SimpleNamespace(max_flex_length=max_flex, max_dense_length=1 << 17, max_reference_length=0, warmup=1,
                           reps=3 if gpu else 1)
    device, dtype = torch.device(DEVICE), torch.bfloat16 if gpu else torch.float32
    runner = Bench(pattern, report, device, dtype, args)
    for n in BENCH_LENGTHS if gpu else CPU_BENCH_LENGTHS:
        if time.monotonic() > deadline:
            say(f"time budget reached: benchmark stops before n={n}")
            break
        report.rows += runner.length(n)
        dense = Bench(SparsePattern.from_config({"local": n, "block": pattern.block}), report, device, dtype, args)
        row = dense._guard(n, "ours, dense causal pattern", dense._ours if gpu else dense._gathered)
        row.impl = "ours, dense causal pattern (control)"
        report.rows.append(row)
        if on_rows:
            on_rows(report)
    if gpu and time.monotonic() < deadline:
        report.longest_fit = runner.longest_fit(start=max(BENCH_LENGTHS), deadline=deadline)
    say(format_table(report))
    return {"report": report, "table": format_table(report)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=float, default=170.0, help="seconds to aim for in total")
    parser.add_argument("--out", default=os.environ.get("OUT") or "gpu_check_out")
    parser.add_argument("--max-flex-length", type=int, default=1 << 17)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cpu: dry run of the correctness checks under TRITON_INTERPRET=1 (shrunk)")
    args = parser.parse_args(argv)
    global DEVICE
    DEVICE = args.device
    if DEVICE == "cpu":
        return dry_run(args.out, args.budget)
    if not torch.cuda.is_available():
        say("gpu_check: no CUDA device; run the CPU tests instead (pytest tests/unit/test_sparse_attention.py)")
        return 2
    t0 = time.monotonic()
    deadline = t0 + args.budget
    import triton

    say(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
        f"{time.strftime('%Y-%m-%d %H:%M')}")
    jobs = [(*c[1:], 2) for c in CASES] + [(BENCH_PATTERN, BENCH_LENGTHS[0], d, "bf16", True, 8, 1) for d in (64, 128)]
    warm_up(jobs)
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
               "date": time.strftime("%Y-%m-%d"), "checks": {}, "bench": []}
    ok = run_checks(results, args.out, [(c[0], check_case, c) for c in CASES]
                    + [(name, fn, ()) for name, fn in (("tile walk", check_walk), ("64-bit offsets", check_int64),
                                                       ("grid split", check_grid_split))])
    say(f"correctness {'passed' if ok else 'FAILED'} after {time.monotonic() - t0:.0f}s")
    run_benches(results, args.out, (64, 128), deadline, args.max_flex_length)
    say(f"done in {time.monotonic() - t0:.0f}s; results in {args.out}")
    return 0 if ok else 1


def _save(results: dict, out: str) -> None:
    """gpu_check.json, rewritten after every check and benchmark length (a timeout keeps the rest)."""
    os.makedirs(out, exist_ok=True)
    tmp = os.path.join(out, "gpu_check.json.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(results, fh, indent=1, default=str)
    os.replace(tmp, os.path.join(out, "gpu_check.json"))


def run_checks(results: dict, out: str, checks: list) -> bool:
    """Each (name, fn, args): one table row on stdout (a traceback goes to stderr)."""
    say(CHECK_HEADER)
    ok = True
    for name, fn, args in checks:
        try:
            passed = fn(*args)
        except Exception:
            sys.stderr.write(f"FAIL {name}:\n{traceback.format_exc()}")
            say(f"| {name} | FAIL | {traceback.format_exc().strip().splitlines()[-1][:150]} |")
            passed = False
        results["checks"][name] = passed
        ok &= passed
        _save(results, out)
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    say(f"\ncorrectness {'passed' if ok else 'FAILED'}\n")
    return ok


def run_benches(results: dict, out: str, head_dims, deadline: float, max_flex: int) -> None:
    from dataclasses import asdict

    for head_dim in head_dims:
        if time.monotonic() > deadline:
            say(f"time budget reached: no benchmark at head_dim {head_dim}")
            break
        results["bench"].append(None)

        def keep(report, slot=len(results["bench"]) - 1):
            results["bench"][slot] = asdict(report)
            _save(results, out)

        try:
            bench(head_dim, deadline, max_flex, on_rows=keep)
        except Exception:
            sys.stderr.write(f"benchmark head_dim {head_dim} failed:\n{traceback.format_exc()}")
            say(f"benchmark head_dim {head_dim} failed: {traceback.format_exc().strip().splitlines()[-1][:150]}")


def dry_run(out: str, budget: float) -> int:
    """The same steps at CPU scale: correctness under the Triton interpreter (shrunk), then the
    benchmark table of the PyTorch paths at CPU_BENCH_LENGTHS."""
    from terrabyte.kernels.triton.function import _interpreting

    if not _interpreting():
        say("gpu_check --device cpu needs TRITON_INTERPRET=1 in the environment")
        return 2
    deadline = time.monotonic() + budget
    results = {"device": "cpu (TRITON_INTERPRET=1)", "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
               "checks": {}, "bench": []}
    ok = run_checks(results, out, [(c[0], check_case, c) for c in CASES]
                    + [("tile walk", check_walk, ()), ("64-bit offsets", check_int64, (7 * 64 + 3, 2, torch.float32))])
    run_benches(results, out, (32,), deadline, 0)
    say(f"dry run {'passed' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
