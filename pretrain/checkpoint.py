"""Checkpoints: everything a run writes to disk and reads back.

Save on all ranks into a temporary folder, fsynced, renamed whole, and only then moved to by an
atomic ``latest``, with the parallel layout and every file's size and sha256 beside it; keep the
newest K; verify a checkpoint before resuming (or fall back to the newest intact one); plan a
resume (through DeepSpeed's universal format when the parallel layout changed); consolidate a
checkpoint of any layout into one plain fp32 state dict, reading it with weights-only loads; decide
which weights a run directory stands for (``resolve_model_source``); read and write the exported
``model.safetensors`` (its config and step in the file's metadata). ``engine.py`` builds and steps
the DeepSpeed engine; this module never changes it.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import pickle
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from terrabyte.data_pipeline.basics.errors import CheckpointError
from terrabyte.data_pipeline.basics.system import atomic_path, atomic_write, fsync_path, fsync_tree

from . import ds_seams, earlier_formats
from .args import Config
from .engine import all_gather_objects, barrier, is_pipeline, layout_of, on_rank0
from .parallel import Layout, pipeline_key

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
# The model's weights in one file, config in its metadata: the export, and save_pretrained's weights
# (huggingface_hub's constants.SAFETENSORS_SINGLE_FILE).
WEIGHTS_FILE = "model.safetensors"


# --------------------------------------------------------------------------- DeepSpeed checkpoints

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


@dataclass
class ResumePlan:
    root: Path
    tag: str
    universal: bool
    """Load from ``<tag>/universal`` (converted) with DeepSpeed's ``load_universal``."""

    @property
    def load_tag(self) -> str:
        return f"{self.tag}/{UNIVERSAL_DIRNAME}" if self.universal else self.tag


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


def plan_resume(cfg: Config, run_dir: str | Path, layout: Layout) -> Optional[ResumePlan]:
    """Check the newest checkpoint against this run before any engine exists, and decide how to load
    it. A different parallel layout goes through DeepSpeed's universal format (converted once, by rank
    0); ``checkpoint.universal`` false makes that an error instead. Every rank must call it."""
    root = checkpoint_dir(run_dir)
    check_run_dir(root, layout.rank)
    # every file checked (shared out over the ranks): all ranks stop, or fall back, together
    tag = choose_checkpoint(root, cfg.checkpoint.fallback, layout.rank)
    if tag is None:
        return None
    ckpt = root / tag
    stored = ckpt / "model_config.json"
    if stored.is_file():
        check_same_model(read_json_mapping(stored), cfg.model.kwargs(), str(ckpt))
    elif layout.rank == 0:
        earlier_formats.warn_no_model_config(ckpt)
    saved = saved_layout(ckpt, layout.rank)
    current = layout.as_dict()
    moved = saved is not None and {k: saved.get(k) for k in current} != current
    if moved and saved.get("pipeline", 1) != layout.pipeline:
        # pipeline checkpoints name parameters by layer index ("3.stages.0..."), plain ones by module
        raise CheckpointError(
            f"checkpoint {ckpt} was written with parallel.pipeline_stages={saved.get('pipeline', 1)}; resuming "
            f"with {layout.pipeline} is not supported: resume with --parallel.pipeline_stages "
            f"{saved.get('pipeline', 1)} (data-parallel, tensor- and sequence-parallel sizes may change)"
        )
    universal = cfg.checkpoint.universal
    if universal is None:
        universal = moved
    elif not universal and moved:
        raise CheckpointError(
            f"checkpoint {ckpt} was written by {_layout_text(saved)}, this run is {_layout_text(current)}: "
            f"sharded ZeRO/pipeline/tensor-parallel states load only in their own layout; drop "
            f"--checkpoint.universal false to convert it (DeepSpeed universal checkpoint), or relaunch as before"
        )
    if universal:
        on_rank0(layout.rank, convert_to_universal, ckpt)
        log.info("resuming %s through a universal checkpoint (%s -> %s)", ckpt,
                 _layout_text(saved) if saved else "unknown layout", _layout_text(current))
    return ResumePlan(root, tag, bool(universal))


def _layout_text(layout: dict) -> str:
    return (f"{layout['world']} rank(s) (data {layout['dp']} x pipeline {layout['pipeline']} x tensor "
            f"{layout['tensor']} x sequence {layout['sequence']})")


def convert_to_universal(ckpt: Path, in_process: bool = False, trust: bool = False) -> Path:
    """DeepSpeed's ``ds_to_universal`` into ``<ckpt>/universal`` (once; atomic). Resuming a run's own
    checkpoint runs it as DeepSpeed ships it, in a subprocess; reading weights (``in_process``) runs
    it here inside ``tensors_only_loads(trust)``, so no file it reads is unpickled in full unless
    trusted. A folder ``universal`` that came with the checkpoint is read, never executed."""
    out = ckpt / UNIVERSAL_DIRNAME
    if (out / "latest_universal").is_file() or (out / ".complete").is_file():
        return out
    tmp = ckpt / f"{UNIVERSAL_DIRNAME}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    log.info("converting %s to a universal checkpoint", ckpt)
    if in_process:
        _convert_here(ckpt, tmp, trust)
    else:
        cmd = [sys.executable, "-m", ds_seams.UNIVERSAL_SCRIPT, *ds_seams.universal_args(str(ckpt), str(tmp))]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise CheckpointError(f"checkpoint {ckpt} could not be converted to a universal checkpoint: {last}")
    (tmp / ".complete").write_text("")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def _convert_here(ckpt: Path, tmp: Path, trust: bool) -> None:
    """``ds_to_universal`` in this process, one worker (no pool of processes to escape the guard)."""
    try:
        with tensors_only_loads(trust):
            ds_seams.run_universal_here(ds_seams.universal_args(str(ckpt), str(tmp)))
    except CheckpointError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except (Exception, SystemExit) as exc:  # DeepSpeed's converter fails in its own ways on foreign files
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"checkpoint {ckpt} could not be converted to a universal checkpoint: "
                              f"{type(exc).__name__}: {_first_line(exc)}") from None


def _unreadable(exc: BaseException) -> bool:
    """Is this what torch.load/DeepSpeed raise for a missing, truncated or garbled checkpoint file?"""
    if isinstance(exc, (FileNotFoundError, EOFError, pickle.UnpicklingError)):
        return True
    return isinstance(exc, RuntimeError) and any(
        s in str(exc) for s in ("PytorchStreamReader", "zip archive", "unexpected EOF"))


def load(engine, plan: Optional[ResumePlan]) -> dict | None:
    """Resume from the planned checkpoint; returns the client state or None for a fresh run."""
    if plan is None:
        return None
    where = plan.root / plan.load_tag
    # DeepSpeed's universal loader copies param group 0's hyperparameters to every group, which would
    # give norms and start tokens weight decay: keep ours (they come from the config anyway)
    groups = ds_seams.inner_optimizer(engine).param_groups
    hyper = [{k: v for k, v in g.items() if k not in ("params", "lr", "initial_lr")} for g in groups]
    try:
        path, client_state = engine.load_checkpoint(str(plan.root), tag=plan.load_tag)
    except Exception as exc:
        if not _unreadable(exc):
            raise
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"checkpoint {where} is incomplete or unreadable ({detail}); point {plan.root / 'latest'} at an "
            f"earlier step or remove the checkpoints to start over"
        ) from None
    if path is None:
        raise CheckpointError(f"checkpoint {where} could not be loaded (files missing or truncated)")
    if plan.universal:
        for group, saved in zip(groups, hyper):
            group.update(saved)
        # ... and hands every parameter the same `step` tensor, which Adam increments in place once
        # per parameter group: give each its own
        for state in ds_seams.inner_optimizer(engine).state.values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].clone()
    return client_state


def _write_json(path: Path, data: dict) -> None:
    atomic_write(path, json.dumps(data, indent=2), durable=True)


def check_same_model(stored: dict, current: dict, where: str) -> None:
    stored = dict(earlier_formats.model_config(stored))
    if len(current.get("max_seq_len") or ()) == 2:  # two stages embed alike either way
        stored["unit_embedding"] = current.get("unit_embedding")
    for key in sorted(set(stored) | set(current)):
        a, b = stored.get(key), current.get(key)
        if isinstance(a, list):
            a = tuple(a)
        if isinstance(b, list):
            b = tuple(b)
        if a != b and key not in RUNTIME_KEYS:
            raise CheckpointError(
                f"checkpoint {where} was written for a different model: model.{key} is {a!r} there "
                f"but {b!r} now (use another run.dir or the same model config)"
            )


def export_safetensors(engine, path: str | Path, model_config: dict, step: int | None = None) -> None:
    """Consolidate the (possibly sharded) parameters into one safetensors file on rank 0; ``step``
    goes into its metadata (so a later checkpoint is known to be newer)."""
    tensors = full_state_dict(engine)
    if engine.global_rank == 0:
        write_safetensors(tensors, model_config, path, step)
    barrier()


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


TRUST_FLAG = "--trust-checkpoint"
_REFUSED_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+)")


def consolidate_checkpoint(root: str | Path, tag: str, trust: bool = False) -> dict[str, torch.Tensor]:
    """fp32 state dict from a DeepSpeed checkpoint of any layout, in this process, no ranks needed.

    Data-parallel ZeRO checkpoints go through ``zero_to_fp32``; pipeline and tensor-parallel ones
    through DeepSpeed's universal conversion, which merges stages and tensor slices. Both run here,
    inside ``tensors_only_loads``: a file that holds anything but tensors and plain data is refused
    unless ``trust`` (``--trust-checkpoint``) says its author is trusted.
    """
    ckpt = Path(root) / tag
    verify_files(ckpt)
    layout = saved_layout(ckpt) or {}
    if _layout_size(layout, "pipeline", ckpt) > 1 or _layout_size(layout, "tensor", ckpt) > 1:
        return _consolidate_universal(ckpt, trust)
    # DeepSpeed logs to stdout, which `terrabyte generate` keeps for the generated bytes
    with contextlib.redirect_stdout(sys.stderr):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    try:
        with contextlib.redirect_stdout(sys.stderr), tensors_only_loads(trust):
            state = get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)
    except CheckpointError:
        raise
    except Exception as exc:  # DeepSpeed's reader fails in its own ways on a garbled or foreign file
        raise CheckpointError(f"checkpoint {ckpt} is incomplete or unreadable: {_first_line(exc)}") from None
    return {k: v.float() for k, v in state.items()}


def _layout_size(layout: dict, key: str, ckpt: Path) -> int:
    value = layout.get(key, 1)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CheckpointError(f"checkpoint {ckpt / LAYOUT_FILE}: {key} must be a positive whole number, got {value!r}")
    return value


@contextlib.contextmanager
def tensors_only_loads(trust: bool = False):
    """Inside: every ``torch.load`` is ``weights_only=True`` (tensors, containers and the allowed
    DeepSpeed data classes; no arbitrary unpickling), whatever its caller asked for: DeepSpeed's
    readers ask for ``weights_only=False``. A file that needs more is refused with one line naming it
    and ``--trust-checkpoint``; with ``trust`` every load unpickles in full. For reading checkpoints
    that may come from elsewhere (``generate``, ``eval``, ``export``, ``from_pretrained``,
    ``--init-from``); not thread-safe, as it swaps ``torch.load``."""
    original = torch.load

    def load(f, *args, **kwargs):
        kwargs["weights_only"] = not trust
        try:
            return original(f, *args, **kwargs)
        except pickle.UnpicklingError as exc:
            found = _REFUSED_GLOBAL.search(str(exc))
            if trust or (found is None and "Weights only load failed" not in str(exc)):
                raise
            name = f if isinstance(f, (str, os.PathLike)) else getattr(f, "name", f)
            what = f" ({found.group(1)})" if found else ""
            raise CheckpointError(
                f"checkpoint file {name} holds pickled objects besides tensors and plain data{what}: loading it "
                f"could run code; pass {TRUST_FLAG} (trust_checkpoint=True in Python) only if you trust whoever "
                f"wrote it") from None

    torch.load = load
    try:
        with torch.serialization.safe_globals(ds_seams.checkpoint_safe_globals()):
            yield
    finally:
        torch.load = original


def _consolidate_universal(ckpt: Path, trust: bool) -> dict[str, torch.Tensor]:
    """Converted once into ``<ckpt>/universal`` where the folder is writable; a read-only checkpoint
    (a shared or downloaded one) is converted into a temporary folder for this read only."""
    if os.access(ckpt, os.W_OK) or (ckpt / UNIVERSAL_DIRNAME / ".complete").is_file():
        return _read_universal(convert_to_universal(ckpt, in_process=True, trust=trust), ckpt)
    import tempfile

    with tempfile.TemporaryDirectory(prefix="terrabyte-universal-") as tmp:
        out = Path(tmp) / UNIVERSAL_DIRNAME
        _convert_here(ckpt, out, trust)
        return _read_universal(out, ckpt)


def _read_universal(out: Path, ckpt: Path) -> dict[str, torch.Tensor]:
    state = {}
    for fp32 in sorted((out / "zero").glob("*/fp32.pt")):
        name = fp32.parent.name
        try:
            obj = torch.load(fp32, map_location="cpu", weights_only=True)
        except Exception as exc:  # a universal folder that came with the checkpoint is read like the rest
            raise CheckpointError(f"checkpoint file {fp32} is unreadable: {_first_line(exc)}") from None
        tensor = obj["param"] if isinstance(obj, dict) else obj  # ZeRO-1/2 wrap it, ZeRO-3 does not
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointError(f"checkpoint file {fp32} holds no tensor")
        # pipeline parameter names start with the layer index
        key = pipeline_key(name) if name.split(".", 1)[0].isdigit() else name
        state[key] = tensor.float()
    if not state:
        raise CheckpointError(f"checkpoint {ckpt}: the universal conversion produced no parameters")
    return state


def full_state_dict(engine) -> Optional[dict[str, torch.Tensor]]:
    """The plain model's whole state dict on rank 0 (None elsewhere), whatever the engine sharded.
    Every rank must call it."""
    import torch.distributed as tdist

    if is_pipeline(engine):
        local = {}
        if ds_seams.pipeline_data_parallel_rank(engine) == 0:
            local = {pipeline_key(k): v.detach().cpu().clone() for k, v in engine.module.state_dict().items()}
        parts = [None] * tdist.get_world_size() if engine.global_rank == 0 else None
        tdist.gather_object(local, parts, dst=0)
        return {k: v for part in parts for k, v in part.items()} if engine.global_rank == 0 else None
    if engine.zero_optimization_partition_weights() or engine.autotp_size() > 1:
        state = ds_seams.gathered_16bit_state_dict(engine)
    else:
        state = engine.module.state_dict() if engine.global_rank == 0 else None
    if state is None:
        return None
    # clone: tied weights share storage, which safetensors refuses
    return {k: v.detach().cpu().clone().contiguous() for k, v in state.items()}



# --------------------------------------------------------------------------- safetensors


def load_state(source, trust: bool = False) -> tuple[dict, dict[str, torch.Tensor]]:
    """(model config, state dict) from a safetensors file, a run directory or a checkpoint folder
    (resolved by ``resolve_model_source``), or from a ``ModelSource`` it returned. Nothing is
    unpickled in full unless ``trust`` (``consolidate_checkpoint``)."""
    config, state = _load_state(source, trust)
    return earlier_formats.model_config(config), state


@dataclass(frozen=True)
class ModelSource:
    """Where a model's weights come from: an exported safetensors file, or a DeepSpeed checkpoint
    (``root`` / ``tag``) consolidated on the fly. ``step`` is the training step they hold, if known."""

    kind: str  # "safetensors" | "checkpoint"
    path: Path  # the file, or the checkpoint folder
    step: Optional[int] = None
    root: Optional[Path] = None
    tag: Optional[str] = None

    def describe(self) -> str:
        at = f" (step {self.step})" if self.step is not None else ""
        return f"{'exported model' if self.kind == 'safetensors' else 'checkpoint'} {self.path}{at}"


def resolve_model_source(source: str | Path) -> ModelSource:
    """The weights a path stands for: a ``.safetensors`` file is itself; a checkpoint folder (one
    holding ``latest``) is its newest checkpoint; a run directory is its newest checkpoint unless
    its exported ``model.safetensors`` is at least as new (the step in the export's metadata, or
    for exports without one, modification times). The one place that decides this, for
    ``generate``, ``eval``, ``export`` and ``TerraByte.from_pretrained``; logs its choice."""
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.is_file():
        return ModelSource("safetensors", path, exported_step(path))
    root = path if (path / "latest").is_file() else checkpoint_dir(path)
    export = path / WEIGHTS_FILE
    ckpt = None
    tag = read_latest(root)
    if tag is not None:
        if not (root / tag).is_dir():
            raise CheckpointError(f"checkpoint {root / 'latest'} points to {tag!r}, which does not exist")
        ckpt = ModelSource("checkpoint", root / tag, tag_step(tag), root, tag)
    if not export.is_file() and ckpt is None:
        raise FileNotFoundError(f"{source} holds neither {WEIGHTS_FILE} nor a checkpoint (no 'latest' file)")
    chosen = ckpt
    if export.is_file():
        exported = ModelSource("safetensors", export, exported_step(export))
        if ckpt is None or _at_least_as_new(exported, ckpt):
            chosen = exported
    if ckpt is not None and chosen is not ckpt:
        log.info("using %s: as new as the newest %s", chosen.describe(), ckpt.describe())
    elif export.is_file():
        log.info("using %s: newer than the exported %s", chosen.describe(), export)
    else:
        log.info("using %s", chosen.describe())
    return chosen


def _at_least_as_new(exported: ModelSource, ckpt: ModelSource) -> bool:
    if exported.step is not None and ckpt.step is not None:
        return exported.step >= ckpt.step
    return exported.path.stat().st_mtime >= ckpt.path.stat().st_mtime


def exported_step(path: Path) -> Optional[int]:
    """The training step recorded in an exported file's metadata (None: not recorded or unreadable)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            step = (f.metadata() or {}).get("step")
        return int(step) if step is not None else None
    except Exception:  # unreadable: reported when the weights are read
        return None


def _load_state(source, trust: bool = False) -> tuple[dict, dict[str, torch.Tensor]]:
    where = source if isinstance(source, ModelSource) else resolve_model_source(source)
    if where.kind == "safetensors":
        return _load_safetensors(where.path)
    config_path = where.path / "model_config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"checkpoint {where.path} has no model_config.json")
    return read_json_mapping(config_path), consolidate_checkpoint(where.root, where.tag, trust)


def _load_safetensors(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        state = load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for truncated/garbled files
        raise CheckpointError(f"{path} is not a readable safetensors file: {exc}") from None
    if "model_config" not in metadata:
        raise CheckpointError(f"{path} carries no model_config metadata (was it written by `terrabyte export`?)")
    return json.loads(metadata["model_config"]), state


def write_safetensors(tensors: dict[str, torch.Tensor], config: dict, path: str | Path,
                      step: Optional[int] = None) -> None:
    """One safetensors file with the model config (and the training step, if known) in its metadata,
    written to a temporary name first."""
    from safetensors.torch import save_file

    metadata = {"model_config": json.dumps(config), "format": "pt"}
    if step is not None:
        metadata["step"] = str(int(step))
    with atomic_path(path, durable=True) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def save_safetensors(model: torch.nn.Module, config: dict, path: str | Path, step: Optional[int] = None) -> None:
    # clone: tied weights share storage, which safetensors refuses
    write_safetensors({k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}, config,
                      path, step)


