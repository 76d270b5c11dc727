"""Shard builder: corpus -> zstd-compressed members -> webdataset tar shards + manifest.json.

`build_shards` runs the steps, each in its own module: inputs into sources (sources.py) and sources
into documents (documents.py); the sources cut into tasks (tasks.py), each task bundling its
documents into members (bundle.py) and writing them into tar shards (shard_writer.py); the global
passes before any shard is written, de-duplication (dedup.py, neardup.py) and the zstd dictionary
(dictionary.py); tasks on a process pool and MPI ranks (parallel.py); the output folder, staging
and the manifest (publish.py). The format both sides share is ../format.py.
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import os
import shutil
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

from ..basics.errors import ConfigError, DataError
from ..basics.system import atomic_write
from ..format import DICT_FILE
from .config import BuildConfig
from .dedup import drop_sets, hash_tasks, near_decide
from .dictionary import dict_id, train_dictionary
from .documents import check_split_bytes
from .parallel import all_ranks
from .publish import STAGING, STAGING_MARK, check_out_dir, clear_tasks, make_manifest, publish
from .sources import discover_sources
from .tasks import init_worker, load_marker, plan_tasks, run_task, task_fingerprint, worker_run_task

logger = logging.getLogger(__name__)


class _Progress:
    """tqdm bar over input bytes with documents/s in the postfix (rank 0 only)."""

    def __init__(self, total: int, enabled: bool):
        self.bar = None
        self.docs = 0
        self.t0 = time.perf_counter()
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1000, desc="shards", smoothing=0.1)

    def __call__(self, docs: int, nbytes: int):
        self.docs += docs
        if self.bar is not None:
            rate = self.docs / max(time.perf_counter() - self.t0, 1e-9)
            self.bar.set_postfix_str(f"{self.docs} docs, {rate:,.0f} docs/s", refresh=False)
            self.bar.update(nbytes)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def build_shards(cfg: BuildConfig, out_dir: str, *, workers: int = 1, progress: bool = True, comm=None) -> dict:
    """Builds webdataset tar shards of zstd members from ``cfg.inputs`` (files, directories, globs,
    archives), e.g. ``build_shards(BuildConfig(inputs=["corpus/"], val_fraction=0.05), "shards")``.

    Returns the manifest (also written to `<out_dir>/manifest.json`). ``workers`` processes on this
    machine; with `comm` (an mpi4py communicator, or found from the environment by the CLI), tasks
    are dealt to ranks round-robin and rank 0 writes the merged manifest; every rank returns it.
    Neither changes the shards' bytes (``cfg`` alone does).

    `out_dir` must be new, empty or a previous build (`check_out_dir`). Shards are written into
    `<out_dir>/.build` and moved into place only when every task is done, so a build that fails
    leaves a previous build in `out_dir` as it was (and its finished tasks in `.build` for a rerun).
    """
    cfg.validate()
    if workers < 1:
        raise ConfigError(f"workers={workers} must be >= 1")
    rank, world = (comm.Get_rank(), comm.Get_size()) if comm is not None else (0, 1)

    skipped = {"skipped_links": 0}
    sources = discover_sources(cfg.inputs, cfg.include, cfg.exclude, cfg.input_format, cfg.follow_symlinks, skipped)
    if any(skipped.values()) and rank == 0:
        logger.warning("inputs not read: %d symbolic links (--follow-symlinks reads them), %d devices, FIFOs or "
                       "sockets", skipped.get("skipped_links", 0), skipped.get("skipped_special", 0))
    if not sources:
        raise DataError(f"no input files left in {', '.join(map(repr, cfg.inputs))} after include/exclude filters")
    for src in sources if cfg.split_bytes else ():
        check_split_bytes(src, cfg.split_bytes)  # before anything is written
    if any(s.kind == "stdin" for s in sources) and cfg.dedup == "near":
        raise ConfigError("stdin input ('-') can be read only once, and --dedup near reads every document twice: "
                          "save it to a file first")
    if any(s.kind == "stdin" for s in sources) and (world > 1 or workers > 1):
        raise ConfigError("stdin input ('-') needs a single process: drop --workers and mpirun")
    tasks = plan_tasks(sources, cfg.task_bytes)
    staging = os.path.join(out_dir, STAGING)
    with all_ranks(comm, rank):
        if rank == 0:
            check_out_dir(out_dir)
            os.makedirs(staging, exist_ok=True)
            atomic_write(os.path.join(staging, STAGING_MARK), "")
    if comm is not None:
        comm.Barrier()

    zdict = None
    if cfg.dict_bytes:
        with all_ranks(comm, rank):  # an error on rank 0 must not leave the others waiting
            if rank == 0:
                zdict = train_dictionary(tasks, cfg)
                atomic_write(os.path.join(staging, DICT_FILE), zdict)
        if comm is not None:
            zdict = comm.bcast(zdict, root=0)

    mine = [t for t in range(len(tasks)) if t % world == rank]
    fingerprints = {t: task_fingerprint(cfg, tasks[t]) for t in mine}
    done = {t: r for t in mine if (r := load_marker(staging, t, fingerprints[t])) is not None}
    earlier = {t: r for t in mine if t not in done and (r := load_marker(out_dir, t, fingerprints[t])) is not None}
    clear_tasks(staging, set(earlier))  # finished by an earlier build: its files stay where they are
    done.update(earlier)
    todo = [t for t in mine if t not in done]
    if done:
        logger.info("rank %d: %d of %d tasks already complete, skipping them", rank, len(done), len(mine))
    logger.info("rank %d of %d: building %d of %d tasks", rank, world, len(todo), len(tasks))

    pool = queue = None
    if workers > 1 and len(todo) + (len(mine) if cfg.dedup else 0) > 1:
        ctx = mp.get_context("spawn")  # fork is unsafe next to threads (torch, MPI)
        queue = ctx.SimpleQueue()
        pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=init_worker,
                                   initargs=(queue, logging.getLogger().level))
    try:
        drop, dedup_report = {}, None
        if cfg.dedup == "near" or (cfg.dedup and len(tasks) > 1):
            # Global dedup needs every hash before any shard is written: a read-only pre-pass.
            # (One task dedups exact copies on the fly: reading order is the same, so the same
            # copies are kept.)
            hashed = {}
            t0 = time.perf_counter()
            with all_ranks(comm, rank):
                hashed = hash_tasks(tasks, mine, cfg, pool, progress and rank == 0)
            logger.info("rank %d: %s-dedup pre-pass over %d task(s), %.1f MB, in %.1f s", rank, cfg.dedup, len(mine),
                        sum(s.size for t in mine for s in tasks[t]) / 1e6, time.perf_counter() - t0)
            if cfg.dedup == "near":
                drop, dedup_report = near_decide(hashed, cfg, comm, rank)
            else:
                if comm is not None:
                    hashed = {t: h for part in comm.allgather(hashed) for t, h in part.items()}
                drop = drop_sets(hashed)
        records = dict(done)
        with all_ranks(comm, rank):
            _run_tasks(todo, tasks, cfg, staging, drop, zdict, pool, queue, records,
                       _Progress(sum(s.size for t in todo for s in tasks[t]), progress and rank == 0))
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)

    all_records = [records[t] for t in sorted(records)]
    if comm is not None:
        gathered = comm.gather(all_records, root=0)
        all_records = sorted((r for part in (gathered or []) for r in part), key=lambda r: r["task"])
    manifest = None
    error = None
    if rank == 0:
        manifest = make_manifest(cfg, all_records, dict_id(zdict), dedup_report)
        for key, n in skipped.items():
            manifest["stats"][key] = manifest["stats"].get(key, 0) + n
        if manifest["totals"]["all"]["documents"] == 0:
            error = (f"empty corpus: no documents in {', '.join(map(repr, cfg.inputs))} "
                     "after filters (check --include/--exclude/--min-bytes)")
            shutil.rmtree(staging, ignore_errors=True)
        else:
            publish(out_dir, staging, manifest, len(tasks))
            t = manifest["totals"]["all"]
            logger.info("wrote %d shards, %d documents, %.1f MB raw -> %.1f MB to %s",
                        t["shards"], t["documents"], t["raw_bytes"] / 1e6, t["compressed_bytes"] / 1e6, out_dir)
    if comm is not None:
        error, manifest = comm.bcast((error, manifest), root=0)
    if error:
        raise DataError(error)
    return manifest


def _run_tasks(todo, tasks, cfg, out_dir, drop, zdict, pool, queue, records: dict, bar):
    try:
        if pool is None:
            for t in todo:
                records[t] = run_task(t, tasks[t], cfg, out_dir, drop.get(t), bar, zdict)
            return
        futures = {pool.submit(worker_run_task, t, tasks[t], cfg, out_dir, drop.get(t), zdict): t for t in todo}
        pending = set(futures)
        while pending:
            finished, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
            while not queue.empty():
                bar(*queue.get())
            for fut in finished:
                records[futures[fut]] = fut.result()
    finally:
        bar.close()
