"""Resuming a run: check the newest checkpoint against this run before any engine exists and plan
how to load it (through DeepSpeed's universal format when the parallel layout changed), then load it
into the engine.
"""
from __future__ import annotations

import logging
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from terrabyte.data_pipeline.basics.errors import CheckpointError

from . import earlier_formats
from ..engine import ds_seams
from ..train.config import Config
from ..engine.engine import on_rank0
from ..parallel.layout import Layout
from .store import (RUNTIME_KEYS, UNIVERSAL_DIRNAME, check_run_dir, checkpoint_dir, choose_checkpoint,
                    read_json_mapping, saved_layout)
from .universal import convert_to_universal

log = logging.getLogger(__name__)


@dataclass
class ResumePlan:
    root: Path
    tag: str
    universal: bool
    """Load from ``<tag>/universal`` (converted) with DeepSpeed's ``load_universal``."""

    @property
    def load_tag(self) -> str:
        return f"{self.tag}/{UNIVERSAL_DIRNAME}" if self.universal else self.tag


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


def check_same_model(stored: dict, current: dict, where: str) -> None:
    stored = dict(earlier_formats.model_config(stored))
    if len(current.get("max_seq_len") or ()) == 2:  # two stages embed alike either way
        stored["unit_embedding"] = current.get("unit_embedding")
    if not stored.get("ngram_sizes") and not current.get("ngram_sizes"):  # no n-grams: their table size is moot
        stored["ngram_buckets"] = current.get("ngram_buckets")
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
