"""``terrabyte bench attention``: the sparse kernels against FlexAttention and dense causal SDPA.

For one fixed pattern and a list of lengths it reports, per implementation, forward and
forward+backward time and TFLOP/s, the block-mask build time of FlexAttention (separately), the
layout metadata in bytes, and with ``--find-max`` (GPU) the longest sequence whose
forward+backward fits in GPU memory. ``--json`` also writes the report as JSON (atomically).

FLOPs are counted on computed tiles: 4 * b * b * head_dim per computed b x b tile for the forward
(QK^T and PV), 3.5x that for forward+backward (the FlashAttention convention: backward = 2.5x
forward), times batch. Tiles are counted by the kernels' own walk (``count_tiles``) on a GPU, by its
Python twin (``SparsePattern.num_tiles``, ``tile_walk.py``) on CPU. Flex is counted on its own block
mask (128 x 128 blocks), dense SDPA on the causal half, n^2 / 2 (n^2 with ``--non-causal``).

On a machine without CUDA it runs the block-gathered PyTorch path (``gathered_attention``, the
``sparse_attention`` default off the GPU), the dense-mask reference (chunked, up to
``--max-reference-length``) and dense SDPA, so the command always works; those numbers say nothing
about the kernels. The last column, forward+backward microseconds per sequence position, stays
roughly flat as n doubles for a path whose cost is linear in n (once n exceeds the pattern's
longest segment).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from terrabyte.data_pipeline.basics.errors import ConfigError
from terrabyte.data_pipeline.basics.system import atomic_write, describe_machine

from ..pattern import SparsePattern

log = logging.getLogger(__name__)

DEFAULT_PATTERN = {"local": 512, "dilated": [[2048, 4], [8192, 16]], "global_tokens": 64, "block": 64}
GPU_LENGTHS = "8192,32768,131072,262144,1048576"
CPU_LENGTHS = "256,512,1024"
FLEX_BLOCK = 128  # FlexAttention's default block size
BWD_FACTOR = 3.5  # forward + backward FLOPs / forward FLOPs (FlashAttention convention)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class Row:
    length: int
    impl: str
    fwd_ms: float | None = None
    fwd_tflops: float | None = None
    fwd_bwd_ms: float | None = None
    fwd_bwd_tflops: float | None = None
    build_ms: float | None = None
    metadata_bytes: int | None = None
    tiles: int | None = None
    us_per_position: float | None = None  # fwd+bwd time / length
    note: str = ""


@dataclass
class Report:
    device: str
    dtype: str
    batch: int
    heads: int
    head_dim: int
    causal: bool
    pattern: dict | list
    rows: list = field(default_factory=list)
    longest_fit: int | None = None
    date: str = field(default_factory=lambda: time.strftime("%Y-%m-%d"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pattern", default=json.dumps(DEFAULT_PATTERN),
                        help="sparse pattern as JSON (keys: see terrabyte.kernels.pattern.parts)")
    parser.add_argument("--lengths", default=None,
                        help=f"comma-separated sequence lengths (default GPU {GPU_LENGTHS}, CPU {CPU_LENGTHS})")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=None, help="default 8 on GPU, 2 on CPU")
    parser.add_argument("--head-dim", type=int, default=None, help="default 64 on GPU, 32 on CPU")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default bf16 on GPU, fp32 on CPU")
    parser.add_argument("--non-causal", action="store_true", help="bidirectional attention")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    parser.add_argument("--max-flex-length", type=int, default=1 << 20,
                        help="skip FlexAttention above this length (its block mask grows as (n/128)^2)")
    parser.add_argument("--max-dense-length", type=int, default=1 << 17,
                        help="skip dense SDPA above this length (its cost grows as n^2)")
    parser.add_argument("--max-reference-length", type=int, default=8192,
                        help="CPU: skip the dense-mask reference above this length (its cost grows as n^2)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--find-max", action="store_true", help="also search the longest sequence that fits (GPU)")
    parser.add_argument("--json", default=None, help="also write the results as JSON to this file")


def run(args: argparse.Namespace) -> int:
    device = _pick_device(args.device)
    on_gpu = device.type == "cuda"
    try:
        pattern_cfg = json.loads(args.pattern)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--pattern is not valid JSON: {exc}") from None
    try:
        pattern = SparsePattern.from_config(pattern_cfg)
    except ValueError as exc:
        raise ConfigError(f"--pattern: {exc}") from None
    lengths = _parse_lengths(args.lengths or (GPU_LENGTHS if on_gpu else CPU_LENGTHS))
    heads = args.heads or (8 if on_gpu else 2)
    head_dim = args.head_dim or (64 if on_gpu else 32)
    dtype_name = args.dtype or ("bf16" if on_gpu else "fp32")
    for name, value in (("--batch", args.batch), ("--heads", heads), ("--head-dim", head_dim), ("--reps", args.reps)):
        if value < 1:
            raise ConfigError(f"{name} must be positive, got {value}")
    try:
        pattern.check_heads(heads, "bench attention")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    machine = describe_machine(str(device)) + ("" if on_gpu else " (PyTorch paths)")
    report = Report(device=machine, dtype=dtype_name, batch=args.batch, heads=heads, head_dim=head_dim,
                    causal=not args.non_causal, pattern=pattern.to_config())
    bench = Bench(pattern, report, device, DTYPES[dtype_name], args)
    for n in lengths:
        report.rows += bench.length(n)
    if args.find_max and on_gpu:
        report.longest_fit = bench.longest_fit(start=max(lengths))
    sys.stdout.write(format_table(report))
    if args.json:
        _write_json(args.json, report)
    return 0


class Bench:
    """Runs every implementation at one length; failures (OOM) become notes, not crashes."""

    def __init__(self, pattern: SparsePattern, report: Report, device: torch.device, dtype: torch.dtype, args):
        self.pattern, self.report, self.device, self.dtype, self.args = pattern, report, device, dtype, args
        self.gpu = device.type == "cuda"

    def inputs(self, n: int, grad: bool) -> tuple:
        r = self.report
        shape = (r.batch, r.heads, n, r.head_dim)
        qkv = [torch.randn(shape, device=self.device, dtype=self.dtype, requires_grad=grad) for _ in range(3)]
        return (*qkv, torch.randn(shape, device=self.device, dtype=self.dtype))

    def length(self, n: int) -> list[Row]:
        rows = [self._ours(n)] if self.gpu else [self._gathered(n)]
        if not self.gpu and self._part_path(n):  # the block-gathered tiles the fast path replaces
            rows.append(self._gathered(n, fast=False))
        if not self.gpu and n <= self.args.max_reference_length:
            rows.append(self._ours(n))
        elif not self.gpu:
            rows.append(Row(n, "reference (cpu)",
                            note=f"skipped above --max-reference-length {self.args.max_reference_length}"))
        if self.gpu and n <= self.args.max_flex_length:
            rows.append(self._guard(n, "flex", self._flex))
        elif self.gpu:
            rows.append(Row(n, "flex", note=f"skipped above --max-flex-length {self.args.max_flex_length}"))
        if n <= self.args.max_dense_length:
            rows.append(self._guard(n, "sdpa dense causal", self._dense))
        else:
            rows.append(Row(n, "sdpa dense causal",
                            note=f"skipped above --max-dense-length {self.args.max_dense_length}"))
        return rows

    def _guard(self, n: int, name: str, fn: Callable[[int], Row]) -> Row:
        try:
            return fn(n)
        except torch.cuda.OutOfMemoryError:
            return Row(n, name, note="out of memory")
        except (RuntimeError, NotImplementedError) as exc:  # e.g. a baseline unavailable in this torch
            log.warning("%s at n=%d failed: %s", name, n, exc)
            return Row(n, name, note=f"failed: {str(exc).splitlines()[0][:80]}")
        finally:
            if self.gpu:
                torch.cuda.empty_cache()

    def _ours(self, n: int) -> Row:
        from ..dispatch import sparse_attention
        from ..triton.function import count_tiles

        r = self.report
        name = "terrabyte triton" if self.gpu else "reference (cpu)"
        if self.gpu:
            tiles = int(count_tiles(self.pattern, n, r.heads, r.causal, device=self.device).sum())
            attend = lambda q, k, v: sparse_attention(q, k, v, self.pattern, causal=r.causal)  # noqa: E731
        else:
            full, masked = self.pattern.num_tiles(n, r.heads, r.causal)
            tiles = full + masked
            attend = lambda q, k, v: sparse_attention(q, k, v, self.pattern, causal=r.causal,  # noqa: E731
                                                      backend="reference", chunk=256)
        flops = tiles * r.batch * 4 * self.pattern.block ** 2 * r.head_dim
        row = self._guard(n, name, lambda n: self._time(n, name, attend, flops))
        row.tiles = tiles
        row.metadata_bytes = self.pattern.metadata_bytes(n, r.heads)
        return row

    def _part_path(self, n: int) -> bool:
        from ..cpu.gathered_attention import DEFAULT_BUDGET
        from ..cpu.part_attention import applies

        r = self.report
        shape = (r.batch, r.heads, n, r.head_dim)
        return applies(self.pattern, torch.empty(shape, dtype=self.dtype, device="meta"), r.causal, DEFAULT_BUDGET)

    def _gathered(self, n: int, fast: bool = True) -> Row:
        """The gathered path as ``sparse_attention`` runs it (part-wise where it applies), or with
        ``fast=False`` its block-gathered tiles; FLOPs and tiles are those of the tiles either way."""
        from ..cpu.gathered_attention import gather_plan, gathered_attention

        r = self.report
        name = "gather (cpu)" if fast else "gather tiles (cpu)"
        plan = gather_plan(self.pattern, n, r.heads, r.causal, self.device)
        flops = plan.tiles * r.batch * 4 * self.pattern.block ** 2 * r.head_dim
        attend = lambda q, k, v: gathered_attention(q, k, v, self.pattern, causal=r.causal, fast=fast)  # noqa: E731
        row = self._guard(n, name, lambda n: self._time(n, name, attend, flops))
        if fast and self._part_path(n):
            row.note = "part-wise path (local band, sinks, dilated in residue order)"
        row.tiles = plan.tiles
        row.metadata_bytes = plan.index_bytes()
        return row

    def _flex(self, n: int) -> Row:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        r = self.report
        mask_mod = self.pattern.mask_mod(r.heads, causal=r.causal, device=self.device)
        torch.cuda.synchronize()
        start = time.perf_counter()
        block_mask = create_block_mask(mask_mod, None, r.heads, n, n, device=self.device, _compile=True)
        torch.cuda.synchronize()
        build_ms = (time.perf_counter() - start) * 1e3
        blocks = int(block_mask.kv_num_blocks.sum())
        if block_mask.full_kv_num_blocks is not None:
            blocks += int(block_mask.full_kv_num_blocks.sum())
        flops = blocks * r.batch * 4 * FLEX_BLOCK ** 2 * r.head_dim  # the mask is shared by the batch
        compiled = _compiled_flex(flex_attention)
        row = self._time(n, "flex", lambda q, k, v: compiled(q, k, v, block_mask=block_mask), flops)
        row.build_ms = build_ms
        row.tiles = blocks
        row.metadata_bytes = sum(t.numel() * t.element_size() for t in block_mask.as_tuple()
                                 if isinstance(t, torch.Tensor))
        return row

    def _dense(self, n: int) -> Row:
        r = self.report
        flops = r.batch * r.heads * 4 * n * n * r.head_dim * (0.5 if r.causal else 1.0)
        return self._time(n, "sdpa dense causal" if r.causal else "sdpa dense",
                          lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=r.causal), flops)

    def _time(self, n: int, name: str, attend: Callable, fwd_flops: float) -> Row:
        q, k, v, do = self.inputs(n, grad=True)
        with torch.no_grad():
            fwd_ms = self._median_ms(lambda: attend(q, k, v))

        def fwd_bwd():
            out = attend(q, k, v)
            torch.autograd.grad(out, (q, k, v), do)

        fwd_bwd_ms = self._median_ms(fwd_bwd)
        return Row(n, name, fwd_ms=fwd_ms, fwd_tflops=fwd_flops / fwd_ms / 1e9, fwd_bwd_ms=fwd_bwd_ms,
                   fwd_bwd_tflops=BWD_FACTOR * fwd_flops / fwd_bwd_ms / 1e9, us_per_position=fwd_bwd_ms * 1e3 / n)

    def _median_ms(self, fn: Callable) -> float:
        for _ in range(self.args.warmup):
            fn()
        times = []
        for _ in range(self.args.reps):
            if self.gpu:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return sorted(times)[len(times) // 2]

    def longest_fit(self, start: int, deadline: float | None = None) -> int:
        """Double the length from ``start`` until forward+backward runs out of memory (or time)."""
        from ..dispatch import sparse_attention

        best, n = None, start
        while n <= (1 << 30) and (deadline is None or time.monotonic() < deadline):
            try:
                q, k, v, do = self.inputs(n, grad=True)
                out = sparse_attention(q, k, v, self.pattern, causal=self.report.causal)
                torch.autograd.grad(out, (q, k, v), do)
                torch.cuda.synchronize()
                best = n
            except torch.cuda.OutOfMemoryError:
                break
            finally:
                q = k = v = do = out = None  # noqa: F841 - free before the next size
                torch.cuda.empty_cache()
            n *= 2
        return best or 0


def _compiled_flex(flex_attention):
    global _FLEX
    if _FLEX is None:
        _FLEX = torch.compile(flex_attention, dynamic=False)
    return _FLEX


_FLEX = None


def format_table(report: Report) -> str:
    def num(x, fmt):
        return "-" if x is None else format(x, fmt)

    head = (f"sparse attention benchmark on {report.device}, {report.dtype}, batch {report.batch}, "
            f"heads {report.heads}, head_dim {report.head_dim}, {'causal' if report.causal else 'non-causal'}, "
            f"{report.date}\npattern: {json.dumps(report.pattern)}\n")
    cols = ("length", "implementation", "fwd ms", "fwd TFLOP/s", "fwd+bwd ms", "fwd+bwd TFLOP/s", "mask build ms",
            "metadata bytes", "tiles", "fwd+bwd us/position", "note")
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in report.rows:
        lines.append("| " + " | ".join([
            str(r.length), r.impl, num(r.fwd_ms, ".3f"), num(r.fwd_tflops, ".3g"), num(r.fwd_bwd_ms, ".3f"),
            num(r.fwd_bwd_tflops, ".3g"), num(r.build_ms, ".1f"), num(r.metadata_bytes, "d"), num(r.tiles, "d"),
            num(r.us_per_position, ".3g"), r.note,
        ]) + " |")
    tail = ""
    if report.longest_fit is not None:
        tail = f"\nlongest sequence whose forward+backward fits: {report.longest_fit}\n"
    return head + "\n".join(lines) + "\n" + tail


def _write_json(path: str, report: Report) -> None:
    atomic_write(path, json.dumps(asdict(report), indent=1))


def _parse_lengths(text: str) -> list[int]:
    try:
        lengths = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--lengths must be comma-separated integers, got {text!r}") from None
    if not lengths or min(lengths) < 1:
        raise ConfigError(f"--lengths must hold positive integers, got {text!r}")
    return lengths


def _pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda asked for, but CUDA is not available")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
