"""Readers of what earlier versions of Terrabyte wrote, in one place.

Each turns an earlier format into the current one. None of them turns a check off silently: where
an earlier file lacks what a check needs, the reader logs a warning that names the checkpoint and
what was not verified, and everything that can still be checked is. Each has a test in
tests/unit/test_earlier_formats.py.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import torch

log = logging.getLogger(__name__)


def files_format1(data) -> Optional[dict[str, dict]]:
    """``files.json`` of format 1, ``{name: size}``, as format 2's entries (sizes, no sha256); None
    when ``data`` is not of format 1."""
    if not isinstance(data, dict) or not all(isinstance(v, int) and not isinstance(v, bool) for v in data.values()):
        return None
    return {str(name): {"size": size} for name, size in data.items()}


def warn_no_sha256(ckpt: Path, manifest: str) -> None:
    log.warning("checkpoint %s: its %s (format 1, written by an earlier Terrabyte) records sizes only: "
                "the files' sha256 are not verified, a changed byte goes unnoticed", ckpt, manifest)


def warn_no_manifest(ckpt: Path, manifest: str) -> None:
    log.warning("checkpoint %s has no %s (written by a Terrabyte that did not record its files): no file's "
                "presence, size or sha256 is verified before it is read", ckpt, manifest)


def warn_no_layout(ckpt: Path, layout_file: str) -> None:
    log.warning("checkpoint %s has no %s (written by an earlier Terrabyte): the parallel layout it was written "
                "with is not verified: a resume loads it as this run's layout, a consolidation as data-parallel (ZeRO)",
                ckpt, layout_file)


def warn_no_model_config(ckpt: Path) -> None:
    log.warning("checkpoint %s has no model_config.json (written by an earlier Terrabyte): the model it holds "
                "is not verified against this run's model config", ckpt)


# model keys added after checkpoints were first written, with what a model from before had instead
LATER_MODEL_KEYS = {"patching": "fixed", "patch_threshold": None, "context_bytes": None, "ngram_sizes": [],
                    "ngram_buckets": 16384}


def model_config(config: dict) -> dict:
    """A stored model config (checkpoint, export, save_pretrained): configs from before grouped
    upper-stage embeddings existed embedded every stage by concatenation; those from before patches
    could follow the data, or hashed n-grams existed, had fixed patches and no n-grams."""
    config = config if "unit_embedding" in config else {**config, "unit_embedding": "concat"}
    return {**LATER_MODEL_KEYS, **config}


def rng_states(saved) -> dict:
    """A checkpoint's random states: a bare tensor is the CPU state of checkpoints from before the
    CUDA state was saved beside it."""
    return {"cpu": saved} if isinstance(saved, torch.Tensor) else saved
