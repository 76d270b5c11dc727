"""Block-gathered sparse attention in plain PyTorch: the pattern's cost off the GPU.

The dense reference (``reference_attention``) builds an (n, n) mask and costs as much as dense
attention. This path visits only the pattern's key blocks: per query block a padded row of key-block
indices (the tiles the pattern touches, found from the pattern's integers with tensor ops, never
from an n x n object), K and V gathered block by block, scores against the query block, the
element-wise predicate on the tiles that are not entirely attended, softmax in fp32 (fp64 stays
fp64). Cost and memory are linear in n for a fixed pattern.

The tiles hold every attended pair; where a tile-level test is conservative they may differ from
the Triton walk's (``tile_walk.visit``), and the element-wise mask makes the result exact either
way. A periodic pattern has few distinct tile masks, so the plan keeps those once and a chunk
gathers them instead of evaluating the predicate (a few dozen full-size tensor ops). Rows are
processed in chunks of (batch x heads slice, query blocks, key-block columns) sized by a byte budget,
so the transient memory is bounded whatever the batch or the length. Autograd saves only q, k, v,
the output and the log-sum-exp, and recomputes each chunk in backward as FlashAttention does
(dK / dV are scattered with ``index_add_``); a gather under plain autograd would save every gathered
K / V block, i.e. visits x n x d per call.

Causal patterns made only of local, global and dilated parts take ``part_attention.py`` instead
(dense tiles per part, dilated parts in residue order, merged by log-sum-exp): a dilated tile here
computes r^2 times the pairs it attends, there about one (3-4x faster fwd+bwd on long_cpu's pattern).

Public: ``gathered_attention`` (the call), ``GatheredAttentionFunction`` (its autograd.Function),
``gather_plan`` (the cached block tables, for tests and the benchmark).
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from . import part_attention
from ..pattern import SparsePattern, check_attention_inputs
from ..pattern.parts import unpack_params

log = logging.getLogger(__name__)

# Transient bytes one chunk may hold (gathered K/V, scores, probabilities, gradients, masks).
DEFAULT_BUDGET = 64 << 20
PLAN_CACHE_SIZE = 16  # (pattern, n, heads, causal, device) plans kept
TABLE_CACHE_SIZE = 8  # chunk layouts kept per plan (one per chunk size in use)
MASK_CACHE_BYTES = 16 << 20  # distinct tile masks kept per plan; beyond, masks are computed per chunk


# ================================================================================================
# The plan: per distinct head, the touched key blocks of every query block (flat, CSR order,
# entirely attended tiles first), and chunk tables padded with -1 built from it.
# ================================================================================================

@dataclass
class _HeadBlocks:
    """One head's tiles, sorted by query block, entirely attended ones first within a row."""

    ptr: torch.Tensor  # int64 (nb + 1,)
    blocks: torch.Tensor  # int64 (tiles,)
    full: torch.Tensor  # bool (tiles,)
    nfull: torch.Tensor  # int64 (nb,)
    mask_id: torch.Tensor | None = None  # int64 (tiles,): row of GatherPlan.bad_masks (0 for full tiles)


@dataclass
class Chunk:
    """Query blocks [r0, r1) and their key-block table (heads or 1, r1 - r0, width), -1 = none.
    Columns [0, nf) hold entirely attended tiles (no element mask), the rest partly attended ones,
    whose masks are rows ``mask_ids`` (same shape; 0 = padding) of the plan's ``bad_masks``."""

    r0: int
    r1: int
    table: torch.Tensor
    nf: int
    mask_ids: torch.Tensor | None


@dataclass
class GatherPlan:
    """Block tables of one (pattern, n, heads, causal, device); O(tiles) integers, never O(n^2)."""

    n: int
    block: int
    heads: int
    head_of: torch.Tensor  # int64 (heads,): index into ``per_head`` for each head
    per_head: list  # distinct _HeadBlocks
    counts: list  # per query block, the widest row over the distinct heads (Python ints)
    device: torch.device
    # Distinct element masks of the partly attended tiles, negated (True = not attended), row 0 all
    # True (padding); None where there are too many distinct ones (computed per chunk instead).
    bad_masks: torch.Tensor | None = None
    _chunks: OrderedDict = field(default_factory=OrderedDict, repr=False)

    @property
    def num_blocks(self) -> int:
        return -(-self.n // self.block)

    @property
    def tiles(self) -> int:
        """Tiles computed per batch element, over all heads (padding excluded)."""
        return sum(int(self.per_head[u].blocks.numel()) for u in self.head_of.tolist())

    @property
    def shared_table(self) -> bool:
        return len(self.per_head) == 1

    def index_bytes(self) -> int:
        """Bytes the plan holds: block lists, mask ids, distinct masks, every cached chunk table."""
        held = [t for hb in self.per_head for t in (hb.ptr, hb.blocks, hb.full, hb.nfull, hb.mask_id)]
        held += [t for chunks in self._chunks.values() for c in chunks for t in (c.table, c.mask_ids)]
        held.append(self.bad_masks)
        return sum(t.numel() * t.element_size() for t in held if t is not None)

    def chunks(self, tiles_per_chunk: int) -> list:
        """Consecutive query blocks grouped greedily so that rows x width <= ``tiles_per_chunk``
        (a single wider row stands alone; its columns are split at run time)."""
        if tiles_per_chunk in self._chunks:
            self._chunks.move_to_end(tiles_per_chunk)
            return self._chunks[tiles_per_chunk]
        bounds, r0, width = [], 0, 0
        for r, c in enumerate(self.counts):
            if r > r0 and (r - r0 + 1) * max(width, c) > tiles_per_chunk:
                bounds.append((r0, r))
                r0, width = r, 0
            width = max(width, c)
        bounds.append((r0, len(self.counts)))
        chunks = [self._chunk(a, b) for a, b in bounds]
        self._chunks[tiles_per_chunk] = chunks
        if len(self._chunks) > TABLE_CACHE_SIZE:
            self._chunks.popitem(last=False)
        return chunks

    def _chunk(self, r0: int, r1: int) -> Chunk:
        nf = max(int(hb.nfull[r0:r1].max()) for hb in self.per_head)
        nm = max(int((hb.ptr[r0 + 1:r1 + 1] - hb.ptr[r0:r1] - hb.nfull[r0:r1]).max()) for hb in self.per_head)
        tables, ids = [], []
        for hb in self.per_head:
            table = torch.full((r1 - r0, nf + nm), -1, dtype=torch.int64)
            a, b = int(hb.ptr[r0]), int(hb.ptr[r1])
            rows = torch.repeat_interleave(torch.arange(r0, r1), hb.ptr[r0 + 1:r1 + 1] - hb.ptr[r0:r1])
            col = torch.arange(a, b) - hb.ptr[rows]
            col = torch.where(hb.full[a:b], col, nf + col - hb.nfull[rows])
            table[rows - r0, col] = hb.blocks[a:b]
            tables.append(table)
            if self.bad_masks is not None:
                mask_ids = torch.zeros((r1 - r0, nf + nm), dtype=torch.int64)
                mask_ids[rows - r0, col] = hb.mask_id[a:b]
                ids.append(mask_ids[:, nf:])

        def per_head(ts):
            return (torch.stack(ts)[self.head_of] if not self.shared_table else ts[0][None]).to(self.device)

        return Chunk(r0, r1, per_head(tables), nf, per_head(ids) if ids else None)


_PLANS: OrderedDict = OrderedDict()


def gather_plan(pattern: SparsePattern, n: int, heads: int, causal: bool = True,
                device: torch.device | str = "cpu") -> GatherPlan:
    """The block tables for this call shape, from a small LRU (the model calls with a few shapes)."""
    key = (pattern, n, heads, causal, str(device))
    if key in _PLANS:
        _PLANS.move_to_end(key)
        return _PLANS[key]
    pattern.check_length(n, "gather_plan")
    pattern.check_heads(heads, "gather_plan")
    nb = -(-n // pattern.block)
    rows_of, per_head, head_of = {}, [], []
    for h in range(heads):
        if pattern.is_csr:
            ident = ("csr", h % pattern.layout.indptr.shape[0])
        else:
            ident = tuple(pattern.head(h).params(h, n))
        if ident not in rows_of:
            rows, blocks = (_csr_candidates(pattern, ident[1], n, causal) if pattern.is_csr
                            else _part_candidates(ident, n, pattern.block, causal))
            rows_of[ident] = len(per_head)
            per_head.append(_head_blocks(rows, blocks, ident, n, pattern, causal))
        head_of.append(rows_of[ident])
    counts = torch.stack([hb.ptr[1:] - hb.ptr[:-1] for hb in per_head]).amax(0).tolist()
    first_head = {u: head_of.index(u) for u in range(len(per_head))}
    bad_masks = _distinct_masks(pattern, per_head, first_head, n, causal)
    plan = GatherPlan(n, pattern.block, heads, torch.tensor(head_of), per_head, counts, torch.device(device),
                      None if bad_masks is None else bad_masks.to(device))
    log.debug("gather plan: n=%d heads=%d blocks=%d distinct heads=%d tiles/batch=%d", n, heads, nb,
              len(per_head), plan.tiles)
    _PLANS[key] = plan
    if len(_PLANS) > PLAN_CACHE_SIZE:
        _PLANS.popitem(last=False)
    return plan


def _ranges(lo: torch.Tensor, hi: torch.Tensor, step: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat (row, value) for value in lo[row], lo[row] + step, ... <= hi[row]; empty where hi < lo."""
    count = ((hi - lo).div(step, rounding_mode="floor") + 1).clamp(min=0)
    rows = torch.repeat_interleave(torch.arange(lo.numel()), count)
    start = count.cumsum(0) - count
    return rows, lo[rows] + (torch.arange(rows.numel()) - start[rows]) * step


def _first_residue(a: torch.Tensor, r: int, off: int) -> torch.Tensor:
    """Smallest p >= a with p % r == off (tensor twin of tile_walk._first_residue)."""
    return a + (off - a % r) % r


def _part_candidates(params: tuple, n: int, B: int, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(query block, key block) pairs, possibly repeated, covering every attended pair of one head;
    the same block ranges as tile_walk's candidate lists, all query blocks at once."""
    w, g, l, dils = unpack_params(params)
    nb = -(-n // B)
    qb = torch.arange(nb)
    x0, xl = qb * B, torch.clamp(qb * B + B, max=n) - 1
    last = n - 1
    parts = [_ranges(torch.clamp(x0 - w + 1, min=0) // B, (xl if causal else torch.clamp(xl + w - 1, max=last)) // B)]
    if g > 0:
        hi = torch.clamp(xl, max=g - 1) if causal else torch.where(x0 < g, last, g - 1)
        parts.append(_ranges(torch.zeros_like(qb), hi // B))
    if l >= B:  # every shift tau * l lands the query block on at most two key blocks
        t_lo = torch.zeros_like(qb) if causal else -((last - x0) // l)
        rows, tau = _ranges(t_lo, xl // l)
        a, b = x0[rows] - tau * l, xl[rows] - tau * l
        keep = (b >= 0) & (a <= last)
        rows, a, b = rows[keep], a[keep], b[keep]
        parts += [(rows, a.clamp(min=0) // B), (rows, b.clamp(max=last) // B)]
    elif l > 0:  # a stride below the block touches every tile of the causal (or full) range
        parts.append(_ranges(torch.zeros_like(qb), qb if causal else torch.full_like(qb, nb - 1)))
    for s, r, off in dils:
        first = _first_residue(x0, r, off)
        has = first <= xl
        final = first + torch.clamp(xl - first, min=0) // r * r  # last query position of the residue
        pos_lo = first // s * s
        pos_hi = torch.clamp((final // s + 1) * s, max=n) - 1
        if causal:
            pos_hi = torch.minimum(pos_hi, final)
        pos_hi = torch.where(has, pos_hi, pos_lo - 1)
        if r >= B:  # keys of the residue are r >= B apart: one block each
            rows, p = _ranges(_first_residue(pos_lo, r, off), pos_hi, r)
            parts.append((rows, p // B))
        else:
            parts.append(_ranges(pos_lo // B, torch.where(has, pos_hi // B, pos_lo // B - 1)))
    rows = torch.cat([p[0] for p in parts])
    blocks = torch.cat([p[1] for p in parts])
    return rows, blocks


def _csr_candidates(pattern: SparsePattern, h: int, n: int, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    ptr = pattern.layout.indptr[h]
    blocks = pattern.layout.indices[int(ptr[0]): int(ptr[-1])]
    rows = torch.repeat_interleave(torch.arange(ptr.numel() - 1), ptr[1:] - ptr[:-1])
    return rows, blocks


def _head_blocks(rows: torch.Tensor, blocks: torch.Tensor, ident, n: int, pattern: SparsePattern,
                 causal: bool) -> _HeadBlocks:
    """Deduplicate, drop tiles above the diagonal, flag the entirely attended tiles, sort them first."""
    B = pattern.block
    nb = -(-n // B)
    keep = (blocks >= 0) & (blocks < nb) & ((blocks <= rows) if causal else True)
    key = torch.unique(rows[keep] * nb + blocks[keep])
    rows, blocks = key // nb, key % nb
    q0, k0 = rows * B, blocks * B
    ql, kl = torch.clamp(q0 + B, max=n) - 1, torch.clamp(k0 + B, max=n) - 1
    complete = (ql - q0 == B - 1) & (kl - k0 == B - 1)
    below = (kl < q0) if causal else torch.ones_like(complete)
    if pattern.is_csr:  # a layout attends whole tiles
        full = complete & below
    else:
        w, g, _, dils = unpack_params(list(ident))
        if causal:
            full = below & (ql - k0 < w)
            full |= below & (kl < g)
        else:
            full = (ql - k0 < w) & (kl - q0 < w)
            full |= (kl < g) | (ql < g)
        for s, r, _ in dils:
            if r == 1:
                seg = q0 // s
                full |= below & (ql // s == seg) & (k0 // s == seg) & (kl // s == seg)
        full &= complete
    order = torch.argsort(rows * (2 * nb) + (~full) * nb + blocks)
    rows, blocks, full = rows[order], blocks[order], full[order]
    counts = torch.bincount(rows, minlength=nb)
    ptr = torch.zeros(nb + 1, dtype=torch.int64)
    ptr[1:] = counts.cumsum(0)
    return _HeadBlocks(ptr, blocks, full, torch.bincount(rows[full], minlength=nb))


def _tile_masks(pattern: SparsePattern, rows: torch.Tensor, blocks: torch.Tensor, head: int | torch.Tensor,
                n: int, causal: bool) -> torch.Tensor:
    """Element-wise predicate of tiles (query block rows[t], key block blocks[t]): bool (T, B, B);
    ``head`` an int or a (T,) tensor. Keys past n are never attended."""
    B = pattern.block
    offs = torch.arange(B, dtype=torch.int32)
    qpos = (rows.to(torch.int32) * B)[:, None, None] + offs[:, None]
    kpos = (blocks.to(torch.int32) * B)[:, None, None] + offs[None, :]
    if pattern.is_csr:  # a layout attends whole tiles: bounds and causality only
        ok = (kpos < n) & (kpos <= qpos) if causal else (kpos < n).expand(-1, B, -1)
    else:
        head = head if isinstance(head, int) else head.view(-1, 1, 1)
        ok = pattern.allowed(qpos, kpos, head=head, causal=causal) & (kpos < n)
    return ok


def _distinct_masks(pattern: SparsePattern, per_head: list, first_head: dict, n: int, causal: bool,
                    limit_bytes: int = MASK_CACHE_BYTES) -> torch.Tensor | None:
    """The negated masks of all partly attended tiles, one per distinct mask; sets each head's
    ``mask_id``.

    A periodic pattern has few distinct tile masks (a diagonal tile, a dilated tile per residue
    phase, segment and sequence ends), so one gather per chunk replaces the element-wise predicate
    (a few dozen full-size tensor ops). Tiles are grouped by a signature that determines their mask
    (``_tile_signature``), and the predicate runs once per group. Returns None, and the masks are
    computed per chunk, when the distinct masks would exceed ``limit_bytes``."""
    B = pattern.block
    masks, total = [torch.zeros(1, B, B, dtype=torch.bool)], 1  # row 0: padding, nothing attended
    for u, hb in enumerate(per_head):
        rows = torch.repeat_interleave(torch.arange(hb.ptr.numel() - 1), hb.ptr[1:] - hb.ptr[:-1])
        part = (~hb.full).nonzero()[:, 0]
        mask_id = torch.zeros(hb.blocks.numel(), dtype=torch.int64)
        if part.numel():
            sig = _tile_signature(pattern, first_head[u], rows[part], hb.blocks[part], n)
            uniq, inverse = torch.unique(sig, dim=0, return_inverse=True)
            if (total + uniq.shape[0]) * B * B > limit_bytes:
                log.debug("gather plan: %d distinct tile masks; computed per chunk instead", total + uniq.shape[0])
                return None
            first = torch.full((uniq.shape[0],), part.numel()).scatter_reduce_(
                0, inverse, torch.arange(part.numel()), "amin")
            rep = part[first]
            masks.append(_tile_masks(pattern, rows[rep], hb.blocks[rep], first_head[u], n, causal))
            mask_id[part] = total + inverse
            total += uniq.shape[0]
        hb.mask_id = mask_id
    return ~torch.cat(masks)


def _tile_signature(pattern: SparsePattern, head: int, rows: torch.Tensor, blocks: torch.Tensor,
                    n: int) -> torch.Tensor:
    """Integers (T, columns) such that tiles with equal rows have equal element masks.

    With a = 0..B-1, b = 0..B-1 the offsets inside the tile and D = q0 - k0: the local window and
    causality see D + a - b only through D clipped to +-(w + B); the stride sees D mod l; global
    tokens see g - k0 and g - q0 clipped to [0, B]; the sequence end n - k0 clipped to [0, B]; a
    dilated part sees the residues q0 mod r, k0 mod r, where the first segment boundary falls inside
    each block (s - q0 mod s, clipped to B = none) and the segment difference clipped to what the
    boundaries inside one block can make up (+-(B // s + 2))."""
    B = pattern.block
    q0, k0 = rows * B, blocks * B
    d = q0 - k0
    cols = [torch.clamp(n - k0, 0, B)]
    if pattern.is_csr:
        return torch.stack(cols + [torch.clamp(d, -B, B)], 1)
    w, g, l, dils = unpack_params(pattern.head(head).params(head, n))
    reach = max(w, 1) + B
    cols.append(torch.clamp(d, -reach, reach))
    if g > 0:
        cols += [torch.clamp(g - k0, 0, B), torch.clamp(g - q0, 0, B)]
    if l > 0:
        cols.append(d % l)
    for s, r, _ in dils:
        span = B // s + 2
        cols += [q0 % r, k0 % r, torch.clamp(s - q0 % s, max=B), torch.clamp(s - k0 % s, max=B),
                 torch.clamp(q0 // s - k0 // s, -span, span)]
    return torch.stack(cols, 1)


# ================================================================================================
# The tile math on one chunk: (slice of batch x heads, query blocks, key-block columns).
# ================================================================================================

class _Blocks:
    """q (pre-scaled), k, v (and dO) in compute precision as (batch * heads, blocks, block, d)."""

    def __init__(self, pattern, q, k, v, causal, scale, budget):
        self.pattern, self.causal, self.scale = pattern, causal, scale
        batch, heads, n, d = q.shape
        self.bh, self.heads, self.n, self.d, self.B = batch * heads, heads, n, d, pattern.block
        self.nb = -(-n // self.B)
        self.compute = torch.promote_types(q.dtype, torch.float32)  # fp16/bf16 in fp32, fp64 stays
        self.q = self.blocked(q, scale)
        self.k, self.v = self.blocked(k), self.blocked(v)
        self.plan = gather_plan(pattern, n, heads, causal, q.device)
        self.slices, self.tiles = self._sizes(budget)
        self.head_invariant_mask = pattern.is_csr or pattern.head_invariant

    def blocked(self, t: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        t = t.to(self.compute)
        if scale != 1.0:
            t = t * scale
        pad = self.nb * self.B - self.n
        if pad:
            t = torch.nn.functional.pad(t, (0, 0, 0, pad))
        return t.reshape(self.bh, self.nb, self.B, self.d)

    def _sizes(self, budget: int) -> tuple[int, int]:
        """(batch x heads rows per slice, tiles per chunk of a slice) that keep a chunk within budget."""
        B, d, es = self.B, self.d, self.compute.itemsize
        # K, V, dK, dV, S, P, dS, and a bool mask (gathered and transposed; int32 positions where the
        # masks are not cached, which the factor 2 on B * B leaves room for only roughly)
        tile_bytes = B * (4 * d + 3 * B) * es + 2 * B * B
        tiles = max(1, budget // tile_bytes)
        per_bh = max(1, max(self.plan.counts) * len(self.plan.counts))
        slices = max(1, min(self.bh, tiles // per_bh))
        return slices, max(1, tiles // slices)

    def pieces(self):
        """(rows of batch x heads, query blocks, key-block columns, masks) covering every tile once.

        Slices of batch x heads are the innermost loop so that a mask that is the same for every
        head is computed once per chunk, not once per slice (the model runs thousands of rows)."""
        shared = self.plan.shared_table and self.head_invariant_mask
        for chunk in self.plan.chunks(self.tiles):
            width = chunk.table.shape[-1]
            step = max(1, self.tiles // (chunk.r1 - chunk.r0))
            for c0 in range(0, width, step):
                c1 = min(c0 + step, width)
                masks = self._masks(chunk, c0, c1, None) if shared else None
                for s0 in range(0, self.bh, self.slices):
                    s1 = min(s0 + self.slices, self.bh)
                    yield Piece(s0, s1, chunk, c0, c1, masks)

    def scores(self, piece: "Piece"):
        """Masked scores (S, R, B, cols * B) of a piece, with its q, gathered K and V, flat block ids."""
        s0, s1, chunk, c0, c1 = piece.s0, piece.s1, piece.chunk, piece.c0, piece.c1
        S, B = s1 - s0, self.B
        heads = torch.arange(s0, s1, device=self.q.device) % self.heads
        idx = chunk.table[:, :, c0:c1] if chunk.table.shape[0] == 1 else chunk.table[heads, :, c0:c1]
        idc = idx.clamp(min=0)
        if idx.shape[0] == 1:
            kg, vg = self.k[s0:s1][:, idc[0]], self.v[s0:s1][:, idc[0]]
        else:
            sel = torch.arange(S, device=idx.device)[:, None, None]
            kg, vg = self.k[s0:s1][sel, idc], self.v[s0:s1][sel, idc]
        R, V = idc.shape[1], idc.shape[2]
        kg, vg = kg.reshape(S, R, V * B, self.d), vg.reshape(S, R, V * B, self.d)
        qc = self.q[s0:s1, chunk.r0:chunk.r1]
        scores = qc @ kg.transpose(-1, -2)
        bad_full, bad_masked = piece.masks or self._masks(chunk, c0, c1, heads)
        nf = max(0, min(chunk.nf, c1) - c0)
        if bad_full is not None:
            scores[..., :nf * B].masked_fill_(bad_full, float("-inf"))
        if bad_masked is not None:
            scores[..., nf * B:].masked_fill_(bad_masked, float("-inf"))
        flat = (torch.arange(s0, s1, device=idc.device)[:, None, None] * self.nb + idc).reshape(-1)
        return scores, qc, kg, vg, flat

    def _masks(self, chunk: Chunk, c0: int, c1: int, heads: torch.Tensor | None):
        """Where scores must be -inf: padding columns among the entirely attended tiles (1 or S, R, 1,
        cols * B), and the negated element-wise predicate on the others (1 or S, R, B, cols * B).
        ``heads`` None: one mask for every head. Query rows past n are left unmasked: their dO is 0,
        so they add nothing to any gradient, and their outputs are dropped."""
        B = self.B
        table = chunk.table if heads is None or chunk.table.shape[0] == 1 else chunk.table[heads]
        idx = table[:, :, c0:c1]
        R = idx.shape[1]
        nf = max(0, min(chunk.nf, c1) - c0)  # columns of entirely attended tiles in this piece
        offs = torch.arange(B, dtype=torch.int32, device=idx.device)
        bad_full = bad_masked = None
        if nf:
            bad_full = (idx[:, :, None, :nf, None] < 0).expand(-1, -1, 1, -1, B).reshape(idx.shape[0], R, 1, nf * B)
        if nf < idx.shape[2] and chunk.mask_ids is not None:
            ids = chunk.mask_ids if heads is None or chunk.mask_ids.shape[0] == 1 else chunk.mask_ids[heads]
            ids = ids[:, :, max(c0, chunk.nf) - chunk.nf: c1 - chunk.nf]
            bad_masked = self.plan.bad_masks[ids].transpose(2, 3).reshape(ids.shape[0], R, B, -1)
        elif nf < idx.shape[2]:
            rest = idx[:, :, nf:]
            qpos = ((chunk.r0 + torch.arange(R, dtype=torch.int32, device=idx.device)) * B)[:, None, None] \
                + offs[:, None]  # (R, B, 1)
            kpos = (rest[..., None].to(torch.int32) * B + offs).reshape(rest.shape[0], R, 1, -1)
            kval = ((rest >= 0)[..., None] & (kpos.view(*rest.shape, B) < self.n)).reshape(kpos.shape)
            if self.pattern.is_csr:  # a layout attends whole tiles: bounds and causality only
                ok = (kpos <= qpos) & kval if self.causal else kval.expand(-1, -1, B, -1)
            elif heads is None or self.head_invariant_mask:
                ok = self.pattern.allowed(qpos, kpos, head=0, causal=self.causal) & kval
            else:
                ok = self.pattern.allowed(qpos, kpos, head=heads.view(-1, 1, 1, 1), causal=self.causal) & kval
            bad_masked = ~ok
        return bad_full, bad_masked


@dataclass
class Piece:
    """Rows [s0, s1) of batch x heads, one chunk of query blocks, its table columns [c0, c1)."""

    s0: int
    s1: int
    chunk: Chunk
    c0: int
    c1: int
    masks: tuple | None  # precomputed for every head, or None: computed per piece


class GatheredAttentionFunction(torch.autograd.Function):
    """Forward and backward over gathered key blocks; saves q, k, v, the output and the log-sum-exp."""

    @staticmethod
    def forward(ctx, q, k, v, pattern: SparsePattern, causal: bool, scale: float, budget: int):
        blk = _Blocks(pattern, q, k, v, causal, scale, budget)
        acc = torch.zeros_like(blk.q)
        m_run = torch.full(blk.q.shape[:-1], float("-inf"), dtype=blk.compute, device=q.device)
        l_run = torch.zeros_like(m_run)
        for piece in blk.pieces():
            scores, _, _, vg, _ = blk.scores(piece)
            rows = (slice(piece.s0, piece.s1), slice(piece.chunk.r0, piece.chunk.r1))
            m = scores.amax(-1)
            if piece.c0:  # a later column piece of the same rows: online softmax, as in the kernels
                m = torch.maximum(m, m_run[rows])
            m_use = torch.where(m == float("-inf"), 0.0, m)  # nothing attended yet: no inf - inf
            p = torch.exp_(scores.sub_(m_use[..., None]))
            if piece.c0:
                alpha = torch.exp(m_run[rows] - m_use)
                l_run[rows] = l_run[rows] * alpha + p.sum(-1)
                acc[rows] = acc[rows] * alpha[..., None] + p @ vg
            else:
                l_run[rows] = p.sum(-1)
                acc[rows] = p @ vg
            m_run[rows] = m
        # Rows that attend nothing (only padding past n: the diagonal is always attended) get a zero
        # output and lse = 0, so that backward's exp(s - lse) is 0 there, as in the kernels.
        l_safe = torch.where(l_run == 0, 1.0, l_run)
        lse = torch.where(m_run == float("-inf"), 0.0, m_run) + torch.log(l_safe)
        out = _unblock(acc / l_safe[..., None], q.shape).to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.pattern, ctx.causal, ctx.scale, ctx.budget = pattern, causal, scale, budget
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, out, lse = ctx.saved_tensors
        blk = _Blocks(ctx.pattern, q, k, v, ctx.causal, ctx.scale, ctx.budget)
        dob = blk.blocked(do)
        delta = (dob * blk.blocked(out)).sum(-1)
        # fresh contiguous buffers: the blocked views keep the inputs' strides, which a model's
        # (b, n, h, d) -> (b, h, n, d) transpose makes non-contiguous
        dq = torch.zeros(blk.q.shape, dtype=blk.q.dtype, device=blk.q.device)
        dk = torch.zeros(blk.k.shape, dtype=blk.k.dtype, device=blk.k.device).view(-1, blk.B, blk.d)
        dv = torch.zeros(blk.v.shape, dtype=blk.v.dtype, device=blk.v.device).view(-1, blk.B, blk.d)
        for piece in blk.pieces():
            scores, qc, kg, vg, flat = blk.scores(piece)
            rows = (slice(piece.s0, piece.s1), slice(piece.chunk.r0, piece.chunk.r1))
            p = torch.exp_(scores.sub_(lse[rows][..., None]))
            doc = dob[rows]
            dv.index_add_(0, flat, (p.transpose(-1, -2) @ doc).view(-1, blk.B, blk.d))
            ds = p.mul_((doc @ vg.transpose(-1, -2)).sub_(delta[rows][..., None]))
            dq[rows] += ds @ kg
            dk.index_add_(0, flat, (ds.transpose(-1, -2) @ qc).view(-1, blk.B, blk.d))
        shape = q.shape
        dq = _unblock(dq, shape) * ctx.scale
        dk = _unblock(dk.view_as(blk.k), shape)
        dv = _unblock(dv.view_as(blk.v), shape)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


def _unblock(t: torch.Tensor, shape) -> torch.Tensor:
    batch, heads, n, d = shape
    return t.reshape(batch, heads, -1, d)[:, :, :n]


def gathered_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: SparsePattern,
                       causal: bool = True, scale: float | None = None, *, budget: int = DEFAULT_BUDGET,
                       fast: bool = True) -> torch.Tensor:
    """Softmax attention over the pattern's attended set on any device and dtype, with cost and
    memory linear in n; q, k, v (batch, heads, seq, head_dim). ``budget``: transient bytes per chunk.

    Causal patterns made of local, global and dilated parts run ``part_attention`` (dense tiles per
    part, dilated parts in residue order, merged by log-sum-exp), which skips the unattended 1 - 1/r
    of each dilated tile; ``fast=False`` forces the block-gathered tiles (the benchmark's baseline)."""
    scale = check_attention_inputs(q, k, v, pattern, causal, scale)
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ValueError(f"gathered_attention: budget must be a positive number of bytes, got {budget!r}")
    if fast and part_attention.applies(pattern, q, causal, budget):
        return part_attention.part_attention(q, k, v, pattern, scale, budget)
    return GatheredAttentionFunction.apply(q, k, v, pattern, causal, scale, budget)
