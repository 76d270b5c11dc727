"""`terrabyte bench data`: builder and loader throughput, side by side with plain zstd.

One process, one corpus (default: the standard library's *.py files):
  1. build   - `build_shards` at the given zstd level, MB/s of raw input;
  2. zstd    - plain decompression of every train member of the same shards (pread + decompress),
               the ceiling any loader of these shards can reach;
  3. loader  - `--epochs` epochs of `ByteLoader` (packed uint8 `ByteBatch`es, what the trainer loads, and
               int64 batches), MB/s of tokens delivered,
               with 0 and 1 prefetch threads;
  4. streaming - mosaicml-streaming's MDSWriter/StreamingDataset on the same documents, only when
               the package is installed (never a dependency).
Measurements 2 and 3 take turns, one run of each per round, best of `--repeats` rounds kept.
`--save` appends the table, with machine and date, to data_pipeline/BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import datetime
import logging
import os
import shutil
import sys
import tempfile
import time

from .basics.system import describe_machine

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
    parser.add_argument("--num-workers", type=int, nargs="+", default=[0, 1],
                        help="loader prefetch threads (one table row per value)")
    parser.add_argument("--dtypes", nargs="+", choices=("uint8", "int32", "int64"), default=["uint8", "int64"],
                        help="batch dtypes to measure (the trainer loads uint8 ByteBatches and widens on the device)")
    parser.add_argument("--epochs", type=int, default=3,
                        help="loader epochs per measurement (steady state: decompression buffers get reused)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats of each read measurement (best kept)")
    parser.add_argument("--workdir", default=None, help="where to build shards (default: a temporary directory)")
    parser.add_argument("--save", action="store_true", help="append the results to data_pipeline/BENCHMARKS.md")
    parser.add_argument("--sources", type=int, default=0, metavar="K",
                        help="also measure a data.sources mixture: the corpus's files dealt round-robin into K "
                             "shard directories, mixed with weights by size, against zstd on their members")


def _best(f, repeats):
    """Best wall time and best CPU time (this process, all threads) over repeats, and f's result.
    On a shared machine CPU time is the steadier number; on an idle one they agree."""
    wall, cpu, out = float("inf"), float("inf"), None
    for _ in range(max(1, repeats)):
        t, c = time.perf_counter(), time.process_time()
        out = f()
        wall = min(wall, time.perf_counter() - t)
        cpu = min(cpu, time.process_time() - c)
    return wall, cpu, out


def _best_interleaved(fs: dict, repeats: int) -> dict:
    """`_best` of each of fs, taking turns (one run of each per round), so that a noisy spell on a
    shared machine slows all of them alike instead of the one measured then: their ratios are what
    the table reports."""
    out = {k: (float("inf"), float("inf"), None) for k in fs}
    for _ in range(max(1, repeats)):
        for k, f in fs.items():
            wall, cpu, result = _best(f, 1)
            out[k] = (min(out[k][0], wall), min(out[k][1], cpu), result)
    return out


def bench_plain_zstd(path: str) -> int:
    """Decompresses every train member of the shards in order; returns raw bytes."""
    import zstandard

    from .read import epochs, fetch
    from .read.manifest import load_manifest, shard_list

    table = epochs.member_table(shard_list(load_manifest(path), "train"))
    files = fetch.ShardFiles()
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


def zstd_cli_frames(paths: list[str], out: str) -> list[str]:
    """Every train member's zstd frame of the builds at `paths`, concatenated into one file per
    build (`zstd -d` reads concatenated frames as one stream); returns the `zstd -d` commands."""
    from .format import DICT_FILE
    from .read import epochs, fetch
    from .read.manifest import file_url, load_manifest, shard_list

    commands = []
    for k, path in enumerate(paths):
        man = load_manifest(path)
        table = epochs.member_table(shard_list(man, "train"))
        files = fetch.ShardFiles()
        target = f"{out}.{k}.zst"
        with open(target, "wb") as f:
            for i in range(len(table)):
                url = table.urls[table.shard[i]]
                f.write(files.pread(url, int(table.cols["zst_offset"][i]), int(table.cols["zst_size"][i])))
        files.close()
        info = man.get("zstd_dict")
        dictionary = ["-D", file_url(man, info.get("path", DICT_FILE))] if info else []
        commands.append(["zstd", "-d", "-q", "-c", *dictionary, target])
    return commands


def bench_zstd_cli(commands: list[list[str]], cpu: list) -> int:
    """Runs each `zstd -d` into /dev/null; returns raw bytes (from the manifests' index) and
    appends the CPU seconds the zstd processes took to `cpu`."""
    import resource
    import subprocess

    def children():
        r = resource.getrusage(resource.RUSAGE_CHILDREN)
        return r.ru_utime + r.ru_stime

    before = children()
    for cmd in commands:
        subprocess.run(cmd, stdout=subprocess.DEVNULL, check=True)
    cpu.append(children() - before)
    return 0


def split_build(inputs, include, exclude, workdir: str, k: int, zstd_level: int) -> list[str]:
    """The corpus's files dealt round-robin (sorted) into k directories, each built into its own
    shard directory, as separately built corpora are; returns the shard directories."""
    from .write.builder import build_shards
    from .write.config import BuildConfig
    from .write.sources import discover_sources

    files = [src for src in discover_sources(inputs, include or (), exclude or ()) if src.kind == "file"]
    paths = []
    for part in range(k):
        raw = os.path.join(workdir, f"part{part}")
        for src in files[part::k]:
            target = os.path.join(raw, src.name)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.copyfile(src.path, target)
        paths.append(os.path.join(workdir, f"part{part}-shards"))
        build_shards(BuildConfig(inputs=[raw], zstd_level=zstd_level), paths[-1], progress=False)
    return paths


def bench_loader(path, args, workers: int, dtype: str = "int64") -> int:
    """`args.epochs` full epochs of packed batches (a Mixture in place of `path`: a MixtureLoader's
    epochs, as many sequences as its sources hold); returns tokens delivered."""
    import torch

    from .read.loader import ByteLoader
    from .read.mixture import Mixture, MixtureLoader

    loader = (MixtureLoader if isinstance(path, Mixture) else ByteLoader)(
        path, seq_len=args.seq_len, global_batch=args.global_batch, micro_batch=args.micro_batch,
        num_workers=workers, dtype=getattr(torch, dtype))
    it = iter(loader)
    tokens = 0
    for _ in range(len(loader) * args.epochs):
        tokens += next(it).numel()
    loader.close()
    return tokens


def bench_streaming(inputs, include, exclude, workdir: str, repeats: int):
    """mosaicml-streaming on the same documents: (write seconds, read seconds, bytes) or None."""
    try:
        from streaming import MDSWriter, StreamingDataset
    except Exception as e:  # absent, or present but unusable (its import pulls in torchvision...)
        logger.info("mosaicml-streaming unavailable (%s): skipped", e)
        return None
    from .write.documents import ReadOptions, read_source
    from .write.sources import discover_sources

    sources = discover_sources(inputs, include or (), exclude or ())
    out = os.path.join(workdir, "mds")
    t = time.perf_counter()
    total = 0
    with MDSWriter(out=out, columns={"data": "bytes"}, compression="zstd:3", size_limit=1 << 26) as w:
        for src in sources:
            for doc in read_source(src, ReadOptions()):
                w.write({"data": doc.data})
                total += len(doc.data)
    write_s = time.perf_counter() - t

    def read():
        ds = StreamingDataset(local=out, shuffle=False, batch_size=1)
        return sum(len(s["data"]) for s in ds)

    read_s, _, _ = _best(read, repeats)
    return write_s, read_s, total


def run(args) -> int:
    import zstandard

    from .stdlib_corpus import STDLIB_EXCLUDE, STDLIB_INCLUDE, stdlib_corpus
    from .write.builder import build_shards
    from .write.config import BuildConfig

    inputs = args.input or [stdlib_corpus()]
    include = args.include if args.include is not None else (list(STDLIB_INCLUDE) if not args.input else [])
    exclude = list(STDLIB_EXCLUDE) if not args.input else []
    workdir = args.workdir or tempfile.mkdtemp(prefix="terrabyte-bench-")
    shard_dir = os.path.join(workdir, "shards")
    try:
        shutil.rmtree(shard_dir, ignore_errors=True)
        def build():
            shutil.rmtree(shard_dir, ignore_errors=True)
            return build_shards(BuildConfig(inputs=inputs, include=include, exclude=exclude,
                                            zstd_level=args.zstd_level),
                                shard_dir, progress=False)

        build_s, build_c, man = _best(build, args.repeats)
        raw_all = man["totals"]["all"]["raw_bytes"]
        reads = {(w, d): (lambda w=w, d=d: bench_loader(shard_dir, args, w, d))
                 for d in args.dtypes for w in args.num_workers}
        fs = {"zstd": lambda: bench_plain_zstd(shard_dir), **reads}
        cli = {"one": [shard_dir]}
        if args.sources:
            from .read.manifest import load_manifest
            from .read.mixture import parse_mixture

            parts = split_build(inputs, include, exclude, workdir, args.sources, args.zstd_level)
            mixture = parse_mixture([{"name": f"part{k}", "path": p, "weight":
                                      load_manifest(p)["totals"]["train"]["raw_bytes"]} for k, p in enumerate(parts)])
            fs["zstd-mix"] = lambda: sum(bench_plain_zstd(p) for p in parts)
            fs.update({("mix", w, d): (lambda w=w, d=d: bench_loader(mixture, args, w, d))
                       for d in args.dtypes for w in args.num_workers})
            cli["mix"] = parts
        cli_cpu: dict = {}
        if shutil.which("zstd"):  # the zstd command line tool on the same members, when installed
            for key, paths in cli.items():
                commands, cli_cpu[key] = zstd_cli_frames(paths, os.path.join(workdir, f"frames-{key}")), []
                fs[f"cli-{key}"] = lambda c=commands, t=cli_cpu[key]: bench_zstd_cli(c, t)
        loads = _best_interleaved(fs, args.repeats)
        zstd_s, zstd_c, raw_train = loads.pop("zstd")
        mds = bench_streaming(inputs, include, exclude, workdir, args.repeats)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)

    mb = 1e6
    rows = [
        ("build (zstd level %d)" % args.zstd_level, raw_all / build_s / mb, raw_all / build_c / mb,
         f"{raw_all / mb:.1f} MB raw input"),
        ("plain zstd decompress", raw_train / zstd_s / mb, raw_train / zstd_c / mb,
         f"{raw_train / mb:.1f} MB, all train members"),
    ]
    ceilings = {"one": (raw_train / zstd_s / mb, raw_train / zstd_c / mb)}
    if args.sources:
        mix_s, mix_c, raw_mix = loads.pop("zstd-mix")
        ceilings["mix"] = (raw_mix / mix_s / mb, raw_mix / mix_c / mb)
    for key in cli_cpu:  # zstd -d: wall time, and the CPU time of the zstd processes
        wall_s = loads.pop(f"cli-{key}")[0]
        raw = raw_train if key == "one" else raw_mix
        cli_rate = (raw / wall_s / mb, raw / min(cli_cpu[key]) / mb)
        rows.append((f"zstd -d (command line){'' if key == 'one' else f', {args.sources} sources'}", *cli_rate,
                     "the same train members, their frames concatenated into one file per build"))
        ceilings[f"cli-{key}"] = cli_rate
    if args.sources:
        rows.append((f"plain zstd decompress, {args.sources} sources", *ceilings["mix"],
                     f"{raw_mix / mb:.1f} MB, all train members of the {args.sources} builds"))

    def versus(key, wall, cpu):
        cpu_cli = ceilings.get(f"cli-{key}")
        return (f"{100 * wall / ceilings[key][0]:.0f}% of plain zstd (wall), {100 * cpu / ceilings[key][1]:.0f}% (CPU)"
                + (f"; {100 * cpu / cpu_cli[1]:.0f}% of zstd -d (CPU)" if cpu_cli else ""))

    one_source = {}
    for key, (loader_s, loader_c, tokens) in loads.items():
        mixed = key[0] == "mix"
        w, d = key[-2:]
        wall, cpu = tokens / loader_s / mb, tokens / loader_c / mb
        name = f"{args.sources}-source MixtureLoader" if mixed else "ByteLoader"
        note = f"{tokens / mb:.1f} M tokens ({d}); {versus('mix' if mixed else 'one', wall, cpu)}"
        if mixed:
            note += f"; {100 * cpu / one_source[(w, d)]:.0f}% of one source's MB/s (CPU)"
        else:
            one_source[(w, d)] = cpu
        rows.append((f"{name} {d}, {args.epochs} epoch(s) (seq {args.seq_len}, batch {args.global_batch}/"
                     f"{args.micro_batch}, {w} prefetch threads)", wall, cpu, note))
    if mds is not None:
        w, r, n = mds
        rows.append(("mosaicml-streaming MDSWriter (zstd:3)", n / w / mb, float("nan"), f"{n / mb:.1f} MB"))
        rows.append(("mosaicml-streaming StreamingDataset", n / r / mb, float("nan"), "documents, unpacked"))
    else:
        rows.append(("mosaicml-streaming", float("nan"), float("nan"), "not installed: skipped"))
    ratio = raw_all / man["totals"]["all"]["compressed_bytes"]
    header = (f"### {datetime.date.today().isoformat()} — {describe_machine()}\n\n"
              f"Corpus: {', '.join(inputs)} ({man['totals']['all']['documents']} documents, "
              f"{raw_all / 1e6:.1f} MB, zstd ratio {ratio:.2f}); python-zstandard {zstandard.__version__}\n\n")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    header += f"Load average at the end: {load:.1f} (wall MB/s suffer on a shared machine; CPU MB/s less so)\n\n"
    table = "| measurement | MB/s (wall) | MB/s (CPU time) | notes |\n|---|---:|---:|---|\n" + "".join(
        f"| {name} | {w:,.0f} | {c:,.0f} | {note} |\n" for name, w, c, note in rows)
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
