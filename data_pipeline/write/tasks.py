"""Tasks: runs of sources (sorted) of about `task_bytes`, fixed by the inputs alone, so the shards
are byte-identical whatever `workers` or the number of MPI ranks. A task writes its own shards
(`train-<task>-<n>.tar`, `val-<task>-<n>.tar`) and, when done, a completion marker
(`.task-<task>.json`), so a rerun of a killed build skips finished tasks. A task runs here or in a
worker process of the builder's pool.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Iterator, Sequence

import zstandard

from ..basics.system import atomic_write
from ..format import SPLITS
from .bundle import READ_BLOCK, Bundler, Member, stream_members
from .config import BUILDER_VERSION, BuildConfig, sha256_json
from .documents import Document, ReadOptions, read_source
from .shard_writer import SHARD_RE, ShardWriter
from .sources import Source

logger = logging.getLogger(__name__)

MARKER_RE = re.compile(r"^\.task-(\d{5})\.json$")


def split_of(group: str, val_fraction: float) -> str:
    """Deterministic split from a stable hash of the group key (never Python's salted hash())."""
    if val_fraction <= 0:
        return "train"
    h = int.from_bytes(hashlib.sha256(group.encode("utf-8", "surrogateescape")).digest()[:8], "big")
    return "val" if h < val_fraction * 2.0**64 else "train"


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


def task_fingerprint(cfg: BuildConfig, sources: Sequence[Source]) -> str:
    stamp = []
    for s in sources:
        try:
            st = os.stat(s.path)
            stamp.append((s.kind, s.name, st.st_size, st.st_mtime_ns))
        except OSError:
            stamp.append((s.kind, s.name, -1, -1))
    return sha256_json({"builder": BUILDER_VERSION, "cfg": cfg.fingerprint(), "sources": stamp})


def marker_path(out_dir: str, task: int) -> str:
    return os.path.join(out_dir, f".task-{task:05d}.json")


def load_marker(out_dir: str, task: int, fingerprint: str) -> dict | None:
    """A finished task's record if its marker matches and every shard it lists is still there."""
    try:
        with open(marker_path(out_dir, task), "rb") as f:
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


def write_json(path: str, obj):
    """The completion markers and the manifest: sorted keys, one line, replaced in one rename."""
    atomic_write(path, json.dumps(obj, sort_keys=True) + "\n")


@dataclass
class TaskStats:
    """What one task counted, summed over tasks into the manifest's totals and the build's log line."""

    sources: int = 0
    documents_read: int = 0
    bytes_read: int = 0
    skipped_sources: int = 0  # sources that failed to read, under on_error "skip"
    filtered_size: int = 0  # documents outside min_bytes..max_bytes
    duplicates: int = 0
    skipped_names: list = field(default_factory=list)
    skipped_special: int = 0  # archive members that are links, devices or FIFOs (never followed)


def iter_documents(sources, cfg: BuildConfig, stats: TaskStats, failed: list | None = None) -> Iterator[Document]:
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
            for doc in read_source(src, opts, cfg.include, cfg.exclude):
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
            failed.append(e)  # iter_documents skips the rest of this source, as for any read error
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
        for ordinal, doc in enumerate(iter_documents(sources, cfg, stats, failed)):
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
    record = dict(task=task, fingerprint=task_fingerprint(cfg, sources),
                  shards=[r for s in SPLITS for r in writers[s].records],
                  stats={k: v for k, v in asdict(stats).items()})
    write_json(marker_path(out_dir, task), record)
    return record


# Module-level state for worker processes (set by the pool initializer).
_progress_queue = None


def init_worker(queue, log_level):
    global _progress_queue
    _progress_queue = queue
    logging.basicConfig(level=log_level)


def worker_run_task(task, sources, cfg, out_dir, drop, zdict):
    def report(docs, nbytes):
        _progress_queue.put((docs, nbytes))

    return run_task(task, sources, cfg, out_dir, drop, report, zdict)
