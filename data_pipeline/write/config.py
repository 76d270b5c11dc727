"""`BuildConfig`: everything that decides the shards' bytes, stored in the manifest as
`builder.args`; its fingerprint lets a rerun skip the tasks it finished."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass

from ..basics.errors import ConfigError
from . import neardup
from .sources import source_kind

BUILDER_VERSION = "1.1"  # 1.1: streamed large documents, per-shard `spans`


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
        source_kind("x", self.input_format)
        if self.dedup not in ("", "exact", "near"):
            raise ConfigError(f"dedup={self.dedup!r} must be 'exact' or 'near'")
        if self.dedup == "near":
            neardup.check_flags(self.dedup_threshold, self.dedup_ngram, self.dedup_perm)
        if self.split_bytes and (len(self.split_bytes) not in (2, 3) or min(self.split_bytes) < 0
                                 or not self.split_bytes[0]):
            raise ConfigError(f"split_bytes={list(self.split_bytes)} must be 2 or 3 sizes (train, val[, test]) "
                              f">= 0, the train size positive, e.g. 90000000,5000000,5000000 for enwik8")

    def fingerprint(self) -> str:
        return sha256_json(asdict(self))


def sha256_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()
