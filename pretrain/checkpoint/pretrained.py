"""Trained weights in and out of Python: ``TerraByte.from_pretrained`` / ``save_pretrained`` /
``push_to_hub`` and the trainer's ``--init-from``.

The conventions are huggingface_hub's ``PyTorchModelHubMixin``: a saved model is a directory with
``model.safetensors`` (the weights) and ``config.json`` (the constructor's keyword arguments), and
``from_pretrained(repo_id_or_path)`` takes a local path or, only when the string is not a local
path, a hub repository id fetched with ``huggingface_hub.snapshot_download``. A local source is any
of: a directory written by ``save_pretrained``, an exported ``.safetensors`` file (its config in
the file's metadata), or a run directory / checkpoint folder, read through the same resolution as
``terrabyte generate`` and ``export`` (``checkpoint.load_state``).

``TerraByte`` has the three as methods through ``hub.HubMixin``, which imports this module only
when one is called: the checkpoint code it reads run directories with imports the model file
(DeepSpeed itself is imported only when a ZeRO checkpoint is consolidated).
"""
from __future__ import annotations

import json
import logging
import re
import tempfile
from pathlib import Path
from typing import Optional

import torch

from terrabyte.data_pipeline.basics.errors import CheckpointError, ConfigError
from terrabyte.data_pipeline.basics.system import atomic_write

from . import earlier_formats
from ..engine.ds_seams import full_shape, is_partitioned
from .store import RUNTIME_KEYS, read_json_mapping
from .weights import WEIGHTS_FILE, load_state, save_safetensors

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"  # huggingface_hub's constants.CONFIG_NAME
# A hub repository id: "name" or "owner/name" (letters, digits, - _ .), never a path
REPO_ID = re.compile(r"^(?:[\w.-]+/)?[\w.-]+$")
STAGE_KEY = re.compile(r"^stages\.(\d+)\.")


# --------------------------------------------------------------------------- where the weights are


def resolve(source: str | Path, *, revision: Optional[str] = None, cache_dir: Optional[str] = None,
            token: Optional[str] = None, local_files_only: bool = False, force_download: bool = False) -> Path:
    """The local path of ``source``: as given when it exists, else a hub snapshot of that repo id."""
    path = Path(source).expanduser()
    if path.exists():
        return path
    text = str(source)
    if not REPO_ID.match(text) or text.startswith("."):
        raise FileNotFoundError(f"{text} does not exist (not a model file, directory or run directory)")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ConfigError(f"{text} is not a local path, and reading it as a hub repository id needs "
                          f"huggingface_hub (`pip install huggingface_hub`)") from None
    try:
        return Path(snapshot_download(repo_id=text, revision=revision, cache_dir=cache_dir, token=token,
                                      local_files_only=local_files_only, force_download=force_download))
    except Exception as exc:  # the hub raises its own errors for unknown repos, no network, ...
        raise CheckpointError(f"{text} is not a local path and could not be fetched from the hub: "
                              f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
                              ) from None


def load_weights(source: str | Path, trust: bool = False, **hub) -> tuple[dict, dict[str, torch.Tensor], str]:
    """(model config, state dict, a name for messages) from any source ``resolve`` accepts, a hub
    snapshot read like a local path; nothing is unpickled in full unless ``trust``."""
    path = resolve(source, **hub)
    saved = path.is_dir() and (path / CONFIG_FILE).is_file() and (path / WEIGHTS_FILE).is_file()
    if saved and not _has_checkpoints(path):  # a run directory always goes the way `generate` reads it
        return _read_saved(path) + (str(path),)
    if path.is_dir() and not (path / WEIGHTS_FILE).is_file() and not _has_checkpoints(path):
        raise CheckpointError(f"{path} holds no model: no {WEIGHTS_FILE}, no {CONFIG_FILE} and no "
                              f"checkpoints/latest (give a run directory, a save_pretrained directory "
                              f"or a .safetensors file)")
    config, state = load_state(path, trust)  # the resolution `terrabyte generate` and `export` use
    return config, state, str(path)


def _has_checkpoints(path: Path) -> bool:
    return (path / "latest").is_file() or (path / "checkpoints" / "latest").is_file()


def _read_saved(directory: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    config = earlier_formats.model_config(read_json_mapping(directory / CONFIG_FILE))
    try:
        state = load_file(str(directory / WEIGHTS_FILE))
    except Exception as exc:  # safetensors' own error types for truncated/garbled files
        raise CheckpointError(f"{directory / WEIGHTS_FILE} is not a readable safetensors file: {exc}") from None
    return config, state


def stage_count(state: dict[str, torch.Tensor]) -> int:
    """How many stages the weights hold (``stages.<i>.`` prefixes)."""
    found = {int(m.group(1)) for key in state if (m := STAGE_KEY.match(key))}
    return max(found) + 1 if found else 0


def check_stage_count(config: dict, state: dict[str, torch.Tensor], where: str) -> None:
    stages = len(config.get("max_seq_len") or ())
    held = stage_count(state)
    if stages != held:
        raise CheckpointError(f"{where}: its config describes {stages} stage(s) (max_seq_len="
                              f"{config.get('max_seq_len')}) but its weights hold {held}: a config from another model")


# --------------------------------------------------------------------------- from_pretrained / save_pretrained


def from_pretrained(cls, source: str | Path, *, device: str | torch.device = "cpu",
                    dtype: Optional[torch.dtype] = None, revision: Optional[str] = None,
                    cache_dir: Optional[str] = None, token: Optional[str] = None,
                    local_files_only: bool = False, force_download: bool = False, trust_checkpoint: bool = False,
                    **model_kwargs):
    """Build ``cls`` from its saved config and load its weights (strictly), in eval mode. A DeepSpeed
    checkpoint whose files hold more than tensors and plain data is refused unless
    ``trust_checkpoint`` (unpickling it in full runs whatever code it names)."""
    config, state, where = load_weights(source, trust_checkpoint, revision=revision, cache_dir=cache_dir, token=token,
                                        local_files_only=local_files_only, force_download=force_download)
    bad = sorted(set(model_kwargs) - set(RUNTIME_KEYS))
    if bad:
        raise ConfigError(f"from_pretrained({where!r}) cannot change {bad}: only {list(RUNTIME_KEYS)} may differ "
                          f"from the saved model")
    check_stage_count(config, state, where)
    try:
        model = cls.from_config({**config, **model_kwargs})
    except ConfigError as exc:
        raise ConfigError(f"{where}: its config does not build a model: {exc}") from None
    # checked before loading: load_state_dict raises its own traceback for a shape that differs
    target = model.state_dict()
    missing, unexpected = sorted(set(target) - set(state)), sorted(set(state) - set(target))
    mismatched = shape_mismatches(target, state)
    if missing or unexpected or mismatched:
        raise CheckpointError(f"{where} does not match the model its config describes: {_differences(missing, unexpected, mismatched)}")
    model.load_state_dict(state)
    return model.to(device=device, dtype=dtype).eval()


def save_pretrained(model: torch.nn.Module, directory: str | Path, *, config: Optional[dict] = None,
                    push_to_hub: bool = False, repo_id: Optional[str] = None, **push_kwargs) -> Path:
    """``directory/model.safetensors`` (config also in its metadata) and ``directory/config.json``;
    with ``push_to_hub``, also uploaded as ``repo_id`` (default: the directory's name)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = dict(model.config if config is None else config)
    save_safetensors(model, config, directory / WEIGHTS_FILE)
    atomic_write(directory / CONFIG_FILE, json.dumps(config, indent=2) + "\n")
    if push_to_hub:
        _push(model, repo_id or directory.name, **push_kwargs)
    return directory


def _push(model, repo_id, **kwargs):
    # save_pretrained's flag keeps the mixin's name, push_to_hub, which hides this module's function there
    return push_to_hub(model, repo_id, **kwargs)


def push_to_hub(model: torch.nn.Module, repo_id: str, *, private: Optional[bool] = None,
                token: Optional[str] = None, revision: Optional[str] = None,
                commit_message: str = "Upload TerraByte", create_pr: bool = False) -> str:
    """Save into a temporary directory and upload it as ``repo_id`` (created if needed); returns the
    commit URL."""
    try:
        from huggingface_hub import HfApi
    except ImportError:
        raise ConfigError("push_to_hub needs huggingface_hub (`pip install huggingface_hub`)") from None
    api = HfApi(token=token)
    repo = api.create_repo(repo_id, private=private, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(model, tmp)
        info = api.upload_folder(repo_id=getattr(repo, "repo_id", repo_id), folder_path=tmp, revision=revision,
                                 commit_message=commit_message, create_pr=create_pr)
    return str(info)


# --------------------------------------------------------------------------- --init-from


def shape_mismatches(target: dict[str, torch.Tensor], source: dict[str, torch.Tensor]) -> list[str]:
    """``name (source shape) vs (target shape)`` for the tensors both have with different shapes."""
    return [f"{k} {tuple(source[k].shape)} there vs {tuple(full_shape(target[k]))} here"
            for k in sorted(set(target) & set(source)) if source[k].shape != full_shape(target[k])]


def _copy_into(target: torch.Tensor, value: torch.Tensor) -> None:
    """``target`` := ``value``; a partitioned parameter (a model built under ``zero.Init``) is gathered
    for the copy and re-partitioned after it, on every rank together (each rank holds the same value)."""
    if not is_partitioned(target):
        target.data.copy_(value)
        return
    import deepspeed  # only a partitioned model gets here: DeepSpeed built it

    with deepspeed.zero.GatheredParameters([target], modifier_rank=0):
        target.data.copy_(value)


def _differences(missing, unexpected, mismatched, limit: int = 6) -> str:
    parts = []
    for label, items in (("shapes differ", mismatched), ("missing there", sorted(missing)),
                         ("not in this model", sorted(unexpected))):
        if items:
            shown = ", ".join(items[:limit]) + (f", ... ({len(items)} in all)" if len(items) > limit else "")
            parts.append(f"{label}: {shown}")
    return "; ".join(parts)


def init_from(model: torch.nn.Module, source: str | Path, strict: bool = True, trust: bool = False) -> dict:
    """Copy trained weights into ``model`` (before any engine wraps it). Strict: every tensor must be
    there with the same shape, else one CheckpointError naming them. Not strict: load the tensors
    that fit and report the rest. A model with another stage count is refused either way."""
    config, state, where = load_weights(source, trust)
    check_stage_count(config, state, where)
    ours = len(model.max_seq_len)
    theirs = len(config.get("max_seq_len") or ())
    if ours != theirs:
        raise CheckpointError(f"--init-from {where} is a {theirs}-stage model (max_seq_len={config.get('max_seq_len')}); "
                              f"this run's has {ours} (model.max_seq_len={list(model.max_seq_len)})")
    target = model.state_dict(keep_vars=True)  # the parameters themselves: partitioned ones keep ds_shape
    mismatched = shape_mismatches(target, state)
    missing = sorted(set(target) - set(state))
    unexpected = sorted(set(state) - set(target))
    if strict and (mismatched or missing or unexpected):
        raise CheckpointError(f"--init-from {where} does not fit this run's model ({_differences(missing, unexpected, mismatched)}); "
                              f"use the same model.* config, or --init-from-strict false to load the tensors that match")
    fits = {k: v for k, v in state.items() if k in target and v.shape == full_shape(target[k])}
    with torch.no_grad():
        for name, tensor in fits.items():
            _copy_into(target[name], tensor)
    if not strict and (mismatched or missing or unexpected):
        log.warning("--init-from %s: loaded %d of %d tensors; not loaded: %s", where, len(fits), len(target),
                    _differences(missing, unexpected, mismatched, limit=50))
    log.info("initialised %d tensors from %s", len(fits), where)
    return {"source": where, "loaded": sorted(fits), "mismatched": mismatched, "missing": missing,
            "unexpected": unexpected}

