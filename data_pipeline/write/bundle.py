"""Documents into members, the unit the loader reads and shuffles.

A *member* bundles small documents up to about `member_bytes` raw (so members are 1x-2x
`member_bytes`) or holds one chunk of a document larger than `member_bytes` (chunks of equal size,
in consecutive members: a *continued* document). Each JSON entry locates a piece of a document
inside the member: bytes [offset, offset+length) of the member are bytes [doc_offset,
doc_offset+length) of the document `path` of total size `doc_size`.

A document larger than `member_bytes` is never held whole: the readers hand it over as a stream,
read in blocks of `READ_BLOCK` into a streaming zstd compressor, one member at a time, so the
builder's memory is bounded by `member_bytes` whatever the document's size (BENCHMARKS.md).
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Iterator

import zstandard

from .documents import Document

READ_BLOCK = 1 << 20  # bytes of a streamed document read at a time
MEMBER_DOCS = 4096  # documents per member at most: many tiny documents must not grow one member's JSON without end
PIECE_JSON = 96  # bytes of member JSON per document, besides its path
MEMBER_JSON = 1 << 20  # a member closes once its JSON would pass this (or member_bytes, if larger)


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
