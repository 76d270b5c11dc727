"""Part-wise sparse attention on the CPU: local band + sink tokens + dilated parts, merged exactly.

The block-gathered path (``gathered_attention.py``) computes every 64 x 64 tile that holds an
attended pair. For a LongNet part with dilation r only 1 / r of a dilated tile's keys and 1 / r of
its queries attend, so a dilated segment costs r^2 times its attended work there. This path splits
the attended set of a causal query i (the UNION of the parts) into DISJOINT key sets and computes
each as dense tiles:

* local band: keys (i - w, i], tiles of B queries against the B + w - 1 (rounded up to blocks)
  keys before them, one band mask shared by every tile;
* sinks: keys j < g with j <= i - w (those not already in the band), one small dense part;
* dilated part p (segment s, dilation r, offset o): the queries i = o (mod r) and the keys of
  their segment with the same residue, i.e. dense causal attention over a sequence reordered by
  residue (LongNet, Ding et al. 2023, sec. 2.2), minus the keys in the band (i - j < w), the sinks
  and the earlier dilated parts, so a key attended by two parts is counted once.

Each part yields (output, log-sum-exp) per query and parts are merged with the log-sum-exp merge
of blockwise softmax (Milakov & Gimelshein 2018; FlashAttention, Dao et al. 2022): with disjoint
key sets, softmax over the union = weights exp(lse_p - lse) on the part outputs. Backward is the
FlashAttention backward per tile with the final lse and delta = rowsum(dO * O): it needs no merge,
recomputes every tile, and saves only q, k, v, the output and the lse. Tiles are grouped in chunks
sized by a byte budget, so the transient memory is bounded and the total is linear in n.

Accepted (``applies``): causal, parts local / global tokens / dilated with segment % dilation == 0
(or a segment covering the sequence), every head with the same local, global and (segment,
dilation) lists (offsets may differ per head, as LongNet's default does). Anything else runs the
block-gathered path.

Public: ``applies`` (whether this path handles a call), ``part_attention`` (the call),
``PartAttentionFunction`` (its autograd.Function).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..pattern import SparsePattern
from ..pattern.parts import unpack_params

BAND_BLOCK = 64  # queries per local-band tile; the band's key width is this plus the window


@dataclass(frozen=True)
class _Layout:
    """The integers of one accepted (pattern, n, heads): shared local and global, per dilated part
    (segment clipped to the sequence, dilation, per-head offsets)."""

    n: int
    heads: int
    w: int
    g: int
    dilated: tuple  # ((segment, dilation, (offset per head, ...)), ...)


def _layout(pattern: SparsePattern, n: int, heads: int, causal: bool) -> _Layout | None:
    """The layout if this path handles the call, else None (the gathered path runs)."""
    if not causal or pattern.is_csr:
        return None
    rows = [unpack_params(pattern.head(h).params(h)) for h in range(heads)]
    w, g, l, dils = rows[0]
    if l > 0 or any((r[0], r[1], r[2], [d[:2] for d in r[3]]) != (w, g, l, [d[:2] for d in dils]) for r in rows):
        return None
    parts = []
    for p, (s, r, _) in enumerate(dils):
        if s >= n:  # one segment: any length >= n with s % r == 0 attends the same set
            s = -(-n // r) * r
        if s % r:
            return None
        parts.append((s, r, tuple(row[3][p][2] for row in rows)))
    return _Layout(n, heads, min(max(w, 1), n), min(g, n), tuple(parts))


def applies(pattern: SparsePattern, q: torch.Tensor, causal: bool, budget: int) -> bool:
    """True when ``part_attention`` handles this call (see the module docstring) and one row of its
    widest tile fits in ``budget`` (a wider one would need key splitting, which the gathered path has)."""
    batch, heads, n, d = q.shape
    lay = _layout(pattern, n, heads, causal)
    if lay is None:
        return False
    widest = max([_band_width(lay.w), lay.g] + [s // r for s, r, _ in lay.dilated])
    return _row_bytes(batch, heads, d, BAND_BLOCK, widest, torch.promote_types(q.dtype, torch.float32)) <= budget


def _band_width(w: int) -> int:
    """Keys of a band tile: the query block and the whole blocks that hold the w - 1 keys before it."""
    return (-(-(w - 1) // BAND_BLOCK) + 1) * BAND_BLOCK


def _row_bytes(batch: int, heads: int, d: int, tq: int, tk: int, dtype: torch.dtype) -> int:
    """Transient bytes of one tile row: scores, probabilities and dS (tq x tk), gathered K, V and
    their gradients (tk x d), q, dO, dQ and the output (tq x d), and the bool mask."""
    return batch * heads * (3 * tq * tk + 4 * tk * d + 4 * tq * d) * dtype.itemsize + heads * tq * tk


# ================================================================================================
# Tiles: query positions (1 or heads, rows, Tq), key positions (1 or heads, rows or 1, Tk), and
# where scores are -inf. Positions outside [0, n) point at a zero trash row and are masked.
# ================================================================================================

@dataclass
class _Tile:
    rows: int
    tq: int
    q0: int | None  # contiguous queries q0 .. q0 + rows * tq (None: qidx holds them)
    qidx: torch.Tensor | None  # int64 (heads, rows, Tq), per-head positions
    kidx: torch.Tensor  # int64 (1 or heads, rows or 1, Tk)
    bad: torch.Tensor | None  # bool, broadcastable to (batch, heads, rows, Tq, Tk)


def _band_tiles(lay: _Layout, trash: int, rows_of):
    """Local band (i - w, i]: query block b against key blocks b - nw .. b."""
    B, w = BAND_BLOCK, lay.w
    nb = -(-lay.n // B)
    nw = -(-(w - 1) // B)
    a = torch.arange(B)[:, None]
    c = torch.arange(_band_width(w))[None, :] - nw * B  # key offset from the query block start
    band_bad = (c > a) | (a - c >= w)
    step = rows_of(B, c.numel())
    for b0 in range(0, nb, step):
        b1 = min(b0 + step, nb)
        kpos = (torch.arange(b0, b1)[:, None] * B + c)  # (R, Tk)
        bad = band_bad
        if b0 * B - nw * B < 0:
            bad = band_bad | (kpos < 0)[:, None, :]
        yield _Tile(b1 - b0, B, b0 * B, None, kpos.clamp(min=0)[None], bad)


def _sink_tiles(lay: _Layout, trash: int, rows_of):
    """Sinks j < g outside the band: j <= i - w; only queries i >= w have any."""
    B, w, g = BAND_BLOCK, lay.w, lay.g
    nb = -(-lay.n // B)
    first = w // B
    kpos = torch.arange(g)
    step = rows_of(B, g)
    for b0 in range(first, nb, step):
        b1 = min(b0 + step, nb)
        qpos = torch.arange(b0 * B, b1 * B).view(b1 - b0, B, 1)
        yield _Tile(b1 - b0, B, b0 * B, None, kpos.view(1, 1, g), kpos > qpos - w)


def _dilated_tiles(lay: _Layout, p: int, trash: int, rows_of):
    """Dilated part p in residue order: segment positions seg * s + o + r * j, queries j in blocks
    [j0, j1) against keys j' < j1 - e (e = ceil(w / r): closer keys lie in the band)."""
    n, w, g = lay.n, lay.w, lay.g
    s, r, offs = lay.dilated[p]
    span = s // r
    e = -(-w // r)
    nseg = -(-n // s)
    off = torch.tensor(offs).view(-1, 1, 1)
    Tq = min(span, BAND_BLOCK)
    for j0 in range(0, span, Tq):
        j1 = min(j0 + Tq, span)
        kend = min(j1 - e, span)
        if kend <= 0:
            continue
        jq, jk = torch.arange(j0, j1), torch.arange(kend)
        band_bad = jk[None, :] > jq[:, None] - e
        step = rows_of(j1 - j0, kend)
        for s0 in range(0, nseg, step):
            s1 = min(s0 + step, nseg)
            base = torch.arange(s0, s1).view(1, -1, 1) * s + off  # (H, R, 1)
            qpos, kpos = base + r * jq, base + r * jk
            bad = band_bad
            if (g > 0 and s0 * s < g) or s1 * s > n or p > 0:
                bad = bad | (kpos < g)[..., None, :] | (kpos >= n)[..., None, :]
                for ps, pr, po in lay.dilated[:p]:
                    po = torch.tensor(po).view(-1, 1, 1, 1)
                    bad = bad | ((qpos[..., None] // ps == kpos[..., None, :] // ps)
                                 & (qpos[..., None] % pr == po) & (kpos[..., None, :] % pr == po))
                bad = bad[None]
            yield _Tile(s1 - s0, j1 - j0, None, torch.where(qpos < n, qpos, trash), torch.where(kpos < n, kpos, trash), bad)


def _tiles(lay: _Layout, trash: int, rows_of):
    """Every tile of every part; ``rows_of(Tq, Tk)`` says how many rows a chunk may hold."""
    yield from _band_tiles(lay, trash, rows_of)
    if lay.g > 0 and lay.n > lay.w:
        yield from _sink_tiles(lay, trash, rows_of)
    for p in range(len(lay.dilated)):
        yield from _dilated_tiles(lay, p, trash, rows_of)


# ================================================================================================
# Gathers and scatters of a tile's rows in (batch, heads, positions, d) buffers.
# ================================================================================================

def _heads(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return torch.arange(t.shape[1], device=t.device).view(-1, *([1] * (idx.dim() - 1)))


def _gather(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """t (b, h, N, ...) at positions idx (1 or h, ...): (b, h, *idx.shape[1:], ...)."""
    if idx.shape[0] == 1:
        flat = t.index_select(2, idx.reshape(-1))
        return flat.view(*t.shape[:2], *idx.shape[1:], *t.shape[3:])
    return t[:, _heads(t, idx), idx]


def _scatter_add(t: torch.Tensor, idx: torch.Tensor, val: torch.Tensor) -> None:
    """t[:, :, idx] += val, repeated positions accumulated."""
    if idx.shape[0] == 1:
        t.index_add_(2, idx.reshape(-1), val.reshape(*t.shape[:2], -1, *t.shape[3:]))
    else:
        batch = torch.arange(t.shape[0], device=t.device).view(-1, *([1] * idx.dim()))
        t.index_put_((batch, _heads(t, idx)[None], idx[None]), val, accumulate=True)


def _rows(t: torch.Tensor, tile: _Tile, rows: int, tq: int) -> torch.Tensor:
    if tile.q0 is not None:
        return t[:, :, tile.q0: tile.q0 + rows * tq].unflatten(2, (rows, tq))
    return _gather(t, tile.qidx)


def _put_rows(t: torch.Tensor, tile: _Tile, val: torch.Tensor) -> None:
    if tile.q0 is not None:
        t[:, :, tile.q0: tile.q0 + val.shape[2] * val.shape[3]] = val.flatten(2, 3)
    else:
        t[:, _heads(t, tile.qidx), tile.qidx] = val


# ================================================================================================
# The tile math (FlashAttention forward / backward on one dense tile) and the autograd Function.
# ================================================================================================

def _scores(q, k, bad):
    s = q @ k.transpose(-1, -2)
    if bad is not None:
        s.masked_fill_(bad, float("-inf"))
    return s


def _tile_forward(q, k, v, bad):
    """(output, lse) of one tile; rows with no key get lse = -inf and output 0."""
    s = _scores(q, k, bad)
    m = s.amax(-1, keepdim=True)
    m = torch.where(m == float("-inf"), 0.0, m)
    p = torch.exp_(s.sub_(m))
    l = p.sum(-1, keepdim=True)
    o = (p @ v) / torch.where(l == 0, 1.0, l)
    return o, (m + torch.log(l)).squeeze(-1)


def _merge(out, lse, o, lse_p):
    """Softmax over the union of two disjoint key sets from each set's (output, lse)."""
    new = torch.logaddexp(lse, lse_p)
    safe = torch.where(new == float("-inf"), 0.0, new)
    a, b = torch.exp(lse - safe), torch.exp(lse_p - safe)
    return out * a[..., None] + o * b[..., None], new


class _Buffers:
    """q (pre-scaled), k, v as (batch, heads, N + 1, d) in compute precision; row N is zero (the
    trash row for positions outside the sequence), rows n .. N - 1 pad the last band block."""

    def __init__(self, lay: _Layout, q, k, v, scale, budget):
        self.lay = lay
        self.compute = torch.promote_types(q.dtype, torch.float32)
        self.n = q.shape[2]
        self.N = -(-self.n // BAND_BLOCK) * BAND_BLOCK
        self.trash = self.N
        self.q, self.k, self.v = self.padded(q, scale), self.padded(k), self.padded(v)
        self.budget = budget

    def padded(self, t: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        t = t.to(self.compute)
        if scale != 1.0:
            t = t * scale
        return torch.nn.functional.pad(t, (0, 0, 0, self.N + 1 - self.n))

    def rows_of(self, tq: int, tk: int) -> int:
        """Rows per chunk: scores, probabilities and dS (tq x tk) plus gathered K, V, dK, dV (tk x d)."""
        b, h, _, d = self.q.shape
        return max(1, self.budget // _row_bytes(b, h, d, tq, tk, self.compute))

    def tiles(self):
        return _tiles(self.lay, self.trash, self.rows_of)


class PartAttentionFunction(torch.autograd.Function):
    """Forward merges the parts' tiles by log-sum-exp; backward recomputes each tile."""

    @staticmethod
    def forward(ctx, q, k, v, pattern: SparsePattern, scale: float, budget: int):
        lay = _layout(pattern, q.shape[2], q.shape[1], True)
        buf = _Buffers(lay, q, k, v, scale, budget)
        out = torch.zeros_like(buf.q)
        lse = torch.full(out.shape[:-1], float("-inf"), dtype=buf.compute, device=q.device)
        for tile in buf.tiles():
            rows, tq = tile.rows, tile.tq
            qt = _rows(buf.q, tile, rows, tq)
            kt, vt = _gather(buf.k, tile.kidx), _gather(buf.v, tile.kidx)
            o, lp = _tile_forward(qt, kt, vt, tile.bad)
            merged = _merge(_rows(out, tile, rows, tq), _rows(lse, tile, rows, tq), o, lp)
            _put_rows(out, tile, merged[0])
            _put_rows(lse, tile, merged[1])
        res = out[:, :, :buf.n].to(q.dtype)
        ctx.save_for_backward(q, k, v, res, lse)
        ctx.pattern, ctx.scale, ctx.budget = pattern, scale, budget
        return res

    @staticmethod
    def backward(ctx, do):
        q, k, v, out, lse = ctx.saved_tensors
        lay = _layout(ctx.pattern, q.shape[2], q.shape[1], True)
        buf = _Buffers(lay, q, k, v, ctx.scale, ctx.budget)
        dob = buf.padded(do)
        delta = (dob * buf.padded(out)).sum(-1)
        lse = lse.clone()
        lse[..., buf.N:] = float("inf")  # the trash row: probabilities 0, no NaN from -inf - -inf
        dq, dk, dv = torch.zeros_like(buf.q), torch.zeros_like(buf.k), torch.zeros_like(buf.v)
        for tile in buf.tiles():
            rows, tq = tile.rows, tile.tq
            qt, dot = _rows(buf.q, tile, rows, tq), _rows(dob, tile, rows, tq)
            kt, vt = _gather(buf.k, tile.kidx), _gather(buf.v, tile.kidx)
            p = torch.exp_(_scores(qt, kt, tile.bad).sub_(_rows(lse, tile, rows, tq)[..., None]))
            ds = p * (dot @ vt.transpose(-1, -2)).sub_(_rows(delta, tile, rows, tq)[..., None])
            dv_t, dk_t = p.transpose(-1, -2) @ dot, ds.transpose(-1, -2) @ qt
            if tile.kidx.shape[1] == 1 and rows > 1:  # keys shared by the rows (sinks)
                dv_t, dk_t = dv_t.sum(2, keepdim=True), dk_t.sum(2, keepdim=True)
            _scatter_add(dv, tile.kidx, dv_t)
            _scatter_add(dk, tile.kidx, dk_t)
            _add_rows(dq, tile, ds @ kt)
        n = buf.n
        return ((dq[:, :, :n] * ctx.scale).to(q.dtype), dk[:, :, :n].to(k.dtype), dv[:, :, :n].to(v.dtype),
                None, None, None)


def _add_rows(t: torch.Tensor, tile: _Tile, val: torch.Tensor) -> None:
    if tile.q0 is not None:
        t[:, :, tile.q0: tile.q0 + val.shape[2] * val.shape[3]] += val.flatten(2, 3)
    else:
        _scatter_add(t, tile.qidx, val)


def part_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: SparsePattern, scale: float,
                   budget: int) -> torch.Tensor:
    """Causal attention over ``pattern`` (``applies`` must hold); inputs already checked."""
    return PartAttentionFunction.apply(q, k, v, pattern, scale, budget)
