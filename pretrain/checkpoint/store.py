"""Checkpoints written whole and checked: save on all ranks into a temporary folder, fsynced, renamed
whole, and only then moved to by an atomic ``latest``, with the parallel layout and every file's size
and sha256 beside it; keep the newest K; verify a checkpoint before resuming (or fall back to the
newest intact one); the random states a checkpoint holds. ``engine/engine.py`` builds and steps the
DeepSpeed engine; this package never changes it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from terrabyte.data_pipeline.basics.errors import CheckpointError
from terrabyte.data_pipeline.basics.system import atomic_write, fsync_path, fsync_tree

from . import earlier_formats
from ..engine.engine import all_gather_objects, barrier, layout_of, on_rank0

log = logging.getLogger(__name__)

CHECKPOINT_DIRNAME = "checkpoints"
TAG_PATTERN = re.compile(r"^step(\d+)$")
LAYOUT_FILE = "layout.json"
UNIVERSAL_DIRNAME = "universal"  # inside a checkpoint's folder, so pruning removes both
FILES_MANIFEST = "files.json"  # every file of a checkpoint with its size and sha256, checked on load
FILES_FORMAT = 2  # files.json {"format": 2, "files": {name: {size, sha256}}} (format 1: earlier_formats)
HASH_BLOCK = 8 << 20
SAVING_PREFIX = ".saving-"  # a checkpoint being written; renamed to stepN once whole
REPLACED_PREFIX = ".replaced-"  # a stepN folder moved aside by a newer save of the same step
# Model arguments that change how the model runs, not what it computes: they may differ between a
# checkpoint and its resumption, and a from_pretrained caller may override them.
RUNTIME_KEYS = ("checkpoint_activations", "attn_dropout", "ff_dropout", "flash_attn", "chunk_bytes")


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINT_DIRNAME


def tag_step(tag: str) -> int | None:
    match = TAG_PATTERN.match(tag)
    return int(match.group(1)) if match else None


def complete_tags(root: Path) -> list[str]:
    """Checkpoint folders that were renamed into place (so saved whole), newest first."""
    if not root.is_dir():
        return []
    tags = [(tag_step(p.name), p.name) for p in root.iterdir()
            if p.is_dir() and tag_step(p.name) is not None and (p / FILES_MANIFEST).is_file()]
    return [tag for _, tag in sorted(tags, reverse=True)]


def save(engine, run_dir: str | Path, step: int, client_state: dict, keep: int, model_config: dict) -> Path:
    """Save a DeepSpeed checkpoint ``stepN`` on all ranks (``write_checkpoint`` says how)."""
    layout = layout_of(engine)
    client_state = {**client_state, "layout": layout.as_dict()}

    def write(tmp: Path) -> None:
        engine.save_checkpoint(str(tmp.parent), tag=tmp.name, client_state=client_state, save_latest=False)

    meta = {"model_config.json": model_config,
            LAYOUT_FILE: {**layout.as_dict(), "zero_stage": engine.zero_optimization_stage()}}
    return write_checkpoint(checkpoint_dir(run_dir), step, write, meta, keep, engine.global_rank)


def write_checkpoint(root: Path, step: int, write: Callable[[Path], None], meta: dict[str, dict], keep: int,
                     rank: int = 0) -> Path:
    """Write checkpoint ``stepN`` under ``root`` so that a kill at any point leaves ``latest`` on a
    whole checkpoint. Every rank calls it; ``write(folder)`` writes this rank's files.

    Every rank writes into ``.saving-stepN`` and fsyncs its files; the ranks hash the files between
    them; rank 0 writes the ``meta`` JSON files and ``files.json`` (size and sha256 of every file),
    fsyncs the folder, renames it to ``stepN``, and only then replaces ``latest`` (fsynced). A save
    never writes into the folder ``latest`` points to: saving that step again is refused. A failed
    write on any rank (full disk, quota) removes the temporary folder and raises the same one
    CheckpointError on all ranks; the previous checkpoint is untouched.
    """
    tag = f"step{step}"
    if read_latest(root) == tag:
        raise CheckpointError(f"checkpoint {root / tag} is the live checkpoint ({root / 'latest'}): it is "
                              f"never written again")
    if (root / tag).exists() and not is_ours(root / tag):
        raise CheckpointError(f"{root / tag} was not written by Terrabyte (no {FILES_MANIFEST} of its format): "
                              f"it is never replaced; move it away or use another run.dir")
    tmp = root / f"{SAVING_PREFIX}{tag}"
    on_rank0(rank, _clear, tmp)  # what a killed save of this step left
    failure = None
    try:
        write(tmp)
        fsync_tree(tmp)
    except (OSError, RuntimeError) as exc:  # torch.save reports a failed write as a RuntimeError
        failure = _first_line(exc)
    _agree_or_fail(failure, rank, tmp, f"checkpoint {root / tag} could not be written")
    files = _hash_files(tmp, rank)

    def commit():
        try:
            for name, data in meta.items():
                _write_json(tmp / name, data)
            _write_json(tmp / FILES_MANIFEST, {"format": FILES_FORMAT, "files": files})
            fsync_path(tmp)
            publish(root, tmp, tag)
        except OSError as exc:
            _clear(tmp)
            raise CheckpointError(f"checkpoint {root / tag} could not be written ({_first_line(exc)}); "
                                  f"{_previous(root)}") from None
        _prune(root, keep)

    on_rank0(rank, commit)
    log.info("saved checkpoint %s", root / tag)
    return root / tag


def publish(root: Path, tmp: Path, tag: str) -> None:
    """Rename a fully written and fsynced checkpoint folder to ``tag``, then point ``latest`` at it
    (both durable). A folder of that name that ``latest`` does not point to (left by a save killed
    between the two steps) is moved aside first, never written into."""
    final = root / tag
    if final.exists():
        aside = root / f"{REPLACED_PREFIX}{tag}"
        _clear(aside)
        os.replace(final, aside)
    os.replace(tmp, final)
    fsync_path(root)
    atomic_write(root / "latest", tag, durable=True)
    _clear(root / f"{REPLACED_PREFIX}{tag}")


def _agree_or_fail(failure: str | None, rank: int, tmp: Path, what: str) -> None:
    """All ranks learn whether any rank failed; then they all raise the same one line."""
    bad = [(r, f) for r, f in enumerate(all_gather_objects(failure)) if f is not None]
    if not bad:
        return
    if rank == 0:
        _clear(tmp)
    barrier()
    r, msg = bad[0]
    raise CheckpointError(f"{what} (rank {r}: {msg}); {_previous(tmp.parent)}")


def _previous(root: Path) -> str:
    tag = read_latest(root)
    if tag is not None:
        return f"the previous checkpoint {root / tag} is intact (free disk space and resume)"
    return "no earlier checkpoint exists"


def read_latest(root: Path) -> str | None:
    """The tag ``root/latest`` names (None: no ``latest``). It must name a folder directly inside
    ``root``: one plain name, no ``..``, no absolute path, and neither it nor ``latest`` a link."""
    latest = root / "latest"
    if not latest.exists() and not latest.is_symlink():
        return None
    if latest.is_symlink() or not latest.is_file():
        raise CheckpointError(f"checkpoint {latest} is a link or not a regular file: it must be a file naming a "
                              f"folder in {root}")
    with open(latest, "rb") as f:
        raw = f.read(256)
    tag = raw.decode("utf-8", errors="replace").strip()
    plain = (tag and len(raw) < 256 and tag not in (".", "..") and "/" not in tag and "\\" not in tag
             and tag.isprintable())
    if not plain or (root / tag).is_symlink():
        raise CheckpointError(f"checkpoint {latest} names {tag[:80]!r}: it must name a folder directly inside "
                              f"{root} (one plain name, not a path or a link)")
    return tag


def is_ours(folder: Path) -> bool:
    """Did Terrabyte write this checkpoint folder? Its ``files.json`` is of our format (2, or an
    earlier one). Only such folders are ever pruned or replaced."""
    manifest = folder / FILES_MANIFEST
    if folder.is_symlink() or manifest.is_symlink() or not manifest.is_file():
        return False
    try:
        data = json.loads(manifest.read_text())
    except (ValueError, OSError):
        return False
    if isinstance(data, dict) and data.get("format") == FILES_FORMAT:
        return isinstance(data.get("files"), dict)
    return earlier_formats.files_format1(data) is not None


def check_run_dir(root: Path, rank: int = 0) -> None:
    """A run directory holding ``stepN`` folders that Terrabyte did not write is refused before a fresh
    run starts (every rank must call it). A run that resumes (``latest`` exists) keeps such folders
    untouched: folders from before ``files.json`` existed are its own, and pruning skips them."""
    foreign = []
    if root.is_dir():
        foreign = sorted(p.name for p in root.iterdir() if tag_step(p.name) is not None and not is_ours(p))
    verdict = None
    has_latest = (root / "latest").exists() or (root / "latest").is_symlink()
    if foreign and not has_latest:
        shown = ", ".join(foreign[:5]) + (f", ... ({len(foreign)} in all)" if len(foreign) > 5 else "")
        verdict = (f"{root} holds checkpoint folders Terrabyte did not write ({shown}: no {FILES_MANIFEST} of its "
                   f"format) and no latest: a fresh run never writes beside them; use another run.dir or move them away")
    verdict = next((v for v in all_gather_objects(verdict) if v is not None), None)
    if verdict is not None:
        raise CheckpointError(verdict)
    if foreign and rank == 0:
        log.warning("%s: %s carry no %s of Terrabyte's format; they are kept and never pruned", root,
                    ", ".join(foreign), FILES_MANIFEST)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _clear(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)


def _prune(root: Path, keep: int) -> None:
    """Keep the newest ``keep`` of our checkpoints; folders Terrabyte did not write are never removed."""
    steps = sorted((tag_step(p.name), p) for p in root.iterdir()
                   if tag_step(p.name) is not None and p.is_dir() and is_ours(p))
    for _, path in steps[:-keep]:
        _clear(path)
    for path in root.iterdir():  # temporary folders of killed saves
        if path.name.startswith((SAVING_PREFIX, REPLACED_PREFIX)):
            _clear(path)


def _checked_files(ckpt: Path) -> list[Path]:
    return [p for p in sorted(ckpt.rglob("*"))
            if p.is_file() and p.name not in (FILES_MANIFEST, "model_config.json", LAYOUT_FILE)
            and UNIVERSAL_DIRNAME not in p.relative_to(ckpt).parts[:1]]


def file_digest(path: Path) -> str:
    """sha256 of a file, read in blocks (the sha_ni instructions make it faster than blake2b)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(HASH_BLOCK):
            h.update(block)
    return h.hexdigest()


def _hash_files(ckpt: Path, rank: int) -> dict[str, dict]:
    """{name: {size, sha256}} of the checkpoint's files; each rank hashes a share, rank 0 gets all."""
    import torch.distributed as tdist

    world = tdist.get_world_size() if tdist.is_initialized() else 1
    paths = _checked_files(ckpt)
    mine = {str(p.relative_to(ckpt)): {"size": p.stat().st_size, "sha256": file_digest(p)}
            for p in paths[rank::world]}
    return {k: v for part in all_gather_objects(mine) for k, v in sorted(part.items())}


def verify_files(ckpt: Path, rank: int = 0, world: int = 1) -> None:
    """Every file the checkpoint was saved with is there, whole and unchanged (size and sha256 from
    files.json); with ``world`` > 1 this caller checks every world-th file from ``rank``. A checkpoint
    of an earlier format is checked as far as its files.json allows, with a warning naming the rest."""
    manifest = ckpt / FILES_MANIFEST
    if not manifest.is_file():
        if rank == 0:
            earlier_formats.warn_no_manifest(ckpt, FILES_MANIFEST)
        return
    hint = f"point {ckpt.parent / 'latest'} at an earlier step, resume with --checkpoint.fallback true, or " \
           f"remove the checkpoints to start over"
    try:
        recorded = json.loads(manifest.read_text())
        entries = recorded["files"] if recorded.get("format") == FILES_FORMAT else earlier_formats.files_format1(recorded)
        if entries is not None and recorded.get("format") != FILES_FORMAT and rank == 0:
            earlier_formats.warn_no_sha256(ckpt, FILES_MANIFEST)
        items = sorted((str(name), int(e["size"]), e.get("sha256")) for name, e in entries.items())
    except (ValueError, KeyError, TypeError, AttributeError):
        raise CheckpointError(f"checkpoint {ckpt} is damaged: {FILES_MANIFEST} is not readable; {hint}") from None
    for name, size, digest in items[rank::world]:
        path = ckpt / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint {ckpt} is incomplete: {name} is missing; {hint}")
        if path.stat().st_size != size:
            raise CheckpointError(f"checkpoint {ckpt} is damaged: {name} has {path.stat().st_size} of {size} bytes "
                                  f"(truncated?); {hint}")
        if digest is not None and file_digest(path) != digest:
            raise CheckpointError(f"checkpoint {ckpt} is damaged: {name} does not match its sha256 in "
                                  f"{FILES_MANIFEST}; {hint}")


def _verify_together(ckpt: Path, rank: int) -> str | None:
    """verify_files shared out over the ranks; every rank gets the same verdict (None: intact)."""
    import torch.distributed as tdist

    world = tdist.get_world_size() if tdist.is_initialized() else 1
    try:
        verify_files(ckpt, rank, world)
        verdict = None
    except CheckpointError as exc:
        verdict = str(exc)
    return next((v for v in all_gather_objects(verdict) if v is not None), None)


def choose_checkpoint(root: Path, fallback: bool, rank: int = 0) -> str | None:
    """The tag to resume from: ``latest``, verified (every rank must call it). A damaged one stops
    the run with the line naming the file; with ``fallback`` the newest intact checkpoint is used
    instead, and said so."""
    latest = root / "latest"
    tag = read_latest(root)
    if tag is None:
        return None
    problem = (f"checkpoint {latest} points to {tag!r}, which does not exist"
               if not (root / tag).is_dir() else _verify_together(root / tag, rank))
    if problem is None:
        return tag
    if not fallback:
        raise CheckpointError(problem)
    newest = tag_step(tag)
    for older in complete_tags(root):
        if newest is not None and tag_step(older) >= newest:
            continue
        if _verify_together(root / older, rank) is None:
            log.warning("%s; resuming from %s instead (checkpoint.fallback)", problem, root / older)
            on_rank0(rank, _set_aside, root, tag, older)
            return older
    raise CheckpointError(f"{problem}; no intact earlier checkpoint in {root} (checkpoint.fallback)")


def _set_aside(root: Path, damaged: str, resumed: str) -> None:
    """Rename the damaged checkpoint ``damaged`` to ``<damaged>.damaged-<time>`` (kept, never pruned:
    the name is no step's) and point ``latest`` at ``resumed``, atomically: the run saves that step
    again and gets past it."""
    if (root / damaged).is_dir():
        stamp = time.strftime("%Y%m%d-%H%M%S")
        aside = next(p for n in range(1000) if not (p := root / f"{damaged}.damaged-{stamp}{f'-{n}' if n else ''}").exists())
        os.replace(root / damaged, aside)
        log.warning("set the damaged checkpoint aside as %s (kept for inspection; remove it when done)", aside)
    atomic_write(root / "latest", resumed, durable=True)
    fsync_path(root)


def saved_layout(ckpt: Path, rank: int = 0) -> Optional[dict]:
    """The layout a checkpoint was written with (None if it predates layout.json, said in a warning)."""
    path = ckpt / LAYOUT_FILE
    if path.is_file():
        return read_json_mapping(path)
    if rank == 0:
        earlier_formats.warn_no_layout(ckpt, LAYOUT_FILE)
    return None


def read_json_mapping(path: Path) -> dict:
    """A JSON object from a file that may come from anyone: anything else is one line naming it."""
    try:
        data = json.loads(path.read_text())
    except (ValueError, RecursionError) as exc:
        raise CheckpointError(f"{path} is not valid JSON: {_first_line(exc)}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a mapping")
    return data


def _write_json(path: Path, data: dict) -> None:
    atomic_write(path, json.dumps(data, indent=2), durable=True)


def rng_state() -> dict:
    """The CPU random state and, on a GPU, this rank's CUDA one (dropout draws from it)."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(saved) -> None:
    """Undo ``rng_state`` (or read an earlier checkpoint's: ``earlier_formats.rng_states``)."""
    saved = earlier_formats.rng_states(saved)
    torch.set_rng_state(saved["cpu"])
    if torch.cuda.is_available():
        if "cuda" in saved:
            torch.cuda.set_rng_state(saved["cuda"])
        else:
            log.warning("the checkpoint holds no CUDA random state (saved without a GPU): GPU dropout "
                        "will not repeat the uninterrupted run's")
