"""De-duplication across the whole build: a read-only pre-pass hashes every document (exact: a
content hash; near: a MinHash sketch, neardup.py) before any shard is written, and the copies to
drop are decided in corpus order, so the same documents are kept whatever the workers or ranks."""
from __future__ import annotations

import hashlib
import logging
import time

from . import neardup
from .bundle import READ_BLOCK
from .config import BuildConfig
from .parallel import all_ranks
from .tasks import TaskStats, iter_documents, plan_tasks

logger = logging.getLogger(__name__)


class _ContentHash:
    SKIPPED = b""

    def __init__(self, _path: str, _cfg: BuildConfig):
        self.h = hashlib.blake2b(digest_size=16)
        self.update = self.h.update
        self.digest = self.h.digest


def _near_sketch(path: str, cfg: BuildConfig) -> neardup.Sketch:
    return neardup.Sketch(path, cfg.dedup_ngram, cfg.dedup_perm)


def _hash_sources(sources, cfg: BuildConfig) -> list:
    """Content hashes of a task's documents, in reading order (size-filtered ones hash to b""); with
    dedup="near", MinHash sketches (neardup.Sketch.digest(); None for size-filtered ones)."""
    sketch = _near_sketch if cfg.dedup == "near" else _ContentHash
    skipped = neardup.Sketch.SKIPPED if cfg.dedup == "near" else _ContentHash.SKIPPED
    out, failed = [], []
    for doc in iter_documents(sources, cfg, TaskStats(), failed):
        n = doc.size
        if n < cfg.min_bytes or (cfg.max_bytes and n > cfg.max_bytes):
            out.append(skipped)
            continue
        h = sketch(doc.path, cfg)
        if doc.stream is None:
            h.update(doc.data)
        else:  # in blocks: bounded memory, as in run_task
            try:
                for block in doc.blocks(n, READ_BLOCK):
                    h.update(block)
            except (OSError, ValueError) as e:
                if cfg.on_error != "skip":
                    raise
                failed.append(e)
                out.append(skipped)
                continue
        out.append(h.digest())
    return out


def drop_sets(hashes_by_task: dict) -> dict:
    """For each content hash, every copy after the first (in task order) is dropped."""
    seen, drop = set(), {}
    for t in sorted(hashes_by_task):
        mine = set()
        for i, h in enumerate(hashes_by_task[t]):
            if not h:
                continue
            if h in seen:
                mine.add(i)
            else:
                seen.add(h)
        drop[t] = frozenset(mine)
    return drop


HASH_UNIT_BYTES = 16 << 20  # sources hashed per pre-pass job: a task's hashing spreads over workers too


def hash_tasks(tasks, mine, cfg, pool, progress: bool = False) -> dict:
    """Each of `mine`'s tasks' hashes, in reading order. A task is cut into runs of sources of about
    HASH_UNIT_BYTES, hashed independently (by the pool's workers when there is one) and joined in
    order: a document's ordinal is the same as in run_task whatever the cut."""
    units = [(t, unit) for t in mine for unit in plan_tasks(tasks[t], HASH_UNIT_BYTES)]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(s.size for _, u in units for s in u), unit="B", unit_scale=True, unit_divisor=1000,
                   desc="dedup " + (cfg.dedup or "exact"), smoothing=0.1)
    results = (pool.map(_hash_sources, [u for _, u in units], [cfg] * len(units)) if pool is not None
               else (_hash_sources(u, cfg) for _, u in units))
    out = {t: [] for t in mine}
    try:
        for (t, unit), hashes in zip(units, results):
            out[t].extend(hashes)
            if bar is not None:
                bar.update(sum(s.size for s in unit))
    finally:
        if bar is not None:
            bar.close()
    return out


def near_decide(hashed: dict, cfg: BuildConfig, comm, rank: int) -> tuple[dict, dict]:
    """Near-duplicate decisions over every rank's sketches, made once on rank 0 in corpus order and
    sent to all ranks (the sketches travel once, the decisions are small)."""
    decision = None
    if comm is not None:
        parts = comm.gather(hashed, root=0)
        hashed = {t: h for part in parts or [] for t, h in part.items()}
    with all_ranks(comm, rank):
        if rank == 0:
            t0 = time.perf_counter()
            decision = neardup.decide(hashed, cfg.dedup_threshold, cfg.dedup_ngram, cfg.dedup_perm)
            r = decision.report
            logger.info("near-dedup: %d of %d documents dropped (%d exact copies, %d near) in %.1f s",
                        r["dropped"], r["documents"], r["exact"], r["near"], time.perf_counter() - t0)
    if comm is not None:
        decision = comm.bcast(decision, root=0)
    return decision.drop, decision.report
