"""`terrabyte shards {build,stats,verify}`: registered into the main CLI by `add_subcommands`.

Each leaf parser sets `func`, a handler taking the parsed args and returning an exit code. Errors
in user input surface as TerrabyteError (basics/errors.py) or OSError, which the main CLI prints as one
line; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import logging
import re
import sys

from .basics.errors import ConfigError, TerrabyteError

logger = logging.getLogger(__name__)

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'4096', '2M', '2MiB', '1.5G' -> bytes (K/M/G/T are powers of 1024)."""
    m = _SIZE.match(str(text))
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (examples: 4096, 2M, 256MiB, 1G)")
    return int(float(m.group(1)) * 1024 ** "_kmgt".index(m.group(2).lower() or "_"))


def parse_split_bytes(text: str) -> tuple:
    """'90000000,5000000,5000000' (or sizes such as 90M, powers of 1024) -> (train, val, test) bytes."""
    return tuple(parse_size(part.strip()) for part in str(text).split(","))


def parse_dedup(text: str) -> str:
    if text not in ("exact", "near"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a dedup mode (exact or near); an input path "
                                         "right after a bare --dedup reads as its mode: write --dedup exact")
    return text


def add_subcommands(subparsers) -> argparse.ArgumentParser:
    shards = subparsers.add_parser(
        "shards", help="build, inspect and verify zstd webdataset shards",
        description="Build byte-level training shards (webdataset tar files of zstd members plus "
                    "manifest.json), print their statistics, or verify their checksums.")
    sub = shards.add_subparsers(dest="shards_command", metavar="{build,stats,verify}")
    sub.required = True
    shards.set_defaults(func=lambda args: (shards.print_help(), 2)[1])

    b = sub.add_parser(
        "build", help="build shards from files, directories, globs, archives, JSON Lines or stdin",
        description="Build train/val shards. Directories are read recursively in sorted order (symbolic "
                    "links skipped unless --follow-symlinks); tar/zip archives member by member; "
                    "*.jsonl[.gz|.zst] one document per line. The same inputs and flags give byte-identical "
                    "shards. Under mpirun, ranks split the work.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    b.add_argument("inputs", nargs="+", metavar="INPUT", help="file, directory, glob, archive, or '-' for stdin")
    b.add_argument("--out", "-o", required=True, metavar="DIR", help="output directory for shards and manifest.json")
    b.add_argument("--include", action="append", default=[], metavar="GLOB",
                   help="keep only paths matching GLOB (repeatable; relative to the input directory; '*' spans '/')")
    b.add_argument("--exclude", action="append", default=[], metavar="GLOB", help="drop paths matching GLOB (repeatable)")
    b.add_argument("--val-fraction", type=float, default=0.01, metavar="F",
                   help="fraction of groups (by stable hash of the group key) that go to the val split")
    b.add_argument("--split-bytes", type=parse_split_bytes, default=(), metavar="TRAIN,VAL[,TEST]",
                   help="cut each input file by position instead: its first TRAIN bytes are one train document, "
                        "the next VAL one val document, the next TEST one test document (enwik8: "
                        "90000000,5000000,5000000); --val-fraction is then unused")
    b.add_argument("--group-depth", type=int, default=0, metavar="N",
                   help="group key for the split: 0 = document path, N = its first N path components "
                        "(e.g. 1 keeps each top-level repository in one split); an archive is one group, unless "
                        "N >= 2: then the archive and the first N-1 components inside it")
    b.add_argument("--zstd-level", type=int, default=3, metavar="N", help="zstd compression level (1-22)")
    b.add_argument("--member-bytes", type=parse_size, default=2 << 20, metavar="SIZE",
                   help="raw bytes per member: small documents are bundled up to this, larger ones chunked")
    b.add_argument("--shard-bytes", type=parse_size, default=256 << 20, metavar="SIZE", help="compressed bytes per shard")
    b.add_argument("--task-bytes", type=parse_size, default=1 << 30, metavar="SIZE",
                   help="input bytes per task (unit of parallel work; independent of --workers, so shards are too)")
    b.add_argument("--workers", type=int, default=1, metavar="N", help="worker processes on this machine")
    b.add_argument("--format", dest="input_format", default="auto", choices=("auto", "raw", "mediawiki"),
                   help="auto: by file name (archives, JSON Lines, else raw bytes); raw: every file as bytes; "
                        "mediawiki: XML dumps, one document per page")
    b.add_argument("--text-field", default="text", metavar="KEY", help="JSON Lines field holding the document text")
    b.add_argument("--dedup", nargs="?", const="exact", default=None, type=parse_dedup, metavar="exact|near",
                   help="drop duplicate documents, keeping the first in corpus order: exact (the default when "
                        "the flag stands alone: byte-identical, by content hash) or near (MinHash + LSH over byte "
                        "n-grams; the manifest lists what was dropped and which kept document it matched)")
    b.add_argument("--dedup-threshold", type=float, default=None, metavar="J",
                   help="--dedup near: drop a document whose estimated Jaccard similarity to a kept one is >= J "
                        "(default 0.8)")
    b.add_argument("--dedup-ngram", type=int, default=None, metavar="N",
                   help="--dedup near: compare documents as sets of N-byte n-grams (default 5)")
    b.add_argument("--dedup-perm", type=int, default=None, metavar="K",
                   help="--dedup near: MinHash permutations, 4 bytes of memory each per document (default 128)")
    b.add_argument("--min-bytes", type=parse_size, default=0, metavar="SIZE", help="drop documents smaller than this")
    b.add_argument("--max-bytes", type=parse_size, default=0, metavar="SIZE", help="drop documents larger than this (0: no limit)")
    b.add_argument("--dict-bytes", type=parse_size, default=0, metavar="SIZE",
                   help="train a zstd dictionary of this size and compress with it (0: none)")
    b.add_argument("--on-error", choices=("raise", "skip"), default="raise",
                   help="unreadable input: stop (raise) or skip it and count it in the manifest")
    b.add_argument("--max-member-bytes", type=parse_size, default=64 << 20, metavar="SIZE",
                   help="refuse an input document that must be held whole (a JSON line) past this size "
                        "(default 64M); larger files and archive members are streamed")
    b.add_argument("--follow-symlinks", action="store_true",
                   help="read the files and directories that symbolic links inside input directories (and glob "
                        "matches) point to; by default they are skipped and counted (devices, FIFOs and sockets "
                        "are never read)")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    b.set_defaults(func=cmd_build)

    s = sub.add_parser("stats", help="print a summary table of a shard directory",
                       description="Print shards, documents, members, raw/compressed sizes per split.")
    s.add_argument("dir", metavar="DIR", help="shard directory (with manifest.json)")
    s.add_argument("--json", action="store_true", help="print the manifest totals and stats as JSON")
    s.set_defaults(func=cmd_stats)

    v = sub.add_parser("verify", help="check checksums and decompress every member",
                       description="Check each shard's sha256 and tar structure and decompress every member; "
                                   "prints one line per bad shard or member; exit code 1 if any.")
    v.add_argument("dir", metavar="DIR", help="shard directory (with manifest.json)")
    v.add_argument("--no-progress", action="store_true", help="no progress bar")
    v.set_defaults(func=cmd_verify)
    return shards


def cmd_build(args) -> int:
    from .write.builder import build_shards
    from .write.config import BuildConfig
    from .write.parallel import mpi_comm_from_env

    near = {k: getattr(args, k) for k in ("dedup_threshold", "dedup_ngram", "dedup_perm")
            if getattr(args, k) is not None}
    for name in near if args.dedup != "near" else ():
        raise ConfigError(f"--{name.replace('_', '-')} applies to --dedup near only")
    cfg = BuildConfig(
        inputs=args.inputs, include=args.include, exclude=args.exclude, val_fraction=args.val_fraction,
        zstd_level=args.zstd_level, member_bytes=args.member_bytes, shard_bytes=args.shard_bytes,
        task_bytes=args.task_bytes, input_format=args.input_format, text_field=args.text_field,
        group_depth=args.group_depth, dedup=args.dedup, **near, min_bytes=args.min_bytes, max_bytes=args.max_bytes,
        dict_bytes=args.dict_bytes, on_error=args.on_error, split_bytes=args.split_bytes,
        max_member_bytes=args.max_member_bytes, follow_symlinks=args.follow_symlinks)
    comm = mpi_comm_from_env()
    rank = comm.Get_rank() if comm is not None else 0
    man = build_shards(cfg, args.out, workers=args.workers, progress=not args.no_progress, comm=comm)
    if rank == 0:
        from .verify import format_stats

        sys.stdout.write(format_stats(man))
    return 0


def cmd_stats(args) -> int:
    import json

    from .read.manifest import load_manifest
    from .verify import format_stats

    man = load_manifest(args.dir)
    if args.json:
        out = {"totals": man["totals"], "stats": man.get("stats", {})}
        if man.get("dedup"):
            out["dedup"] = man["dedup"]
        sys.stdout.write(json.dumps(out, indent=2) + "\n")
    else:
        sys.stdout.write(format_stats(man))
    return 0


def cmd_verify(args) -> int:
    from .read.manifest import load_manifest
    from .verify import verify_shards

    problems = verify_shards(args.dir, progress=not args.no_progress)
    for p in problems:
        sys.stdout.write(f"BAD {p}\n")
    n = len(load_manifest(args.dir)["shards"])
    sys.stdout.write(f"{'FAILED' if problems else 'OK'}: {n} shards checked, {len(problems)} problem(s)\n")
    return 1 if problems else 0


def main(argv=None) -> int:
    """Standalone entry (`python -m terrabyte.data_pipeline.cli shards ...`), same error policy as
    the main CLI: one line, no traceback, for bad input (a TerrabyteError or OSError)."""
    parser = argparse.ArgumentParser(prog="terrabyte")
    add_subcommands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return args.func(args)
    except (TerrabyteError, OSError) as e:
        sys.stderr.write(f"terrabyte: error: {e}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
