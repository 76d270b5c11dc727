"""Unpacking a member: its zstd frame into bytes (bounded, into pooled buffers), its JSON checked
against them, and on the sequential path samples into whole documents."""
from __future__ import annotations

import json
import mmap
import threading
import weakref
from typing import Callable, Iterable, Iterator

import numpy as np
import zstandard

from ..basics.errors import DataError
from .fetch import ErrorCounter, Sample


_dctx = threading.local()


def _decompressor(zdict: bytes | None) -> zstandard.ZstdDecompressor:
    # ZstdDecompressor objects are not thread-safe: one per thread and dictionary. A mixture's
    # sources each have their own dictionary and their members come interleaved: loading a
    # dictionary for every member would cost more than many members' decompression.
    cache = getattr(_dctx, "by_dict", None)
    if cache is None:
        cache = _dctx.by_dict = {}
    hit = cache.get(id(zdict))
    if hit is None or hit[0] is not zdict:
        if len(cache) >= 16:
            cache.clear()
        dd = zstandard.ZstdCompressionDict(zdict) if zdict else None
        hit = cache[id(zdict)] = (zdict, zstandard.ZstdDecompressor(dict_data=dd))  # (zdict kept: id stays its)
    return hit[1]


_HUGE_PAGE = 1 << 21


def fresh_buffer(nbytes: int) -> np.ndarray:
    """nbytes of new memory as a uint8 array. Its whole 2 MiB stretches are private anonymous
    memory in huge pages where the kernel allows (transparent huge pages, "madvise" mode): faulting
    a member's worth of 4 KiB pages in one by one costs about half as much as decompressing it.
    (np.empty's own huge-page hint misses: malloc'd blocks are not 2 MiB aligned.)"""
    huge = nbytes // _HUGE_PAGE * _HUGE_PAGE
    if not huge or not hasattr(mmap, "MADV_HUGEPAGE"):
        return np.empty(nbytes, dtype=np.uint8)
    m = mmap.mmap(-1, nbytes + _HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    whole = np.frombuffer(m, dtype=np.uint8)
    start = -whole.ctypes.data % _HUGE_PAGE  # huge pages back only 2 MiB-aligned ranges
    try:
        m.madvise(mmap.MADV_HUGEPAGE, start, huge)
    except OSError:  # THP disabled: 4 KiB pages, slower but the same bytes
        pass
    return whole[start:start + nbytes]


class BufferPool:
    """Reuses decompression buffers. Writing into fresh memory costs page faults that, for MiB-sized
    members held by many lanes, take as long as zstd itself; buffers come back when the object
    that owns them (a member's Segments) is garbage collected.

    The free list keeps at least `keep` buffers, and more while its bytes stay under the most
    bytes ever handed out and alive at once: the members a mixture's lanes hold grow with the
    number of sources, and freeing more than `keep` at once (lanes crossing an epoch boundary) only
    to fault fresh ones in a step later costs as much as decompressing them. So the pool holds at
    most the peak live set again, never more."""

    def __init__(self, keep: int = 16):
        self.keep = keep
        self._free: list[np.ndarray] = []
        self._free_bytes = self._live = self._peak = 0
        self._lock = threading.Lock()

    def take(self, size: int) -> np.ndarray:
        with self._lock:
            fits = [j for j, b in enumerate(self._free) if len(b) >= size]
            if fits:  # the smallest that fits, so that larger members still find theirs
                buf = self._free.pop(min(fits, key=lambda j: len(self._free[j])))
                self._free_bytes -= len(buf)
                self._lent(len(buf))
                return buf
        # whole MiB, so a buffer fits the many members of similar size that follow (not powers of
        # two: a 2.1 MB member would fault in and zero two huge pages)
        buf = fresh_buffer(-(-size >> 20) << 20)
        with self._lock:
            self._lent(len(buf))
        return buf

    def _lent(self, nbytes: int):  # (under self._lock)
        self._live += nbytes
        self._peak = max(self._peak, self._live)

    def give(self, buf: np.ndarray):
        with self._lock:
            self._live = max(self._live - len(buf), 0)  # (a buffer the pool did not hand out: counted 0)
            if len(self._free) < self.keep or self._free_bytes + len(buf) <= self._peak:
                self._free.append(buf)
                self._free_bytes += len(buf)

    def own(self, owner, buf: np.ndarray):
        """Return buf to the pool when owner is collected."""
        weakref.finalize(owner, self.give, buf)


MAX_MEMBER_BYTES = 64 << 20
"""Default bound on one member's decompressed size (the builder's members are 2-4 MiB bundles and
chunks): a frame that would expand past it, or past the manifest's raw size, is refused."""


def bounded_decompress(frame: bytes, zdict: bytes | None, limit: int, where: str) -> bytes:
    """A zstd frame's bytes, refusing (DataError naming `where`) output past `limit` bytes. The
    frame header's content size is only an upper bound checked against `limit` before anything is
    allocated; zstd itself fails a frame whose output differs from its header, and without a size
    in the header the output buffer is capped at `limit` (a bomb costs at most `limit` bytes)."""
    try:
        declared = zstandard.get_frame_parameters(frame).content_size
    except zstandard.ZstdError as e:
        raise DataError(f"{where}: bad zstd frame ({e})") from None
    if declared != zstandard.CONTENTSIZE_UNKNOWN and declared > limit:
        raise DataError(f"{where}: its zstd frame declares {declared} bytes, more than the limit of {limit} (the "
                        f"manifest's raw size or max_member_bytes); refused")
    try:
        return _decompressor(zdict).decompress(frame, max_output_size=limit)
    except zstandard.ZstdError as e:
        raise DataError(f"{where}: bad zstd frame, or one expanding past {limit} bytes ({e})") from None


def decompress_sample(s: Sample, zdict: bytes | None = None, pool: BufferPool | None = None,
                      max_bytes: int = MAX_MEMBER_BYTES) -> Sample:
    """zstd frame -> raw bytes (or, with a pool, a numpy view of a pooled buffer, kept in
    `s.buffer`); checks the size the manifest promised and the frame checksum, and never expands
    past that size or `max_bytes` (a member the manifest says is larger is refused unread)."""
    if s.raw_size > max_bytes:
        raise DataError(f"{s.where}: the manifest gives it {s.raw_size} raw bytes, more than max_member_bytes="
                        f"{max_bytes}; refused (raise the limit if the build really made members this large)")
    try:
        if pool is None or s.raw_size < 0:
            raw = bounded_decompress(s.data, zdict, max_bytes if s.raw_size < 0 else s.raw_size, s.where)
        else:
            s.buffer = pool.take(s.raw_size)
            raw = s.buffer[:s.raw_size]
            with _decompressor(zdict).stream_reader(s.data) as r:
                got = 0
                view = memoryview(raw)
                while got < len(raw):
                    n = r.readinto(view[got:])
                    if not n:
                        break
                    got += n
                if got != len(raw) or r.read(1):  # reading to the end also checks the frame checksum
                    raise DataError(f"{s.where}: decompressed size differs from the manifest's {s.raw_size}")
    except zstandard.ZstdError as e:
        raise DataError(f"{s.where}: bad zstd frame ({e})") from None
    if s.raw_size >= 0 and len(raw) != s.raw_size:
        raise DataError(f"{s.where}: decompressed to {len(raw)} bytes, manifest says {s.raw_size}")
    s.data = raw
    return s


_PIECE_KEYS = ("offset", "length", "doc_offset", "doc_size")


def parse_meta(s: Sample) -> Sample:
    """Parses the member JSON and checks it against the member's bytes (the pieces tile them, in
    order, each inside its document) and, when known, the manifest's per-member counts: a garbled
    JSON that still parses cannot cut documents at the wrong places unnoticed."""
    if isinstance(s.meta, (bytes, bytearray)):
        try:
            meta = json.loads(s.meta)
            docs = meta["docs"]
            if not isinstance(docs, list) or not docs:
                raise ValueError("'docs' is not a non-empty list")
            at = 0
            for d in docs:
                if not all(type(d[k]) is int and d[k] >= 0 for k in _PIECE_KEYS) or not isinstance(d["path"], str):
                    raise ValueError(f"a document entry has malformed fields: {str(d)[:120]}")
                if d["offset"] != at or d["doc_offset"] + d["length"] > d["doc_size"]:
                    raise ValueError(f"document {d['path']!r} does not follow the one before or lies outside "
                                     f"its document")
                at += d["length"]
            if at != len(s.data):
                raise ValueError(f"its documents cover {at} of the member's {len(s.data)} bytes")
            last = docs[-1]
            counts = (sum(d["doc_offset"] == 0 for d in docs), sum(d["doc_offset"] + d["length"] == d["doc_size"]
                                                                   for d in docs),
                      int(last["doc_offset"] + last["length"] < last["doc_size"]))
            if s.counts is not None and counts != s.counts:
                raise ValueError(f"(starts, ends, cont) are {counts}, the manifest's index says {s.counts}")
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"{s.where}: malformed member JSON ({e})") from None
        s.meta = meta
    return s


def _map(data: Iterable, f: Callable, on_error: str, counter: ErrorCounter | None):
    for item in data:
        try:
            yield f(item)
        except DataError as e:
            if on_error != "skip":
                raise
            if counter is not None:
                counter.add(str(e))


def decompress(samples: Iterable[Sample], zdict: bytes | None = None, on_error="raise", counter=None,
               max_bytes: int = MAX_MEMBER_BYTES):
    return _map(samples, lambda s: decompress_sample(s, zdict, max_bytes=max_bytes), on_error, counter)


def documents(samples: Iterable[Sample]) -> Iterator[tuple[str, bytes]]:
    """Samples -> (path, document bytes), joining chunks of large documents."""
    partial: list[bytes] = []
    for s in samples:
        s = parse_meta(s)
        for d in s.meta["docs"]:
            partial.append(s.data[d["offset"]:d["offset"] + d["length"]])
            if d["doc_offset"] + d["length"] == d["doc_size"]:
                yield d["path"], b"".join(partial)
                partial = []


def documents_from_wds(sample: dict) -> list[tuple[str, bytes, dict]]:
    """An upstream `webdataset` sample ({"zst": ..., "json": ...}) -> [(path, piece bytes, entry)]."""
    raw = bounded_decompress(sample["zst"], None, MAX_MEMBER_BYTES, sample.get("__key__", "webdataset sample"))
    meta = json.loads(sample["json"])
    return [(d["path"], raw[d["offset"]:d["offset"] + d["length"]], d) for d in meta["docs"]]
