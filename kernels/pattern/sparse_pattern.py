"""Sparse attention patterns: which keys each query attends to, per head, in O(1) metadata.

A :class:`SparsePattern` describes the attended set of every head as the UNION of a few parts, each
defined by a handful of integers, so the layout of a sequence of any length is computed on the fly
(inside the Triton kernels, by :meth:`SparsePattern.allowed`, or by :meth:`SparsePattern.key_blocks`)
and never stored. Positions are 0-based absolute indices in the sequence; ``i`` is a query, ``j`` a
key.

The config keys and the rules: ``parts.py``. The other faces of the pattern are mixins: the
element-level mask (``masks.py``) and the key lists of decode and prefill (``keys.py``).

Block level: ``key_blocks`` (and ``query_blocks``, the transposed layout) list the tiles the kernels
compute, from the plain-Python twin of their tile walk in ``tile_walk.py``: the forward and dQ kernels
walk exactly the tiles ``key_blocks`` lists, the dK/dV kernel those ``query_blocks`` lists, each
once, entirely attended tiles in a first unmasked pass and the others in a second pass with the
element-wise predicate.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import torch

from .keys import KeyLists
from .masks import ElementMask
from .parts import (BLOCK_SIZES, DEFAULT_BLOCK, MAX_POSITIONS, PARAMS_FIXED, BlockLayout, Dilated, HeadPattern,
                    _parse_head, unpack_params)
from .tile_walk import visit, visit_csr


class SparsePattern(ElementMask, KeyLists):
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
            visits = visit(*unpack_params(self.head(head).params(head, n)), n, self.block, x_block, causal, transposed)
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
