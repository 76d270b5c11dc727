"""The typed config tree: one dataclass per section, loaded from YAML, then dotted CLI overrides.

    cfg = load_config("tiny", ["--train.steps", "100", "--model.dim=256,128"])

A name resolves to ``configs/<name>.yaml`` (shipped as package data); anything else is a path. Unknown
keys and wrong-typed values stop with one message naming the key. ``validate`` derives and checks
cross-section facts once, so the rest of the code can trust the tree.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Optional, Union

import yaml

IntTuple = tuple[int, ...]
PerStage = Union[int, IntTuple]  # one value for every stage, or one per stage


@dataclass
class RunConfig:
    dir: str = "runs/default"
    """Run directory: default-corpus shards, checkpoints, TensorBoard events and the exported model."""
    seed: int = 0
    """Seeds model init, data order and sampling."""


@dataclass
class ModelConfig:
    """Mirrors the ``TerraByte`` constructor; tuples have one entry per stage, coarsest first."""

    num_tokens: int = 256
    """Data vocabulary: 256 for bytes. Special ids (pad, eos, bos) are added above it."""
    dim: IntTuple = (128, 64)
    depth: IntTuple = (2, 2)
    max_seq_len: IntTuple = (256, 8)
    """Patches per stage; their product is the training sequence length in bytes."""
    dim_head: PerStage = 32
    heads: PerStage = 4
    ff_mult: float = 4.0
    attn_dropout: float = 0.0
    ff_dropout: float = 0.0
    flash_attn: bool = True
    """Use the flash-attn package when installed and on GPU; otherwise PyTorch SDPA."""
    rotary: bool = True
    tie_embeddings: bool = False
    attention: Optional[list] = None
    """Per-stage attention specs, e.g. ``[{kind: sparse, pattern: {local: 256}}, null]``."""
    checkpoint_activations: bool = False

    @property
    def seq_len(self) -> int:
        return math.prod(self.max_seq_len)

    def kwargs(self) -> dict:
        """Keyword arguments for ``TerraByte(**...)``."""
        return dataclasses.asdict(self)


@dataclass
class DataConfig:
    path: Optional[str] = None
    """Shard directory (with manifest.json). Unset: shards of this Python's standard library source,
    built once into ``<run.dir>/data``."""
    num_workers: int = 0
    """DataLoader worker processes per rank."""
    val_sequences: int = 64
    """Validation sequences scored at each evaluation (the same ones every time)."""
    on_error: str = "raise"
    """``raise`` on a corrupt shard member, or ``skip`` it and count it."""


@dataclass
class TrainConfig:
    steps: int = 300
    """Optimizer steps in total (a resumed run continues up to this count)."""
    micro_batch: int = 4
    """Sequences per rank per forward/backward."""
    global_batch: int = 8
    """Sequences per optimizer step over all ranks; gradient accumulation is derived from it."""
    eval_interval: int = 100
    log_interval: int = 10
    grad_clip: float = 1.0
    precision: str = "auto"
    """``auto`` (bf16 on GPU, fp32 on CPU), ``fp32`` or ``bf16``."""
    compile: bool = False
    """Wrap the model in torch.compile."""
    sample_bytes: int = 200
    """Bytes generated at each evaluation and at the end (0 disables)."""
    sample_prompt: str = "def "


@dataclass
class OptimConfig:
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of ``lr``."""
    warmup_steps: int = 30
    schedule: str = "cosine"
    """``cosine``, ``linear`` or ``constant`` after the linear warm-up."""
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8


@dataclass
class ParallelConfig:
    zero_stage: int = 3
    """DeepSpeed ZeRO stage (0-3)."""
    offload: str = "none"
    """``none``, ``cpu`` or ``nvme`` (ZeRO-3 parameter and optimizer offload)."""
    nvme_path: str = "/local_nvme"


@dataclass
class CheckpointConfig:
    interval: int = 100
    """Save a DeepSpeed checkpoint every this many steps (and at the end)."""
    keep: int = 3
    """Keep only the newest this many checkpoints."""
    export: bool = True
    """Write ``model.safetensors`` + ``model_config.json`` into the run directory at the end."""


@dataclass
class LoggingConfig:
    level: str = "INFO"
    tensorboard: bool = True
    peak_tflops: Optional[float] = None
    """Peak dense TFLOP/s of one accelerator for MFU; unset: looked up by GPU name (H100/H200 bf16),
    no MFU on CPU."""


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- loading


def available_configs() -> list[str]:
    root = resources.files("terrabyte.configs")
    return sorted(p.name[: -len(".yaml")] for p in root.iterdir() if p.name.endswith(".yaml"))


def resolve_config_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise FileNotFoundError(f"config file {name_or_path} does not exist")
        return path
    candidate = resources.files("terrabyte.configs") / f"{name_or_path}.yaml"
    if not candidate.is_file():
        raise ValueError(
            f"unknown config {name_or_path!r}: give a YAML path or one of {', '.join(available_configs())}"
        )
    return Path(str(candidate))


def load_config(name_or_path: str = "tiny", overrides: list[str] | None = None) -> Config:
    path = resolve_config_path(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"config file {path} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"config file {path} must hold a mapping of sections, not {type(raw).__name__}")
    cfg = Config()
    for section, values in raw.items():
        if not isinstance(values, dict):
            raise ValueError(f"config file {path}: section {section!r} must be a mapping")
        for key, value in values.items():
            set_value(cfg, f"{section}.{key}", value, source=str(path))
    for key, value in parse_overrides(overrides or []):
        set_value(cfg, key, yaml.safe_load(value) if value != "" else "", source="command line")
    validate(cfg)
    return cfg


def config_from_dict(data: dict) -> Config:
    """Rebuild a Config from ``to_dict()`` output (e.g. stored in a checkpoint)."""
    cfg = Config()
    for section, values in data.items():
        for key, value in values.items():
            set_value(cfg, f"{section}.{key}", value, source="stored config")
    validate(cfg)
    return cfg


def parse_overrides(args: list[str]) -> list[tuple[str, str]]:
    """``--a.b 1 --c.d=2`` -> [("a.b", "1"), ("c.d", "2")]."""
    pairs, i = [], 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise ValueError(f"unexpected argument {arg!r}: overrides look like --section.key VALUE")
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise ValueError(f"override {arg} has no value")
            key, value = arg[2:], args[i + 1]
            i += 2
        pairs.append((key, value))
    return pairs


def set_value(cfg: Config, dotted: str, value: Any, source: str) -> None:
    parts = dotted.split(".")
    if len(parts) != 2:
        raise ValueError(f"{source}: config key {dotted!r} must be section.key")
    section_name, key = parts
    sections = {f.name for f in dataclasses.fields(Config)}
    if section_name not in sections:
        raise ValueError(f"{source}: unknown config section {section_name!r} (known: {', '.join(sorted(sections))})")
    section = getattr(cfg, section_name)
    hints = typing.get_type_hints(type(section))
    if key not in hints:
        known = ", ".join(f.name for f in dataclasses.fields(section))
        raise ValueError(f"{source}: unknown config key {dotted!r} (known in {section_name}: {known})")
    setattr(section, key, coerce(value, hints[key], dotted, source))


def coerce(value: Any, hint: Any, key: str, source: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        errors = []
        for option in inner:  # first type that accepts the value wins
            try:
                return coerce(value, option, key, source)
            except ValueError as exc:
                errors.append(str(exc).split(" expects ", 1)[-1].split(", got ")[0])
        raise ValueError(f"{source}: config key {key} expects {' or '.join(errors)}, got {value!r}")
    if origin is tuple:
        if isinstance(value, str):
            value = [yaml.safe_load(v) for v in value.split(",")]
        if isinstance(value, int) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in value
        ):
            raise ValueError(f"{source}: config key {key} expects a list of integers, got {value!r}")
        return tuple(value)
    if hint is list or origin is list:
        if not isinstance(value, list):
            raise ValueError(f"{source}: config key {key} expects a list, got {value!r}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{source}: config key {key} expects true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{source}: config key {key} expects an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-3" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{source}: config key {key} expects a number, got {value!r}")
        return float(value)
    if hint is str:
        if value is None or isinstance(value, (dict, list)):
            raise ValueError(f"{source}: config key {key} expects a string, got {value!r}")
        return str(value)
    return value


def _choice(value: str, choices: tuple[str, ...], key: str) -> None:
    if value not in choices:
        raise ValueError(f"config key {key} must be one of {', '.join(choices)}, got {value!r}")


def _positive(value: float, key: str) -> None:
    if value <= 0:
        raise ValueError(f"config key {key} must be positive, got {value!r}")


def validate(cfg: Config) -> None:
    m = cfg.model
    stages = len(m.dim)
    if stages < 2:
        raise ValueError(f"config key model.dim needs at least 2 stages, got {m.dim}")
    for key in ("depth", "max_seq_len"):
        if len(getattr(m, key)) != stages:
            raise ValueError(
                f"config keys model.dim and model.{key} must have one entry per stage: "
                f"{m.dim} has {stages}, {getattr(m, key)} has {len(getattr(m, key))}"
            )
    for key in ("heads", "dim_head"):
        value = getattr(m, key)
        if isinstance(value, tuple) and len(value) != stages:
            raise ValueError(f"config key model.{key} needs one entry per stage ({stages}) or a single value, got {value}")
    if m.attention is not None and len(m.attention) != stages:
        raise ValueError(f"config key model.attention needs one entry per stage ({stages}), got {len(m.attention)}")
    for key in ("steps", "micro_batch", "global_batch", "eval_interval", "log_interval"):
        _positive(getattr(cfg.train, key), f"train.{key}")
    _positive(cfg.checkpoint.interval, "checkpoint.interval")
    _positive(cfg.checkpoint.keep, "checkpoint.keep")
    _positive(cfg.optim.lr, "optim.lr")
    if cfg.train.global_batch % cfg.train.micro_batch:
        raise ValueError(
            f"train.global_batch ({cfg.train.global_batch}) must be a multiple of train.micro_batch "
            f"({cfg.train.micro_batch})"
        )
    _choice(cfg.train.precision, ("auto", "fp32", "bf16"), "train.precision")
    _choice(cfg.optim.schedule, ("cosine", "linear", "constant"), "optim.schedule")
    _choice(cfg.parallel.offload, ("none", "cpu", "nvme"), "parallel.offload")
    _choice(cfg.data.on_error, ("raise", "skip"), "data.on_error")
    if cfg.parallel.zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"config key parallel.zero_stage must be 0, 1, 2 or 3, got {cfg.parallel.zero_stage}")
    if cfg.parallel.offload != "none" and cfg.parallel.zero_stage != 3:
        raise ValueError("parallel.offload needs parallel.zero_stage 3")


def validate_world(cfg: Config, world_size: int) -> int:
    """Check the batch against the data-parallel world size; returns gradient accumulation steps."""
    per_step = cfg.train.micro_batch * world_size
    if cfg.train.global_batch % per_step:
        raise ValueError(
            f"train.global_batch ({cfg.train.global_batch}) must be a multiple of train.micro_batch x "
            f"world size ({cfg.train.micro_batch} x {world_size} = {per_step})"
        )
    return cfg.train.global_batch // per_step
