"""`terrabyte bench data`: builder and loader throughput, side by side with plain zstd.

One process, one corpus (default: the standard library's *.py files):
  1. build   - `build_shards` at the given zstd level, MB/s of raw input;
  2. zstd    - plain decompression of every train member of the same shards (pread + decompress),
               the ceiling any loader of these shards can reach;
  3. loader  - one epoch of `ByteLoader` (packed int64 batches), MB/s of bytes delivered;
  4. streaming - mosaicml-streaming's MDSWriter/StreamingDataset on the same documents, only when
               the package is installed (never a dependency).
`--save` appends the table, with machine and date, to data_pipeline/BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import datetime
import logging
import os
import platform
import shutil
import sys
import tempfile
import time

logger = logging.getLogger(__name__)

BENCH_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "BENCHMARKS.md")


def add_arguments(parser: argparse.ArgumentParser):
    parser.add_argument("--input", nargs="*", default=None, metavar="PATH",
                        help="corpus to shard (default: this interpreter's standard library *.py files)")
    parser.add_argument("--include", action="append", default=None, metavar="GLOB", help="include glob (default *.py for the stdlib)")
    parser.add_argument("--zstd-level", type=int, default=3, help="zstd level for the build")
    parser.add_argument("--seq-len", type=int, default=2048, help="loader sequence length")
    parser.add_argument("--global-batch", type=int, default=64, help="loader global batch (lanes)")
    parser.add_argument("--micro-batch", type=int, default=8, help="loader micro-batch")
    parser.add_argument("--num-workers", type=int, default=0, help="loader prefetch threads")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats of each read measurement (best kept)")
    parser.add_argument("--workdir", default=None, help="where to build shards (default: a temporary directory)")
    parser.add_argument("--save", action="store_true", help="append the results to data_pipeline/BENCHMARKS.md")


def _best(f, repeats):
    best, out = float("inf"), None
    for _ in range(max(1, repeats)):
        t = time.perf_counter()
        out = f()
        best = min(best, time.perf_counter() - t)
    return best, out


def bench_plain_zstd(path: str) -> int:
    """Decompresses every train member of the shards in order; returns raw bytes."""
    import zstandard

    from . import stages
    from .builder import load_manifest

    table = stages.member_table(stages.shard_list(load_manifest(path), "train"))
    files = stages.ShardFiles()
    d = zstandard.ZstdDecompressor()
    total = 0
    try:
        for i in range(len(table)):
            url = table.urls[table.shard[i]]
            zo, zs = int(table.cols["zst_offset"][i]), int(table.cols["zst_size"][i])
            total += len(d.decompress(files.pread(url, zo, zs)))
    finally:
        files.close()
    return total


def bench_loader(path: str, args) -> int:
    """One full epoch of packed batches; returns bytes delivered (tokens that are not EOS/PAD)."""
    from .loader import ByteLoader

    loader = ByteLoader(path, seq_len=args.seq_len, global_batch=args.global_batch, micro_batch=args.micro_batch,
                        num_workers=args.num_workers)
    it = iter(loader)
    data = 0
    for _ in range(len(loader)):
        b = next(it)
        data += b.numel()
    loader.close()
    return data


def bench_streaming(docs_dir: str, inputs, include, workdir: str, repeats: int):
    """mosaicml-streaming on the same documents: (write seconds, read seconds, bytes) or None."""
    try:
        from streaming import MDSWriter, StreamingDataset
    except ImportError:
        return None
    from . import readers

    sources = readers.discover_sources(inputs, include or (), ())
    out = os.path.join(workdir, "mds")
    t = time.perf_counter()
    total = 0
    with MDSWriter(out=out, columns={"data": "bytes"}, compression="zstd:3", size_limit=1 << 26) as w:
        for src in sources:
            for doc in readers.read_source(src, readers.ReadOptions()):
                w.write({"data": doc.data})
                total += len(doc.data)
    write_s = time.perf_counter() - t

    def read():
        ds = StreamingDataset(local=out, shuffle=False, batch_size=1)
        return sum(len(s["data"]) for s in ds)

    read_s, _ = _best(read, repeats)
    return write_s, read_s, total


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores visible, Python {platform.python_version()}"


def run(args) -> int:
    import zstandard

    from .builder import build_shards
    from .loader import STDLIB_EXCLUDE, STDLIB_INCLUDE, stdlib_corpus

    inputs = args.input or [stdlib_corpus()]
    include = args.include if args.include is not None else (list(STDLIB_INCLUDE) if not args.input else [])
    exclude = list(STDLIB_EXCLUDE) if not args.input else []
    workdir = args.workdir or tempfile.mkdtemp(prefix="terrabyte-bench-")
    shard_dir = os.path.join(workdir, "shards")
    try:
        shutil.rmtree(shard_dir, ignore_errors=True)
        t = time.perf_counter()
        man = build_shards(inputs, shard_dir, include=include, exclude=exclude, zstd_level=args.zstd_level,
                           progress=False)
        build_s = time.perf_counter() - t
        raw_all = man["totals"]["all"]["raw_bytes"]
        zstd_s, raw_train = _best(lambda: bench_plain_zstd(shard_dir), args.repeats)
        loader_s, delivered = _best(lambda: bench_loader(shard_dir, args), args.repeats)
        mds = bench_streaming(shard_dir, inputs, include, workdir, args.repeats)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)

    rows = [
        ("build (zstd level %d)" % args.zstd_level, raw_all / build_s / 1e6, f"{raw_all / 1e6:.1f} MB raw input"),
        ("plain zstd decompress", raw_train / zstd_s / 1e6, f"{raw_train / 1e6:.1f} MB, all train members"),
        (f"ByteLoader epoch (seq {args.seq_len}, batch {args.global_batch}/{args.micro_batch}, "
         f"{args.num_workers} workers)", delivered / loader_s / 1e6,
         f"{delivered / 1e6:.1f} M tokens, {100 * (delivered / loader_s) / (raw_train / zstd_s):.0f}% of plain zstd"),
    ]
    if mds is not None:
        w, r, n = mds
        rows.append(("mosaicml-streaming MDSWriter (zstd:3)", n / w / 1e6, f"{n / 1e6:.1f} MB"))
        rows.append(("mosaicml-streaming StreamingDataset", n / r / 1e6, "documents, unpacked"))
    else:
        rows.append(("mosaicml-streaming", float("nan"), "not installed: skipped"))
    ratio = raw_all / man["totals"]["all"]["compressed_bytes"]
    header = (f"### {datetime.date.today().isoformat()} — {machine()}\n\n"
              f"Corpus: {', '.join(inputs)} ({man['totals']['all']['documents']} documents, "
              f"{raw_all / 1e6:.1f} MB, zstd ratio {ratio:.2f}); python-zstandard {zstandard.__version__}\n\n")
    table = "| measurement | MB/s | notes |\n|---|---:|---|\n" + "".join(
        f"| {name} | {mbps:,.0f} | {note} |\n" for name, mbps, note in rows)
    sys.stdout.write(header + table)
    if args.save:
        with open(BENCH_FILE, "a", encoding="utf-8") as f:
            f.write("\n" + header + table)
        logger.info("appended results to %s", BENCH_FILE)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="terrabyte bench data", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
