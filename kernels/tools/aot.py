"""Compile every kernel variant the GPU path can launch, for a GPU this machine does not have.

    python -m terrabyte.kernels.tools.aot [--arch 90] [--subset] [--jobs N]

No GPU is needed: each kernel of ``kernels/triton/`` goes through ``triton.compile`` with an
``ASTSource`` (the signature and constexprs that ``SparseAttentionFunction`` and ``count_tiles``
launch with) and ``GPUTarget("cuda", arch, 64)``; Triton's bundled ptxas makes the cubin and its
bundled ``cuobjdump --dump-resource-usage`` reads registers and stack (spilled registers live
there) per variant. One line per variant, then a summary; exit code 1 if any variant fails to
compile (on a GPU machine that failure would cost device minutes).

Variants: forward, backward preprocessing, dQ and dK/dV for bf16/fp16/fp32 x head dims 32/64/128 x
blocks 64/128 x (a causal union of every part kind, an explicit CSR layout, non-causal), and the tile
counter per block and walk direction; warps and stages from ``_launch_options`` as launched.
``--subset``: each kernel once, bf16 at the heaviest shape (head dim 128, block 128: the CI check).
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

logger = logging.getLogger(__name__)

DTYPES = {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}
HEAD_DIMS = (32, 64, 128)
BLOCKS = (64, 128)
# pattern flags as _launch_meta sets them: (name, HAS_GLOBAL, HAS_STRIDE, NUM_DIL, LAYOUT_CSR, CAUSAL)
PATTERNS = (
    ("union", True, True, 2, False, True),
    ("csr", False, False, 0, True, True),
    ("noncausal", True, True, 1, False, False),
)
KERNELS = ("fwd", "preprocess", "dq", "dkdv")
# pointer arguments whose element type does not follow q's
POINTER_TYPES = {"LSE": "fp32", "DELTA": "fp32", "PRM": "i32", "PTR": "i32", "IDX": "i32", "MAP": "i32", "COUNTS": "i64"}
FLOAT_SCALARS = {"qk_scale", "sm_scale"}
INT_ARGS = {"H"}  # upper-case names that are not tensors (heads)


def _module():
    from terrabyte.kernels.triton import function  # Triton is imported here

    return function


def _kernel(name: str):
    from terrabyte.kernels.triton import backward, count, forward

    return {"fwd": forward._fwd_kernel, "preprocess": backward._bwd_preprocess_kernel, "dq": backward._bwd_dq_kernel,
            "dkdv": backward._bwd_dkdv_kernel, "count": count._count_kernel}[name]


def _options(block: int, head_dim: int = 32) -> dict:
    """Warps and stages as a compiled launch uses them."""
    return _module().compiled_options(block, head_dim)


def variants(subset: bool = False) -> list[dict]:
    """Every (kernel, constexprs, options) the GPU path launches; ``subset``: the heaviest of each."""
    out = []
    for dtype in (("bf16",) if subset else DTYPES):
        for head_dim in (HEAD_DIMS[-1:] if subset else HEAD_DIMS):
            for block in (BLOCKS[-1:] if subset else BLOCKS):
                block_d = max(1 << (head_dim - 1).bit_length(), 16)
                options = _options(block, block_d)
                for pname, has_global, has_stride, num_dil, csr, causal in (PATTERNS[:1] if subset else PATTERNS):
                    flags = dict(CAUSAL=causal, BLOCK=block, HEAD_DIM=head_dim, BLOCK_D=block_d, HAS_GLOBAL=has_global,
                                 HAS_STRIDE=has_stride, NUM_DIL=num_dil, LAYOUT_CSR=csr,
                                 DOT_PREC="ieee" if dtype == "fp32" else "tf32")
                    for kernel in KERNELS:
                        if kernel == "preprocess":
                            if pname != PATTERNS[0][0]:
                                continue  # it takes no pattern flags
                            consts = dict(BLOCK=block, HEAD_DIM=head_dim, BLOCK_D=block_d)
                        else:
                            consts = flags
                        out.append({"kernel": kernel, "dtype": dtype, "pattern": pname, "constexprs": consts,
                                    "options": options})
    for block in (BLOCKS[-1:] if subset else BLOCKS):
        for transposed in (False, True):
            for pname, has_global, has_stride, num_dil, csr, causal in (PATTERNS[:1] if subset else PATTERNS):
                out.append({"kernel": "count", "dtype": "fp32", "pattern": pname, "options": _options(block),
                            "constexprs": dict(CAUSAL=causal, TRANSPOSED=transposed, BLOCK=block, HAS_GLOBAL=has_global,
                                               HAS_STRIDE=has_stride, NUM_DIL=num_dil, LAYOUT_CSR=csr, HAS_MAP=False)})
    return out


def signature(fn, constexprs: dict, dtype: str) -> dict:
    """Argument types as a launch specialises them: tensors by element type, Python ints as i32
    (every launch here passes sizes and strides below 2**31), the scales as fp32."""
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.isupper() and name not in INT_ARGS:
            sig[name] = "*" + POINTER_TYPES.get(name, dtype)
        else:
            sig[name] = "fp32" if name in FLOAT_SCALARS else "i32"
    return sig


def _tools() -> tuple[str, str]:
    import triton

    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    return os.path.join(bin_dir, "ptxas"), os.path.join(bin_dir, "cuobjdump")


def resource_usage(cubin: bytes) -> dict:
    """Registers, stack bytes and shared memory of a cubin, read by the bundled cuobjdump."""
    _, cuobjdump = _tools()
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True,
                              timeout=60).stdout
    found = {k.lower(): int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", text)}
    return {"registers": found.get("reg"), "stack": found.get("stack"), "local": found.get("local"),
            "shared": found.get("shared")}


def compile_one(v: dict, arch: int) -> dict:
    """Compile one variant; the row for the table (``error`` set on failure)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _kernel(v["kernel"])
    row = {k: v[k] for k in ("kernel", "dtype", "pattern")}
    c = v["constexprs"]
    row.update(head_dim=c.get("HEAD_DIM"), block=c["BLOCK"], causal=c.get("CAUSAL"), warps=v["options"]["num_warps"],
               stages=v["options"]["num_stages"], transposed=c.get("TRANSPOSED"))
    started = time.monotonic()
    try:
        src = ASTSource(fn=fn, signature=signature(fn, c, v["dtype"]), constexprs=c)
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 64), options=dict(v["options"]))
        row.update(resource_usage(compiled.asm["cubin"]))
    except Exception as exc:  # noqa: BLE001 - every failure is a row, the exit code counts them
        row["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}"
    row["seconds"] = time.monotonic() - started
    return row


def _compile_star(args):
    return compile_one(*args)


def describe(row: dict) -> str:
    what = f"{row['kernel']:<10} {row['dtype']:<4} {row['pattern']:<9} d={row['head_dim'] or '-':<3} block={row['block']:<3}"
    if row["kernel"] == "count":
        what += f" {'transposed' if row['transposed'] else 'forward':<10}"
    what += f" warps={row['warps']}"
    if "error" in row:
        return f"FAIL {what}: {row['error']}"
    return (f"ok   {what}: {row['registers']} registers, {row['stack']} B stack (spills), "
            f"{row['shared']} B shared, {row['seconds']:.1f}s")


def run(arch: int, subset: bool, jobs: int) -> list[dict]:
    todo = [(v, arch) for v in variants(subset)]
    logger.info("compiling %d kernel variants for sm_%d with %d process(es)", len(todo), arch, jobs)
    if jobs <= 1:
        rows = []
        for job in todo:
            rows.append(_compile_star(job))
            sys.stdout.write(describe(rows[-1]) + "\n")
        return rows
    import multiprocessing as mp

    with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
        rows = []
        for row in pool.map(_compile_star, todo):
            rows.append(row)
            sys.stdout.write(describe(row) + "\n")
            sys.stdout.flush()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m terrabyte.kernels.tools.aot", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (default: 90, H100/H200)")
    parser.add_argument("--subset", action="store_true", help="each kernel once, bf16 at head dim 128 and block 128")
    parser.add_argument("--jobs", type=int, default=max(1, min(4, len(os.sched_getaffinity(0)))),
                        help="compiling processes (default: up to 4)")
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.arch < 70 or args.jobs < 1:
        sys.stderr.write(f"terrabyte: error: --arch {args.arch} must be >= 70 and --jobs {args.jobs} >= 1\n")
        return 2
    import triton

    if _module()._interpreting():
        sys.stderr.write("terrabyte: error: kernels.tools.aot compiles the kernels: unset TRITON_INTERPRET\n")
        return 2
    started = time.monotonic()
    rows = run(args.arch, args.subset, args.jobs)
    failed = [r for r in rows if "error" in r]
    worst = max((r for r in rows if "error" not in r), key=lambda r: r["stack"] or 0, default=None)
    sys.stdout.write(
        f"triton {triton.__version__}, sm_{args.arch}: {len(rows) - len(failed)} of {len(rows)} variants compiled in "
        f"{time.monotonic() - started:.0f}s" + (f"; most stack: {describe(worst)[5:]}" if worst else "") + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
