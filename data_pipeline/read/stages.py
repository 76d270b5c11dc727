"""The read side's stages: from a manifest's member index to token streams.

Like webdataset's `filters.py`, each piece is a plain function of one item or a generator over an
iterable, testable alone. `ByteLoader` (loader.py) uses them in this order, per lane of an epoch:

    member_table -> epoch_order -> lanes (the rank split) -> locate (where a lane starts)
        -> prefetch_map(read_member (one pread of a member's JSON + zstd) -> decompress_sample
                        (into a BufferPool buffer) -> parse_meta -> member_segments)
        -> TokenReader.fill (documents + EOS, into the loader's lane buffer)

and cuts micro-batches out of the filled lane buffer itself: there is no separate pack or batch
stage, because the loader fills a block of steps of each lane per `fill` call into one reused
uint8 buffer (EOS positions on the side) and copies each micro-batch from it (why:
`ByteLoader._iter_train`, batch.py, data_pipeline/BENCHMARKS.md).

The sequential path, for whole documents instead of packed batches (`loader.split_documents`,
used by `terrabyte eval`, and the tests):

    tar_members (expands tar shards as webdataset's `tar_file_expander` + `group_by_keys` do)
        -> decompress -> documents (chunks of large documents joined)

`documents_from_wds` reads one sample of upstream `webdataset`. Errors follow one policy, a
handler: "raise" raises a `DataError` naming the shard and member; "skip" drops the member, counts
it in an `ErrorCounter` and logs it.
"""
from __future__ import annotations

import bisect
import itertools
import json
import logging
import mmap
import operator
import os
import tarfile
import threading
import weakref
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import zstandard

from ..basics.errors import DataError
from ..basics.system import atomic_write
from .manifest import INDEX_KEYS, display, run_pipe

logger = logging.getLogger(__name__)


@dataclass
class ErrorCounter:
    """Members skipped under on_error="skip" (the trainer reports `skipped` to TensorBoard)."""

    skipped: int = 0
    last: str = ""
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, message: str):
        with self._lock:
            self.skipped += 1
            self.last = message
        logger.warning("skipping bad member: %s", message)


def _handle(err: Exception, where: str, on_error: str, counter: ErrorCounter | None):
    msg = f"{where}: {err}"
    if on_error == "skip":
        if counter is not None:
            counter.add(msg)
        return
    raise DataError(msg) from None


# ---------------------------------------------------------------------------------------------
# Member table (from the manifest's shard list)
# ---------------------------------------------------------------------------------------------


@dataclass
class MemberTable:
    """Every member of one split as numpy columns (from the manifest: no shard is opened)."""

    urls: list  # shard paths
    shard: np.ndarray  # shard index of each member
    key: np.ndarray  # member number inside its shard
    cols: dict  # INDEX_KEYS -> int64 arrays

    def __len__(self):
        return len(self.shard)

    @property
    def tokens(self) -> np.ndarray:
        """Tokens each member contributes to the stream: its bytes plus one EOS per ending document."""
        return self.cols["raw"] + self.cols["ends"]

    def units(self) -> np.ndarray:
        """Start index of each shuffle unit: a member, or the chain of chunks of one large document."""
        cont = self.cols["cont"]
        starts = np.ones(len(self), dtype=bool)
        starts[1:] = cont[:-1] == 0
        return np.flatnonzero(starts)

    def where(self, i: int) -> str:
        return f"{display(self.urls[self.shard[i]])} member {int(self.key[i]):06d}"


def member_table(shards: Sequence[dict]) -> MemberTable:
    cols = {k: [] for k in INDEX_KEYS}
    shard_ix, keys = [], []
    for i, s in enumerate(shards):
        idx = s["index"]
        for k in INDEX_KEYS:
            cols[k].extend(idx[k])
        shard_ix.extend([i] * s["members"])
        keys.extend(range(s["members"]))
    return MemberTable(
        urls=[s["url"] for s in shards], shard=np.asarray(shard_ix, dtype=np.int64), key=np.asarray(keys, dtype=np.int64),
        cols={k: np.asarray(v, dtype=np.int64) for k, v in cols.items()},
    )


# ---------------------------------------------------------------------------------------------
# Epoch order and lanes
# ---------------------------------------------------------------------------------------------


def epoch_order(table: MemberTable, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """Member indices in stream order for one epoch: shuffle units (seeded numpy, never hash())."""
    if not shuffle:
        return np.arange(len(table))
    starts = table.units()
    ends = np.append(starts[1:], len(table))
    perm = np.random.default_rng([seed, epoch]).permutation(len(starts))
    return np.concatenate([np.arange(starts[u], ends[u]) for u in perm]) if len(perm) else np.arange(0)


@dataclass(frozen=True)
class Lane:
    """A contiguous token range [start, stop) of one epoch's stream."""

    start: int
    stop: int


def lanes(total_tokens: int, global_batch: int, seq_len: int) -> tuple[list[Lane], int]:
    """Cuts the stream into `global_batch` equal contiguous lanes; returns them and steps per epoch.

    Global step g takes sequence g (tokens [g*seq_len, (g+1)*seq_len)) of every lane, so a step
    always has `global_batch` sequences and every rank gets the same number of steps; the tail
    (< global_batch * (seq_len + 1) tokens) is dropped this epoch and lands elsewhere in the next.
    """
    lane_len = total_tokens // global_batch
    steps = lane_len // seq_len
    return [Lane(b * lane_len, b * lane_len + steps * seq_len) for b in range(global_batch)], steps


def locate(cum_tokens: np.ndarray, position: int) -> tuple[int, int]:
    """(order index, offset inside that member) of a stream position; cum_tokens starts with 0."""
    i = int(np.searchsorted(cum_tokens, position, side="right")) - 1
    return i, position - int(cum_tokens[i])


# ---------------------------------------------------------------------------------------------
# Reading members: by offset (seekable) or by expanding a tar stream
# ---------------------------------------------------------------------------------------------


class ShardFiles:
    """Opened shard files shared by threads; `pread` keeps no file position, so it is thread-safe.
    http(s) shards are read with Range requests; `pipe:` shards are fetched whole, once, into a
    temporary cache (a pipe cannot seek)."""

    def __init__(self):
        self._fds: dict[str, int] = {}
        self._sizes: dict[str, int] = {}
        self._lock = threading.Lock()
        self._cache_dir: str | None = None

    def _fetch_pipe(self, url: str) -> str:
        import tempfile

        template, name = url.split("\0", 1)
        if self._cache_dir is None:
            self._cache_dir = tempfile.mkdtemp(prefix="terrabyte-pipe-")
        local = os.path.join(self._cache_dir, os.path.basename(name))
        atomic_write(local, run_pipe(template, name))
        return local

    def pread(self, url: str, offset: int, size: int) -> bytes:
        fd = self._fds.get(url)
        if fd is None:
            with self._lock:
                fd = self._fds.get(url)
                if fd is None:
                    if "://" in url and not url.startswith("pipe:"):
                        return _http_range(url, offset, size)
                    try:
                        fd = os.open(self._fetch_pipe(url) if url.startswith("pipe:") else url, os.O_RDONLY)
                    except OSError as e:
                        raise DataError(f"cannot open shard {display(url)!r}: {e.strerror or e}") from None
                    self._sizes[url] = os.fstat(fd).st_size
                    self._fds[url] = fd
        if offset + size > self._sizes[url]:  # before allocating: the size comes from the manifest
            raise DataError(f"shard {display(url)!r} is truncated (wanted {size} bytes at offset {offset}, it has "
                            f"{self._sizes[url]})")
        data = os.pread(fd, size, offset)
        if len(data) != size:
            raise DataError(f"shard {display(url)!r} is truncated (wanted {size} bytes at offset {offset}, got {len(data)})")
        return data

    def close(self):
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
            self._sizes.clear()
            if self._cache_dir is not None:
                import shutil

                shutil.rmtree(self._cache_dir, ignore_errors=True)
                self._cache_dir = None


def _http_range(url: str, offset: int, size: int) -> bytes:
    import urllib.request

    req = urllib.request.Request(url, headers={"Range": f"bytes={offset}-{offset + size - 1}"})
    with urllib.request.urlopen(req, timeout=60) as r:
        # a server that ignores Range would send the whole shard for every member: refused unread
        if r.status != 206:
            raise DataError(f"{url}: the server answered a Range request with HTTP {r.status}, not 206 (partial "
                            "content); serve the shards from a server that supports Range requests")
        length = r.headers.get("Content-Length")
        if length is not None and length.strip() != str(size):
            raise DataError(f"{url}: the server sent {length.strip()} bytes for a range of {size} at offset {offset}")
        data = bytearray()
        while len(data) < size and (block := r.read(min(size - len(data), 1 << 20))):
            data += block
        data = bytes(data)
    if len(data) != size:
        raise DataError(f"{url}: short read at offset {offset}")
    return data


@dataclass
class Sample:
    """One member as it moves through the stages."""

    where: str  # "shard member key" for messages
    meta: bytes | dict  # member JSON (bytes until parsed)
    data: bytes  # zstd frame, then raw bytes after `decompress`
    raw_size: int = -1  # expected raw size (-1: unknown)
    ident: int = -1  # member index in the table (seeds its document order)
    buffer: np.ndarray | None = None  # pooled buffer behind `data`, if any
    counts: tuple | None = None  # (starts, ends, cont) the manifest's index records, checked against the JSON


def read_member(table: MemberTable, files: ShardFiles, i: int) -> Sample:
    """Reads member i with one pread covering its JSON and zstd payloads (adjacent in the tar)."""
    c = table.cols
    url = table.urls[table.shard[i]]
    jo, js, zo, zs = (int(c[k][i]) for k in ("json_offset", "json_size", "zst_offset", "zst_size"))
    lo = min(jo, zo)
    try:
        blob = files.pread(url, lo, max(jo + js, zo + zs) - lo)
    except DataError as e:
        raise DataError(f"{table.where(i)}: {e}") from None
    s = Sample(table.where(i), blob[jo - lo: jo - lo + js], blob[zo - lo: zo - lo + zs], int(c["raw"][i]), int(i))
    s.counts = (int(c["starts"][i]), int(c["ends"][i]), int(c["cont"][i]))
    return s


def tar_members(urls: Iterable[str], on_error: str = "raise", counter: ErrorCounter | None = None) -> Iterator[Sample]:
    """Expands tar shards sequentially into samples, grouping `<key>.json` and `<key>.zst`."""
    for url in urls:
        try:
            with tarfile.open(url, mode="r|") as tf:
                pending: dict = {}
                for info in tf:
                    if not info.isfile():  # links, devices, FIFOs: never followed (the builder writes none)
                        if not info.isdir():
                            _handle(ValueError(f"{info.name!r} is not a regular file"), f"shard {url}",
                                    "skip", counter)
                        continue
                    key, _, ext = info.name.partition(".")
                    if pending and pending.get("key") != key:
                        yield from _emit_tar_sample(url, pending, on_error, counter)
                        pending = {}
                    pending["key"] = key
                    pending[ext] = tf.extractfile(info).read()
                if pending:
                    yield from _emit_tar_sample(url, pending, on_error, counter)
        except (tarfile.TarError, OSError, EOFError) as e:
            _handle(e, f"shard {url}", on_error, counter)


def _emit_tar_sample(url, pending, on_error, counter):
    where = f"{url} member {pending['key']}"
    if "json" not in pending or "zst" not in pending:
        _handle(ValueError("needs both .json and .zst files"), where, on_error, counter)
        return
    yield Sample(where, pending["json"], pending["zst"])


# ---------------------------------------------------------------------------------------------
# Per-member transforms (each a function of one sample) and their generator forms
# ---------------------------------------------------------------------------------------------


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


@dataclass
class Segments:
    """A member's token stream without materialising it: segment i is `lengths[i]` tokens of
    `raw` from `offsets[i]`, followed by one EOS if `eos[i]`. `raw` is the member's uint8 bytes, or
    (for members of many tiny documents) the whole stream already laid out, one byte per token,
    with 0 where an EOS goes and those positions in `marks`."""

    raw: np.ndarray
    offsets: list
    lengths: list
    eos: list
    starts: list  # token index where each segment starts
    ntokens: int
    marks: np.ndarray | None = None  # positions in `raw` that hold an EOS (ascending)

    @classmethod
    def build(cls, raw: np.ndarray, offsets, lengths, eos, marks: np.ndarray | None = None) -> "Segments":
        starts = list(itertools.accumulate(map(operator.add, lengths, eos), initial=0))
        return cls(raw, list(offsets), list(lengths), list(eos), starts[:-1], starts[-1], marks)

    def window(self, start: int, stop: int) -> "Segments":
        """Tokens [start, stop) of this member's stream, as Segments over the same bytes (how a lane
        takes only its part of the members at its two ends)."""
        if start <= 0 and stop >= self.ntokens:
            return self
        # the segments it touches, sliced (members hold hundreds of small documents); then the two ends trimmed
        i0 = max(bisect.bisect_right(self.starts, start) - 1, 0)
        i1 = bisect.bisect_left(self.starts, stop, i0)
        offsets, lengths, eos = self.offsets[i0:i1], self.lengths[i0:i1], self.eos[i0:i1]
        for i, st in ((0, self.starts[i0]), (i1 - i0 - 1, self.starts[i1 - 1])):
            if i < 0:
                break
            n = self.lengths[i0 + i]
            a, b = max(start - st, 0), min(stop - st, n)  # its data tokens inside the window
            offsets[i] = self.offsets[i0 + i] + min(a, n)
            lengths[i] = max(b - a, 0)
            eos[i] = bool(self.eos[i0 + i]) and start <= st + n < stop
        return Segments.build(self.raw, offsets, lengths, eos, self.marks)

    def tokens(self, eos_id: int) -> np.ndarray:
        """The stream as one uint16 array of ids (for tests and small inputs)."""
        out = np.empty(self.ntokens, dtype=np.uint16)
        TokenReader([self], eos_id).fill(out)
        return out


_TINY_DOCS = 256  # mean document bytes below which a member is materialised with vectorised numpy


def member_segments(s: Sample, eos_id: int, order_seed: Sequence[int] | None = None) -> Segments:
    """A decompressed, parsed member as Segments: its documents (in a seeded random order when
    `order_seed` is given), an EOS after each one that ends in this member."""
    docs = s.meta["docs"]
    if order_seed is not None and len(docs) > 1:
        perm = np.random.default_rng(list(order_seed)).permutation(len(docs))
        docs = [docs[j] for j in perm.tolist()]
    raw = s.data if isinstance(s.data, np.ndarray) else np.frombuffer(s.data, dtype=np.uint8)
    offsets = [d["offset"] for d in docs]
    lengths = [d["length"] for d in docs]
    eos = [d["doc_offset"] + d["length"] == d["doc_size"] for d in docs]
    if len(docs) > 1 and len(raw) < _TINY_DOCS * len(docs):
        # Per-document Python work would dominate: build the token array in a few numpy passes.
        tokens, marks = _tokens_vectorized(raw, np.asarray(offsets, np.int64), np.asarray(lengths, np.int64),
                                           np.asarray(eos, bool))
        return Segments.build(tokens, [0], [len(tokens)], [False], marks)
    return Segments.build(raw, offsets, lengths, eos)


def _tokens_vectorized(raw, offsets, lengths, ends) -> tuple[np.ndarray, np.ndarray]:
    """The documents laid out in order as uint8, a 0 in each EOS slot, and those slots."""
    out = np.empty(int(lengths.sum() + ends.sum()), dtype=np.uint8)
    dst = np.concatenate([[0], np.cumsum(lengths + ends)[:-1]])  # where each document starts
    marks = (dst + lengths)[ends]
    is_data = np.ones(len(out), dtype=bool)
    is_data[marks] = False
    out[marks] = 0
    # data position p holds raw[offsets[i] + (p - first data position of document i)]
    first = np.cumsum(np.concatenate([[0], lengths[:-1]]))
    out[is_data] = raw[np.repeat(offsets - first, lengths) + np.arange(int(lengths.sum()))]
    return out, marks


class TokenReader:
    """Reads a stream of Segments into caller-given buffers, casting to the buffer's dtype while
    copying. `skip` tokens are dropped first, and at most `limit` tokens are delivered.

    `fill(out)` writes EOS ids into `out` (a buffer wide enough for them); `fill(out, eos_at)`
    writes 0 there instead and appends the positions to the list `eos_at`: the loader's lane
    buffer is uint8, one byte per byte, whatever the sequence length (batch.py)."""

    def __init__(self, members: Iterable[Segments], eos_id: int, skip: int = 0, limit: int | None = None):
        self._members = iter(members)
        self.eos_id = eos_id
        self.remaining = float("inf") if limit is None else limit
        self._cur: Segments | None = None
        self._seg = self._within = 0  # position: segment index, tokens of its data consumed
        self._skip(skip)

    def _advance_member(self) -> bool:
        for m in self._members:
            if m.ntokens:
                self._cur, self._seg, self._within = m, 0, 0
                return True
        self._cur = None
        return False

    def _skip(self, n: int):
        while n > 0:
            if self._cur is None and not self._advance_member():
                return
            cur = self._cur
            at = cur.starts[self._seg] + self._within if self._seg < len(cur.starts) else cur.ntokens
            if n >= cur.ntokens - at:
                n -= cur.ntokens - at
                self._cur = None
                continue
            t = at + n
            self._seg = bisect.bisect_right(cur.starts, t) - 1
            self._within = t - cur.starts[self._seg]  # == lengths[seg] means "at its EOS"
            return

    def fill(self, out: np.ndarray, eos_at: list | None = None, base: int = 0) -> int:
        """Writes up to len(out) tokens into out; returns how many (fewer only at the end). EOS
        positions go into `eos_at` plus `base` (where `out` starts in the caller's buffer)."""
        # Hot loop (once per row per lane): locals only, one slice copy per document piece.
        want = len(out)
        if self.remaining < want:
            want = int(self.remaining)
        pos, cur, i, w = 0, self._cur, self._seg, self._within
        while pos < want:
            if cur is None or i >= len(cur.lengths):
                if not self._advance_member():
                    break
                cur, i, w = self._cur, 0, 0
                continue
            n = cur.lengths[i]
            if w < n:
                take = n - w
                if take > want - pos:
                    take = want - pos
                o = cur.offsets[i] + w
                out[pos:pos + take] = cur.raw[o:o + take]
                if cur.marks is not None:  # EOS slots inside the copied range
                    mk = cur.marks[np.searchsorted(cur.marks, o):np.searchsorted(cur.marks, o + take)]
                    if len(mk):
                        if eos_at is None:
                            out[mk + (pos - o)] = self.eos_id
                        else:
                            eos_at.extend((mk + (base + pos - o)).tolist())
                pos += take
                w += take
                if w < n:
                    break  # out is full
            if cur.eos[i]:
                if pos == want:
                    break  # the EOS goes first into the next buffer
                if eos_at is None:
                    out[pos] = self.eos_id
                else:
                    out[pos] = 0
                    eos_at.append(base + pos)
                pos += 1
            i, w = i + 1, 0
        self._seg, self._within = i, w
        self.remaining -= pos
        return pos


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


# ---------------------------------------------------------------------------------------------
# Prefetch: run a per-item function on a thread pool, results in order
# ---------------------------------------------------------------------------------------------


def prefetch_map(f: Callable, items: Iterable, executor, depth: int = 2,
                 ready: Callable | None = None) -> Iterator:
    """Like map(f, items), but keeps `depth` calls running ahead on `executor` (threads: zstd and
    pread release the GIL). Output order equals input order, so results never depend on timing.
    `ready(item)`, if given, returns f(item) when it is at hand (a cache hit), else None: such items
    skip the executor, whose hand-off costs ~30 us of CPU."""
    if executor is None:
        yield from map(f, items)
        return

    def start(item) -> Future:
        value = ready(item) if ready is not None else None
        if value is None:
            return executor.submit(f, item)
        done = Future()
        done.set_result(value)
        return done

    it = iter(items)
    window: deque = deque()
    try:
        for item in it:
            window.append(start(item))
            if len(window) >= depth:
                break
        while window:
            fut = window.popleft()
            for item in it:
                window.append(start(item))
                break
            yield fut.result()
    finally:  # a consumer that stops early (end of a lane) cancels the reads it will never use
        for fut in window:
            fut.cancel()
