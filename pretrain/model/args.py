"""The model's arguments, in one place: ``ModelArgs`` is ``TerraByte``'s keywords, the config tree's
``model`` section and the JSON an export stores, with one set of defaults and one validation
(``checked``) that both the constructor and ``train.config.validate`` run.

    TerraByte(num_tokens=256, dim=(512, 256), depth=(6, 4), max_seq_len=(1024, 4))
    TerraByte(ModelArgs(dim=(512, 256), depth=(6, 4), max_seq_len=(1024, 4)))

The defaults describe a small two-stage model (the one a config file without a ``model`` section
builds). A saved model stores every argument, so a default never changes what loads.

Light on purpose (the standard library and the error classes): the config tree imports it without
torch, the model without yaml.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional, Union

from terrabyte.data_pipeline.basics.errors import ConfigError

IntTuple = tuple[int, ...]
PerStage = Union[int, IntTuple]  # one value for every stage, or one per stage

# Arguments with one value per stage, coarsest first; the constructor also takes one value for all.
PER_STAGE = ("dim", "depth", "heads", "dim_head", "ff_mult", "attention")
UNIT_EMBEDDINGS = ("grouped", "concat")
ATTENTION_KINDS = ("dense", "sparse")
PATCHING = ("fixed", "space", "entropy")  # model/patching.py's schemes
NGRAM_HASH_VALUES = (1 << 31) - 1  # layers.NGRAM_PRIME: the n-gram hash is taken modulo it


@dataclass
class ModelArgs:
    """``TerraByte``'s arguments; tuples have one entry per stage, coarsest first."""

    num_tokens: int = 256
    """Data vocabulary: 256 for bytes. Special ids (pad, eos, bos) are added above it."""
    dim: IntTuple = (128, 64)
    depth: IntTuple = (2, 2)
    max_seq_len: IntTuple = (256, 8)
    """Patches per stage; their product is the training sequence length in bytes (unless
    ``context_bytes`` says otherwise)."""
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
    checkpoint_activations: Optional[bool] = None
    """Recompute each global-stage block in backward instead of keeping its activations. Unset
    (None): automatic, decided where the step runs (``TerraByte.auto_checkpoint``; the trainer
    decides once at start-up from the memory estimate, the same on every rank)."""
    chunk_bytes: Optional[int] = None
    """Bytes of each chunk the lower stages, logits and loss run on (a multiple of the global patch;
    activation memory below the global stage is one chunk's). Unset: about 1 GiB of fp32
    activations' worth, capped so no kernel call gets more than 65,535 sequences x heads."""
    unit_embedding: str = "grouped"
    """How an upper stage embeds its units: ``grouped`` (bytes projected group by group: parameters
    do not grow with the unit) or ``concat`` (MEGABYTE: all the unit's bytes in one projection).
    Two-stage models are the same either way."""

    ngram_sizes: IntTuple = ()
    """Hashed n-gram embeddings (BLT): for each n here, every byte of an upper stage's unit adds the
    embedding of a hash of the n bytes of the unit ending at it (``layers.NgramEmbed``), e.g.
    ``[3, 4, 5, 6, 7, 8]``. Empty: none (MEGABYTE's linear unit embedding)."""
    ngram_buckets: int = 16384
    """Rows of each n-gram size's hash table (``ngram_sizes`` only)."""

    patching: str = "fixed"
    """Which bytes form a global patch (``model/patching.py``): ``fixed`` (every
    ``prod(max_seq_len[1:])`` bytes, MEGABYTE), ``space`` (after space-like bytes, SpaceByte) or
    ``entropy`` (where a small byte model's next-byte entropy rises, BLT; the model is part of this
    one, trained with it). A patch holds at most ``prod(max_seq_len[1:])`` bytes; with ``space`` and
    ``entropy``, ``max_seq_len[0]`` is the most patches a row may have and ``context_bytes`` the
    row's bytes."""
    patch_threshold: Optional[float] = None
    """``entropy`` only: the rise of the next-byte entropy, in bits, from one byte to the next that
    starts a patch. Unset: 1.5."""
    context_bytes: Optional[int] = None
    """Bytes per row: the training sequence and the longest input. Unset: ``prod(max_seq_len)``,
    what fixed patches hold; ``space`` and ``entropy`` need it set, below that product (their
    patches are shorter than the longest), e.g. 2048 with ``max_seq_len: [512, 8]``."""

    @property
    def seq_len(self) -> int:
        return self.context_bytes or math.prod(self.max_seq_len)

    def kwargs(self) -> dict:
        """Keyword arguments for ``TerraByte(**...)``."""
        return dataclasses.asdict(self)

    def checked(self) -> "ModelArgs":
        """These arguments checked, as a copy whose per-stage arguments are tuples of one entry per
        stage; a value that cannot work is one ``ConfigError`` naming the key."""
        msl = self.max_seq_len
        if not isinstance(msl, (list, tuple)) or len(msl) < 2:
            raise ConfigError(f"config key model.max_seq_len={msl!r} must be a list with one length per stage "
                              f"(at least 2)")
        msl = tuple(msl)
        stages = {name: _per_stage(name, getattr(self, name), msl) for name in PER_STAGE}
        for name, values in (("max_seq_len", msl), *((k, stages[k]) for k in ("dim", "depth", "heads", "dim_head"))):
            for v in values:
                positive_int(v, f"model.{name}")
        positive_int(self.num_tokens, "model.num_tokens")
        if self.rotary and any(d % 2 for d in stages["dim_head"]):
            raise ConfigError(f"config key model.dim_head={self.dim_head} must be even with model.rotary (rotary "
                              f"embeddings turn pairs of values)")
        for m in stages["ff_mult"]:
            if isinstance(m, bool) or not isinstance(m, (int, float)):
                raise ConfigError(f"config key model.ff_mult expects a number, got {m!r}")
            positive(m, "model.ff_mult")
        for key in ("attn_dropout", "ff_dropout"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"config key model.{key} expects a number, got {value!r}")
            within(value, f"model.{key}", 0, 1, high_open=True)
        for key in ("flash_attn", "rotary", "tie_embeddings"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"config key model.{key} expects true or false, got {getattr(self, key)!r}")
        if self.checkpoint_activations is not None and not isinstance(self.checkpoint_activations, bool):
            raise ConfigError(f"config key model.checkpoint_activations={self.checkpoint_activations!r} must be "
                              "true, false or null (automatic)")
        if self.unit_embedding not in UNIT_EMBEDDINGS:
            raise ConfigError(f"model.unit_embedding={self.unit_embedding!r} must be 'grouped' or 'concat'")
        _check_chunk_bytes(self.chunk_bytes, math.prod(msl[1:]))
        ngram_sizes = _check_ngrams(self.ngram_sizes, self.ngram_buckets)
        _check_patching(self.patching, self.patch_threshold, self.context_bytes, msl)
        for s, spec in enumerate(stages["attention"]):
            _check_attention(spec, s, stages["heads"][s], self.attn_dropout)
        return dataclasses.replace(self, max_seq_len=msl, ngram_sizes=ngram_sizes, **stages)


MODEL_KEYS = tuple(f.name for f in dataclasses.fields(ModelArgs))


def _per_stage(name: str, value, max_seq_len: tuple) -> tuple:
    """One value for every stage, or a list with one per stage, as a tuple of one per stage."""
    stages = len(max_seq_len)
    if isinstance(value, (list, tuple)):
        if len(value) != stages:
            raise ConfigError(f"config key model.{name}={tuple(value)} has {len(value)} entries but "
                              f"model.max_seq_len={max_seq_len} gives {stages} stages: give one entry per stage")
        return tuple(value)
    return (value,) * stages


def _check_chunk_bytes(chunk_bytes, patch: int) -> None:
    if chunk_bytes is None:
        return
    if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or chunk_bytes < 1 or chunk_bytes % patch:
        lower = max(patch, (chunk_bytes if isinstance(chunk_bytes, int) else 0) // patch * patch)
        raise ConfigError(
            f"model.chunk_bytes={chunk_bytes!r} must be a positive multiple of the global patch "
            f"({patch} bytes), e.g. {lower} or {lower + patch}; leave it unset for automatic"
        )


def _check_ngrams(sizes, buckets) -> tuple:
    if not isinstance(sizes, (list, tuple)):
        raise ConfigError(f"config key model.ngram_sizes={sizes!r} must be a list of n-gram lengths, e.g. [3, 4, 5]")
    for n in sizes:
        if isinstance(n, bool) or not isinstance(n, int) or n < 2:
            raise ConfigError(f"config key model.ngram_sizes={list(sizes)} must hold integers of at least 2, "
                              f"got {n!r}")
    if len(set(sizes)) != len(sizes):
        raise ConfigError(f"config key model.ngram_sizes={list(sizes)} repeats a length")
    positive_int(buckets, "model.ngram_buckets")
    if buckets > NGRAM_HASH_VALUES:
        raise ConfigError(f"config key model.ngram_buckets={buckets} exceeds the {NGRAM_HASH_VALUES} values the n-gram "
                          f"hash takes: more rows would never be used")
    return tuple(sizes)


def _check_patching(patching, threshold, context_bytes, max_seq_len: tuple) -> None:
    if patching not in PATCHING:
        raise ConfigError(f"config key model.patching={patching!r} must be one of {', '.join(PATCHING)}")
    if threshold is not None:
        if patching != "entropy":
            raise ConfigError(f"config key model.patch_threshold={threshold!r} applies to model.patching=entropy "
                              f"only (patching is {patching!r}); leave it unset")
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
            raise ConfigError(f"config key model.patch_threshold expects a finite number of bits, got {threshold!r}")
    most = math.prod(max_seq_len)
    if context_bytes is not None:
        positive_int(context_bytes, "model.context_bytes")
        if context_bytes > most:
            raise ConfigError(f"config key model.context_bytes={context_bytes} exceeds prod(model.max_seq_len)="
                              f"{most}, the bytes max_seq_len[0] patches of {most // max_seq_len[0]} hold")
    if patching != "fixed" and (context_bytes is None or context_bytes == most):
        raise ConfigError(f"config key model.patching={patching} needs model.context_bytes (bytes per row) below "
                          f"prod(model.max_seq_len)={most}: max_seq_len[0]={max_seq_len[0]} is the most patches a "
                          f"row may have, e.g. context_bytes={most // 2}")


def _check_attention(spec, s: int, heads: int, attn_dropout: float) -> None:
    """One stage's attention spec: None (dense), a callable (Python only: it gets (q, k, v) and must
    be causal) or a dict with a known ``kind``; a sparse pattern must build and fit the heads."""
    where = f"model.attention[{s}]"
    if spec is None or callable(spec):
        return
    if not isinstance(spec, dict) or spec.get("kind") not in ATTENTION_KINDS:
        raise ConfigError(f"config key {where}: {spec!r} must be null or a mapping with kind "
                          f"{' or '.join(ATTENTION_KINDS)}")
    if spec["kind"] == "dense":
        return
    if "pattern" not in spec:
        raise ConfigError(f"config key {where}: sparse attention {spec!r} needs a 'pattern' mapping")
    if attn_dropout > 0:
        raise ConfigError(f"config key {where}: sparse attention does not support model.attn_dropout > 0; set it 0")
    from terrabyte.kernels import SparsePattern  # torch, no Triton

    try:
        SparsePattern.from_config(spec["pattern"]).check_heads(heads, where)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise ConfigError(f"config key {where}.pattern: {exc}") from None


def positive_int(value, key: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"config key {key} expects an integer, got {value!r}")
    positive(value, key)


def positive(value: float, key: str) -> None:
    if value <= 0:
        raise ConfigError(f"config key {key} must be positive, got {value!r}")


def within(value, key: str, low=None, high=None, high_open: bool = False) -> None:
    """``low <= value <= high`` (``< high`` with ``high_open``); None bounds are open."""
    fits = (low is None or value >= low) and (high is None or (value < high if high_open else value <= high))
    if not fits:
        span = [f"at least {low}"] if low is not None else []
        span += [f"below {high}" if high_open else f"at most {high}"] if high is not None else []
        raise ConfigError(f"config key {key} must be {' and '.join(span)}, got {value!r}")
