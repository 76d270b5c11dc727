"""Members into tar shards. Layout of one shard (a plain ustar tar, readable by `tar tf`,
`zstd -d` and upstream webdataset):

    000000.json   {"docs": [{"path", "offset", "length", "doc_offset", "doc_size"}, ...]}
    000000.zst    one zstd frame holding the member's raw bytes
    000001.json
    000001.zst
    ...

Keys carry no dots because webdataset splits sample keys at the first dot. Each shard's manifest
record lists where every member's payloads sit (`index`, format.INDEX_KEYS) and the continued
documents that start in it (`spans`: path, size, first member, member count).
"""
from __future__ import annotations

import hashlib
import os
import re
import tarfile

from ..format import INDEX_KEYS
from .bundle import Member, member_json

SHARD_RE = re.compile(r"^(train|val|test)-(\d{5})-(\d{6})\.tar$")
TAR_BLOCK = 512
TAR_RECORD = 20 * TAR_BLOCK  # tar pads archives to whole records of 10 KiB
TAR_MTIME = 0  # fixed header fields make shards byte-reproducible


def shard_name(split: str, task: int, index: int) -> str:
    return f"{split}-{task:05d}-{index:06d}.tar"


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
            remove_quietly(os.path.join(self.out_dir, rec["path"]))
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
            remove_quietly(self.tmp)


def remove_quietly(path: str):
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
