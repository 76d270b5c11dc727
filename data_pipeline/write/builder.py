"""Shard builder: corpus -> zstd-compressed members -> webdataset tar shards + manifest.json.

Layout of one shard (a plain ustar tar, readable by `tar tf`, `zstd -d` and upstream webdataset):

    000000.json   {"docs": [{"path", "offset", "length", "doc_offset", "doc_size"}, ...]}
    000000.zst    one zstd frame holding the member's raw bytes
    000001.json
    000001.zst
    ...

A *member* bundles small documents up to about `member_bytes` raw (so members are 1x-2x
`member_bytes`) or holds one chunk of a document larger than `member_bytes` (chunks of equal size,
in consecutive members: a *continued* document). Each JSON entry locates a piece of a document
inside the member: bytes [offset, offset+length) of the member are bytes [doc_offset,
doc_offset+length) of the document `path` of total size `doc_size`. Keys carry no dots because
webdataset splits sample keys at the first dot. Each shard's manifest record lists the continued
documents that start in it (`spans`: path, size, first member, member count).

A document larger than `member_bytes` is never held whole: the readers hand it over as a stream,
read in blocks of `READ_BLOCK` into a streaming zstd compressor, one member at a time, so the
builder's memory is bounded by `member_bytes` whatever the document's size (BENCHMARKS.md).

Work is cut into *tasks*: runs of sources (sorted) of about `task_bytes`, fixed by the inputs alone,
so the shards are byte-identical whatever `workers` or the number of MPI ranks. A task writes its own
shards (`train-<task>-<n>.tar`, `val-<task>-<n>.tar`) and, when done, a completion marker
(`.task-<task>.json`), so a rerun of a killed build skips finished tasks. The manifest is written
last; a directory without `manifest.json` is not a finished build.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import multiprocessing as mp
import os
import re
import shutil
import tarfile
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Iterator, Sequence

import zstandard

from ..basics.errors import ConfigError, DataError, TerrabyteError
from ..basics.system import atomic_write
from ..read.manifest import DICT_FILE, FORMAT, INDEX_KEYS, MANIFEST, SPLITS
from . import neardup, readers
from .readers import Document, ReadOptions, Source

logger = logging.getLogger(__name__)

BUILDER_VERSION = "1.1"  # 1.1: streamed large documents, per-shard `spans`
SHARD_RE = re.compile(r"^(train|val|test)-(\d{5})-(\d{6})\.tar$")
MARKER_RE = re.compile(r"^\.task-(\d{5})\.json$")
STAGING = ".build"  # the build in progress, inside --out: moved into place once every task is done
STAGING_MARK = ".terrabyte-build"  # in STAGING: says the folder around it is a build of ours
BUILD_LOCK = ".build.lock"  # taken by callers that build into one folder from several processes
TAR_BLOCK = 512
TAR_RECORD = 20 * TAR_BLOCK  # tar pads archives to whole records of 10 KiB
TAR_MTIME = 0  # fixed header fields make shards byte-reproducible
READ_BLOCK = 1 << 20  # bytes of a streamed document read at a time
MEMBER_DOCS = 4096  # documents per member at most: many tiny documents must not grow one member's JSON without end
PIECE_JSON = 96  # bytes of member JSON per document, besides its path
MEMBER_JSON = 1 << 20  # a member closes once its JSON would pass this (or member_bytes, if larger)


@dataclass(frozen=True)
class BuildConfig:
    """Everything that decides the shards' bytes (stored in the manifest as `builder.args`)."""

    inputs: tuple = ()
    include: tuple = ()
    exclude: tuple = ()
    val_fraction: float = 0.01
    zstd_level: int = 3
    member_bytes: int = 2 << 20
    shard_bytes: int = 256 << 20
    task_bytes: int = 1 << 30
    input_format: str = "auto"
    text_field: str = "text"
    group_depth: int = 0
    dedup: str = ""  # "" | "exact" (content hash) | "near" (MinHash + LSH, neardup.py)
    dedup_threshold: float = 0.8  # near: estimated Jaccard similarity of byte n-gram sets
    dedup_ngram: int = 5
    dedup_perm: int = 128
    min_bytes: int = 0
    max_bytes: int = 0  # 0: no limit
    dict_bytes: int = 0  # >0: train a zstd dictionary of this size on a sample of the corpus
    on_error: str = "raise"  # "raise" | "skip" (skip unreadable sources, counted in the manifest)
    split_bytes: tuple = ()  # (train, val[, test]) bytes: each file cut by position, one document per split
    max_member_bytes: int = 64 << 20  # the largest document held whole where it cannot be streamed
    follow_symlinks: bool = False  # read files and directories that links in input directories point to

    def __post_init__(self):
        """Plain values, as the manifest stores them and their fingerprint resumes a build: one input
        path or several, sequences as tuples, sizes as int; dedup True/False as "exact"/"" (none)."""
        inputs = (self.inputs,) if isinstance(self.inputs, (str, os.PathLike)) else self.inputs
        plain = dict(inputs=tuple(os.fspath(i) for i in inputs), include=tuple(self.include),
                     exclude=tuple(self.exclude), val_fraction=float(self.val_fraction),
                     dedup={True: "exact", False: "", None: ""}.get(self.dedup, self.dedup),
                     split_bytes=tuple(int(n) for n in self.split_bytes), follow_symlinks=bool(self.follow_symlinks))
        for name in ("zstd_level", "member_bytes", "shard_bytes", "task_bytes", "group_depth", "min_bytes",
                     "max_bytes", "dict_bytes", "max_member_bytes"):
            plain[name] = int(getattr(self, name))
        for name, value in plain.items():
            object.__setattr__(self, name, value)  # frozen

    def validate(self):
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction={self.val_fraction} must be in [0, 1)")
        if not 1 <= self.zstd_level <= 22:
            raise ConfigError(f"zstd_level={self.zstd_level} must be in 1..22")
        for name in ("member_bytes", "shard_bytes", "task_bytes", "max_member_bytes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be positive")
        if self.on_error not in ("raise", "skip"):
            raise ConfigError(f"on_error={self.on_error!r} must be 'raise' or 'skip'")
        if self.min_bytes < 0 or self.max_bytes < 0 or self.dict_bytes < 0:
            raise ConfigError("min_bytes, max_bytes and dict_bytes must be >= 0")
        readers.source_kind("x", self.input_format)
        if self.dedup not in ("", "exact", "near"):
            raise ConfigError(f"dedup={self.dedup!r} must be 'exact' or 'near'")
        if self.dedup == "near":
            neardup.check_flags(self.dedup_threshold, self.dedup_ngram, self.dedup_perm)
        if self.split_bytes and (len(self.split_bytes) not in (2, 3) or min(self.split_bytes) < 0
                                 or not self.split_bytes[0]):
            raise ConfigError(f"split_bytes={list(self.split_bytes)} must be 2 or 3 sizes (train, val[, test]) "
                              f">= 0, the train size positive, e.g. 90000000,5000000,5000000 for enwik8")

    def fingerprint(self) -> str:
        return _sha256_json(asdict(self))


def _sha256_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def split_of(group: str, val_fraction: float) -> str:
    """Deterministic split from a stable hash of the group key (never Python's salted hash())."""
    if val_fraction <= 0:
        return "train"
    h = int.from_bytes(hashlib.sha256(group.encode("utf-8", "surrogateescape")).digest()[:8], "big")
    return "val" if h < val_fraction * 2.0**64 else "train"


def shard_name(split: str, task: int, index: int) -> str:
    return f"{split}-{task:05d}-{index:06d}.tar"


# ---------------------------------------------------------------------------------------------
# Bundling documents into members
# ---------------------------------------------------------------------------------------------


@dataclass
class Member:
    raw: bytes | None  # None for a chunk of a streamed document (compressed as it was read)
    pieces: list  # dicts: path, offset, length, doc_offset, doc_size
    size: int = -1  # raw bytes

    def __post_init__(self):
        if self.raw is not None:
            self.size = len(self.raw)

    @property
    def ends(self) -> int:  # documents that end in this member
        return sum(p["doc_offset"] + p["length"] == p["doc_size"] for p in self.pieces)

    @property
    def starts(self) -> int:
        return sum(p["doc_offset"] == 0 for p in self.pieces)

    @property
    def cont(self) -> int:  # 1 if the last document continues in the next member
        p = self.pieces[-1]
        return int(p["doc_offset"] + p["length"] < p["doc_size"])


def chunk_plan(size: int, member_bytes: int) -> list[tuple[int, int]]:
    """(start, length) of the equal chunks a document larger than `member_bytes` is cut into."""
    chunks = -(-size // member_bytes)
    step = -(-size // chunks)
    return [(start, min(step, size - start)) for start in range(0, size, step)]


def _piece(path: str, start: int, length: int, size: int, offset: int = 0) -> dict:
    return dict(path=path, offset=offset, length=length, doc_offset=start, doc_size=size)


def stream_members(doc: Document, member_bytes: int, cctx: zstandard.ZstdCompressor,
                   block_bytes: int = READ_BLOCK, hasher=None) -> Iterator[tuple[Member, bytes]]:
    """A streamed document -> (member, zstd frame) per chunk, in order. Reads `block_bytes` at a
    time into a streaming compressor, so at most one block and one compressed chunk are held;
    `hasher` (e.g. blake2b) sees every byte, for de-duplication without a second read."""
    for start, n in chunk_plan(doc.size, member_bytes):
        out = io.BytesIO()
        with cctx.stream_writer(out, size=n, closefd=False) as w:
            for block in doc.blocks(n, block_bytes):
                if hasher is not None:
                    hasher.update(block)
                w.write(block)
        yield Member(None, [_piece(doc.path, start, n, doc.size)], n), out.getvalue()


class Bundler:
    """Groups documents into members: small ones bundled, large ones cut into equal chunks."""

    def __init__(self, member_bytes: int):
        self.member_bytes = member_bytes
        self._parts: list[bytes] = []
        self._pieces: list[dict] = []
        self._size = 0
        self._meta = 0  # about the member JSON's bytes: bounded like the data
        self._meta_bytes = max(member_bytes, MEMBER_JSON)

    def add(self, path: str, data: bytes) -> Iterator[Member]:
        n = len(data)
        if n > self.member_bytes:
            yield from self.flush()
            for start, length in chunk_plan(n, self.member_bytes):
                yield Member(data[start:start + length], [_piece(path, start, length, n)])
            return
        self._pieces.append(_piece(path, 0, n, n, offset=self._size))
        self._parts.append(data)
        self._size += n
        self._meta += len(path) + PIECE_JSON
        if self._size >= self.member_bytes or self._meta >= self._meta_bytes or len(self._pieces) >= MEMBER_DOCS:
            yield from self.flush()

    def flush(self) -> Iterator[Member]:
        if self._pieces:
            yield Member(b"".join(self._parts), self._pieces)
        self._parts, self._pieces, self._size, self._meta = [], [], 0, 0

    def save(self) -> tuple:
        """The documents waiting for a member (restored when a streamed document is taken out)."""
        return list(self._parts), list(self._pieces), self._size, self._meta

    def restore(self, saved: tuple):
        self._parts, self._pieces, self._size, self._meta = list(saved[0]), list(saved[1]), saved[2], saved[3]


def member_json(member: Member) -> bytes:
    return json.dumps({"docs": member.pieces}, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


# ---------------------------------------------------------------------------------------------
# Tar shard writer
# ---------------------------------------------------------------------------------------------


def _tar_header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = TAR_MTIME
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict")


class ShardWriter:
    """Writes one split of one task as a series of tar shards, each under a temporary name.

    Records for every member where its JSON and zstd payloads sit in the tar (byte offsets of the
    data, not the headers), so the loader can seek straight to a member.
    """

    def __init__(self, out_dir: str, split: str, task: int, shard_bytes: int):
        self.out_dir, self.split, self.task, self.shard_bytes = out_dir, split, task, shard_bytes
        self.index = 0
        self.records: list[dict] = []
        self._f = None
        self._span: dict | None = None  # the continued document being written

    def _open(self):
        self.name = shard_name(self.split, self.task, self.index)
        self.tmp = os.path.join(self.out_dir, f".{self.name}.tmp")
        self._f = open(self.tmp, "wb")
        self._pos = 0
        self._sha = hashlib.sha256()
        self._rec = dict(split=self.split, path=self.name, task=self.task, documents=0, members=0,
                         raw_bytes=0, compressed_bytes=0, spans=[])
        self._idx = {k: [] for k in INDEX_KEYS}

    def _write(self, b: bytes):
        self._f.write(b)
        self._sha.update(b)
        self._pos += len(b)

    def _add_file(self, name: str, data: bytes) -> int:
        self._write(_tar_header(name, len(data)))
        offset = self._pos
        self._write(data)
        pad = -len(data) % TAR_BLOCK
        if pad:
            self._write(b"\0" * pad)
        return offset

    def add(self, member: Member, zst: bytes):
        if self._f is not None and self._pos + len(zst) > self.shard_bytes:
            self.close()
            self.index += 1
        if self._f is None:
            self._open()
        key = f"{self._rec['members']:06d}"  # no dots: webdataset splits keys at the first dot
        js = member_json(member)
        idx = self._idx
        idx["json_offset"].append(self._add_file(f"{key}.json", js))
        idx["json_size"].append(len(js))
        idx["zst_offset"].append(self._add_file(f"{key}.zst", zst))
        idx["zst_size"].append(len(zst))
        idx["raw"].append(member.size)
        idx["starts"].append(member.starts)
        idx["ends"].append(member.ends)
        idx["cont"].append(member.cont)
        r = self._rec
        first, last = member.pieces[0], member.pieces[-1]
        if first["doc_offset"] > 0 and self._span is not None:
            self._span["members"] += 1  # (possibly in the record of an earlier shard)
        if member.cont and last["doc_offset"] == 0:
            self._span = dict(path=last["path"], size=last["doc_size"], member=int(key), members=1)
            r["spans"].append(self._span)
        r["documents"] += member.starts
        r["members"] += 1
        r["raw_bytes"] += member.size
        r["compressed_bytes"] += len(zst)

    def mark(self) -> tuple:
        """Where the writer stands between two documents, for `rollback`."""
        state = None
        if self._f is not None:
            state = (self._pos, self._sha.copy(), dict(self._rec, spans=list(self._rec["spans"])),
                     {k: len(v) for k, v in self._idx.items()})
        return len(self.records), self.index, state

    def rollback(self, mark: tuple):
        """Back to `mark`: takes out a streamed document that failed or turned out a duplicate
        half-way through, even from shards finished since (they are deleted, or reopened under
        their temporary name), so no shard holds part of a document."""
        nrec, index, state = mark
        if self._f is not None and (state is None or self.index != index):
            self.abort()  # a shard opened after the mark
        reopen = state is not None and self._f is None
        for rec in self.records[nrec + reopen:]:
            _remove_quietly(os.path.join(self.out_dir, rec["path"]))
        if state is not None:
            pos, sha, rec, lens = state
            if reopen:  # the marked shard was finished since: back under its temporary name
                done = self.records[nrec]
                self.name = done["path"]
                self.tmp = os.path.join(self.out_dir, f".{self.name}.tmp")
                os.replace(os.path.join(self.out_dir, self.name), self.tmp)
                self._f = open(self.tmp, "r+b")
                self._idx = {k: list(done["index"][k]) for k in INDEX_KEYS}
            self._f.truncate(pos)
            self._f.seek(pos)
            self._idx = {k: v[:lens[k]] for k, v in self._idx.items()}
            self._pos, self._sha, self._rec = pos, sha.copy(), dict(rec, spans=list(rec["spans"]))
        del self.records[nrec:]
        self.index, self._span = index, None

    def close(self):
        if self._f is None:
            return
        end = 2 * TAR_BLOCK
        end += -(self._pos + end) % TAR_RECORD
        self._write(b"\0" * end)
        self._f.close()
        self._f = None
        os.replace(self.tmp, os.path.join(self.out_dir, self.name))
        self._rec.update(tar_bytes=self._pos, sha256=self._sha.hexdigest(), index=self._idx)
        self.records.append(self._rec)

    def abort(self):
        if self._f is not None:
            self._f.close()
            self._f = None
            _remove_quietly(self.tmp)


def _remove_quietly(path: str):
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


# ---------------------------------------------------------------------------------------------
# Tasks
# ---------------------------------------------------------------------------------------------


def plan_tasks(sources: Sequence[Source], task_bytes: int) -> list[list[Source]]:
    """Cuts the sorted sources into runs of about `task_bytes` (a source is never split)."""
    tasks, current, size = [], [], 0
    for src in sources:
        if current and size + src.size > task_bytes:
            tasks.append(current)
            current, size = [], 0
        current.append(src)
        size += src.size
    if current:
        tasks.append(current)
    return tasks


def _task_fingerprint(cfg: BuildConfig, sources: Sequence[Source]) -> str:
    stamp = []
    for s in sources:
        try:
            st = os.stat(s.path)
            stamp.append((s.kind, s.name, st.st_size, st.st_mtime_ns))
        except OSError:
            stamp.append((s.kind, s.name, -1, -1))
    return _sha256_json({"builder": BUILDER_VERSION, "cfg": cfg.fingerprint(), "sources": stamp})


def _marker_path(out_dir: str, task: int) -> str:
    return os.path.join(out_dir, f".task-{task:05d}.json")


def _load_marker(out_dir: str, task: int, fingerprint: str) -> dict | None:
    """A finished task's record if its marker matches and every shard it lists is still there."""
    try:
        with open(_marker_path(out_dir, task), "rb") as f:
            rec = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(rec, dict) or rec.get("fingerprint") != fingerprint:
        return None
    for sh in rec["shards"]:
        if not SHARD_RE.match(str(sh.get("path"))):
            return None
        p = os.path.join(out_dir, sh["path"])
        if not os.path.isfile(p) or os.path.getsize(p) != sh["tar_bytes"]:
            return None
    return rec


def _write_json(path: str, obj):
    """The completion markers and the manifest: sorted keys, one line, replaced in one rename."""
    atomic_write(path, json.dumps(obj, sort_keys=True) + "\n")


@dataclass
class TaskStats:
    sources: int = 0
    documents_read: int = 0
    bytes_read: int = 0
    skipped_sources: int = 0
    filtered_size: int = 0
    duplicates: int = 0
    skipped_names: list = field(default_factory=list)
    skipped_special: int = 0  # archive members that are links, devices or FIFOs (never followed)


def _iter_documents(sources, cfg: BuildConfig, stats: TaskStats, failed: list | None = None) -> Iterator[Document]:
    """Every document of the sources; documents larger than `member_bytes` come as streams. The
    consumer reads a stream after this generator yields it, so a read error happens outside it:
    the consumer appends it to `failed` and this generator raises it on resuming, in the source's
    own reading loop, where the on_error policy applies to it like to any other error of the
    source."""
    def special(_name: str):
        stats.skipped_special += 1

    opts = ReadOptions(text_field=cfg.text_field, group_depth=cfg.group_depth, stream_bytes=cfg.member_bytes,
                       max_document_bytes=cfg.max_member_bytes, on_special=special,
                       split_bytes=cfg.split_bytes)
    for src in sources:
        stats.sources += 1
        try:
            for doc in readers.read_source(src, opts, cfg.include, cfg.exclude):
                yield doc
                if failed:
                    raise failed.pop()
        except (OSError, ValueError) as e:
            if cfg.on_error != "skip":
                raise
            stats.skipped_sources += 1
            stats.skipped_names.append(src.name)
            logger.warning("skipping input %s: %s", src.path, e)


def run_task(task: int, sources: Sequence[Source], cfg: BuildConfig, out_dir: str,
             drop: frozenset | None = None, progress: Callable | None = None, zdict: bytes | None = None) -> dict:
    """Builds the shards of one task and writes its completion marker; returns the task record.

    `drop` holds the ordinals (within this task) of documents removed by global de-duplication.
    """
    writers = {s: ShardWriter(out_dir, s, task, cfg.shard_bytes) for s in SPLITS}
    bundlers = {s: Bundler(cfg.member_bytes) for s in SPLITS}
    dict_data = zstandard.ZstdCompressionDict(zdict) if zdict else None
    # The frame checksum (xxhash, 4 bytes) makes a corrupted member fail loudly, never yield wrong bytes.
    cctx = zstandard.ZstdCompressor(level=cfg.zstd_level, dict_data=dict_data, write_content_size=True,
                                    write_checksum=True)
    stats = TaskStats()
    seen: set = set()
    failed: list = []

    def emit(split: str, members: Iterable[Member]):
        for m in members:
            writers[split].add(m, cctx.compress(m.raw))

    def stream(split: str, doc: Document) -> bool:
        """Writes a streamed document; False if it turned out a duplicate or failed to read under
        on_error="skip" (then it is taken out of the shards again)."""
        w, b = writers[split], bundlers[split]
        mark, saved = w.mark(), b.save()
        h = hashlib.blake2b(digest_size=16) if cfg.dedup and drop is None else None
        try:
            emit(split, b.flush())
            for m, zst in stream_members(doc, cfg.member_bytes, cctx, READ_BLOCK, h):
                w.add(m, zst)
        except (OSError, ValueError) as e:
            w.rollback(mark)
            b.restore(saved)
            if cfg.on_error != "skip":
                raise
            failed.append(e)  # _iter_documents skips the rest of this source, as for any read error
            return False
        if h is not None:
            if h.digest() in seen:
                w.rollback(mark)
                b.restore(saved)
                stats.duplicates += 1
                return False
            seen.add(h.digest())
        return True

    try:
        pending_docs, pending_bytes = 0, 0
        for ordinal, doc in enumerate(_iter_documents(sources, cfg, stats, failed)):
            n = doc.size
            stats.documents_read += 1
            stats.bytes_read += n
            pending_docs += 1
            pending_bytes += n
            if n < cfg.min_bytes or (cfg.max_bytes and n > cfg.max_bytes):
                stats.filtered_size += 1
                continue
            if cfg.dedup:
                if drop is not None:
                    if ordinal in drop:
                        stats.duplicates += 1
                        continue
                elif doc.stream is not None:
                    pass  # hashed while written (stream)
                else:  # one task: dedup on the fly, first copy wins
                    h = hashlib.blake2b(doc.data, digest_size=16).digest()
                    if h in seen:
                        stats.duplicates += 1
                        continue
                    seen.add(h)
            split = doc.split or split_of(doc.group, cfg.val_fraction)
            if doc.stream is None:
                emit(split, bundlers[split].add(doc.path, doc.data))
            elif not stream(split, doc):
                continue
            if progress is not None and (pending_bytes >= 1 << 20 or pending_docs >= 256):
                progress(pending_docs, pending_bytes)
                pending_docs, pending_bytes = 0, 0
        for s in SPLITS:
            emit(s, bundlers[s].flush())
            writers[s].close()
        if progress is not None:
            progress(pending_docs, pending_bytes)
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    record = dict(task=task, fingerprint=_task_fingerprint(cfg, sources),
                  shards=[r for s in SPLITS for r in writers[s].records],
                  stats={k: v for k, v in asdict(stats).items()})
    _write_json(_marker_path(out_dir, task), record)
    return record


# Module-level state for worker processes (set by the pool initializer).
_progress_queue = None


def _init_worker(queue, log_level):
    global _progress_queue
    _progress_queue = queue
    logging.basicConfig(level=log_level)


def _worker_run_task(task, sources, cfg, out_dir, drop, zdict):
    def report(docs, nbytes):
        _progress_queue.put((docs, nbytes))

    return run_task(task, sources, cfg, out_dir, drop, report, zdict)


# ---------------------------------------------------------------------------------------------
# Global passes: de-duplication and dictionary training
# ---------------------------------------------------------------------------------------------


class _ContentHash:
    SKIPPED = b""

    def __init__(self, _path: str, _cfg: BuildConfig):
        self.h = hashlib.blake2b(digest_size=16)
        self.update = self.h.update
        self.digest = self.h.digest


def _near_sketch(path: str, cfg: BuildConfig) -> neardup.Sketch:
    return neardup.Sketch(path, cfg.dedup_ngram, cfg.dedup_perm)


def _hash_sources(sources, cfg: BuildConfig) -> list:
    """Content hashes of a task's documents, in reading order (size-filtered ones hash to b""); with
    dedup="near", MinHash sketches (neardup.Sketch.digest(); None for size-filtered ones)."""
    sketch = _near_sketch if cfg.dedup == "near" else _ContentHash
    skipped = neardup.Sketch.SKIPPED if cfg.dedup == "near" else _ContentHash.SKIPPED
    out, failed = [], []
    for doc in _iter_documents(sources, cfg, TaskStats(), failed):
        n = doc.size
        if n < cfg.min_bytes or (cfg.max_bytes and n > cfg.max_bytes):
            out.append(skipped)
            continue
        h = sketch(doc.path, cfg)
        if doc.stream is None:
            h.update(doc.data)
        else:  # in blocks: bounded memory, as in run_task
            try:
                for block in doc.blocks(n, READ_BLOCK):
                    h.update(block)
            except (OSError, ValueError) as e:
                if cfg.on_error != "skip":
                    raise
                failed.append(e)
                out.append(skipped)
                continue
        out.append(h.digest())
    return out


def _drop_sets(hashes_by_task: dict) -> dict:
    """For each content hash, every copy after the first (in task order) is dropped."""
    seen, drop = set(), {}
    for t in sorted(hashes_by_task):
        mine = set()
        for i, h in enumerate(hashes_by_task[t]):
            if not h:
                continue
            if h in seen:
                mine.add(i)
            else:
                seen.add(h)
        drop[t] = frozenset(mine)
    return drop


def train_dictionary(tasks, cfg: BuildConfig) -> bytes:
    """Trains a zstd dictionary on evenly spaced documents (first 100 MB of samples at most)."""
    samples, total = [], 0
    all_sources = [s for t in tasks for s in t]
    stride = max(1, len(all_sources) // 1000)
    for src in all_sources[::stride]:
        opts = ReadOptions(cfg.text_field, cfg.group_depth, stream_bytes=1 << 20)
        for doc in readers.read_source(src, opts, cfg.include, cfg.exclude):
            if doc.size:
                samples.append(doc.read(1 << 20))
                total += len(samples[-1])
            if total > 100 << 20:
                break
    if len(samples) < 8:
        raise ConfigError(f"too few documents ({len(samples)}) to train a zstd dictionary; drop --dict-bytes")
    d = zstandard.train_dictionary(cfg.dict_bytes, samples, level=cfg.zstd_level)
    return d.as_bytes()


# ---------------------------------------------------------------------------------------------
# Manifest
# ---------------------------------------------------------------------------------------------


def _totals(shards: Sequence[dict]) -> dict:
    out = {}
    for split in SPLITS + ("all",):
        sel = [s for s in shards if split == "all" or s["split"] == split]
        out[split] = {k: sum(s[k] for s in sel) for k in ("documents", "members", "raw_bytes", "compressed_bytes", "tar_bytes")}
        out[split]["shards"] = len(sel)
    return out


def make_manifest(cfg: BuildConfig, task_records: Sequence[dict], dict_id: int | None,
                  dedup_report: dict | None = None) -> dict:
    shards = sorted((s for r in task_records for s in r["shards"]), key=lambda s: (s["split"] != "train", s["path"]))
    stats = {}
    for r in task_records:
        for k, v in r["stats"].items():
            if isinstance(v, list):
                stats.setdefault(k, []).extend(v)
            else:
                stats[k] = stats.get(k, 0) + v
    return {
        "format": FORMAT,
        "builder": {"version": BUILDER_VERSION, "args": asdict(cfg)},
        "tasks": len(task_records),
        "zstd_dict": {"path": DICT_FILE, "id": dict_id} if dict_id is not None else None,
        "shards": shards,
        "totals": _totals(shards),
        "stats": stats,
        **({"dedup": dedup_report} if dedup_report is not None else {}),
    }


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


def _read_json_dict(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            obj = json.load(f)
    except (OSError, ValueError, RecursionError):
        return {}
    return obj if isinstance(obj, dict) else {}


def check_out_dir(out_dir: str) -> None:
    """`--out` must be new, empty, or a build of ours (finished, or stopped before its manifest):
    the builder replaces and removes files only in such a folder, and only under its own names, so
    a folder of someone else's files is refused before anything is written."""
    try:
        entries = sorted(e for e in os.listdir(out_dir) if e != BUILD_LOCK)
    except FileNotFoundError:
        return
    except NotADirectoryError:
        raise ConfigError(f"--out {out_dir!r} is a file, not a folder") from None
    staging = os.path.join(out_dir, STAGING)
    ours = not os.path.islink(staging) and os.path.isfile(os.path.join(staging, STAGING_MARK))
    if os.path.lexists(staging) and not ours:  # it is written into and removed: it must be ours
        raise ConfigError(f"--out {out_dir!r}: {STAGING!r} in it is not a staging folder of the builder; "
                          "remove it or pick another folder")
    if not entries or ours or \
            _read_json_dict(os.path.join(out_dir, MANIFEST)).get("format") == FORMAT or \
            any(MARKER_RE.match(e) and "fingerprint" in _read_json_dict(os.path.join(out_dir, e)) for e in entries):
        return
    more = f" and {len(entries) - 1} more" if len(entries) > 1 else ""
    raise ConfigError(f"--out {out_dir!r} is not empty and holds no Terrabyte shard build ({entries[0]!r}{more}); "
                      "the builder writes only into a new or empty folder or over a build of its own: pick another")


def _clear_tasks(staging: str, tasks: set):
    """The files that earlier tries left in the staging folder for `tasks` (taken from --out)."""
    for fn in os.listdir(staging) if tasks else ():
        shard, marker = SHARD_RE.match(fn), MARKER_RE.match(fn)
        if (shard and int(shard.group(2)) in tasks) or (marker and int(marker.group(1)) in tasks):
            _remove_quietly(os.path.join(staging, fn))


def _publish(out_dir: str, staging: str, manifest: dict, ntasks: int):
    """Moves a finished build from the staging folder into `out_dir`, task by task (its shards,
    then its marker, so a marker in `out_dir` always has its shards beside it), removes the
    previous build's files that the new one does not keep, and writes the manifest last."""
    _remove_quietly(os.path.join(out_dir, MANIFEST))  # the old manifest must not vouch for new shards
    names = {t: [] for t in range(ntasks)}
    for s in manifest["shards"]:
        names[s["task"]].append(s["path"])
    for t in range(ntasks):
        for fn in names[t] + [os.path.basename(_marker_path(out_dir, t))]:
            if os.path.exists(os.path.join(staging, fn)):
                os.replace(os.path.join(staging, fn), os.path.join(out_dir, fn))
    if manifest.get("zstd_dict") and os.path.exists(os.path.join(staging, DICT_FILE)):
        os.replace(os.path.join(staging, DICT_FILE), os.path.join(out_dir, DICT_FILE))
    _cleanup_stale(out_dir, {s["path"] for s in manifest["shards"]}, set(range(ntasks)))
    _write_json(os.path.join(out_dir, MANIFEST), manifest)
    shutil.rmtree(staging, ignore_errors=True)


def _cleanup_stale(out_dir: str, keep_shards: set, keep_tasks: set):
    for fn in os.listdir(out_dir):
        m = SHARD_RE.match(fn)
        if m and fn not in keep_shards:
            logger.info("removing stale shard %s", fn)
            _remove_quietly(os.path.join(out_dir, fn))
        m = MARKER_RE.match(fn)
        if m and int(m.group(1)) not in keep_tasks:
            _remove_quietly(os.path.join(out_dir, fn))


def mpi_comm_from_env():
    """The MPI world communicator when launched by mpirun/srun with more than one rank, else None."""
    for var in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS"):
        if int(os.environ.get(var, "1") or 1) > 1:
            try:
                from mpi4py import MPI
            except ImportError:
                raise ConfigError("launched under MPI but mpi4py is not installed: pip install 'terrabyte[mpi]'") from None
            return MPI.COMM_WORLD
    return None


class _Progress:
    """tqdm bar over input bytes with documents/s in the postfix (rank 0 only)."""

    def __init__(self, total: int, enabled: bool):
        self.bar = None
        self.docs = 0
        self.t0 = time.perf_counter()
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1000, desc="shards", smoothing=0.1)

    def __call__(self, docs: int, nbytes: int):
        self.docs += docs
        if self.bar is not None:
            rate = self.docs / max(time.perf_counter() - self.t0, 1e-9)
            self.bar.set_postfix_str(f"{self.docs} docs, {rate:,.0f} docs/s", refresh=False)
            self.bar.update(nbytes)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def build_shards(cfg: BuildConfig, out_dir: str, *, workers: int = 1, progress: bool = True, comm=None) -> dict:
    """Builds webdataset tar shards of zstd members from ``cfg.inputs`` (files, directories, globs,
    archives), e.g. ``build_shards(BuildConfig(inputs=["corpus/"], val_fraction=0.05), "shards")``.

    Returns the manifest (also written to `<out_dir>/manifest.json`). ``workers`` processes on this
    machine; with `comm` (an mpi4py communicator, or found from the environment by the CLI), tasks
    are dealt to ranks round-robin and rank 0 writes the merged manifest; every rank returns it.
    Neither changes the shards' bytes (``cfg`` alone does).

    `out_dir` must be new, empty or a previous build (`check_out_dir`). Shards are written into
    `<out_dir>/.build` and moved into place only when every task is done, so a build that fails
    leaves a previous build in `out_dir` as it was (and its finished tasks in `.build` for a rerun).
    """
    cfg.validate()
    if workers < 1:
        raise ConfigError(f"workers={workers} must be >= 1")
    rank, world = (comm.Get_rank(), comm.Get_size()) if comm is not None else (0, 1)

    skipped = {"skipped_links": 0}
    sources = readers.discover_sources(cfg.inputs, cfg.include, cfg.exclude, cfg.input_format,
                                       cfg.follow_symlinks, skipped)
    if any(skipped.values()) and rank == 0:
        logger.warning("inputs not read: %d symbolic links (--follow-symlinks reads them), %d devices, FIFOs or "
                       "sockets", skipped.get("skipped_links", 0), skipped.get("skipped_special", 0))
    if not sources:
        raise DataError(f"no input files left in {', '.join(map(repr, cfg.inputs))} after include/exclude filters")
    for src in sources if cfg.split_bytes else ():
        readers.check_split_bytes(src, cfg.split_bytes)  # before anything is written
    if any(s.kind == "stdin" for s in sources) and cfg.dedup == "near":
        raise ConfigError("stdin input ('-') can be read only once, and --dedup near reads every document twice: "
                          "save it to a file first")
    if any(s.kind == "stdin" for s in sources) and (world > 1 or workers > 1):
        raise ConfigError("stdin input ('-') needs a single process: drop --workers and mpirun")
    tasks = plan_tasks(sources, cfg.task_bytes)
    staging = os.path.join(out_dir, STAGING)
    with _all_ranks(comm, rank):
        if rank == 0:
            check_out_dir(out_dir)
            os.makedirs(staging, exist_ok=True)
            atomic_write(os.path.join(staging, STAGING_MARK), "")
    if comm is not None:
        comm.Barrier()

    zdict = None
    if cfg.dict_bytes:
        with _all_ranks(comm, rank):  # an error on rank 0 must not leave the others waiting
            if rank == 0:
                zdict = train_dictionary(tasks, cfg)
                atomic_write(os.path.join(staging, DICT_FILE), zdict)
        if comm is not None:
            zdict = comm.bcast(zdict, root=0)

    mine = [t for t in range(len(tasks)) if t % world == rank]
    fingerprints = {t: _task_fingerprint(cfg, tasks[t]) for t in mine}
    done = {t: r for t in mine if (r := _load_marker(staging, t, fingerprints[t])) is not None}
    earlier = {t: r for t in mine if t not in done and (r := _load_marker(out_dir, t, fingerprints[t])) is not None}
    _clear_tasks(staging, set(earlier))  # finished by an earlier build: its files stay where they are
    done.update(earlier)
    todo = [t for t in mine if t not in done]
    if done:
        logger.info("rank %d: %d of %d tasks already complete, skipping them", rank, len(done), len(mine))
    logger.info("rank %d of %d: building %d of %d tasks", rank, world, len(todo), len(tasks))

    pool = queue = None
    if workers > 1 and len(todo) + (len(mine) if cfg.dedup else 0) > 1:
        ctx = mp.get_context("spawn")  # fork is unsafe next to threads (torch, MPI)
        queue = ctx.SimpleQueue()
        pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                                   initargs=(queue, logging.getLogger().level))
    try:
        drop, dedup_report = {}, None
        if cfg.dedup == "near" or (cfg.dedup and len(tasks) > 1):
            # Global dedup needs every hash before any shard is written: a read-only pre-pass.
            # (One task dedups exact copies on the fly: reading order is the same, so the same
            # copies are kept.)
            hashed = {}
            t0 = time.perf_counter()
            with _all_ranks(comm, rank):
                hashed = _hash_tasks(tasks, mine, cfg, pool, progress and rank == 0)
            logger.info("rank %d: %s-dedup pre-pass over %d task(s), %.1f MB, in %.1f s", rank, cfg.dedup, len(mine),
                        sum(s.size for t in mine for s in tasks[t]) / 1e6, time.perf_counter() - t0)
            if cfg.dedup == "near":
                drop, dedup_report = _near_decide(hashed, cfg, comm, rank)
            else:
                if comm is not None:
                    hashed = {t: h for part in comm.allgather(hashed) for t, h in part.items()}
                drop = _drop_sets(hashed)
        records = dict(done)
        with _all_ranks(comm, rank):
            _run_tasks(todo, tasks, cfg, staging, drop, zdict, pool, queue, records,
                       _Progress(sum(s.size for t in todo for s in tasks[t]), progress and rank == 0))
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)

    all_records = [records[t] for t in sorted(records)]
    if comm is not None:
        gathered = comm.gather(all_records, root=0)
        all_records = sorted((r for part in (gathered or []) for r in part), key=lambda r: r["task"])
    manifest = None
    error = None
    if rank == 0:
        manifest = make_manifest(cfg, all_records, _dict_id(zdict), dedup_report)
        for key, n in skipped.items():
            manifest["stats"][key] = manifest["stats"].get(key, 0) + n
        if manifest["totals"]["all"]["documents"] == 0:
            error = (f"empty corpus: no documents in {', '.join(map(repr, cfg.inputs))} "
                     "after filters (check --include/--exclude/--min-bytes)")
            shutil.rmtree(staging, ignore_errors=True)
        else:
            _publish(out_dir, staging, manifest, len(tasks))
            t = manifest["totals"]["all"]
            logger.info("wrote %d shards, %d documents, %.1f MB raw -> %.1f MB to %s",
                        t["shards"], t["documents"], t["raw_bytes"] / 1e6, t["compressed_bytes"] / 1e6, out_dir)
    if comm is not None:
        error, manifest = comm.bcast((error, manifest), root=0)
    if error:
        raise DataError(error)
    return manifest


def _dict_id(zdict: bytes | None) -> int | None:
    return zstandard.ZstdCompressionDict(zdict).dict_id() if zdict else None


HASH_UNIT_BYTES = 16 << 20  # sources hashed per pre-pass job: a task's hashing spreads over workers too


def _hash_tasks(tasks, mine, cfg, pool, progress: bool = False) -> dict:
    """Each of `mine`'s tasks' hashes, in reading order. A task is cut into runs of sources of about
    HASH_UNIT_BYTES, hashed independently (by the pool's workers when there is one) and joined in
    order: a document's ordinal is the same as in run_task whatever the cut."""
    units = [(t, unit) for t in mine for unit in plan_tasks(tasks[t], HASH_UNIT_BYTES)]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(s.size for _, u in units for s in u), unit="B", unit_scale=True, unit_divisor=1000,
                   desc="dedup " + (cfg.dedup or "exact"), smoothing=0.1)
    results = (pool.map(_hash_sources, [u for _, u in units], [cfg] * len(units)) if pool is not None
               else (_hash_sources(u, cfg) for _, u in units))
    out = {t: [] for t in mine}
    try:
        for (t, unit), hashes in zip(units, results):
            out[t].extend(hashes)
            if bar is not None:
                bar.update(sum(s.size for s in unit))
    finally:
        if bar is not None:
            bar.close()
    return out


def _near_decide(hashed: dict, cfg: BuildConfig, comm, rank: int) -> tuple[dict, dict]:
    """Near-duplicate decisions over every rank's sketches, made once on rank 0 in corpus order and
    sent to all ranks (the sketches travel once, the decisions are small)."""
    decision = None
    if comm is not None:
        parts = comm.gather(hashed, root=0)
        hashed = {t: h for part in parts or [] for t, h in part.items()}
    with _all_ranks(comm, rank):
        if rank == 0:
            t0 = time.perf_counter()
            decision = neardup.decide(hashed, cfg.dedup_threshold, cfg.dedup_ngram, cfg.dedup_perm)
            r = decision.report
            logger.info("near-dedup: %d of %d documents dropped (%d exact copies, %d near) in %.1f s",
                        r["dropped"], r["documents"], r["exact"], r["near"], time.perf_counter() - t0)
    if comm is not None:
        decision = comm.bcast(decision, root=0)
    return decision.drop, decision.report


def _run_tasks(todo, tasks, cfg, out_dir, drop, zdict, pool, queue, records: dict, bar):
    try:
        if pool is None:
            for t in todo:
                records[t] = run_task(t, tasks[t], cfg, out_dir, drop.get(t), bar, zdict)
            return
        futures = {pool.submit(_worker_run_task, t, tasks[t], cfg, out_dir, drop.get(t), zdict): t for t in todo}
        pending = set(futures)
        while pending:
            finished, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
            while not queue.empty():
                bar(*queue.get())
            for fut in finished:
                records[futures[fut]] = fut.result()
    finally:
        bar.close()


class _all_ranks:
    """Context manager around rank-local work followed by a collective: every rank learns whether
    any rank failed, so no rank waits forever in the next collective. The failing rank re-raises
    its own error; the others raise one naming it: a DataError when it was bad input (a
    TerrabyteError or OSError: the CLI prints one line), a RuntimeError when it was a bug (its
    traceback is on the failing rank)."""

    def __init__(self, comm, rank: int):
        self.comm, self.rank = comm, rank

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if self.comm is None:
            return False
        mine = None
        if exc is not None:
            mine = (f"{exc_type.__name__}: {exc}", isinstance(exc, (TerrabyteError, OSError)))
        failed = [(r, e) for r, e in enumerate(self.comm.allgather(mine)) if e]
        if exc is not None or not failed:
            return False
        r, (e, bad_input) = failed[0]
        raise (DataError if bad_input else RuntimeError)(f"shard build failed on MPI rank {r}: {e}")
