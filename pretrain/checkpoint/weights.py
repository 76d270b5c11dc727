"""The model's weights as one state dict: gathered from a live engine (``full_state_dict``), read from
whatever a path stands for (``resolve_model_source``, ``load_state``: an exported file, or a
checkpoint consolidated on the fly), and written to the exported ``model.safetensors`` (its config
and step in the file's metadata).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from terrabyte.data_pipeline.basics.errors import CheckpointError
from terrabyte.data_pipeline.basics.system import atomic_path

from . import earlier_formats
from ..engine import ds_seams
from ..engine.engine import barrier, is_pipeline
from ..parallel.pipeline import pipeline_key
from .store import checkpoint_dir, read_json_mapping, read_latest, tag_step
from .universal import consolidate_checkpoint

log = logging.getLogger(__name__)


# The model's weights in one file, config in its metadata: the export, and save_pretrained's weights
# (huggingface_hub's constants.SAFETENSORS_SINGLE_FILE).
WEIGHTS_FILE = "model.safetensors"


def export_safetensors(engine, path: str | Path, model_config: dict, step: int | None = None) -> None:
    """Consolidate the (possibly sharded) parameters into one safetensors file on rank 0; ``step``
    goes into its metadata (so a later checkpoint is known to be newer)."""
    tensors = full_state_dict(engine)
    if engine.global_rank == 0:
        write_safetensors(tensors, model_config, path, step)
    barrier()


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
