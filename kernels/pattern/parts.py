"""The parts of a sparse pattern (the config keys, parsed into ``HeadPattern`` rows of a few integers)
and ``BlockLayout``, an explicit CSR layout. ``SparsePattern`` (sparse_pattern.py) is built from these.

Config keys (``SparsePattern.from_config``; the model's ``attention: {kind: sparse, pattern: ...}``)
-----------------------------------------------------------------------------------------------
``local: w`` (int >= 0, default 0)
    Local window: ``|i - j| < w``. With causal masking this is the usual sliding window of the ``w``
    most recent keys, the query itself included.
``stride: l`` (int >= 0, default 0 = off)
    Strided part of the Sparse Transformer (Child et al. 2019, ``A(2)``): ``(i - j) % l == 0``, i.e.
    every l-th key counted back from the query.
``dilated: [[segment, dilation], ...]`` (at most 4 entries, default none)
    LongNet dilated attention (Ding et al. 2023): the sequence is cut into segments
    ``[k * segment, (k + 1) * segment)``; inside a segment the positions ``p`` with
    ``p % dilation == offset`` attend each other. The offset varies per head as in LongNet,
    ``offset = head % dilation``; a third entry ``[segment, dilation, offset]`` fixes it instead.
    Needs ``1 <= dilation <= segment`` and ``0 <= offset < dilation``.
``global_tokens: g`` (int >= 0, default 0)
    Global / attention-sink tokens: the first ``g`` positions are attended by every query
    (``j < g``) and attend every key (``i < g``; under causal masking that adds nothing).
``block: b`` (16, 32, 64 or 128; default 64)
    Tile size of the kernels. ``key_blocks`` / ``query_blocks`` and explicit layouts count in blocks
    of ``b`` positions. It does not change the attended set, only how the work is tiled.
``csr: {indptr: [...], indices: [...]}`` (instead of the parts above)
    An explicit block layout: query block ``qb`` attends key blocks
    ``indices[indptr[qb]:indptr[qb + 1]]`` (whole ``b x b`` tiles). Metadata is O(number of blocks),
    and the pattern only fits sequences of exactly ``len(indptr) - 1`` blocks.

A config is one mapping (every head the same, except the LongNet offsets, which follow the head
index), or a list of mappings, one per head (all with the same ``block``).

Rules
-----
* The diagonal is always attended (``j == i``; the local part has an effective window of at least
  1), so under causal masking every query has at least one key and the softmax is never empty.
* Causal masking (``j <= i``) is applied on top of the union; it is an argument of the attention
  call, not part of the pattern.
* The cost of the kernels is the number of ``b x b`` tiles that hold at least one attended pair.
  Local windows, global tokens and dilation-1 segments fill whole tiles; the strided and dilated
  (dilation > 1) parts fill tiles sparsely, so their FLOPs are counted on whole computed tiles.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

BLOCK_SIZES = (16, 32, 64, 128)
DEFAULT_BLOCK = 64
MAX_DILATED = 4
# Positions are int32 inside the kernels; segment ends such as (k + 1) * segment must not overflow.
MAX_POSITIONS = 2**30
PART_KEYS = ("local", "stride", "dilated", "global_tokens")
CONFIG_KEYS = PART_KEYS + ("block", "csr")
# Columns of the per-head parameter table handed to the kernels: local, global, stride, then
# (segment, dilation, offset) per dilated part. Segment 0 marks an unused dilated slot.
PARAMS_FIXED = 3


def _int_value(where: str, value: Any, minimum: int = 0, maximum: int = MAX_POSITIONS) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"sparse pattern: {where} must be an integer, got {value!r}")
    if not minimum <= value <= maximum:
        raise ValueError(f"sparse pattern: {where} must be between {minimum} and {maximum}, got {value}")
    return value


@dataclass(frozen=True)
class Dilated:
    """One LongNet part: segments of ``segment`` positions, every ``dilation``-th one kept."""

    segment: int
    dilation: int
    offset: int | None = None  # None: head % dilation (LongNet's per-head shift)

    def offset_for(self, head: int) -> int:
        return head % self.dilation if self.offset is None else self.offset


@dataclass(frozen=True)
class HeadPattern:
    """The parts of one head (or of every head, when the pattern is not given per head)."""

    local: int = 0
    stride: int = 0
    dilated: tuple[Dilated, ...] = ()
    global_tokens: int = 0

    @property
    def head_invariant(self) -> bool:
        """True when no dilated part takes its offset from the head index."""
        return all(d.offset is not None or d.dilation == 1 for d in self.dilated)

    def params(self, head: int, n: int | None = None) -> list[int]:
        """Integers of the kernel parameter row; with ``n`` they are clipped to the sequence.

        Clipping keeps int32 arithmetic safe and does not change the attended set inside [0, n):
        a window, stride or segment of at least ``n`` behaves like one of exactly ``n``.
        """
        cap = (lambda x: min(x, n)) if n is not None else (lambda x: x)
        row = [cap(max(self.local, 1)), cap(self.global_tokens), cap(self.stride)]
        for d in self.dilated:
            row += [cap(d.segment), d.dilation, d.offset_for(head)]
        return row


def _parse_dilated(where: str, value: Any) -> tuple[Dilated, ...]:
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"sparse pattern: {where} must be a list of [segment, dilation] pairs, got {value!r}")
    if len(value) > MAX_DILATED:
        raise ValueError(f"sparse pattern: {where} has {len(value)} entries; at most {MAX_DILATED} are supported")
    parts = []
    for k, entry in enumerate(value):
        at = f"{where}[{k}]"
        if not isinstance(entry, (list, tuple)) or len(entry) not in (2, 3):
            raise ValueError(f"sparse pattern: {at} must be [segment, dilation] or [segment, dilation, offset], "
                             f"got {entry!r}")
        segment = _int_value(f"{at} segment", entry[0], minimum=1)
        dilation = _int_value(f"{at} dilation", entry[1], minimum=1)
        if dilation > segment:
            raise ValueError(f"sparse pattern: {at} dilation {dilation} is larger than its segment {segment}")
        offset = None
        if len(entry) == 3:
            offset = _int_value(f"{at} offset", entry[2], minimum=0, maximum=dilation - 1)
        parts.append(Dilated(segment, dilation, offset))
    return tuple(parts)


def _parse_head(cfg: Any, where: str) -> tuple[HeadPattern | None, int, dict | None]:
    """One mapping -> (parts or None for csr, block, csr dict or None)."""
    if not isinstance(cfg, dict):
        raise ValueError(f"sparse pattern: {where} must be a mapping of {', '.join(CONFIG_KEYS)}, got {cfg!r}")
    unknown = sorted(set(cfg) - set(CONFIG_KEYS))
    if unknown:
        raise ValueError(f"sparse pattern: {where} has unknown key {unknown[0]!r} (allowed: {', '.join(CONFIG_KEYS)})")
    block = cfg.get("block", DEFAULT_BLOCK)
    if isinstance(block, bool) or block not in BLOCK_SIZES:
        raise ValueError(f"sparse pattern: {where}.block must be one of {BLOCK_SIZES}, got {block!r}")
    if "csr" in cfg:
        mixed = [k for k in PART_KEYS if k in cfg]
        if mixed:
            raise ValueError(f"sparse pattern: {where} gives both 'csr' and {mixed[0]!r}; "
                             "an explicit layout replaces the parts")
        csr = cfg["csr"]
        if not isinstance(csr, dict) or set(csr) != {"indptr", "indices"}:
            raise ValueError(f"sparse pattern: {where}.csr must be a mapping with exactly 'indptr' and 'indices'")
        return None, block, csr
    head = HeadPattern(
        local=_int_value(f"{where}.local", cfg.get("local", 0)),
        stride=_int_value(f"{where}.stride", cfg.get("stride", 0)),
        dilated=_parse_dilated(f"{where}.dilated", cfg.get("dilated", [])),
        global_tokens=_int_value(f"{where}.global_tokens", cfg.get("global_tokens", 0)),
    )
    return head, block, None


@dataclass
class BlockLayout:
    """An explicit block layout in CSR form, per head: (heads, rows + 1) pointers into one index list."""

    indptr: torch.Tensor  # int64 (heads, rows + 1), global offsets into indices
    indices: torch.Tensor  # int64 (nnz,), sorted key blocks of each row, diagonal included
    t_indptr: torch.Tensor  # the transposed layout (per key block, its query blocks)
    t_indices: torch.Tensor
    dense: torch.Tensor  # bool (heads, rows, rows), for allowed() and tests
    _device_cache: dict = field(default_factory=dict, repr=False)

    @property
    def num_blocks(self) -> int:
        return self.dense.shape[-1]

    @classmethod
    def from_dense(cls, dense: torch.Tensor) -> "BlockLayout":
        dense = dense.clone().bool()
        rows = dense.shape[-1]
        dense[:, torch.arange(rows), torch.arange(rows)] = True  # the diagonal rule
        return cls(*cls._csr(dense), *cls._csr(dense.transpose(1, 2)), dense)

    @staticmethod
    def _csr(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        counts = dense.sum(-1).flatten()
        indptr = torch.zeros(counts.numel() + 1, dtype=torch.int64)
        indptr[1:] = counts.cumsum(0)
        heads, rows = dense.shape[:2]
        # Pointers per head: row pointers of head h are indptr[h * rows : h * rows + rows + 1].
        per_head = torch.stack([indptr[h * rows: h * rows + rows + 1] for h in range(heads)])
        indices = dense.reshape(-1, rows).nonzero()[:, 1]
        return per_head, indices

    def on(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        """int32 copies on ``device``: indptr, indices, t_indptr, t_indices."""
        key = str(device)
        if key not in self._device_cache:
            self._device_cache[key] = tuple(
                t.to(device=device, dtype=torch.int32).contiguous()
                for t in (self.indptr, self.indices, self.t_indptr, self.t_indices)
            )
        return self._device_cache[key]


def unpack_params(params: Sequence[int]) -> tuple[int, int, int, list[tuple[int, int, int]]]:
    """A parameter-table row -> (local, global, stride, used dilated parts as (segment, dilation, offset))."""
    w, g, l = params[:PARAMS_FIXED]
    rest = params[PARAMS_FIXED:]
    dils = [(rest[i], rest[i + 1], rest[i + 2]) for i in range(0, len(rest), 3) if rest[i] > 0]
    return w, g, l, dils
