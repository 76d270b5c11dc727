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

from terrabyte.data_pipeline.basics.errors import ConfigError

from ..model.args import ModelArgs
from ..model.args import positive as _positive
from ..model.args import within as _within


@dataclass
class RunConfig:
    dir: str = "runs/default"
    """Run directory: default-corpus shards, checkpoints, TensorBoard events and the exported model."""
    seed: int = 0
    """Seeds model init, data order and sampling."""


# The model section is the model's own argument set: one class, one set of defaults, one validation.
ModelConfig = ModelArgs


@dataclass
class DataConfig:
    path: Optional[str] = None
    """Shard directory (with manifest.json). Unset: shards of this Python's standard library source,
    built once into ``<run.dir>/data``."""
    num_workers: int = 0
    """Threads per rank that prefetch and decompress shard members (batches never depend on it)."""
    val_sequences: int = 64
    """Validation sequences scored at each evaluation (the same ones every time)."""
    on_error: str = "raise"
    """``raise`` on a corrupt shard member, or ``skip`` it and count it."""
    allow_pipe: bool = False
    """Allow a ``pipe:CMD`` data path (it runs a shell command): off unless asked for."""
    max_member_bytes: int = 64 << 20
    """A shard member that would decompress past this many bytes (or past the size the manifest
    records for it) is refused as corrupt, before it is expanded."""
    sources: Optional[list] = None
    """Several shard directories mixed by weight, instead of ``path``: ``[{name, path, weight}, ...]``.
    Each sequence's source is drawn by weight; a small source loops on its own; weight 0 keeps a
    source for validation only. Each source's validation split is scored and logged as
    ``val/<name>/bpb``; ``val/bits_per_byte`` is their weighted total."""
    schedule: Optional[list] = None
    """With ``sources``: ``[{step, weights: {name: weight}}, ...]``, new weights from each step on
    (sources not named keep theirs)."""


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
    max_nonfinite_steps: int = 5
    """A step whose loss is NaN/inf on any rank is skipped (no update) and counted; training stops
    after this many such steps in a row."""
    init_from: Optional[str] = None
    """Start a fresh run (new optimizer, schedule and data order) from these trained weights: an
    exported ``.safetensors``, a ``save_pretrained`` directory or a run directory (``--init-from``).
    Ignored when the run directory already has a checkpoint to resume from."""
    init_from_strict: bool = True
    """Every tensor must match in name and shape; false loads the ones that do and lists the rest."""
    init_from_trust: bool = False
    """Read an ``init_from`` DeepSpeed checkpoint whose files hold pickled objects besides tensors and
    plain data (unpickling runs the code they name): only for checkpoints you trust
    (``--trust-checkpoint``)."""


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
    """How the ranks split the work. The world size must be a multiple of
    ``pipeline_stages x tensor_parallel x sequence_parallel``; what is left over is data parallelism.
    The batch sizes live in ``train``; gradient accumulation is derived from them."""

    zero_stage: int = 3
    """DeepSpeed ZeRO stage (0-3); pipeline parallelism needs 0 or 1."""
    offload: str = "none"
    """``none``; ``cpu``: optimizer state in CPU memory (and the parameters too under ZeRO-3);
    ``nvme``: both on NVMe under ``nvme_path`` (ZeRO-3 only)."""
    nvme_path: str = "/local_nvme"
    pipeline_stages: int = 1
    """Pipeline-parallel stages (DeepSpeed PipelineModule; ZeRO-0/1 only). Combines with data
    parallelism only: DeepSpeed 0.19 runs neither AutoTP nor our Ulysses groups inside a pipeline."""
    pipeline_partition: str = "flops"
    """How layers are spread over pipeline stages: ``flops`` (balance training FLOPs: a lower-stage
    parameter sees many more tokens than a global one), ``parameters`` (balance parameter counts,
    DeepSpeed's default) or ``uniform`` (balance layer counts)."""
    tensor_parallel: int = 1
    """DeepSpeed AutoTP degree: attention and feed-forward projections split column/row-wise over
    this many ranks. Must divide ``model.heads``."""
    sequence_parallel: int = 1
    """DeepSpeed-Ulysses degree: the patches of each sequence are split over this many ranks; the global
    stage's attention gathers the sequence and splits the heads instead. Must divide
    ``model.max_seq_len[0]`` and the global stage's heads per tensor-parallel rank (``tensor_parallel x
    sequence_parallel`` divides ``model.heads``)."""
    zero_quantized_weights: bool = False
    """ZeRO++ qwZ: all-gather int8-quantized weights (ZeRO-3, GPU)."""
    zero_quantized_gradients: bool = False
    """ZeRO++ qgZ: reduce-scatter int4-quantized gradients (ZeRO-3, GPU)."""
    zero_hpz_partition_size: int = 1
    """ZeRO++ hpZ: keep a secondary weight shard within groups of this many ranks (usually the GPUs of
    one node) so backward all-gathers stay inside the node; 1 disables it."""


@dataclass
class CheckpointConfig:
    interval: int = 100
    """Save a DeepSpeed checkpoint every this many steps (and at the end)."""
    keep: int = 3
    """Keep only the newest this many checkpoints."""
    export: bool = True
    """Write ``model.safetensors`` + ``model_config.json`` into the run directory at the end."""
    universal: Optional[bool] = None
    """Resume through DeepSpeed's universal checkpoint format (converted once, next to the checkpoint).
    ``null``: only when the saved parallel layout differs from the current one; ``true``: always;
    ``false``: never (a different layout is then an error)."""
    fallback: bool = False
    """A damaged newest checkpoint (a file missing, truncated or not matching its sha256) stops the
    run naming the file; ``true`` resumes from the newest intact checkpoint instead (logged)."""


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
        raise ConfigError(
            f"unknown config {name_or_path!r}: give a YAML path or one of {', '.join(available_configs())}"
        )
    return Path(str(candidate))


def load_config(name_or_path: str = "tiny", overrides: list[str] | None = None) -> Config:
    path = resolve_config_path(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, not {type(raw).__name__}")
    cfg = Config()
    for section, values in raw.items():
        if not isinstance(values, dict):
            raise ConfigError(f"config file {path}: section {section!r} must be a mapping")
        for key, value in values.items():
            set_value(cfg, f"{section}.{key}", value, source=str(path))
    for key, value in parse_overrides(overrides or []):
        set_value(cfg, key, value, source="command line", text=True)
    validate(cfg)
    return cfg


def parse_overrides(args: list[str]) -> list[tuple[str, str]]:
    """``--a.b 1 --c.d=2`` -> [("a.b", "1"), ("c.d", "2")]."""
    pairs, i = [], 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise ConfigError(f"unexpected argument {arg!r}: overrides look like --section.key VALUE")
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"override {arg} has no value")
            key, value = arg[2:], args[i + 1]
            i += 2
        pairs.append((key, value))
    return pairs


def set_value(cfg: Config, dotted: str, value: Any, source: str, text: bool = False) -> None:
    """Set ``section.key``; ``text`` values come from the command line and are parsed as YAML unless
    the key holds a string (so ``--run.dir off`` stays the directory "off")."""
    parts = dotted.split(".")
    if len(parts) != 2:
        raise ConfigError(f"{source}: config key {dotted!r} must be section.key")
    section_name, key = parts
    sections = {f.name for f in dataclasses.fields(Config)}
    if section_name not in sections:
        raise ConfigError(f"{source}: unknown config section {section_name!r} (known: {', '.join(sorted(sections))})")
    section = getattr(cfg, section_name)
    hints = typing.get_type_hints(type(section))
    if key not in hints:
        known = ", ".join(f.name for f in dataclasses.fields(section))
        raise ConfigError(f"{source}: unknown config key {dotted!r} (known in {section_name}: {known})")
    if text:
        value = _parse_text(value, hints[key], dotted, source)
    setattr(section, key, coerce(value, hints[key], dotted, source))


def _parse_text(value: str, hint: Any, key: str, source: str) -> Any:
    args = typing.get_args(hint)
    if hint is str or (str in args and type(None) in args and value not in ("null", "~", "")):
        return value
    return _yaml_value(value, key, source) if value != "" else ""


def _yaml_value(text: str, key: str, source: str) -> Any:
    """A command-line value read as YAML; text YAML cannot read is one line naming the key."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{source}: config key {key}: {text!r} is not a value ({reason})") from None
    except (ValueError, RecursionError) as exc:  # e.g. a timestamp out of range, nesting too deep
        raise ConfigError(f"{source}: config key {key}: {text!r} is not a value ({type(exc).__name__})") from None


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
        raise ConfigError(f"{source}: config key {key} expects {' or '.join(errors)}, got {value!r}")
    if origin is tuple:
        if isinstance(value, str):
            value = [_yaml_value(v, key, source) for v in value.split(",")]
        if isinstance(value, int) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in value
        ):
            raise ConfigError(f"{source}: config key {key} expects a list of integers, got {value!r}")
        return tuple(value)
    if hint is list or origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{source}: config key {key} expects a list, got {value!r}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: config key {key} expects true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: config key {key} expects an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-3" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: config key {key} expects a number, got {value!r}")
        try:
            number = float(value)
        except OverflowError:  # an integer past the float range
            number = math.inf
        if not math.isfinite(number):
            raise ConfigError(f"{source}: config key {key} expects a finite number, got {value!r}")
        return number
    if hint is str:
        if value is None or isinstance(value, (dict, list)):
            raise ConfigError(f"{source}: config key {key} expects a string, got {value!r}")
        return str(value)
    return value


def _choice(value: str, choices: tuple[str, ...], key: str) -> None:
    if value not in choices:
        raise ConfigError(f"config key {key} must be one of {', '.join(choices)}, got {value!r}")


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def validate_numbers(cfg: Config) -> None:
    """Every number in the tree within what it can mean (floats are already finite: ``coerce``)."""
    t, o = cfg.train, cfg.optim
    _within(cfg.run.seed, "run.seed", 0, 2 ** 63, high_open=True)
    _within(cfg.data.num_workers, "data.num_workers", 0)
    _positive(cfg.data.val_sequences, "data.val_sequences")
    _within(t.grad_clip, "train.grad_clip", 0)
    _within(t.sample_bytes, "train.sample_bytes", 0)
    _positive(o.lr, "optim.lr")
    _within(o.min_lr_ratio, "optim.min_lr_ratio", 0, 1)
    _within(o.warmup_steps, "optim.warmup_steps", 0)
    _within(o.weight_decay, "optim.weight_decay", 0)
    for key in ("beta1", "beta2"):
        _within(getattr(o, key), f"optim.{key}", 0, 1, high_open=True)
    _positive(o.eps, "optim.eps")
    if cfg.logging.peak_tflops is not None:
        _positive(cfg.logging.peak_tflops, "logging.peak_tflops")
    if cfg.logging.level.upper() not in LOG_LEVELS:
        raise ConfigError(f"config key logging.level must be one of {', '.join(LOG_LEVELS)}, got {cfg.logging.level!r}")


def validate(cfg: Config) -> None:
    cfg.model.checked()  # the same checks the model's constructor runs
    for key in ("steps", "micro_batch", "global_batch", "eval_interval", "log_interval"):
        _positive(getattr(cfg.train, key), f"train.{key}")
    _positive(cfg.checkpoint.interval, "checkpoint.interval")
    _positive(cfg.checkpoint.keep, "checkpoint.keep")
    validate_numbers(cfg)
    if cfg.train.global_batch % cfg.train.micro_batch:
        raise ConfigError(
            f"train.global_batch ({cfg.train.global_batch}) must be a multiple of train.micro_batch "
            f"({cfg.train.micro_batch})"
        )
    _choice(cfg.train.precision, ("auto", "fp32", "bf16"), "train.precision")
    _choice(cfg.optim.schedule, ("cosine", "linear", "constant"), "optim.schedule")
    _choice(cfg.data.on_error, ("raise", "skip"), "data.on_error")
    _positive(cfg.data.max_member_bytes, "data.max_member_bytes")
    if cfg.data.sources is not None:
        if cfg.data.path:
            raise ConfigError("config keys data.path and data.sources exclude each other: give one shard directory "
                              "(data.path) or several (data.sources)")
        from terrabyte.data_pipeline.read.mixture import parse_mixture

        parse_mixture(cfg.data.sources, cfg.data.schedule)
    elif cfg.data.schedule is not None:
        raise ConfigError("config key data.schedule needs data.sources (the weights it changes)")
    _positive(cfg.train.max_nonfinite_steps, "train.max_nonfinite_steps")
    validate_parallel(cfg)


def validate_parallel(cfg: Config) -> None:
    """Parallel settings that are impossible whatever the world size: one message saying what to change."""
    p, m = cfg.parallel, cfg.model
    if p.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"config key parallel.zero_stage must be 0, 1, 2 or 3, got {p.zero_stage}")
    for key in ("pipeline_stages", "tensor_parallel", "sequence_parallel", "zero_hpz_partition_size"):
        _positive(getattr(p, key), f"parallel.{key}")
    _choice(p.offload, ("none", "cpu", "nvme"), "parallel.offload")
    _choice(p.pipeline_partition, ("flops", "parameters", "uniform"), "parallel.pipeline_partition")
    if p.offload == "cpu" and p.zero_stage == 0:
        raise ConfigError("parallel.offload cpu needs parallel.zero_stage 1, 2 or 3 (ZeRO-Offload); got 0")
    if p.offload == "nvme" and p.zero_stage != 3:
        raise ConfigError(f"parallel.offload nvme needs parallel.zero_stage 3 (ZeRO-Infinity); got {p.zero_stage}")
    for key in ("zero_quantized_weights", "zero_quantized_gradients"):
        if getattr(p, key) and p.zero_stage != 3:
            raise ConfigError(f"parallel.{key} (ZeRO++) needs parallel.zero_stage 3; got {p.zero_stage}")
    if p.zero_hpz_partition_size > 1 and p.zero_stage != 3:
        raise ConfigError(f"parallel.zero_hpz_partition_size > 1 (ZeRO++ hpZ) needs parallel.zero_stage 3; got {p.zero_stage}")

    degrees = {k: getattr(p, k) for k in ("pipeline_stages", "tensor_parallel", "sequence_parallel")}
    used = [f"parallel.{k}={v}" for k, v in degrees.items() if v > 1]
    if used and cfg.train.compile:
        raise ConfigError(f"train.compile is not supported with {used[0]} (yet): set train.compile false")
    if cfg.train.compile and p.zero_stage == 3:
        # TorchDynamo traces ZeRO-3's empty parameter shards where the model reads a parameter outside
        # its module's forward (the start tokens)
        raise ConfigError("train.compile does not work with parallel.zero_stage 3: use --parallel.zero_stage 2 "
                         "(or 1) with it, or set train.compile false")
    if p.pipeline_stages > 1 and len(used) > 1:
        raise ConfigError(f"{' and '.join(used)} cannot be combined: {PIPELINE_COMBINES[used[1].split('=')[0]]}")
    if p.pipeline_stages > 1:
        if p.zero_stage > 1:
            raise ConfigError(
                f"parallel.pipeline_stages={p.pipeline_stages} needs parallel.zero_stage 0 or 1 (DeepSpeed "
                f"pipelines do not support ZeRO-2/3); got {p.zero_stage}: set --parallel.zero_stage 1"
            )
        if m.tie_embeddings:
            raise ConfigError("model.tie_embeddings is not supported with parallel.pipeline_stages > 1; set it false")
        if m.patching != "fixed":
            # the pipeline's activations have one shape for every micro-batch, and the entropy model's
            # auxiliary loss would start in the first layer, not the last
            raise ConfigError(f"model.patching={m.patching} is not supported with parallel.pipeline_stages > 1 "
                              f"(pipeline activations have a fixed shape); use fixed, or sequence parallelism")
        if m.attn_dropout or m.ff_dropout:
            # each pipeline layer would draw from its stage's RNG: not the plain model's dropout masks
            raise ConfigError("model.attn_dropout/ff_dropout must be 0 with parallel.pipeline_stages > 1")
        layers = sum(m.depth) + len(m.dim) + 1  # blocks; embedding, one projection per stage boundary, head
        if p.pipeline_stages > layers:
            raise ConfigError(
                f"parallel.pipeline_stages={p.pipeline_stages} exceeds the model's {layers} pipeline layers "
                f"(blocks of model.depth {m.depth}, the embedding, {len(m.dim) - 1} stage projection(s) and the "
                f"head): use fewer stages"
            )
    heads = m.heads if isinstance(m.heads, tuple) else (m.heads,) * len(m.dim)
    if p.tensor_parallel > 1:
        tp = p.tensor_parallel
        for s, h in enumerate(heads):
            if h % tp:
                raise ConfigError(
                    f"parallel.tensor_parallel={tp} must divide stage {s}'s model.heads={h} (attention is split "
                    f"by heads): change one of them"
                )
        from ..model.layers import _ff_hidden  # the feed-forward width every stage really gets

        for s, d in enumerate(m.dim):
            hidden = _ff_hidden(d, m.ff_mult)
            if hidden % tp:
                raise ConfigError(
                    f"parallel.tensor_parallel={tp} must divide stage {s}'s feed-forward width {hidden} "
                    f"(from model.dim={d}, model.ff_mult={m.ff_mult}): change one of them"
                )
    if p.sequence_parallel > 1:
        sp, tp = p.sequence_parallel, p.tensor_parallel
        per_rank = heads[0] // tp  # tensor parallelism (checked above) splits the heads first
        works = _divisors(math.gcd(per_rank, m.max_seq_len[0]))
        if per_rank % sp:
            held = f"the {per_rank} global-stage heads a tensor-parallel rank holds" if tp > 1 else \
                f"the global stage's model.heads={heads[0]}"
            raise ConfigError(
                f"parallel.sequence_parallel={sp} must divide {held}: Ulysses hands each rank whole heads"
                f"{_pattern_note(m.attention)}; use parallel.sequence_parallel in {works} or change model.heads"
            )
        if m.max_seq_len[0] % sp:
            raise ConfigError(
                f"parallel.sequence_parallel={sp} must divide model.max_seq_len[0]={m.max_seq_len[0]} (each rank "
                f"holds an equal run of patches): use parallel.sequence_parallel in {works} or change model.max_seq_len"
            )


# Why DeepSpeed 0.19 cannot run a pipeline together with the other model-parallel forms.
PIPELINE_COMBINES = {
    "parallel.tensor_parallel": (
        "DeepSpeed 0.19's AutoTP replaces the engine's process-group topology with its own (data x tensor) "
        "mesh, which has no pipeline axis; use pipeline x data (ZeRO-1), or tensor x sequence x data (ZeRO-3) "
        "without a pipeline"),
    "parallel.sequence_parallel": (
        "the pipeline passes whole sequences between stages and DeepSpeed 0.19's pipeline topology has no "
        "sequence axis; use pipeline x data (ZeRO-1), or sequence x tensor x data (ZeRO-3) without a pipeline"),
}


def _divisors(n: int) -> str:
    found = [d for d in range(1, n + 1) if not n % d]
    return ", ".join(map(str, found[:12])) + (", ..." if len(found) > 12 else "")


def _pattern_note(attention: Optional[list]) -> str:
    """Why a per-head global pattern follows its heads (for the sequence-parallel message)."""
    spec = (attention or [None])[0]
    pattern = spec.get("pattern") if isinstance(spec, dict) and spec.get("kind") == "sparse" else None
    if isinstance(pattern, (list, tuple)):
        return f", each with its own pattern of model.attention[0] ({len(pattern)} per-head patterns)"
    if isinstance(pattern, dict) and pattern.get("dilated"):
        return " (dilated offsets follow the global head index)"
    return ""


def model_parallel_size(cfg: Config) -> int:
    """Ranks that work on the same sequences: one data-parallel replica."""
    p = cfg.parallel
    return p.pipeline_stages * p.tensor_parallel * p.sequence_parallel


def validate_world(cfg: Config, world_size: int) -> int:
    """Check the parallel degrees and the batch against the world size; returns gradient accumulation
    steps (micro-batches per rank per optimizer step)."""
    replica = model_parallel_size(cfg)
    if world_size % replica:
        p = cfg.parallel
        raise ConfigError(
            f"world size {world_size} is not a multiple of parallel.pipeline_stages x tensor_parallel x "
            f"sequence_parallel = {p.pipeline_stages} x {p.tensor_parallel} x {p.sequence_parallel} = {replica}: "
            f"launch a multiple of {replica} ranks or change the parallel degrees"
        )
    dp = world_size // replica
    hpz, zero_ranks = cfg.parallel.zero_hpz_partition_size, dp * cfg.parallel.sequence_parallel
    if hpz > 1 and zero_ranks % hpz:
        raise ConfigError(
            f"parallel.zero_hpz_partition_size={hpz} must divide the {zero_ranks} ranks ZeRO partitions over "
            f"(data x sequence parallel): use a divisor, usually the GPUs per node"
        )
    per_step = cfg.train.micro_batch * dp
    if cfg.train.global_batch % per_step:
        raise ConfigError(
            f"train.global_batch ({cfg.train.global_batch}) must be a multiple of train.micro_batch x "
            f"data-parallel world size ({cfg.train.micro_batch} x {dp} = {per_step}; world size {world_size} "
            f"over {replica} rank(s) per replica)"
        )
    return cfg.train.global_batch // per_step
