"""Checkpoints: everything a run writes to disk and reads back.

Save on all ranks with an atomic ``latest`` and the parallel layout and file sizes beside it; keep
the newest K; verify a checkpoint is whole before resuming; plan a resume (through DeepSpeed's
universal format when the parallel layout changed); consolidate a checkpoint of any layout into one
plain fp32 state dict; read and write the exported ``model.safetensors`` (its config in the file's
metadata). ``engine.py`` builds and steps the DeepSpeed engine; this module never changes it.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from terrabyte.data_pipeline.errors import CheckpointError
from terrabyte.data_pipeline.system import atomic_path, atomic_write

from .args import Config
from .engine import barrier, is_pipeline, on_rank0
from .parallel import Layout, pipeline_key

log = logging.getLogger(__name__)

CHECKPOINT_DIRNAME = "checkpoints"
TAG_PATTERN = re.compile(r"^step(\d+)$")
LAYOUT_FILE = "layout.json"
UNIVERSAL_DIRNAME = "universal"  # inside a checkpoint's folder, so pruning removes both
FILES_MANIFEST = "files.json"  # every file of a checkpoint with its size: missing/truncated files show
# Model keys that may change between a checkpoint and its resumption.
RESUMABLE_MODEL_KEYS = ("checkpoint_activations", "attn_dropout", "ff_dropout", "flash_attn", "chunk_bytes")
# The exported model: one file, config in its metadata.
EXPORT_FILE = "model.safetensors"


# --------------------------------------------------------------------------- DeepSpeed checkpoints

def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINT_DIRNAME


def latest_tag(run_dir: str | Path) -> str | None:
    latest = checkpoint_dir(run_dir) / "latest"
    if not latest.is_file():
        return None
    tag = latest.read_text().strip()
    if not (checkpoint_dir(run_dir) / tag).is_dir():
        raise CheckpointError(f"checkpoint {latest} points to {tag!r}, which does not exist")
    return tag


def save(engine, run_dir: str | Path, step: int, client_state: dict, keep: int, model_config: dict) -> Path:
    """Save on all ranks; only after every rank finished does ``latest`` point at it (atomically)."""
    root = checkpoint_dir(run_dir)
    tag = f"step{step}"
    layout = engine.terrabyte.layout
    client_state = {**client_state, "layout": layout.as_dict()}
    engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
    barrier()
    if engine.global_rank == 0:
        _write_json(root / tag / "model_config.json", model_config)
        _write_json(root / tag / LAYOUT_FILE, {**layout.as_dict(), "zero_stage": engine.zero_optimization_stage()})
        _write_json(root / tag / FILES_MANIFEST, _file_sizes(root / tag))
        atomic_write(root / "latest", tag)
        _prune(root, keep)
    barrier()
    log.info("saved checkpoint %s", root / tag)
    return root / tag


def _prune(root: Path, keep: int) -> None:
    steps = sorted(
        (int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := TAG_PATTERN.match(p.name))
    )
    for _, path in steps[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


def _file_sizes(ckpt: Path) -> dict[str, int]:
    return {
        str(p.relative_to(ckpt)): p.stat().st_size
        for p in sorted(ckpt.rglob("*"))
        if p.is_file() and p.suffix != ".json" and UNIVERSAL_DIRNAME not in p.relative_to(ckpt).parts[:1]
    }


def verify_files(ckpt: Path) -> None:
    """Every file the checkpoint was saved with is there, whole (checked against files.json)."""
    manifest = ckpt / FILES_MANIFEST
    if not manifest.is_file():
        return  # written before manifests existed: DeepSpeed's own errors will have to do
    for name, size in json.loads(manifest.read_text()).items():
        path = ckpt / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint {ckpt} is incomplete: {name} is missing; point "
                             f"{ckpt.parent / 'latest'} at an earlier step or remove the checkpoints to start over")
        if path.stat().st_size != size:
            raise CheckpointError(f"checkpoint {ckpt} is damaged: {name} has {path.stat().st_size} of {size} bytes "
                             f"(truncated?); point {ckpt.parent / 'latest'} at an earlier step or remove the "
                             f"checkpoints to start over")


@dataclass
class ResumePlan:
    root: Path
    tag: str
    universal: bool
    """Load from ``<tag>/universal`` (converted) with DeepSpeed's ``load_universal``."""

    @property
    def load_tag(self) -> str:
        return f"{self.tag}/{UNIVERSAL_DIRNAME}" if self.universal else self.tag


def saved_layout(ckpt: Path) -> Optional[dict]:
    """The layout a checkpoint was written with (None if it predates layout.json)."""
    path = ckpt / LAYOUT_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def plan_resume(cfg: Config, run_dir: str | Path, layout: Layout) -> Optional[ResumePlan]:
    """Check the newest checkpoint against this run before any engine exists, and decide how to load
    it. A different parallel layout goes through DeepSpeed's universal format (converted once, by rank
    0); ``checkpoint.universal`` false makes that an error instead. Every rank must call it."""
    tag = latest_tag(run_dir)
    if tag is None:
        return None
    root = checkpoint_dir(run_dir)
    ckpt = root / tag
    stored = ckpt / "model_config.json"
    if stored.is_file():
        check_same_model(json.loads(stored.read_text()), cfg.model.kwargs(), str(ckpt))
    verify_files(ckpt)  # on every rank, no collective: all ranks stop together on a bad checkpoint
    saved = saved_layout(ckpt)
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


def convert_to_universal(ckpt: Path) -> Path:
    """``python -m deepspeed.checkpoint.ds_to_universal`` into ``<ckpt>/universal`` (once; atomic)."""
    out = ckpt / UNIVERSAL_DIRNAME
    if (out / "latest_universal").is_file() or (out / ".complete").is_file():
        return out
    tmp = ckpt / f"{UNIVERSAL_DIRNAME}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(ckpt),
           "--output_folder", str(tmp), "--num_extract_workers", "1", "--num_merge_workers", "1"]
    log.info("converting %s to a universal checkpoint", ckpt)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise CheckpointError(f"checkpoint {ckpt} could not be converted to a universal checkpoint: {last}")
    (tmp / ".complete").write_text("")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


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
    groups = engine.basic_optimizer.param_groups
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
        for state in engine.basic_optimizer.state.values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].clone()
    return client_state


def _write_json(path: Path, data: dict) -> None:
    atomic_write(path, json.dumps(data, indent=2))


def check_same_model(stored: dict, current: dict, where: str) -> None:
    # configs from before grouped embeddings embedded by concatenation; two stages embed alike either way
    stored = {"unit_embedding": "concat", **stored}
    if len(current.get("max_seq_len") or ()) == 2:
        stored["unit_embedding"] = current.get("unit_embedding")
    for key in sorted(set(stored) | set(current)):
        a, b = stored.get(key), current.get(key)
        if isinstance(a, list):
            a = tuple(a)
        if isinstance(b, list):
            b = tuple(b)
        if a != b and key not in RESUMABLE_MODEL_KEYS:
            raise CheckpointError(
                f"checkpoint {where} was written for a different model: model.{key} is {a!r} there "
                f"but {b!r} now (use another run.dir or the same model config)"
            )


def export_safetensors(engine, path: str | Path, model_config: dict) -> None:
    """Consolidate the (possibly sharded) parameters into one safetensors file on rank 0."""
    tensors = full_state_dict(engine)
    if engine.global_rank == 0:
        write_safetensors(tensors, model_config, path)
    barrier()


def consolidate_checkpoint(root: str | Path, tag: str) -> dict[str, torch.Tensor]:
    """fp32 state dict from a DeepSpeed checkpoint of any layout, in one process, no ranks needed.

    Data-parallel ZeRO checkpoints go through ``zero_to_fp32``; pipeline and tensor-parallel ones
    through the universal conversion, which merges stages and tensor slices.
    """
    ckpt = Path(root) / tag
    verify_files(ckpt)
    layout = saved_layout(ckpt) or {}
    if layout.get("pipeline", 1) > 1 or layout.get("tensor", 1) > 1:
        return _consolidate_universal(ckpt)
    # DeepSpeed logs to stdout, which `terrabyte generate` keeps for the generated bytes
    with contextlib.redirect_stdout(sys.stderr):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    try:
        with contextlib.redirect_stdout(sys.stderr):
            state = get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)
    except (FileNotFoundError, ValueError, RuntimeError, EOFError) as exc:
        raise CheckpointError(f"checkpoint {ckpt} is incomplete or unreadable: {exc}") from None
    return {k: v.float() for k, v in state.items()}


def _consolidate_universal(ckpt: Path) -> dict[str, torch.Tensor]:
    out = convert_to_universal(ckpt)
    state = {}
    for fp32 in sorted((out / "zero").glob("*/fp32.pt")):
        name = fp32.parent.name
        obj = torch.load(fp32, map_location="cpu", weights_only=False)
        tensor = obj["param"] if isinstance(obj, dict) else obj  # ZeRO-1/2 wrap it, ZeRO-3 does not
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
        if engine.grid.data_parallel_id == 0:
            local = {pipeline_key(k): v.detach().cpu().clone() for k, v in engine.module.state_dict().items()}
        parts = [None] * tdist.get_world_size() if engine.global_rank == 0 else None
        tdist.gather_object(local, parts, dst=0)
        return {k: v for part in parts for k, v in part.items()} if engine.global_rank == 0 else None
    if engine.zero_optimization_partition_weights() or engine.autotp_size() > 1:
        state = engine._consolidated_16bit_state_dict()  # gathers ZeRO-3 and AutoTP shards to rank 0
    else:
        state = engine.module.state_dict() if engine.global_rank == 0 else None
    if state is None:
        return None
    # clone: tied weights share storage, which safetensors refuses
    return {k: v.detach().cpu().clone().contiguous() for k, v in state.items()}



# --------------------------------------------------------------------------- safetensors


def load_state(source: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(model config, state dict) from a safetensors file, a run directory or a checkpoint folder."""
    config, state = _load_state(source)
    if "unit_embedding" not in config:
        # written before grouped upper-stage embeddings existed: every stage embedded by concatenation
        config = {**config, "unit_embedding": "concat"}
    return config, state


def _load_state(source: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.is_dir() and (path / EXPORT_FILE).is_file():
        path = path / EXPORT_FILE
    if path.is_file():
        return _load_safetensors(path)
    root = path if (path / "latest").is_file() else checkpoint_dir(path)
    tag = (root / "latest").read_text().strip() if (root / "latest").is_file() else None
    if tag is None:
        raise FileNotFoundError(f"{source} holds neither model.safetensors nor a checkpoint (no 'latest' file)")
    config_path = root / tag / "model_config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"checkpoint {root / tag} has no model_config.json")
    return json.loads(config_path.read_text()), consolidate_checkpoint(root, tag)


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


def write_safetensors(tensors: dict[str, torch.Tensor], config: dict, path: str | Path) -> None:
    """One safetensors file with the model config in its metadata, written to a temporary name first."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"model_config": json.dumps(config), "format": "pt"})


def save_safetensors(model: torch.nn.Module, config: dict, path: str | Path) -> None:
    # clone: tied weights share storage, which safetensors refuses
    write_safetensors({k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}, config, path)


