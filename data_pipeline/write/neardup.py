"""Near-duplicate removal for `terrabyte shards build --dedup near`: MinHash + LSH over byte n-grams.

Two steps, so that the result does not depend on how the work was spread:

1. *Sketch* (parallel: pool workers and MPI ranks, any split of the sources): each document's set of
   byte n-grams becomes a MinHash signature (`datasketch.MinHash`, `perm` values of 4 bytes) plus a
   16-byte content hash. A signature is a pure function of the document's bytes; the document is
   read in blocks and never held, so memory per document is O(perm), whatever its size.
2. *Decide* (one process, corpus order): documents are offered to a `datasketch.MinHashLSH` index in
   the order the builder reads them (task, then reading order). A document whose LSH candidates
   include a kept document with estimated Jaccard similarity >= threshold is dropped as a copy of
   the most similar such document (the earliest on ties); otherwise it is kept and indexed. So
   the first document of a group of near-copies in corpus order is the one kept, and the same
   documents are dropped with 1 worker or 64 ranks.

Memory grows with the number of documents, never with their bytes: a signature and a hash per
document, and the LSH index's buckets per kept document (BENCHMARKS.md measures both).

Why datasketch's MinHash and LSH as they are: the permutation scheme, the band/row optimisation
for a threshold and the bucket index are the library's, maintained and tested there. What is ours
is the shingling: datasketch's default hash function is one SHA-1 per n-gram in Python (about one
byte a microsecond); here the n-grams of a block are hashed with numpy and handed to
`MinHash.update_batch` as 32-bit values (identity hash function), which is what the library
documents for custom hashing.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

import numpy as np

from ..basics.errors import ConfigError

logger = logging.getLogger(__name__)

SEED = 1  # the MinHash permutations' seed: fixed, so signatures from every process agree
BATCH = 2048  # n-gram hashes per update_batch: (BATCH, perm) uint32 temporaries stay in cache
LISTED = 1000  # dropped documents named one by one in the manifest (the totals count them all)
_FNV = np.uint64(1099511628211)
_FOLD = np.uint64(0x9E3779B97F4A7C15)


def _identity(x):
    return x


def ngram_hashes(data: bytes, n: int) -> np.ndarray:
    """The distinct 32-bit hashes of the byte n-grams of `data` (len(data) >= n)."""
    a = np.frombuffer(data, dtype=np.uint8)
    m = len(a) - n + 1
    h = np.zeros(m, dtype=np.uint64)
    for k in range(n):  # polynomial hash mod 2^64, one pass per n-gram position
        h *= _FNV
        h += a[k:k + m]
    h *= _FOLD  # multiplicative fold: the high 32 bits mix all 64
    return np.unique((h >> np.uint64(32)).astype(np.uint32))


def make_lsh(threshold: float, perm: int):
    """datasketch's LSH index with its own optimal (bands, rows) for the threshold; bad pairs of
    flags become a ConfigError naming them."""
    try:
        from datasketch import MinHashLSH
    except ImportError:
        raise ConfigError("--dedup near needs datasketch: pip install datasketch") from None
    try:
        return MinHashLSH(threshold=threshold, num_perm=perm)
    except ValueError as e:
        raise ConfigError(f"--dedup-threshold {threshold} with --dedup-perm {perm}: {e} "
                          "(a threshold near 1 needs more permutations, e.g. --dedup-perm 256)") from None


def check_flags(threshold: float, ngram: int, perm: int) -> None:
    if not 0.0 < threshold <= 1.0:
        raise ConfigError(f"--dedup-threshold {threshold} must be in (0, 1]")
    if ngram < 1:
        raise ConfigError(f"--dedup-ngram {ngram} must be >= 1")
    if perm < 2:
        raise ConfigError(f"--dedup-perm {perm} must be >= 2")
    make_lsh(threshold, perm)


class Sketch:
    """Fed a document's bytes block by block (n-grams across block edges included); `digest()`
    gives (content hash, MinHash signature as uint32[perm], recorded path). A document shorter than
    the n-gram size is one n-gram: itself."""

    SKIPPED = None  # what the builder records for a size-filtered or unreadable document

    _templates: dict = {}

    def __init__(self, path: str, ngram: int, perm: int):
        from datasketch import MinHash

        if perm not in Sketch._templates:  # permutations are made once per process, then shared
            Sketch._templates[perm] = MinHash(num_perm=perm, seed=SEED).permutations
        self.mh = MinHash(num_perm=perm, seed=SEED, hashfunc=_identity,
                          permutations=Sketch._templates[perm], scheme="affine32")
        self.path, self.n = path, ngram
        self.exact = hashlib.blake2b(digest_size=16)
        self.tail = b""
        self.grams = False

    def update(self, block: bytes):
        self.exact.update(block)
        data = self.tail + block if self.tail else block
        if len(data) >= self.n:
            h = ngram_hashes(data, self.n).tolist()  # update_batch iterates: Python ints beat numpy scalars
            for i in range(0, len(h), BATCH):
                self.mh.update_batch(h[i:i + BATCH])
            self.grams = True
        self.tail = data[-(self.n - 1):] if self.n > 1 else b""  # what an n-gram across the next edge needs

    def digest(self) -> tuple:
        if not self.grams:
            whole = self.tail
            self.mh.update_batch([int.from_bytes(hashlib.blake2b(whole, digest_size=4).digest(), "big")])
        return self.exact.digest(), self.mh.hashvalues.astype(np.uint32), self.path


@dataclass
class Decision:
    drop: dict  # task -> frozenset of ordinals (every task present, possibly empty)
    report: dict  # what the manifest records under "dedup"


def decide(sketches: dict, threshold: float, ngram: int, perm: int) -> Decision:
    """`sketches`: task -> list, in reading order, of `Sketch.digest()` tuples (None for documents
    the size filters drop). Keeps the first of each group of near-copies in corpus order."""
    from datasketch import LeanMinHash

    lsh = make_lsh(threshold, perm)
    first_copy: dict = {}  # content hash -> key of the kept document with it
    kept_sigs: dict = {}  # key (task, ordinal) -> signature, kept documents only
    drop: dict = {}
    listed: list = []
    counts = dict(documents=0, kept=0, dropped=0, exact=0, near=0)
    for t in sorted(sketches):
        mine = set()
        for i, sk in enumerate(sketches[t]):
            if sk is None:
                continue
            exact, sig, path = sk
            counts["documents"] += 1
            match, jac = first_copy.get(exact), 1.0
            m = None
            if match is None:
                m = LeanMinHash(seed=SEED, hashvalues=sig, scheme="affine32")
                best = None
                for key in sorted(lsh.query(m)):  # sorted: ties go to the earliest kept document
                    j = np.count_nonzero(kept_sigs[key] == sig) / perm
                    if j >= threshold and (best is None or j > best[1]):
                        best = (key, j)
                if best is not None:
                    match, jac = best
            if match is None:
                lsh.insert((t, i), m, check_duplication=False)
                kept_sigs[(t, i)] = sig
                first_copy.setdefault(exact, (t, i))
                counts["kept"] += 1
                continue
            mine.add(i)
            is_exact = first_copy.get(exact) == match
            counts["dropped"] += 1
            counts["exact" if is_exact else "near"] += 1
            if len(listed) < LISTED:
                listed.append(dict(path=path, kept=sketches[match[0]][match[1]][2], jaccard=round(jac, 4),
                                   exact=is_exact))
        drop[t] = frozenset(mine)
    report = dict(mode="near", threshold=threshold, ngram=ngram, perm=perm, bands=lsh.b, rows=lsh.r,
                  **counts, dropped_docs=listed, dropped_docs_omitted=counts["dropped"] - len(listed))
    return Decision(drop, report)


def format_report(rep: dict) -> list[str]:
    """Lines for `terrabyte shards stats`."""
    lines = [f"near-duplicates: {rep['dropped']} of {rep['documents']} documents dropped ({rep['exact']} exact copies, "
             f"{rep['near']} near), MinHash {rep['perm']} permutations over {rep['ngram']}-byte n-grams, "
             f"Jaccard >= {rep['threshold']}, LSH {rep['bands']} bands x {rep['rows']} rows"]
    for d in rep["dropped_docs"][:10]:
        lines.append(f"  dropped {d['path']}  ~ kept {d['kept']}  ({'exact copy' if d['exact'] else 'Jaccard %.3f' % d['jaccard']})")
    more = len(rep["dropped_docs"]) - 10 + rep["dropped_docs_omitted"]
    if more > 0:
        lines.append(f"  ... {more} more (`shards stats --json` lists the first {LISTED})")
    return lines
