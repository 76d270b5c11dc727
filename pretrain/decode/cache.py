"""The decode state: one key/value cache per stage (``TerraByteCache``), built by ``init_cache``,
and the size of the pieces a long prompt is prefilled in (``prefill_patches``)."""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor, nn

from terrabyte.data_pipeline.basics.errors import ConfigError

from . import plans
from .plans import _StagePlan, decode_plans


# --------------------------------------------------------------------------------------------
# Caches and the cached forward
# --------------------------------------------------------------------------------------------

@dataclass
class StageCache:
    kv: Tensor        # (depth, 2, b, heads, seq_len, dim_head), preallocated
    plan: _StagePlan
    length: int = 0   # positions filled in the current parent unit
    parent: int = -1  # byte offset of the parent unit the cache belongs to
    ctx: Optional[Tensor] = None  # (b, next_seq_len, next_dim): this stage's projection down


@dataclass
class TerraByteCache:
    """State of an incremental decode: the bytes so far and one KV cache per stage.

    Holds fused copies of the weights taken at ``init_cache`` time: build a new cache after the
    weights change (``init_cache`` notices the change and copies them again).
    """
    tokens: Tensor                 # (b, context_length) ids; [:, :length] are valid
    stages: list = field(default_factory=list)
    length: int = 0
    logits: Optional[Tensor] = None  # (b, vocab_size) for byte `length`
    prefill_chunk_bytes: Optional[int] = None  # bytes per prefill piece, None: automatic (prefill_patches)
    # patches that follow the data (a row of a PatchedCache): tokens is the row's virtual stream and
    # this (1, max_seq_len[0], unit_sizes[1]) the real bytes before each of its patches
    patch_before: Optional[Tensor] = None

    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]

    def reset(self) -> None:
        """Forget the sequence, keep the buffers and weights."""
        self.length, self.logits = 0, None
        for st in self.stages:
            st.length, st.parent, st.ctx = 0, -1, None


@dataclass
class PatchedCache:
    """The decode state of a model whose patches follow the data (``model.patching`` space or
    entropy): rows reach patch boundaries at different bytes, so each row keeps its own batch-1
    ``TerraByteCache`` over its virtual stream, its patches laid end to end as the forward's units
    are (bytes first, PAD after them): the fixed decode walk over that stream is the forward's walk,
    but for the bytes a patch's first position reads, the real bytes before the patch
    (``patch_before``). ``length`` counts real bytes, the same in every row; ``slot`` is where in
    its virtual stream each row's next byte goes, ``count`` and ``last`` its patches so far and the
    start of its current one (what decides the next byte's patch, ``Patcher``'s rules)."""
    rows: list
    stream: Tensor  # (b, context_length) real bytes; [:, :length] are valid
    count: Tensor   # (b,) patches so far
    last: Tensor    # (b,) byte where the current patch starts
    slot: Tensor    # (b,) virtual position of byte ``length``
    length: int = 0
    logits: Optional[Tensor] = None
    prefill_chunk_bytes: Optional[int] = None

    @property
    def batch_size(self) -> int:
        return self.stream.shape[0]

    pad_id: int = 0

    def reset(self) -> None:
        """Forget the sequence, keep the buffers and weights."""
        self.length, self.logits = 0, None
        for t in (self.count, self.last, self.slot):
            t.zero_()
        for row in self.rows:
            row.reset()
            row.tokens.fill_(self.pad_id)
            row.patch_before.fill_(self.pad_id)


def check_chunk_bytes(value) -> Optional[int]:
    """prefill_chunk_bytes is None (automatic) or a positive int."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ConfigError(f"prefill_chunk_bytes={value!r} must be a positive integer (prompt bytes per "
                          f"prefill piece) or None for the automatic size")
    return value


@torch.no_grad()
def init_cache(model: nn.Module, batch_size: int, device=None,
               prefill_chunk_bytes: Optional[int] = None) -> TerraByteCache:
    """Empty decode state for ``batch_size`` sequences: preallocated KV caches in the weights'
    dtype, plus fused weight copies for the decode path (about the size of the blocks; in eval
    mode shared with later caches until a parameter changes). Long inputs go through in pieces of
    about ``prefill_chunk_bytes`` (see ``advance``)."""
    check_chunk_bytes(prefill_chunk_bytes)
    ref = model.to_logits.weight
    device = ref.device if device is None else device
    dtype = ref.dtype
    stages = []
    for stage, plan in zip(model.stages, decode_plans(model)):
        shape = (stage.depth, 2, batch_size, stage.heads, stage.seq_len, stage.dim_head)
        stages.append(StageCache(torch.empty(shape, device=device, dtype=dtype), plan))
    if model.patcher.dynamic:
        return _patched_cache(model, batch_size, device, stages, prefill_chunk_bytes)
    tokens = torch.full((batch_size, model.context_length), model.pad_id, dtype=torch.long, device=device)
    return TerraByteCache(tokens=tokens, stages=stages, prefill_chunk_bytes=prefill_chunk_bytes)


def _patched_cache(model: nn.Module, batch_size: int, device, stages: list,
                   prefill_chunk_bytes: Optional[int]) -> PatchedCache:
    """A ``PatchedCache``: the batch's KV caches cut into one batch-1 cache per row."""
    slots = math.prod(model.max_seq_len)  # the virtual stream: max_seq_len[0] patches of unit_sizes[0]
    rows = []
    for r in range(batch_size):
        row_stages = [StageCache(st.kv[:, :, r:r + 1], st.plan) for st in stages]
        rows.append(TerraByteCache(
            tokens=torch.full((1, slots), model.pad_id, dtype=torch.long, device=device), stages=row_stages,
            prefill_chunk_bytes=prefill_chunk_bytes,
            patch_before=torch.full((1, model.max_seq_len[0], model.unit_sizes[1]), model.pad_id, dtype=torch.long,
                                    device=device)))
    zeros = functools.partial(torch.zeros, batch_size, dtype=torch.long, device=device)
    return PatchedCache(rows=rows, stream=torch.full((batch_size, model.context_length), model.pad_id,
                                                     dtype=torch.long, device=device),
                        count=zeros(), last=zeros(), slot=zeros(), prefill_chunk_bytes=prefill_chunk_bytes,
                        pad_id=model.pad_id)


def prefill_patches(model: nn.Module, cache: TerraByteCache) -> int:
    """Global-stage patches per prefill piece: ``cache.prefill_chunk_bytes`` in whole patches (at
    least one), or automatically as many as keep one piece within ``plans.PREFILL_MEMORY_BYTES``: the
    global stage's activations per patch, and the (heads, piece, piece) scores a fresh piece may
    take in a plain attention path (the PyTorch sparse reference holds its mask, the scores, the
    masked scores and the probabilities at once: four such tensors)."""
    patch = model.unit_sizes[0]
    if cache.prefill_chunk_bytes is not None:
        return max(1, cache.prefill_chunk_bytes // patch)
    st = cache.stages[0]
    plan, b, itemsize = st.plan, cache.batch_size, st.kv.element_size()
    hidden = plan.layers[0].wgu.shape[1] // 2 if plan.layers else 0
    # the stream, embedding, q|k|v (and its fp32 rotary copy), attention output, gate|up, product
    per_patch = b * itemsize * (3 * plan.dim + 8 * plan.heads * plan.dim_head + 3 * hidden)
    budget = plans.PREFILL_MEMORY_BYTES  # read when called: one budget with the row groups of plans.py
    by_activations = budget // max(per_patch, 1)
    by_scores = math.isqrt(budget // (4 * 4 * b * plan.heads))
    return max(1, min(by_activations, by_scores, model.max_seq_len[0]))
