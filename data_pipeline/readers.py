"""Input readers: turn command-line inputs into sources, and each source into documents.

A *source* is one thing a build task reads (a plain file, an archive, a JSON Lines file, a MediaWiki
dump, stdin). Discovery only stats files, so the builder can plan tasks by size before reading a
byte. Each source kind has one reader that yields `Document`s; a new input kind is a new reader,
nothing else changes.

Recorded document paths are relative to the input they came from (a file input records its base
name), use "/" separators, and are what include/exclude globs match. The *group key* decides the
train/val split: by default the document path, but every document of an archive shares the archive
as its group, so one repository never straddles the splits.
"""
from __future__ import annotations

import bz2
import fnmatch
import glob
import gzip
import io
import itertools
import json
import logging
import os
import stat
import sys
import tarfile
import xml.etree.ElementTree as ET
import zipfile
import zlib
from dataclasses import dataclass
from typing import BinaryIO, Callable, Iterator, Sequence

import zstandard

from .errors import ConfigError, DataError

logger = logging.getLogger(__name__)

# Input formats chosen with --format. "auto" picks by file name; "raw" reads every file as bytes.
FORMATS = ("auto", "raw", "mediawiki")
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.zst", ".zip")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".ndjson")
STDIN = "-"


@dataclass(frozen=True)
class Source:
    """One unit of input. `name` is the recorded path; `path` is where to read it (or "-")."""

    kind: str  # "file" | "archive" | "jsonl" | "mediawiki" | "stdin"
    path: str
    name: str
    size: int


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
    never points outside its archive)."""
    parts = [p for p in member.replace("\\", "/").split("/") if p not in ("", ".", "..")]
    return f"{archive}/{'/'.join(parts)}"


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
        except (tarfile.TarError, zipfile.BadZipFile, EOFError, zstandard.ZstdError, OSError, zlib.error) as e:
            raise DataError(f"cannot read {self._where}: {e}") from None


def _streams(opts: ReadOptions, size: int) -> bool:
    return 0 < opts.stream_bytes < size


def source_kind(name: str, input_format: str) -> str:
    if input_format not in FORMATS:
        raise ConfigError(f"unknown input format {input_format!r}; choose one of {', '.join(FORMATS)}")
    if input_format == "raw":
        return "file"
    if input_format == "mediawiki":
        return "mediawiki"
    lower = name.lower()
    if lower.endswith(ARCHIVE_SUFFIXES):
        return "archive"
    if lower.endswith(JSONL_SUFFIXES):
        return "jsonl"
    return "file"


def _matches(rel: str, include: Sequence[str], exclude: Sequence[str]) -> bool:
    if include and not any(fnmatch.fnmatchcase(rel, g) for g in include):
        return False
    return not any(fnmatch.fnmatchcase(rel, g) for g in exclude)


def _keep_file(rel: str, kind: str, include, exclude) -> bool:
    # Globs apply at every level: to files on disk (archives included) and again to archive members
    # as `<archive>/<member>`. Reading only .py files from tarballs: --include '*.tar.gz' --include '*.py'.
    return _matches(rel, include, exclude)


def _has_magic(path: str) -> bool:
    return glob.has_magic(path)


def discover_sources(
    inputs: Sequence[str],
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    input_format: str = "auto",
) -> list[Source]:
    """Expands files, directories (recursively, sorted) and globs into sources.

    Include/exclude globs (fnmatch; `*` also matches "/") apply to the path relative to the input
    directory (archives included: an archive must pass them to be read) and again to each archive
    member as `<archive>/<member>`. A missing input raises FileNotFoundError
    naming it; a glob that matches nothing raises too, since that is almost always a typo.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    if not inputs:
        raise ConfigError("no inputs given: pass at least one file, directory, glob or '-' for stdin")
    sources: list[Source] = []
    for raw in inputs:
        item = os.fspath(raw)
        if item == STDIN:
            sources.append(Source("stdin", STDIN, "stdin", 0))
            continue
        if item.startswith(("http://", "https://", "pipe:")):
            raise ConfigError(f"input {item!r}: URLs and pipe: inputs are read by the loader only; "
                              "download the corpus first")
        if _has_magic(item) and not os.path.exists(item):
            matches = sorted(glob.glob(item, recursive=True))
            if not matches:
                raise FileNotFoundError(f"input glob {item!r} matches no file")
            for m in matches:
                sources.extend(_discover_path(m, os.path.dirname(m) or ".", include, exclude, input_format))
            continue
        if not os.path.exists(item):
            raise FileNotFoundError(f"input path {item!r} does not exist")
        sources.extend(_discover_path(item, None, include, exclude, input_format))
    return sources


def _discover_path(path, base, include, exclude, input_format) -> list[Source]:
    if os.path.isdir(path):
        # Recorded paths are relative to the input directory (or to the glob's directory).
        root = os.path.normpath(path)
        prefix = "" if base is None else os.path.relpath(root, base).replace(os.sep, "/") + "/"
        prefix = "" if prefix == "./" else prefix
        found = []
        for dirpath, dirnames, filenames in os.walk(root, onerror=_raise_walk_error):
            reldir = os.path.relpath(dirpath, root).replace(os.sep, "/")
            reldir = prefix if reldir == "." else f"{prefix}{reldir}/"
            # sorted traversal: the same tree always yields the same order; excluded dirs pruned
            dirnames[:] = sorted(d for d in dirnames if not _dir_excluded(reldir + d, exclude))
            for fn in sorted(filenames):
                rel = reldir + fn
                if _keep_file(rel, source_kind(rel, input_format), include, exclude):
                    found.append(_file_source(os.path.join(dirpath, fn), rel, input_format))
        return found
    rel = os.path.basename(path) if base is None else os.path.relpath(path, base).replace(os.sep, "/")
    if not _keep_file(rel, source_kind(rel, input_format), include, exclude):
        return []
    return [_file_source(path, rel, input_format)]


def _dir_excluded(reldir: str, exclude: Sequence[str]) -> bool:
    # `--exclude 'site-packages/*'` prunes the whole directory instead of listing 50k files.
    return any(g.endswith("/*") and fnmatch.fnmatchcase(reldir, g[:-2]) for g in exclude)


def _raise_walk_error(err: OSError):
    raise OSError(f"cannot list directory {err.filename!r}: {err.strerror}")


def _file_source(full: str, rel: str, input_format: str) -> Source:
    try:
        size = os.stat(full).st_size
    except OSError as e:
        raise OSError(f"cannot stat input file {full!r}: {e.strerror}") from None
    return Source(source_kind(rel, input_format), full, rel, size)


# ---------------------------------------------------------------------------------------------
# Readers: Source -> Iterator[Document]
# ---------------------------------------------------------------------------------------------


def group_key(path: str, depth: int) -> str:
    if depth <= 0:
        return path
    return "/".join(path.split("/")[:depth])


def read_file_bytes(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise OSError(f"cannot read input file {path!r}: {e.strerror or e}") from None


def read_plain(src: Source, opts: ReadOptions, include=(), exclude=()) -> Iterator[Document]:
    group = group_key(src.name, opts.group_depth)
    if not _streams(opts, src.size):
        yield Document(src.name, read_file_bytes(src.path), group)
        return
    try:
        f = open(src.path, "rb")
    except OSError as e:
        raise OSError(f"cannot read input file {src.path!r}: {e.strerror or e}") from None
    with f:
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
    try:
        f = open(src.path, "rb")
    except OSError as e:
        raise OSError(f"cannot read input file {src.path!r}: {e.strerror or e}") from None
    with f:
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


def _open_decompressed(path: str, fileobj=None):
    lower = path.lower()
    raw = fileobj if fileobj is not None else open(path, "rb")
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
            with zipfile.ZipFile(src.path) as zf:
                for info in sorted(zf.infolist(), key=lambda i: i.filename):
                    if info.is_dir():
                        continue
                    name = _archive_name(src.name, info.filename)
                    if stat.S_IFMT(info.external_attr >> 16) not in (0, stat.S_IFREG):  # a symlink's target
                        _special(opts, name)
                        continue
                    if not _matches(name, include, exclude):
                        continue
                    if _streams(opts, info.file_size):
                        with zf.open(info) as f:
                            yield Document(name, None, src.name, info.file_size, _Guarded(f, f"archive {src.path!r}"))
                    else:
                        yield Document(name, zf.read(info), src.name)
            return
        with open(src.path, "rb") as raw:
            if lower.endswith(".tar.zst"):
                stream = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
                tf = tarfile.open(fileobj=stream, mode="r|")
            else:
                tf = tarfile.open(fileobj=raw, mode="r|*")
            # Streaming mode keeps archive order (reproducible) and never seeks.
            with tf:
                for info in tf:
                    if not info.isfile():
                        if not info.isdir():
                            _special(opts, _archive_name(src.name, info.name))
                        continue
                    name = _archive_name(src.name, info.name)
                    if not _matches(name, include, exclude):
                        continue
                    f = tf.extractfile(info)
                    if f is not None and _streams(opts, info.size):
                        yield Document(name, None, src.name, info.size, _Guarded(f, f"archive {src.path!r}"))
                    else:
                        yield Document(name, f.read() if f else b"", src.name)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, zstandard.ZstdError, OSError) as e:
        raise DataError(f"cannot read archive {src.path!r}: {e}") from None


def read_jsonl(src: Source, opts: ReadOptions, include=(), exclude=()) -> Iterator[Document]:
    """JSON Lines (plain, .gz or .zst): one document per line from `opts.text_field`.

    Documents are recorded as `<file>:<line number>`; a line that is not JSON or lacks the field
    raises naming the file and line.
    """
    field = opts.text_field
    try:
        f = io.BufferedReader(_open_decompressed(src.path))
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
                try:
                    rec = json.loads(line)
                    text = rec[field]
                except (ValueError, KeyError, TypeError):
                    raise DataError(f"{src.path}:{lineno}: not a JSON object with a {field!r} field "
                                    "(set --text-field)") from None
                data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
                path = f"{src.name}:{lineno}"
                yield Document(path, data, group_key(path, opts.group_depth))
    except (OSError, EOFError, zstandard.ZstdError) as e:
        raise DataError(f"cannot read JSON Lines file {src.path!r}: {e}") from None


# expat error codes that mean "the input ended early" (enwik8/9 end mid-page)
_TRUNCATION_CODES = {3, 5, 6}  # no element found, unclosed token, partial character


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


class _PageBound(io.RawIOBase):
    """The XML stream as ElementTree reads it, refusing a page longer than ``limit`` bytes before the
    parser holds it: ElementTree keeps a page's text whole until its closing tag, and reads on
    without returning to the caller while inside it, so the bound sits where the bytes come in."""

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
            raise DataError(f"{self.path}: page {self.pages + 1} (after {self.pages} complete pages) is longer than "
                            f"--max-member-bytes={self.limit} bytes; refused (raise the limit for dumps with long "
                            "pages or full revision histories)")
        return data

    def page_ended(self, pages: int) -> None:
        self.pages, self.page_start = pages, self.read_bytes


def read_mediawiki(src: Source, opts: ReadOptions, include=(), exclude=()) -> Iterator[Document]:
    """MediaWiki XML dump (enwik8/enwik9, optionally .gz/.bz2/.zst): one document per page.

    The document is the page's wikitext (latest revision); the recorded path is
    `<file>/<page title>`. enwik8/9 are truncated at a fixed byte count, so a truncated last page is
    tolerated; any other parse error raises naming the file.
    """
    f = _open_decompressed(src.path)
    bound = _PageBound(f, opts.max_document_bytes, src.path)
    n = 0
    try:
        for _, elem in ET.iterparse(bound, events=("end",)):
            if _local(elem.tag) != "page":
                continue
            bound.page_ended(n + 1)
            title, text = "", ""
            for child in elem.iter():
                tag = _local(child.tag)
                if tag == "title":
                    title = child.text or ""
                elif tag == "text":
                    text = child.text or ""
            elem.clear()
            n += 1
            path = f"{src.name}/{title}"
            yield Document(path, text.encode("utf-8"), group_key(path, opts.group_depth))
    except ET.ParseError as e:
        if n == 0 or e.code not in _TRUNCATION_CODES:
            raise DataError(f"cannot parse MediaWiki XML {src.path!r}: {e}") from None
        logger.info("%s: stopped at a truncated page after %d pages", src.path, n)
    finally:
        f.close()


def read_stdin(src: Source, opts: ReadOptions, include=(), exclude=()) -> Iterator[Document]:
    """stdin is one document (bytes as they are)."""
    yield Document("stdin", sys.stdin.buffer.read(), "stdin")


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
