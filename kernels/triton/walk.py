"""The tile walk's geometry, as ``@triton.jit`` device functions: which tiles of a fixed block (a query
block; a key block when TRANSPOSED) each part of the pattern touches or fills, and which part owns a
tile. Twin of ``pattern/tile_walk.py`` (same parts, same order, same ownership rules); ``sweep.py``
runs the loop over them.
"""
from __future__ import annotations

import triton
import triton.language as tl


# ================================================================================================
# Element and block predicates (device functions). Positions are int32 and never negative, because
# Triton's // and % truncate towards zero.
# ================================================================================================

@triton.jit
def _first_residue(a, r, off):
    """Smallest p >= a with p % r == off."""
    return a + (off - a % r + r) % r


@triton.jit
def _allowed(qi, kj, n, prm, CAUSAL: tl.constexpr, HAS_GLOBAL: tl.constexpr, HAS_STRIDE: tl.constexpr,
             NUM_DIL: tl.constexpr, LAYOUT_CSR: tl.constexpr):
    """Element-wise predicate for a tile: query positions ``qi`` against key positions ``kj``."""
    ok = (kj < n) & (qi < n)
    if not LAYOUT_CSR:  # an explicit layout attends whole tiles: only bounds and causality
        w = tl.load(prm)
        diff = qi - kj
        part = (diff < w) & (diff > -w)
        if HAS_GLOBAL:
            g = tl.load(prm + 1)
            part = part | (kj < g) | (qi < g)
        if HAS_STRIDE:
            l = tl.load(prm + 2)
            ls = tl.maximum(l, 1)
            part = part | (((qi % ls) == (kj % ls)) & (l > 0))
        for d in tl.static_range(NUM_DIL):
            s = tl.load(prm + 3 + 3 * d)
            r = tl.load(prm + 4 + 3 * d)
            off = tl.load(prm + 5 + 3 * d)
            ss = tl.maximum(s, 1)
            rs = tl.maximum(r, 1)
            part = part | ((qi // ss == kj // ss) & (qi % rs == off) & (kj % rs == off) & (s > 0))
        ok = ok & part
    if CAUSAL:
        ok = ok & (kj <= qi)
    return ok


@triton.jit
def _touch_local(q0, ql, k0, kl, w, CAUSAL: tl.constexpr):
    if CAUSAL:
        t = (k0 <= ql) & (q0 - kl < w)
    else:
        t = (q0 - kl < w) & (k0 - ql < w)
    return t


@triton.jit
def _touch_global(q0, ql, k0, kl, g, CAUSAL: tl.constexpr):
    if CAUSAL:
        t = (k0 < g) & (k0 <= ql)
    else:
        t = (k0 < g) | (q0 < g)
    return t


@triton.jit
def _touch_stride(q0, ql, k0, kl, l, CAUSAL: tl.constexpr):
    """Some difference i - j of the tile (j <= i when causal) is a multiple of l."""
    ls = tl.maximum(l, 1)
    dlo = q0 - kl
    dhi = ql - k0
    if CAUSAL:
        dlo = tl.maximum(dlo, 0)
    a = tl.where(dlo > 0, dlo, tl.where(dhi < 0, -dhi, 0))
    b = tl.where(dlo > 0, dhi, tl.where(dhi < 0, -dlo, 0))
    return (l > 0) & (dhi >= dlo) & ((a + ls - 1) // ls * ls <= b)


@triton.jit
def _touch_dilated(q0, ql, k0, kl, s, r, off, CAUSAL: tl.constexpr):
    ss = tl.maximum(s, 1)
    rs = tl.maximum(r, 1)
    t = (s > 0) & (_first_residue(q0, rs, off) <= ql) & (_first_residue(k0, rs, off) <= kl)
    t = t & (q0 // ss <= kl // ss) & (k0 // ss <= ql // ss)
    if CAUSAL:
        t = t & (k0 <= ql)
    return t


@triton.jit
def _complete(q0, ql, k0, kl, BLOCK: tl.constexpr):
    return ((ql - q0) == BLOCK - 1) & ((kl - k0) == BLOCK - 1)


@triton.jit
def _full_local(q0, ql, k0, kl, w, CAUSAL: tl.constexpr, BLOCK: tl.constexpr):
    if CAUSAL:
        f = (kl < q0) & (ql - k0 < w)
    else:
        f = (ql - k0 < w) & (kl - q0 < w)
    return f & _complete(q0, ql, k0, kl, BLOCK)


@triton.jit
def _full_global(q0, ql, k0, kl, g, CAUSAL: tl.constexpr, BLOCK: tl.constexpr):
    if CAUSAL:
        f = (kl < g) & (kl < q0)
    else:
        f = (kl < g) | (ql < g)
    return f & _complete(q0, ql, k0, kl, BLOCK)


@triton.jit
def _full_dilated(q0, ql, k0, kl, s, r, CAUSAL: tl.constexpr, BLOCK: tl.constexpr):
    ss = tl.maximum(s, 1)
    seg = q0 // ss
    f = (s > 0) & (r == 1) & (ql // ss == seg) & (k0 // ss == seg) & (kl // ss == seg)
    if CAUSAL:
        f = f & (kl < q0)
    return f & _complete(q0, ql, k0, kl, BLOCK)


@triton.jit
def _full_any(q0, ql, k0, kl, w, g, prm, CAUSAL: tl.constexpr, BLOCK: tl.constexpr,
              HAS_GLOBAL: tl.constexpr, NUM_DIL: tl.constexpr):
    """The tile is entirely attended (it belongs to the unmasked pass)."""
    f = _full_local(q0, ql, k0, kl, w, CAUSAL, BLOCK)
    if HAS_GLOBAL:
        f = f | _full_global(q0, ql, k0, kl, g, CAUSAL, BLOCK)
    for d in tl.static_range(NUM_DIL):
        f = f | _full_dilated(q0, ql, k0, kl, tl.load(prm + 3 + 3 * d), tl.load(prm + 4 + 3 * d), CAUSAL, BLOCK)
    return f


@triton.jit
def _orient(blk, x0, xl, n, BLOCK: tl.constexpr, TRANSPOSED: tl.constexpr):
    """(q0, ql, k0, kl) of the tile between the fixed block [x0, xl] and moving block ``blk``."""
    b0 = blk * BLOCK
    bl = tl.minimum(b0 + BLOCK, n) - 1
    if TRANSPOSED:
        return b0, bl, x0, xl
    else:
        return x0, xl, b0, bl


# ================================================================================================
# Enumeration of the tiles of one fixed block (a query block; a key block when TRANSPOSED).
# ================================================================================================

@triton.jit
def _local_full_range(xb, w, nbc, CAUSAL: tl.constexpr, TRANSPOSED: tl.constexpr, BLOCK: tl.constexpr):
    m = tl.where(w >= BLOCK, (tl.maximum(w, BLOCK) - BLOCK) // BLOCK, -1)
    if CAUSAL and TRANSPOSED:
        lo = xb + 1
    else:
        lo = xb - m
    if CAUSAL and not TRANSPOSED:
        hi = xb - 1
    else:
        hi = xb + m
    lo = tl.maximum(lo, 0)
    hi = tl.where(xb >= nbc, -1, tl.minimum(hi, nbc - 1))
    return lo, hi


@triton.jit
def _global_full_range(xb, g, nbc, CAUSAL: tl.constexpr, TRANSPOSED: tl.constexpr, BLOCK: tl.constexpr):
    G = g // BLOCK
    if not CAUSAL:
        lo = xb * 0
        hi = tl.where(xb < G, nbc - 1, G - 1)
    elif not TRANSPOSED:
        lo = xb * 0
        hi = tl.minimum(G, xb) - 1
    else:
        lo = xb + 1
        hi = tl.where(xb < G, nbc - 1, -1)
    hi = tl.where(xb >= nbc, -1, hi)
    return lo, hi


@triton.jit
def _dilated_full_range(xb, x0, xl, s, r, n, nbc, CAUSAL: tl.constexpr, TRANSPOSED: tl.constexpr,
                        BLOCK: tl.constexpr):
    ss = tl.maximum(s, 1)
    seg = x0 // ss
    lo = (seg * ss + BLOCK - 1) // BLOCK
    hi = tl.minimum((seg + 1) * ss, n) // BLOCK - 1
    if CAUSAL and not TRANSPOSED:
        hi = tl.minimum(hi, xb - 1)
    if CAUSAL and TRANSPOSED:
        lo = tl.maximum(lo, xb + 1)
    bad = (s == 0) | (r != 1) | (xb >= nbc) | (xl // ss != seg)
    return lo, tl.where(bad, lo - 1, hi)


@triton.jit
def _local_touch_range(x0, xl, w, n, CAUSAL: tl.constexpr, TRANSPOSED: tl.constexpr, BLOCK: tl.constexpr):
    if CAUSAL and TRANSPOSED:
        lo = x0
    else:
        lo = tl.maximum(x0 - w + 1, 0)
    if CAUSAL and not TRANSPOSED:
        hi = xl
    else:
        hi = tl.minimum(xl + w - 1, n - 1)
    return lo // BLOCK, hi // BLOCK


@triton.jit
def _global_touch_range(xb, x0, xl, g, n, CAUSAL: tl.constexpr, TRANSPOSED: tl.constexpr, BLOCK: tl.constexpr):
    nb = tl.cdiv(n, BLOCK)
    inside = x0 < g
    g_last = tl.maximum(g - 1, 0)
    if not CAUSAL:
        lo = xb * 0
        hi = tl.where(inside, nb - 1, g_last // BLOCK)
    elif not TRANSPOSED:
        lo = xb * 0
        hi = tl.minimum(g_last, xl) // BLOCK
    else:
        lo = xb
        hi = tl.where(inside, nb - 1, -1)
    hi = tl.where(g == 0, lo - 1, hi)
    return lo, hi


# Parts, in ownership order: 0 local, 1 global, 2 stride, 3 + d dilated part d. They run as a
# runtime loop so that each pass inlines a single tile body (compile time and code size stay those
# of a dense flash-attention kernel, whatever the number of parts).

@triton.jit
def _part_setup(p, xb, x0, xl, n, w, g, l, prm, FULL_PASS: tl.constexpr, CAUSAL: tl.constexpr,
                TRANSPOSED: tl.constexpr, BLOCK: tl.constexpr, HAS_GLOBAL: tl.constexpr, HAS_STRIDE: tl.constexpr):
    """Candidate list of part ``p`` for fixed block ``xb``: (count, base, stepping). Candidate u is
    block base + u, except where ``stepping`` (see _part_candidate)."""
    nb = tl.cdiv(n, BLOCK)
    nbc = n // BLOCK
    count = xb * 0
    base = xb * 0
    stepping = xb < 0
    if p == 0:
        if FULL_PASS:
            lo, hi = _local_full_range(xb, w, nbc, CAUSAL, TRANSPOSED, BLOCK)
        else:
            lo, hi = _local_touch_range(x0, xl, w, n, CAUSAL, TRANSPOSED, BLOCK)
        count = hi - lo + 1
        base = lo
    elif p == 1:
        if HAS_GLOBAL:
            if FULL_PASS:
                lo, hi = _global_full_range(xb, g, nbc, CAUSAL, TRANSPOSED, BLOCK)
            else:
                lo, hi = _global_touch_range(xb, x0, xl, g, n, CAUSAL, TRANSPOSED, BLOCK)
            count = hi - lo + 1
            base = lo
    elif p == 2:
        if HAS_STRIDE:
            if not FULL_PASS:  # a strided part never fills a tile
                # l >= BLOCK: shift tau * l (tau in [t_lo, t_hi]) hits at most two blocks.
                # l < BLOCK: scan the blocks [r_lo, r_hi].
                ls = tl.maximum(l, 1)
                far = (n - 1 - x0) // ls
                near = xl // ls
                if TRANSPOSED:
                    t_lo = -far
                    r_hi = nb - 1
                    if CAUSAL:
                        t_hi = xb * 0
                        r_lo = xb
                    else:
                        t_hi = near
                        r_lo = xb * 0
                else:
                    t_hi = near
                    r_lo = xb * 0
                    if CAUSAL:
                        t_lo = xb * 0
                        r_hi = xb
                    else:
                        t_lo = -far
                        r_hi = nb - 1
                stepping = l >= BLOCK
                count = tl.where(stepping, 2 * (t_hi - t_lo + 1), r_hi - r_lo + 1)
                count = tl.where(l > 0, count, 0)
                base = tl.where(stepping, t_lo, r_lo)
    else:
        d = p - 3
        s = tl.load(prm + 3 + 3 * d)
        r = tl.load(prm + 4 + 3 * d)
        if FULL_PASS:
            lo, hi = _dilated_full_range(xb, x0, xl, s, r, n, nbc, CAUSAL, TRANSPOSED, BLOCK)
            count = hi - lo + 1
            base = lo
        else:
            # Blocks of the segments the fixed block spans; r >= BLOCK: step over p % r == off.
            off = tl.load(prm + 5 + 3 * d)
            ss = tl.maximum(s, 1)
            rs = tl.maximum(r, 1)
            pos_lo = (x0 // ss) * ss
            pos_hi = tl.minimum((xl // ss + 1) * ss, n) - 1
            if CAUSAL and not TRANSPOSED:
                pos_hi = tl.minimum(pos_hi, xl)
            if CAUSAL and TRANSPOSED:
                pos_lo = tl.maximum(pos_lo, x0)
            b_lo = pos_lo // BLOCK
            b_hi = pos_hi // BLOCK
            p0 = _first_residue(b_lo * BLOCK, rs, off)
            p_end = tl.minimum((b_hi + 1) * BLOCK, n) - 1
            stepping = r >= BLOCK
            count = tl.where(stepping, tl.where(p0 <= p_end, (tl.maximum(p_end, p0) - p0) // rs + 1, 0),
                             b_hi - b_lo + 1)
            count = tl.where((s > 0) & (_first_residue(x0, rs, off) <= xl), count, 0)
            base = tl.where(stepping, p0, b_lo)
    return tl.maximum(count, 0), base, stepping


@triton.jit
def _part_candidate(p, u, base, stepping, xb, x0, xl, n, l, prm, CAUSAL: tl.constexpr, TRANSPOSED: tl.constexpr,
                    BLOCK: tl.constexpr, HAS_STRIDE: tl.constexpr):
    """Block of candidate ``u`` of part ``p`` and whether the part really touches it."""
    blk = base + u
    ok = u >= 0
    if p == 2:
        if HAS_STRIDE:
            if stepping:
                # blocks listed falling (forward) or rising (transposed): a repeat is the one just before
                tau = base + u // 2
                hi_b = tl.minimum(xl - tau * l, n - 1) // BLOCK
                lo_b = tl.maximum(x0 - tau * l, 0) // BLOCK
                prev_lo = tl.maximum(x0 - (tau - 1) * l, 0) // BLOCK
                odd = (u % 2) == 1
                blk = tl.where(odd, lo_b, hi_b)
                ok = tl.where(odd, lo_b != hi_b, (tau == base) | (hi_b != prev_lo))
            else:
                q0, ql, k0, kl = _orient(blk, x0, xl, n, BLOCK, TRANSPOSED)
                ok = _touch_stride(q0, ql, k0, kl, l, CAUSAL)
    elif p >= 3:
        d = p - 3
        rs = tl.maximum(tl.load(prm + 4 + 3 * d), 1)
        off = tl.load(prm + 5 + 3 * d)
        if stepping:
            blk = (base + u * rs) // BLOCK
        else:
            b0 = blk * BLOCK
            ok = _first_residue(b0, rs, off) <= tl.minimum(b0 + BLOCK, n) - 1
    return blk, ok


@triton.jit
def _fills(e, q0, ql, k0, kl, w, g, prm, CAUSAL: tl.constexpr, BLOCK: tl.constexpr, HAS_GLOBAL: tl.constexpr):
    """Does part ``e`` attend every pair of the tile? (A strided part never does.)"""
    f = q0 < 0
    if e == 0:
        f = _full_local(q0, ql, k0, kl, w, CAUSAL, BLOCK)
    elif e == 1:
        if HAS_GLOBAL:
            f = _full_global(q0, ql, k0, kl, g, CAUSAL, BLOCK)
    elif e >= 3:
        d = e - 3
        f = _full_dilated(q0, ql, k0, kl, tl.load(prm + 3 + 3 * d), tl.load(prm + 4 + 3 * d), CAUSAL, BLOCK)
    return f


@triton.jit
def _touches(e, q0, ql, k0, kl, w, g, l, prm, CAUSAL: tl.constexpr, HAS_GLOBAL: tl.constexpr,
             HAS_STRIDE: tl.constexpr):
    """Does part ``e`` attend at least one pair of the tile?"""
    t = q0 < 0
    if e >= 3:
        d = e - 3
        t = _touch_dilated(q0, ql, k0, kl, tl.load(prm + 3 + 3 * d), tl.load(prm + 4 + 3 * d),
                           tl.load(prm + 5 + 3 * d), CAUSAL)
    elif e == 2:
        if HAS_STRIDE:
            t = _touch_stride(q0, ql, k0, kl, l, CAUSAL)
    elif e == 1:
        if HAS_GLOBAL:
            t = _touch_global(q0, ql, k0, kl, g, CAUSAL)
    else:
        t = _touch_local(q0, ql, k0, kl, w, CAUSAL)
    return t


@triton.jit
def _claimed(p, q0, ql, k0, kl, w, g, l, prm, FULL_PASS: tl.constexpr, CAUSAL: tl.constexpr, BLOCK: tl.constexpr,
             HAS_GLOBAL: tl.constexpr, HAS_STRIDE: tl.constexpr):
    """Does a part before ``p`` own the tile (fill it, in the unmasked pass; touch it, otherwise)?"""
    c = q0 < 0
    for e in range(0, p):
        if FULL_PASS:
            c = c | _fills(e, q0, ql, k0, kl, w, g, prm, CAUSAL, BLOCK, HAS_GLOBAL)
        else:
            c = c | _touches(e, q0, ql, k0, kl, w, g, l, prm, CAUSAL, HAS_GLOBAL, HAS_STRIDE)
    return c
