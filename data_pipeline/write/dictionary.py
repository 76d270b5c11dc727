"""A zstd dictionary trained on a sample of the corpus (`--dict-bytes`): small members compress
better with one; the build stores it beside the shards as format.DICT_FILE."""
from __future__ import annotations

import zstandard

from ..basics.errors import ConfigError
from .config import BuildConfig
from .documents import ReadOptions, read_source


def train_dictionary(tasks, cfg: BuildConfig) -> bytes:
    """Trains a zstd dictionary on evenly spaced documents (first 100 MB of samples at most)."""
    samples, total = [], 0
    all_sources = [s for t in tasks for s in t]
    stride = max(1, len(all_sources) // 1000)
    for src in all_sources[::stride]:
        opts = ReadOptions(cfg.text_field, cfg.group_depth, stream_bytes=1 << 20)
        for doc in read_source(src, opts, cfg.include, cfg.exclude):
            if doc.size:
                samples.append(doc.read(1 << 20))
                total += len(samples[-1])
            if total > 100 << 20:
                break
    if len(samples) < 8:
        raise ConfigError(f"too few documents ({len(samples)}) to train a zstd dictionary; drop --dict-bytes")
    d = zstandard.train_dictionary(cfg.dict_bytes, samples, level=cfg.zstd_level)
    return d.as_bytes()


def dict_id(zdict: bytes | None) -> int | None:
    return zstandard.ZstdCompressionDict(zdict).dict_id() if zdict else None
