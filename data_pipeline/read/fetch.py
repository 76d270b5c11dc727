"""Reading members: one pread of a member's JSON and zstd payloads by the manifest's offsets
(local files, http(s) Range requests, `pipe:` shards cached once), or a tar shard expanded in
order; the `Sample` each member travels in, the error policy, and `prefetch_map`, which keeps
reads running ahead on a thread pool."""
from __future__ import annotations

import logging
import os
import tarfile
import threading
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import numpy as np

from ..basics.errors import DataError
from ..basics.system import atomic_write
from .epochs import MemberTable
from .manifest import display, run_pipe

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
