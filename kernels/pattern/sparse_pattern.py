"""Sparse attention patterns: which keys each query attends to, per head, in O(1) metadata.

A :class:`SparsePattern` describes the attended set of every head as the UNION of a few parts, each
defined by a handful of integers, so the layout of a sequence of any length is computed on the fly
(inside the Triton kernels, by :meth:`SparsePattern.allowed`, or by :meth:`SparsePattern.key_blocks`)
and never stored. Positions are 0-based absolute indices in the sequence; ``i`` is a query, ``j`` a
key.

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

Block level: ``key_blocks`` (and ``query_blocks``, the transposed layout) list the tiles the kernels
compute, from the plain-Python twin of their tile walk in ``tile_walk.py``: the forward and dQ kernels
walk exactly the tiles ``key_blocks`` lists, the dK/dV kernel those ``query_blocks`` lists, each
once, entirely attended tiles in a first unmasked pass and the others in a second pass with the
element-wise predicate.
"""
from __future__ import annotations

import dataclasses
import math

from array import array
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from .tile_walk import visit, visit_csr

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


class SparsePattern:
    """The attended set of every head; see the module docstring for the config keys and rules."""

    def __init__(self, heads: Sequence[HeadPattern] | HeadPattern | None = None, *, block: int = DEFAULT_BLOCK,
                 layout: BlockLayout | None = None):
        if block not in BLOCK_SIZES:
            raise ValueError(f"sparse pattern: block must be one of {BLOCK_SIZES}, got {block!r}")
        self.block = block
        self.layout = layout
        if layout is not None:
            self._heads: tuple[HeadPattern, ...] = ()
            # one layout serves any number of heads; several fix the count
            self.num_heads: int | None = layout.dense.shape[0] if layout.dense.shape[0] > 1 else None
        elif isinstance(heads, HeadPattern) or heads is None:
            self._heads = (heads or HeadPattern(),)
            self.num_heads = None  # any number of heads
        else:
            self._heads = tuple(heads)
            if not self._heads:
                raise ValueError("sparse pattern: the list of per-head patterns is empty")
            self.num_heads = len(self._heads)
        self._tables: dict = {}

    # ----------------------------------------------------------------------------- construction
    @classmethod
    def from_config(cls, cfg: Any) -> "SparsePattern":
        """Build from one mapping (all heads) or a list of mappings (one per head)."""
        if isinstance(cfg, SparsePattern):
            return cfg
        if isinstance(cfg, (list, tuple)):
            if not cfg:
                raise ValueError("sparse pattern: the list of per-head patterns is empty")
            parsed = [_parse_head(c, f"pattern[{h}]") for h, c in enumerate(cfg)]
            blocks = {b for _, b, _ in parsed}
            if len(blocks) != 1:
                raise ValueError(f"sparse pattern: per-head patterns use different block sizes {sorted(blocks)}; "
                                 "use one")
            block = blocks.pop()
            if any(csr is not None for _, _, csr in parsed):
                if not all(csr is not None for _, _, csr in parsed):
                    raise ValueError("sparse pattern: mix of 'csr' and part-based heads; "
                                     "give every head a csr layout or none")
                return cls.from_csr_lists([csr for _, _, csr in parsed], block=block)
            return cls([h for h, _, _ in parsed], block=block)
        head, block, csr = _parse_head(cfg, "pattern")
        if csr is not None:
            return cls.from_csr_lists([csr], block=block)
        return cls(head, block=block)

    @classmethod
    def from_block_layout(cls, layout: torch.Tensor, block: int = DEFAULT_BLOCK) -> "SparsePattern":
        """An explicit layout: bool (rows, rows) or (heads, rows, rows), True = tile attended."""
        if not isinstance(layout, torch.Tensor) or layout.dim() not in (2, 3) or layout.shape[-1] != layout.shape[-2]:
            raise ValueError("sparse pattern: a block layout must be a square bool tensor (rows, rows) "
                             "or (heads, rows, rows)")
        dense = layout.detach().cpu().bool()
        if dense.dim() == 2:
            dense = dense[None]
        return cls(block=block, layout=BlockLayout.from_dense(dense))

    @classmethod
    def from_csr(cls, indptr: Sequence[int] | torch.Tensor, indices: Sequence[int] | torch.Tensor,
                 block: int = DEFAULT_BLOCK) -> "SparsePattern":
        """An explicit per-query-block list of key blocks (one head, or every head the same)."""
        return cls.from_csr_lists([{"indptr": indptr, "indices": indices}], block=block)

    @classmethod
    def from_csr_lists(cls, csrs: Sequence[dict], block: int = DEFAULT_BLOCK) -> "SparsePattern":
        denses = []
        for h, csr in enumerate(csrs):
            indptr = torch.as_tensor(csr["indptr"], dtype=torch.int64).flatten()
            indices = torch.as_tensor(csr["indices"], dtype=torch.int64).flatten()
            rows = indptr.numel() - 1
            if rows < 1 or indptr[0] != 0 or bool((indptr[1:] < indptr[:-1]).any()) or indptr[-1] != indices.numel():
                raise ValueError(f"sparse pattern: csr of head {h}: indptr must start at 0, never decrease "
                                 "and end at len(indices)")
            if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= rows):
                raise ValueError(f"sparse pattern: csr of head {h}: key blocks must lie in [0, {rows}), "
                                 f"got {indices.tolist()}")
            dense = torch.zeros(rows, rows, dtype=torch.bool)
            row_of = torch.repeat_interleave(torch.arange(rows), indptr[1:] - indptr[:-1])
            dense[row_of, indices] = True
            denses.append(dense)
        if len({d.shape[0] for d in denses}) != 1:
            raise ValueError("sparse pattern: per-head csr layouts have different numbers of blocks")
        return cls(block=block, layout=BlockLayout.from_dense(torch.stack(denses)))

    def to_config(self) -> dict | list:
        """The config that rebuilds this pattern (inverse of from_config)."""
        def one(hp: HeadPattern) -> dict:
            out: dict[str, Any] = {"block": self.block}
            if hp.local:
                out["local"] = hp.local
            if hp.stride:
                out["stride"] = hp.stride
            if hp.dilated:
                out["dilated"] = [[d.segment, d.dilation] + ([] if d.offset is None else [d.offset])
                                  for d in hp.dilated]
            if hp.global_tokens:
                out["global_tokens"] = hp.global_tokens
            return out

        if self.layout is not None:
            return [{"block": self.block,
                     "csr": {"indptr": (p - p[0]).tolist(), "indices": self.layout.indices[p[0]:p[-1]].tolist()}}
                    for p in self.layout.indptr]
        if self.num_heads is None:
            return one(self._heads[0])
        return [one(hp) for hp in self._heads]

    def __repr__(self) -> str:
        what = self.to_config() if self.layout is None else f"<csr {tuple(self.layout.dense.shape)}>"
        return f"SparsePattern({what})"

    # ----------------------------------------------------------------------------- per head
    @property
    def is_csr(self) -> bool:
        return self.layout is not None

    @property
    def head_invariant(self) -> bool:
        """True when every head attends the same set."""
        if self.layout is not None:
            return bool((self.layout.dense == self.layout.dense[:1]).all())
        return len(set(self._heads)) == 1 and self._heads[0].head_invariant

    def head(self, h: int) -> HeadPattern:
        if self.layout is not None:
            raise ValueError("sparse pattern: an explicit csr layout has no parts")
        return self._heads[0] if self.num_heads is None else self._heads[h]

    def for_heads(self, start: int, count: int) -> "SparsePattern":
        """The pattern of heads [start, start + count) as a pattern of ``count`` heads: its head h
        attends exactly what head ``start + h`` attends here (LongNet offsets keep the global head
        index). What a rank that holds a slice of the heads attends with (Ulysses, tensor parallelism)."""
        total = self.num_heads
        if isinstance(start, bool) or isinstance(count, bool) or start < 0 or count < 1 or (
                total is not None and start + count > total):
            raise ValueError(f"sparse pattern: heads [{start}, {start + count}) are not a slice of the pattern's "
                             f"{total} heads" if total else f"sparse pattern: no head slice [{start}, {start + count})")
        if self.layout is not None:
            if self.layout.dense.shape[0] == 1:
                return self  # one layout for every head
            return SparsePattern(block=self.block, layout=BlockLayout.from_dense(self.layout.dense[start:start + count]))
        if self.head_invariant:
            return self if total is None else SparsePattern(self._heads[0], block=self.block)
        return SparsePattern([self._fixed_head(start + h) for h in range(count)], block=self.block)

    def _fixed_head(self, h: int) -> HeadPattern:
        """Head h's parts with every dilated offset made explicit."""
        hp = self.head(h)
        return dataclasses.replace(hp, dilated=tuple(Dilated(d.segment, d.dilation, d.offset_for(h)) for d in hp.dilated))

    def check_heads(self, heads: int, where: str = "attention") -> None:
        if self.num_heads is not None and self.num_heads != heads:
            raise ValueError(f"{where}: the sparse pattern is given for {self.num_heads} heads "
                             f"but the input has {heads}")

    def check_length(self, n: int, where: str = "attention") -> None:
        if not 1 <= n <= MAX_POSITIONS:
            raise ValueError(f"{where}: sequence length {n} is outside [1, {MAX_POSITIONS}]")
        if self.layout is not None and -(-n // self.block) != self.layout.num_blocks:
            raise ValueError(f"{where}: the csr layout covers {self.layout.num_blocks} blocks of {self.block}, "
                             f"but the sequence has {n} positions ({-(-n // self.block)} blocks)")

    @property
    def num_dilated(self) -> int:
        return max((len(hp.dilated) for hp in self._heads), default=0)

    @property
    def has_global(self) -> bool:
        return any(hp.global_tokens > 0 for hp in self._heads)

    @property
    def has_stride(self) -> bool:
        return any(hp.stride > 0 for hp in self._heads)

    def param_table(self, heads: int, n: int | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
        """int32 (heads, 3 + 3 * num_dilated): the whole layout metadata the kernels receive.

        Its size depends on the number of heads and parts only, never on the sequence length.
        """
        self.check_heads(heads)
        key = (heads, n, str(device))
        if key not in self._tables:
            if len(self._tables) > 64:  # lengths vary (generation): keep the cache small
                self._tables.clear()
            width = PARAMS_FIXED + 3 * self.num_dilated
            rows = []
            for h in range(heads):
                row = self.head(h).params(h, n)
                rows.append(row + [0] * (width - len(row)))
            self._tables[key] = torch.tensor(rows, dtype=torch.int32, device=device).reshape(heads, width)
        return self._tables[key]

    def metadata_bytes(self, n: int, heads: int) -> int:
        """Bytes of layout metadata the kernels read for a sequence of ``n`` positions."""
        if self.layout is not None:
            return 4 * sum(t.numel() for t in (self.layout.indptr, self.layout.indices,
                                               self.layout.t_indptr, self.layout.t_indices))
        return self.param_table(heads, None).numel() * 4

    # ----------------------------------------------------------------------------- element level
    def _head_index(self, head: int | torch.Tensor | None, heads: int | None) -> torch.Tensor | int:
        if head is not None:
            return head
        if heads is not None:
            self.check_heads(heads, "sparse pattern")
        else:
            heads = self.num_heads
        if heads is None:
            if not self.head_invariant:
                raise ValueError("sparse pattern: the mask differs per head (dilated offsets follow the head index); "
                                 "pass head= or heads=")
            return 0
        return torch.arange(heads)

    def allowed(self, q_idx: torch.Tensor | int, k_idx: torch.Tensor | int, head: int | torch.Tensor | None = None,
                causal: bool = True, heads: int | None = None) -> torch.Tensor:
        """Element-wise predicate: may query position ``q_idx`` attend key position ``k_idx``?

        ``q_idx``, ``k_idx`` and ``head`` broadcast against each other (plain tensor arithmetic, so
        this also serves as a FlexAttention ``mask_mod``). ``head=None`` means all heads: a leading
        head axis of size ``heads`` (or the pattern's own head count) is added, or no axis when every
        head attends the same set.
        """
        q = torch.as_tensor(q_idx)
        k = torch.as_tensor(k_idx, device=q.device)
        h = self._head_index(head, heads)
        if isinstance(h, torch.Tensor) and head is None:
            h = h.to(q.device).view(-1, *([1] * max(q.dim(), k.dim())))
        if self.layout is not None:
            dense = self.layout.dense.to(q.device)
            rows = dense.shape[-1]
            hh = torch.as_tensor(h, device=q.device) % dense.shape[0]
            qb, kb = q // self.block, k // self.block
            inside = (qb < rows) & (kb < rows) & (q >= 0) & (k >= 0)
            ok = dense[hh, qb.clamp(0, rows - 1), kb.clamp(0, rows - 1)] & inside
        else:
            # a per-head pattern has one row per head; one config for all heads has a single row
            table = self.param_table(self.num_heads or 1, None, device=q.device).long()
            hh = torch.as_tensor(h, device=q.device)
            if self.num_heads is None:
                # One config for all heads: only the LongNet offset depends on the head.
                row = table[0]
                ok = self._allowed_row(q, k, row, hh)
            else:
                ok = self._allowed_row(q, k, table[hh], None)
        if causal:
            ok = ok & (k <= q)
        if isinstance(h, torch.Tensor):  # keep the head axis even where no part depends on it
            ok = ok.expand(torch.broadcast_shapes(ok.shape, h.shape))
        return ok

    def _parts(self) -> tuple[bool, bool, tuple[bool, ...]]:
        """Python constants for _allowed_parts: global part?, stride part?, per dilated slot whether
        its offset follows the head. Taken out of the pattern so mask_mod traces (torch.compile)."""
        return self.has_global, self.has_stride, tuple(
            self._heads[0].dilated[d].offset is None if d < len(self._heads[0].dilated) else False
            for d in range(self.num_dilated))

    def _allowed_row(self, q: torch.Tensor, k: torch.Tensor, row: torch.Tensor,
                     head: torch.Tensor | None) -> torch.Tensor:
        return _allowed_parts(q, k, row, head, *self._parts())

    def dense_mask(self, n: int, heads: int | None = None, causal: bool = True,
                   device: torch.device | str = "cpu") -> torch.Tensor:
        """Bool mask (heads, n, n), or (n, n) when ``heads`` is None and every head is the same."""
        i = torch.arange(n, device=device)
        if heads is None and self.num_heads is None:
            return self.allowed(i[:, None], i[None, :], head=None, causal=causal)
        heads = heads or self.num_heads
        return self.allowed(i[:, None], i[None, :], head=None, causal=causal, heads=heads)

    def mask_mod(self, heads: int, causal: bool = True, device: torch.device | str = "cpu") -> Callable:
        """FlexAttention ``mask_mod(b, h, q_idx, kv_idx)`` for exactly this attended set."""
        self.check_heads(heads)
        if self.layout is not None:
            dense = self.layout.dense.to(device)
            block, hn = self.block, dense.shape[0]

            def mask_mod(b, h, q_idx, kv_idx):
                ok = dense[h % hn, q_idx // block, kv_idx // block]
                return ok & (kv_idx <= q_idx) if causal else ok

            return mask_mod
        table = self.param_table(heads, None, device=device).long()  # per-head offsets already in it
        has_global, has_stride, head_offsets = self._parts()
        no_head_offsets = tuple(False for _ in head_offsets)

        def mask_mod(b, h, q_idx, kv_idx):
            ok = _allowed_parts(q_idx, kv_idx, table[h], None, has_global, has_stride, no_head_offsets)
            return ok & (kv_idx <= q_idx) if causal else ok

        return mask_mod

    # ----------------------------------------------------------------------------- key lists
    def attended_keys(self, q_pos: int, n: int, head: int = 0, causal: bool = True) -> torch.Tensor:
        """The key positions in [0, n) that query ``q_pos`` attends, sorted: int64 (count,).

        Exactly ``{k : allowed(q_pos, k, head=head, causal=causal)}``, enumerated from the parts
        instead of tested against every key, so the cost follows the number of attended keys, not
        ``n``: what a decode step over a long cache needs (one query, a few of its keys).
        """
        return torch.tensor(self._key_list(q_pos, n, head, causal), dtype=torch.long)

    def attended_key_rows(self, q_start: int, q_end: int, n: int, head: int | None = None,
                          heads: int | None = None, causal: bool = True,
                          device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """Attended keys of queries [q_start, q_end), padded: (idx, valid), both (H, m, kmax).

        Row r of head h lists the keys of query q_start + r in order, then padding (index 0,
        valid False). H is 1 for one ``head``, or when every head attends the same set (any
        number of heads); otherwise ``heads`` (default: the pattern's own count), padded to one
        kmax across heads, so one gather serves all of them. One query (a decode step) is listed
        in plain Python, tens of microseconds; many rows (a prefill piece) in tensor ops.
        """
        if head is None and heads is not None:
            self.check_heads(heads, "attended_key_rows")
        if head is not None:
            head_list = [head]
        elif self.head_invariant:
            head_list = [0]
        elif (heads or self.num_heads) is None:
            raise ValueError("sparse pattern: the attended keys differ per head (dilated offsets follow the "
                             "head index); pass head= or heads=")
        else:
            head_list = list(range(heads or self.num_heads))
        if q_end - q_start == 1:
            lists = [self._key_list(q_start, n, h, causal) for h in head_list]
            kmax = max(1, max(len(k) for k in lists))
            flat = array("q")  # one buffer, no per-element conversion: ~10 us against ~40
            for k in lists:
                flat.extend(k)
                flat.extend([-1] * (kmax - len(k)))
            idx = torch.frombuffer(flat, dtype=torch.long).view(len(lists), 1, kmax).to(device)
            return idx.clamp(min=0), idx >= 0
        q = torch.arange(q_start, q_end)
        rows = [self._candidates(q, n, h, causal) for h in head_list]  # each (m, c_h), n = padding
        width = max(r.shape[1] for r in rows)
        cand = torch.stack([torch.nn.functional.pad(r, (0, width - r.shape[1]), value=n) for r in rows])
        idx, valid = _sorted_unique(cand, n)
        return idx.to(device), valid.to(device)

    def _key_list(self, q: int, n: int, head: int, causal: bool) -> list[int]:
        """The sorted keys of one query, from Python ranges (no tensor op: a decode step's cost)."""
        hi = min(q + 1, n) if causal else n  # keys lie in [0, hi)
        if self.layout is not None:
            lay, b = self.layout, self.block
            if q < 0 or q // b >= lay.num_blocks:
                return []
            ptr = lay.indptr[head % lay.indptr.shape[0]]
            blocks = lay.indices[int(ptr[q // b]): int(ptr[q // b + 1])].tolist()  # sorted, distinct
            return [k for kb in blocks for k in range(kb * b, min(kb * b + b, hi))]
        w, g, l, dilated = _unpack(self.head(head).params(head, None))
        keys = set(range(max(q - w + 1, 0), min(q + w, hi)))
        if g > 0:
            keys.update(range(hi if q < g else min(g, hi)))  # a global query attends every key
        if l > 0:
            keys.update(range(q % l, hi, l))
        for s, r, off in dilated:
            if q % r == off:
                start = q // s * s
                keys.update(range(start + (off - start) % r, min(start + s, hi), r))
        return sorted(keys)

    def _candidates(self, q: torch.Tensor, n: int, head: int, causal: bool) -> torch.Tensor:
        """Every key that a part gives queries q (m,), duplicates and all: (m, c) int64, ``n``
        where a slot holds none. c is the sum of the parts' sizes, never n itself (unless a part is
        that large)."""
        if q.numel() == 0:
            return torch.full((0, 1), n, dtype=torch.long)
        if self.layout is not None:
            cand = self._csr_candidates(q, n, head)
        else:
            w, g, l, dilated = _unpack(self.head(head).params(head, None))
            parts = [_window(q, min(w, n), causal)]
            if g > 0:
                parts.append(torch.arange(min(g, n)).expand(q.numel(), -1))
                if not causal and int(q.min()) < g:  # a global query attends every key
                    parts.append(torch.where(q[:, None] < g, torch.arange(n), n))
            if l > 0:
                parts.append(_strided(q, n, l))
            parts += [_dilated(q, n, s, r, off) for s, r, off in dilated]
            cand = torch.cat(parts, dim=1)
        keep = (cand >= 0) & (cand < n)
        if causal:
            keep &= cand <= q[:, None]
        return torch.where(keep, cand, n)

    def _csr_candidates(self, q: torch.Tensor, n: int, head: int) -> torch.Tensor:
        """Whole key blocks of each query's block row: (m, blocks * block) positions."""
        lay, b = self.layout, self.block
        rows = lay.num_blocks
        ptr = lay.indptr[head % lay.indptr.shape[0]]  # (rows + 1,) offsets into lay.indices
        qb = (q // b).clamp(max=rows - 1)
        lo, count = ptr[qb], ptr[qb + 1] - ptr[qb]
        count = torch.where(q // b < rows, count, 0)  # past the layout: nothing attended
        width = max(int(count.max()), 1)
        slot = torch.arange(width)
        blocks = lay.indices[(lo[:, None] + slot).clamp(max=max(lay.indices.numel() - 1, 0))]
        keys = blocks[:, :, None] * b + torch.arange(b)  # (m, width, b)
        keys = torch.where((slot < count[:, None])[:, :, None], keys, n)
        return keys.flatten(1)

    # ----------------------------------------------------------------------------- block level
    def key_blocks(self, q_block: int, n: int, head: int = 0, causal: bool = True, with_full: bool = False) -> list:
        """Key blocks the kernels visit for query block ``q_block`` (sorted; pairs with a full flag if asked)."""
        return self._blocks(q_block, n, head, causal, with_full, transposed=False)

    def query_blocks(self, k_block: int, n: int, head: int = 0, causal: bool = True, with_full: bool = False) -> list:
        """Query blocks whose key-block list contains ``k_block`` (the transposed layout)."""
        return self._blocks(k_block, n, head, causal, with_full, transposed=True)

    def _blocks(self, x_block: int, n: int, head: int, causal: bool, with_full: bool, transposed: bool) -> list:
        self.check_length(n, "key_blocks")
        nb = -(-n // self.block)
        if not 0 <= x_block < nb:
            raise ValueError(f"key_blocks: block {x_block} is outside [0, {nb}) for length {n}")
        if self.layout is not None:
            lay = self.layout
            ptr, idx = (lay.t_indptr, lay.t_indices) if transposed else (lay.indptr, lay.indices)
            visits = visit_csr(ptr, idx, head, n, self.block, x_block, causal, transposed)
        else:
            visits = visit(*_unpack(self.head(head).params(head, n)), n, self.block, x_block, causal, transposed)
        visits = sorted(visits)
        return visits if with_full else [b for b, _ in visits]

    def num_tiles(self, n: int, heads: int, causal: bool = True) -> tuple[int, int]:
        """(full tiles, masked tiles) the forward kernel computes over all heads (Python, slow for huge n)."""
        full = masked = 0
        nb = -(-n // self.block)
        for h in range(heads):
            for qb in range(nb):
                for _, is_full in self.key_blocks(qb, n, h, causal, with_full=True):
                    full += is_full
                    masked += not is_full
        return full, masked


def _allowed_parts(q: torch.Tensor, k: torch.Tensor, row: torch.Tensor, head: torch.Tensor | None,
                   has_global: bool, has_stride: bool, head_offsets: tuple[bool, ...]) -> torch.Tensor:
    """Union of the parts, element-wise, in plain tensor ops (traceable by torch.compile / Flex).

    ``row`` is a parameter-table row, or rows indexed by head (last axis = columns). Dilated slot d
    takes its offset from ``head % dilation`` when ``head`` is given and ``head_offsets[d]``.
    """
    def col(c):
        return row[..., c]

    diff = q - k
    w = col(0)
    ok = (diff < w) & (-diff < w)
    if has_global:
        g = col(1)
        ok = ok | (k < g) | (q < g)
    if has_stride:
        l = col(2)
        ls = l.clamp(min=1)
        ok = ok | ((l > 0) & (q % ls == k % ls))
    for d, from_head in enumerate(head_offsets):
        s, r = col(PARAMS_FIXED + 3 * d), col(PARAMS_FIXED + 3 * d + 1)
        off = col(PARAMS_FIXED + 3 * d + 2)
        if head is not None and from_head:
            off = head % r.clamp(min=1)
        ss, rs = s.clamp(min=1), r.clamp(min=1)
        ok = ok | ((s > 0) & (q // ss == k // ss) & (q % rs == off) & (k % rs == off))
    return ok


def _unpack(params: Sequence[int]) -> tuple[int, int, int, list[tuple[int, int, int]]]:
    """A parameter-table row -> (local, global, stride, used dilated parts as (segment, dilation, offset))."""
    w, g, l = params[:PARAMS_FIXED]
    rest = params[PARAMS_FIXED:]
    dils = [(rest[i], rest[i + 1], rest[i + 2]) for i in range(0, len(rest), 3) if rest[i] > 0]
    return w, g, l, dils


def _window(q: torch.Tensor, w: int, causal: bool) -> torch.Tensor:
    """|q - k| < w (w >= 1): (m, w) keys, or (m, 2w - 1) without causal masking."""
    return q[:, None] + torch.arange(-(w - 1), 1 if causal else w)


def _strided(q: torch.Tensor, n: int, l: int) -> torch.Tensor:
    """k % l == q % l: every l-th key from the query's residue on, (m, ceil(n / l))."""
    return (q % l)[:, None] + l * torch.arange(-(-n // l))


def _dilated(q: torch.Tensor, n: int, s: int, r: int, off: int) -> torch.Tensor:
    """One LongNet part: for queries with q % r == off, the keys of their segment with k % r ==
    off, (m, ceil(min(s, n) / r)); ``n`` (none) for the other queries and past the segment."""
    start = q // s * s
    first = start + (off - start) % r  # the segment's first key with k % r == off
    keys = first[:, None] + r * torch.arange(-(-min(s, n) // r))
    ok = (q % r == off)[:, None] & (keys < (start + s)[:, None])
    return torch.where(ok, keys, n)


def _sorted_unique(cand: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., c) keys with ``n`` as padding -> each row's distinct keys sorted, left-aligned and
    cut to the longest row: (idx with padding 0, valid)."""
    cand = cand.sort(dim=-1).values
    dup = torch.zeros_like(cand, dtype=torch.bool)
    dup[..., 1:] = cand[..., 1:] == cand[..., :-1]
    cand = cand.masked_fill(dup, n).sort(dim=-1).values
    valid = cand < n
    kmax = max(int(valid.sum(-1).max()) if valid.numel() else 0, 1)
    cand, valid = cand[..., :kmax], valid[..., :kmax]
    return cand.masked_fill(~valid, 0), valid


def check_attention_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: SparsePattern,
                  causal: bool, scale: float | None) -> float:
    """Validate before any work (one clear ValueError per problem); return the softmax scale."""
    if not isinstance(pattern, SparsePattern):
        raise ValueError("sparse_attention: pattern must be a SparsePattern (use SparsePattern.from_config), "
                         f"got {type(pattern).__name__}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"sparse_attention: {name} must be a 4-D tensor (batch, heads, seq, head_dim), "
                             f"got {tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if not (q.shape == k.shape == v.shape):
        raise ValueError(f"sparse_attention: q, k, v shapes differ: {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"sparse_attention: q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}; cast them to one")
    if not q.dtype.is_floating_point:
        raise ValueError(f"sparse_attention: q, k, v must be floating point, got {q.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"sparse_attention: q, k, v are on different devices: {q.device}, {k.device}, {v.device}")
    batch, heads, n, head_dim = q.shape
    if batch < 1 or heads < 1 or head_dim < 1:
        raise ValueError(f"sparse_attention: empty batch, heads or head_dim in shape {tuple(q.shape)}")
    pattern.check_length(n, "sparse_attention")
    pattern.check_heads(heads, "sparse_attention")
    if not isinstance(causal, bool):
        raise ValueError(f"sparse_attention: causal must be True or False, got {causal!r}")
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"sparse_attention: scale must be a positive finite number, got {scale!r}")
    return float(scale)
