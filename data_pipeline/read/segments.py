"""A member's token stream: `Segments` (its documents and EOS positions over its bytes, never
materialised) and `TokenReader`, which copies a stream of them into the loader's buffers."""
from __future__ import annotations

import bisect
import itertools
import operator
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from .fetch import Sample


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
