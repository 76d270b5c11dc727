"""Sources into documents: one reader per source kind (plain files, tar/zip archives, JSON Lines,
MediaWiki dumps, stdin), and a plain file cut by position into train/val/test.

A new input kind is a new reader here (and its kind in sources.py), nothing else changes. Recorded
document paths are relative to the input they came from and use "/" separators. The *group key*
decides the train/val split: by default the document path, but every document of an archive
shares the archive as its group, so one repository never straddles the splits.
"""
from __future__ import annotations

import bz2
import errno
import gzip
import io
import itertools
import json
import logging
import lzma
import os
import stat
import sys
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from typing import BinaryIO, Callable, Iterator, Sequence
from xml.parsers import expat

import zstandard

from ..basics.errors import ConfigError, DataError
from .sources import Source, matches_globs, safe_name

logger = logging.getLogger(__name__)


@dataclass
class Document:
    """One document. Small ones come read (`data`); one larger than `ReadOptions.stream_bytes`
    comes unread, as a `stream` of `size` bytes, so that a document larger than memory never has
    to be held whole. A stream is valid only until the next document is asked for (archives are
    read in one pass, never seeking): consume it first, or not at all."""

    path: str  # recorded path, relative, "/"-separated
    data: bytes | None
    group: str  # split group key
    size: int = -1  # bytes (len(data) when read)
    stream: BinaryIO | None = None
    split: str | None = None  # set by a positional split (--split-bytes); else the group's hash decides

    def __post_init__(self):
        if self.data is not None:
            self.size = len(self.data)

    def blocks(self, nbytes: int, block_bytes: int = 1 << 20) -> Iterator[bytes]:
        """The next `nbytes` of the document in blocks of at most `block_bytes`; a source that
        ends early raises a DataError naming the document."""
        if self.data is not None:
            raise ValueError("blocks() reads a streamed document; this one is in memory")
        while nbytes > 0:
            b = self.stream.read(min(block_bytes, nbytes))
            if not b:
                raise DataError(f"input document {self.path!r} ended early ({nbytes} of its {self.size} bytes missing)")
            nbytes -= len(b)
            yield b

    def read(self, limit: int | None = None) -> bytes:
        """The document's bytes (the first `limit` of them), read from its stream if need be."""
        if self.data is not None:
            return self.data if limit is None else self.data[:limit]
        return b"".join(self.blocks(self.size if limit is None else min(limit, self.size)))


@dataclass(frozen=True)
class ReadOptions:
    text_field: str = "text"
    group_depth: int = 0  # 0: group by document path; N: by its first N path components
    allow_urls: bool = False
    stream_bytes: int = 0
    """Files and archive members larger than this come as streams (`Document.stream`); 0: never."""
    split_bytes: tuple = ()
    """Cut each plain file by position: its first split_bytes[0] bytes are one train document, the
    next split_bytes[1] one val document, the next split_bytes[2] (if given) one test document."""
    max_document_bytes: int = 64 << 20
    """The largest document read whole into memory where it cannot be streamed (a JSON line):
    a longer one is refused with a DataError naming it, before it is held."""
    on_special: Callable[[str], None] | None = None
    """Told the recorded name of each archive member that is not a regular file (a symlink, hard
    link, device, FIFO): such members are never followed or read, only counted."""


def _archive_name(archive: str, member: str) -> str:
    """The recorded path of an archive member: `<archive>/<member>` with any leading `/` and any
    `.` / `..` component dropped (members are read as data, never extracted, but a recorded path
    never points outside its archive; bytes that are not UTF-8 become escapes, see `safe_name`)."""
    parts = [p for p in member.replace("\\", "/").split("/") if p not in ("", ".", "..")]
    return safe_name(f"{archive}/{'/'.join(parts)}")


def _special(opts: ReadOptions, name: str) -> None:
    logger.warning("skipping archive member %s: not a regular file (links and devices are never followed)", name)
    if opts.on_special is not None:
        opts.on_special(name)


class _Guarded:
    """A document stream whose read errors become one DataError naming the input (a truncated
    archive fails while the builder reads the document, not while the reader yields it)."""

    def __init__(self, f, where: str):
        self._f, self._where = f, where

    def read(self, n: int = -1) -> bytes:
        try:
            return self._f.read(n)
        except (tarfile.TarError, zipfile.BadZipFile, EOFError, zstandard.ZstdError, lzma.LZMAError, OSError,
                zlib.error) as e:
            raise DataError(f"cannot read {self._where}: {e}") from None


def _streams(opts: ReadOptions, size: int) -> bool:
    return 0 < opts.stream_bytes < size


def group_key(path: str, depth: int) -> str:
    if depth <= 0:
        return path
    return "/".join(path.split("/")[:depth])


READ_BLOCK = 1 << 20  # bytes read at a time where a read is streamed
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)


def open_regular(path: str, link_ok: bool = False) -> BinaryIO:
    """`path` opened for reading only if it is a regular file, checked on the opened descriptor
    (so a file swapped for a link, FIFO or device after discovery is still refused). O_NONBLOCK
    keeps the open of a FIFO from waiting for a writer; O_NOFOLLOW refuses a link unless `link_ok`."""
    flags = _OPEN_FLAGS | (0 if link_ok else getattr(os, "O_NOFOLLOW", 0))
    try:
        fd = os.open(path, flags)
    except OSError as e:
        if e.errno == errno.ELOOP and not link_ok:
            raise OSError(f"input file {path!r} is a symbolic link; not followed (--follow-symlinks to read it)") \
                from None
        raise OSError(f"cannot read input file {path!r}: {e.strerror or e}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise DataError(f"input {path!r} is not a regular file (devices, FIFOs and sockets are never read)")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_file_bytes(path: str, link_ok: bool = False) -> bytes:
    """A regular file's bytes, as many as its size when opened (a file that grows, or a
    /proc file that reports no size, is never read on without end)."""
    with open_regular(path, link_ok) as f:
        try:
            return f.read(os.fstat(f.fileno()).st_size)
        except OSError as e:
            raise OSError(f"cannot read input file {path!r}: {e.strerror or e}") from None


def read_plain(src: Source, opts: ReadOptions, include=(), exclude=()) -> Iterator[Document]:
    group = group_key(src.name, opts.group_depth)
    if not _streams(opts, src.size):
        yield Document(src.name, read_file_bytes(src.path, src.link_ok), group)
        return
    with open_regular(src.path, src.link_ok) as f:
        yield Document(src.name, None, group, os.fstat(f.fileno()).st_size, _Guarded(f, f"input file {src.path!r}"))


POSITIONAL_SPLITS = ("train", "val", "test")


class _Slice:
    """The next `size` bytes of an open file, as a stream."""

    def __init__(self, f, size: int):
        self._f, self._left = f, size

    def read(self, n: int = -1) -> bytes:
        n = self._left if n is None or n < 0 else min(n, self._left)
        data = self._f.read(n)
        self._left -= len(data)
        return data


def check_split_bytes(src: Source, split_bytes: Sequence[int]) -> None:
    """A plain file at least as long as the positional split asks."""
    if src.kind != "file":
        raise ConfigError(f"--split-bytes cuts plain files by position; input {src.path!r} is a {src.kind} "
                          f"(use --format raw to read it as bytes)")
    wanted = sum(split_bytes)
    if src.size < wanted:
        parts = " + ".join(f"{n} {name}" for name, n in zip(POSITIONAL_SPLITS, split_bytes))
        raise DataError(f"input {src.path!r} has {src.size} bytes, fewer than --split-bytes asks for: {wanted} "
                        f"({parts}); is the file complete?")
    if src.size > wanted:
        logger.warning("input %s: its last %d bytes (after the %d that --split-bytes asks for) go to no split",
                       src.path, src.size - wanted, wanted)


def read_by_position(src: Source, opts: ReadOptions, include=(), exclude=()) -> Iterator[Document]:
    """One document per split, cut from the file by position (enwik8: 90M train, 5M val, 5M test),
    so each split is one long document; large pieces come as streams."""
    with open_regular(src.path, src.link_ok) as f:
        offset = 0
        for split, size in zip(POSITIONAL_SPLITS, opts.split_bytes):
            f.seek(offset)
            offset += size
            if size == 0:
                continue
            if _streams(opts, size):
                stream = _Guarded(_Slice(f, size), f"input file {src.path!r}")
                yield Document(src.name, None, src.name, size, stream, split=split)
            else:
                yield Document(src.name, f.read(size), src.name, split=split)


def _open_decompressed(src: Source):
    lower = src.path.lower()
    raw = open_regular(src.path, src.link_ok)
    if lower.endswith(".gz"):
        return gzip.GzipFile(fileobj=raw)
    if lower.endswith(".zst"):
        return zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
    if lower.endswith(".bz2"):
        return bz2.BZ2File(raw)
    return raw


def read_archive(src: Source, opts: ReadOptions, include=(), exclude=()) -> Iterator[Document]:
    """tar / tar.gz / tar.zst / zip member by member, never extracted to disk.

    Member paths are recorded as `<archive name>/<member>`; all share the archive as group key,
    unless `group_depth` N >= 2: then the archive and the first N-1 components of the member path
    (the archive counts as the first component, so one tarball of a source tree can still be split).
    Globs apply to the recorded member path.
    """
    lower = src.name.lower()
    try:
        if lower.endswith(".zip"):
            with open_regular(src.path, src.link_ok) as raw, zipfile.ZipFile(raw) as zf:
                for info in sorted(zf.infolist(), key=lambda i: i.filename):
                    if info.is_dir():
                        continue
                    name = _archive_name(src.name, info.filename)
                    if stat.S_IFMT(info.external_attr >> 16) not in (0, stat.S_IFREG):  # a symlink's target
                        _special(opts, name)
                        continue
                    if not matches_globs(name, include, exclude):
                        continue
                    if _streams(opts, info.file_size):
                        with zf.open(info) as f:
                            yield Document(name, None, src.name, info.file_size, _Guarded(f, f"archive {src.path!r}"))
                    else:
                        yield Document(name, zf.read(info), src.name)
            return
        with open_regular(src.path, src.link_ok) as raw:
            if lower.endswith(".tar.zst"):
                stream = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
                tf = tarfile.open(fileobj=stream, mode="r|")
            else:
                tf = tarfile.open(fileobj=raw, mode="r|*")
            # Streaming mode keeps archive order (reproducible) and never seeks; "r|*" also reads
            # .tar.gz, .tar.bz2 and .tar.xz.
            with tf:
                for info in tf:
                    if not info.isfile():
                        if not info.isdir():
                            _special(opts, _archive_name(src.name, info.name))
                        continue
                    name = _archive_name(src.name, info.name)
                    if not matches_globs(name, include, exclude):
                        continue
                    f = tf.extractfile(info)
                    if f is not None and _streams(opts, info.size):
                        yield Document(name, None, src.name, info.size, _Guarded(f, f"archive {src.path!r}"))
                    else:
                        yield Document(name, f.read() if f else b"", src.name)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, zstandard.ZstdError, lzma.LZMAError, OSError,
            UnicodeError) as e:
        raise DataError(f"cannot read archive {src.path!r}: {e}") from None


def read_jsonl(src: Source, opts: ReadOptions, include=(), exclude=()) -> Iterator[Document]:
    """JSON Lines (plain, .gz or .zst): one document per line from `opts.text_field`.

    Documents are recorded as `<file>:<line number>`; a line that is not JSON or lacks the field
    raises naming the file and line.
    """
    field = opts.text_field
    try:
        f = io.BufferedReader(_open_decompressed(src))
        limit = opts.max_document_bytes
        with f:
            for lineno in itertools.count(1):
                line = f.readline(limit + 2)  # bounded: never a whole multi-GB line in memory
                if not line:
                    break
                if len(line.rstrip(b"\r\n")) > limit:
                    raise DataError(f"{src.path}:{lineno}: a line longer than --max-member-bytes={limit} bytes; "
                                    "refused (raise the limit, or split the document)")
                if not line.strip():
                    continue
                data = _jsonl_text(line, field, f"{src.path}:{lineno}")
                path = f"{src.name}:{lineno}"
                yield Document(path, data, group_key(path, opts.group_depth))
    except (OSError, EOFError, zstandard.ZstdError) as e:
        raise DataError(f"cannot read JSON Lines file {src.path!r}: {e}") from None


_JSON_TYPES = {type(None): "null", bool: "a boolean", int: "a number", float: "a number", list: "an array",
               dict: "an object"}


def _jsonl_text(line: bytes, field: str, where: str) -> bytes:
    """The UTF-8 bytes of one JSON line's text field; a DataError naming `where` (file:line) for
    anything else: bad JSON or UTF-8, nesting past the parser's depth, a field that is missing or
    not a string (a number must never become bytes), a string holding a lone surrogate."""
    try:
        rec = json.loads(line)
    except RecursionError:
        raise DataError(f"{where}: JSON nested too deeply to parse; refused") from None
    except ValueError as e:
        raise DataError(f"{where}: not valid JSON in UTF-8 ({e})") from None
    if not isinstance(rec, dict) or field not in rec:
        raise DataError(f"{where}: not a JSON object with a {field!r} field (set --text-field)")
    text = rec[field]
    if not isinstance(text, str):
        raise DataError(f"{where}: field {field!r} is {_JSON_TYPES.get(type(text), type(text).__name__)}, "
                        "not a string; refused")
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(f"{where}: field {field!r} holds a lone surrogate ({e.object[e.start]!r} at character "
                        f"{e.start}), which is not text; refused") from None


# expat error codes that mean "the input ended early" (enwik8/9 end mid-page)
_TRUNCATION_CODES = {3, 5, 6}  # no element found, unclosed token, partial character


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


class _PageBound(io.RawIOBase):
    """The XML stream as the parser reads it, refusing a page of more than ``limit`` input bytes
    (markup and attributes included) before the parser holds it; `_Pages` bounds the text the
    page expands to."""

    def __init__(self, f, limit: int, path: str):
        self.f, self.limit, self.path = f, limit, path
        self.read_bytes = self.page_start = 0
        self.pages = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self.f.read(size)
        self.read_bytes += len(data)
        # the parser reads ahead by at most one buffer: allow that much past the bound
        if self.read_bytes - self.page_start > self.limit + max(size, 1 << 16):
            raise self.too_long()
        return data

    def too_long(self) -> DataError:
        return DataError(f"{self.path}: page {self.pages + 1} (after {self.pages} complete pages) is longer than "
                         f"--max-member-bytes={self.limit} bytes; refused (raise the limit for dumps with long "
                         "pages or full revision histories)")

    def page_ended(self, pages: int) -> None:
        self.pages, self.page_start = pages, self.read_bytes


class _Pages:
    """expat handlers keeping only the current page's title and latest text: no element tree is
    built, so memory stays one page whatever the number of pages. The text is counted as expanded
    (entities and character references resolved), against the same bound as the input."""

    def __init__(self, bound: _PageBound):
        self.bound = bound
        self.done: list[tuple[str, bytes]] = []  # pages ended since the caller last took them
        self.n = 0
        self._in_page = False
        self._field: str | None = None  # "title" or "text" while inside one
        self._parts: list[bytes] = []
        self._size = 0  # expanded bytes of the current page
        self._title, self._text = "", b""

    def entity(self, name, *_):
        raise DataError(f"{self.bound.path}: the XML declares an entity ({name!r}); MediaWiki dumps declare none, "
                        "and entities can expand a page past any bound; refused")

    def start(self, name: str, _attrs):
        tag = _local(name)
        if tag == "page":
            self._in_page, self._size, self._title, self._text = True, 0, "", b""
        elif self._in_page and tag in ("title", "text"):
            self._field, self._parts = tag, []

    def data(self, text: str):
        if self._field is None:
            return
        b = text.encode("utf-8")
        self._size += len(b)
        if self._size > self.bound.limit:
            raise self.bound.too_long()
        self._parts.append(b)

    def end(self, name: str):
        tag = _local(name)
        if tag == self._field:
            value, self._field, self._parts = b"".join(self._parts), None, []
            if tag == "title":
                self._title = value.decode("utf-8")
            else:
                self._text = value  # the last revision's text wins
        elif tag == "page" and self._in_page:
            self.n += 1
            self.bound.page_ended(self.n)
            self.done.append((self._title, self._text))
            self._in_page, self._title, self._text = False, "", b""


_XML_READ = 1 << 16


def read_mediawiki(src: Source, opts: ReadOptions, include=(), exclude=()) -> Iterator[Document]:
    """MediaWiki XML dump (enwik8/enwik9, optionally .gz/.bz2/.zst): one document per page.

    The document is the page's wikitext (latest revision); the recorded path is
    `<file>/<page title>`. enwik8/9 are truncated at a fixed byte count, so a truncated last page is
    tolerated; any other parse error raises naming the file.
    """
    f = _open_decompressed(src)
    bound = _PageBound(f, opts.max_document_bytes, src.path)
    pages = _Pages(bound)
    parser = expat.ParserCreate(namespace_separator="}")
    parser.buffer_text, parser.buffer_size = True, _XML_READ
    parser.StartElementHandler, parser.EndElementHandler = pages.start, pages.end
    parser.CharacterDataHandler, parser.EntityDeclHandler = pages.data, pages.entity

    def take() -> Iterator[Document]:
        done, pages.done = pages.done, []
        for title, text in done:
            path = safe_name(f"{src.name}/{title}")
            yield Document(path, text, group_key(path, opts.group_depth))

    try:
        while True:
            chunk = bound.read(_XML_READ)
            try:
                parser.Parse(chunk, not chunk)
            except expat.ExpatError as e:
                yield from take()
                if pages.n == 0 or e.code not in _TRUNCATION_CODES:
                    raise DataError(f"cannot parse MediaWiki XML {src.path!r}: {e}") from None
                logger.info("%s: stopped at a truncated page after %d pages", src.path, pages.n)
                return
            yield from take()
            if not chunk:
                return
    finally:
        f.close()


def read_stdin(src: Source, opts: ReadOptions, include=(), exclude=()) -> Iterator[Document]:
    """stdin is one document (bytes as they are), spooled to a temporary file past `stream_bytes`
    (or past `max_document_bytes` when nothing streams), so it is never held whole."""
    import tempfile

    hold = opts.stream_bytes or opts.max_document_bytes
    with tempfile.SpooledTemporaryFile(max_size=hold) as spool:
        stdin = sys.stdin.buffer
        size = 0
        while block := stdin.read(READ_BLOCK):
            size += len(block)
            if not opts.stream_bytes and size > opts.max_document_bytes:
                raise DataError(f"stdin: more than --max-member-bytes={opts.max_document_bytes} bytes; refused")
            spool.write(block)
        spool.seek(0)
        if _streams(opts, size):
            yield Document("stdin", None, "stdin", size, _Guarded(spool, "stdin"))
        else:
            yield Document("stdin", spool.read(size), "stdin")


READERS = {
    "file": read_plain,
    "archive": read_archive,
    "jsonl": read_jsonl,
    "mediawiki": read_mediawiki,
    "stdin": read_stdin,
}


def read_source(src: Source, opts: ReadOptions, include=(), exclude=()) -> Iterator[Document]:
    if opts.split_bytes:
        return read_by_position(src, opts, include, exclude)
    docs = READERS[src.kind](src, opts, include, exclude)
    return _archive_groups(src, docs, opts.group_depth) if src.kind == "archive" and opts.group_depth > 1 else docs


def _archive_groups(src: Source, docs: Iterator[Document], depth: int) -> Iterator[Document]:
    """An archive's members grouped by the archive and the first depth-1 components inside it."""
    for doc in docs:
        doc.group = f"{src.name}/{group_key(doc.path[len(src.name) + 1:], depth - 1)}"
        yield doc
