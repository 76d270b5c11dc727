"""Which member comes where: a split's member table (from the manifest, no shard opened), the
seeded order of an epoch, the rank split into lanes and where a lane starts."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..format import INDEX_KEYS
from .manifest import display


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
