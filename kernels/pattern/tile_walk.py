"""Which tiles the kernels visit, in plain Python: the twin of the kernels' tile walk (``triton/``).

For one fixed block (a query block; a key block for the dK/dV kernel, ``transposed``) :func:`visit`
lists the other blocks whose tile the Triton kernels compute, in the kernels' order: first the tiles
that are entirely attended (no mask), each owned by the first part that fills it, then the other
touched tiles (element-wise mask), each owned by the first part that touches it. :func:`visit_csr`
does the same for an explicit CSR block layout. Every function here has a device twin of the same
name in ``triton/walk.py`` (``_touch_*``, ``_full_*``, ``_*_range``; ``_stride_candidates`` and
``_dilated_candidates`` are ``_part_setup`` / ``_part_candidate``; ``visit`` is ``sweep._sweep``). Keep the
two in step: ``tests/unit/test_sparse_attention.py`` compares them tile by tile through
``count_tiles``. :meth:`SparsePattern.key_blocks` / ``query_blocks`` / ``num_tiles`` are built on this.

(q0, ql) are the first and last position of a query block, (k0, kl) of a key block; blocks are
aligned, only the last one of a sequence may be short. All arithmetic stays on non-negative integers
because Triton's // and % truncate towards zero.
"""
from __future__ import annotations

from typing import Iterable, Sequence


def _first_residue(a: int, r: int, off: int) -> int:
    """Smallest p >= a with p % r == off."""
    return a + (off - a % r + r) % r


def _touch_local(q0, ql, k0, kl, w, causal):
    if causal:
        return k0 <= ql and q0 - kl < w
    return q0 - kl < w and k0 - ql < w


def _touch_global(q0, ql, k0, kl, g, causal):
    if causal:
        return k0 < g and k0 <= ql
    return k0 < g or q0 < g


def _touch_stride(q0, ql, k0, kl, l, causal):
    """Some i - j (j <= i when causal) in the tile is a multiple of l."""
    if l == 0:
        return False
    dlo, dhi = q0 - kl, ql - k0
    if causal:
        dlo = max(dlo, 0)
    if dlo > 0:
        a, b = dlo, dhi
    elif dhi < 0:
        a, b = -dhi, -dlo
    else:
        a, b = 0, 0
    return dhi >= dlo and (a + l - 1) // l * l <= b


def _touch_dilated(q0, ql, k0, kl, s, r, off, causal):
    if s == 0:
        return False
    return (_first_residue(q0, r, off) <= ql and _first_residue(k0, r, off) <= kl
            and q0 // s <= kl // s and k0 // s <= ql // s and (not causal or k0 <= ql))


def _complete(q0, ql, k0, kl, block):
    return ql - q0 == block - 1 and kl - k0 == block - 1


def _full_local(q0, ql, k0, kl, w, causal, block):
    if not _complete(q0, ql, k0, kl, block):
        return False
    if causal:
        return kl < q0 and ql - k0 < w
    return ql - k0 < w and kl - q0 < w


def _full_global(q0, ql, k0, kl, g, causal, block):
    if not _complete(q0, ql, k0, kl, block):
        return False
    if causal:
        return kl < g and kl < q0
    return kl < g or ql < g


def _full_dilated(q0, ql, k0, kl, s, r, causal, block):
    if s == 0 or r != 1 or not _complete(q0, ql, k0, kl, block):
        return False
    return q0 // s == ql // s == k0 // s == kl // s and (not causal or kl < q0)


def visit(w: int, g: int, l: int, dils: Sequence[tuple[int, int, int]], n: int, block: int, xb: int,
          causal: bool, transposed: bool) -> list[tuple[int, bool]]:
    """Tiles (other block, full) visited for fixed block ``xb`` (a query block, or a key block when
    ``transposed``), in kernel order: the unmasked pass, then the masked pass. Mirrors ``_sweep``.

    ``w``, ``g``, ``l`` are the local window, global tokens and stride of a parameter row (clipped to
    ``n``), ``dils`` its used dilated parts as (segment, dilation, offset)."""
    B = block
    nb, nbc = -(-n // B), n // B
    x0 = xb * B
    xl = min(x0 + B, n) - 1

    def orient(blk):
        b0 = blk * B
        bl = min(b0 + B, n) - 1
        return (b0, bl, x0, xl) if transposed else (x0, xl, b0, bl)

    def full_any(t):
        return (_full_local(*t, w, causal, B) or _full_global(*t, g, causal, B)
                or any(_full_dilated(*t, s, r, causal, B) for s, r, _ in dils))

    out: list[tuple[int, bool]] = []
    # ---- pass 1: entirely attended tiles, no mask; each owned by the first part that fills it.
    lo, hi = _local_full_range(xb, w, nbc, causal, transposed, B)
    out += [(blk, True) for blk in range(lo, hi + 1)]
    lo, hi = _global_full_range(xb, g, nbc, causal, transposed, B)
    for blk in range(lo, hi + 1):
        if not _full_local(*orient(blk), w, causal, B):
            out.append((blk, True))
    for d, (s, r, _) in enumerate(dils):
        lo, hi = _dilated_full_range(xb, x0, xl, s, r, n, nbc, causal, transposed, B)
        for blk in range(lo, hi + 1):
            t = orient(blk)
            if not (_full_local(*t, w, causal, B) or _full_global(*t, g, causal, B)
                    or any(_full_dilated(*t, s2, r2, causal, B) for s2, r2, _ in dils[:d])):
                out.append((blk, True))
    # ---- pass 2: the other touched tiles, with the element-wise predicate.
    lo, hi = _local_touch_range(x0, xl, w, n, causal, transposed, B)
    for blk in range(lo, hi + 1):
        if not full_any(orient(blk)):
            out.append((blk, False))
    lo, hi = _global_touch_range(xb, x0, xl, g, n, causal, transposed, B)
    for blk in range(lo, hi + 1):
        t = orient(blk)
        if not _touch_local(*t, w, causal) and not full_any(t):
            out.append((blk, False))
    if l > 0:
        for blk, ok in _stride_candidates(x0, xl, xb, l, n, nb, causal, transposed, B):
            t = orient(blk)
            if ok and not (_touch_local(*t, w, causal) or _touch_global(*t, g, causal)) and not full_any(t):
                out.append((blk, False))
    for d, (s, r, off) in enumerate(dils):
        for blk, ok in _dilated_candidates(x0, xl, xb, s, r, off, n, causal, transposed, B):
            t = orient(blk)
            earlier = (_touch_local(*t, w, causal) or _touch_global(*t, g, causal) or _touch_stride(*t, l, causal)
                       or any(_touch_dilated(*t, s2, r2, o2, causal) for s2, r2, o2 in dils[:d]))
            if ok and not earlier and not full_any(t):
                out.append((blk, False))
    return out


def _local_full_range(xb, w, nbc, causal, transposed, B):
    m = (w - B) // B if w >= B else -1
    lo = xb + 1 if (causal and transposed) else xb - m
    hi = xb - 1 if (causal and not transposed) else xb + m
    if xb >= nbc:
        return 0, -1
    return max(lo, 0), min(hi, nbc - 1)


def _global_full_range(xb, g, nbc, causal, transposed, B):
    G = g // B
    if xb >= nbc:
        return 0, -1
    if not causal:
        return 0, (nbc - 1 if xb < G else G - 1)
    if not transposed:
        return 0, min(G, xb) - 1
    return xb + 1, (nbc - 1 if xb < G else -1)


def _dilated_full_range(xb, x0, xl, s, r, n, nbc, causal, transposed, B):
    if s == 0 or r != 1 or xb >= nbc or x0 // s != xl // s:
        return 0, -1
    seg = x0 // s
    lo = (seg * s + B - 1) // B
    hi = min((seg + 1) * s, n) // B - 1
    if causal and not transposed:
        hi = min(hi, xb - 1)
    if causal and transposed:
        lo = max(lo, xb + 1)
    return lo, hi


def _local_touch_range(x0, xl, w, n, causal, transposed, B):
    lo = x0 if (causal and transposed) else max(x0 - w + 1, 0)
    hi = xl if (causal and not transposed) else min(xl + w - 1, n - 1)
    return lo // B, hi // B


def _global_touch_range(xb, x0, xl, g, n, causal, transposed, B):
    nb = -(-n // B)
    if g == 0:
        return 0, -1
    inside = x0 < g
    if not causal:
        return 0, (nb - 1 if inside else (g - 1) // B)
    if not transposed:
        return 0, min(g - 1, xl) // B
    return xb, (nb - 1 if inside else -1)


def _stride_candidates(x0, xl, xb, l, n, nb, causal, transposed, B) -> Iterable[tuple[int, bool]]:
    """Blocks holding a key j = i - tau * l (forward) or query i = j + tau' * l (transposed).

    For l >= B each tau hits at most two blocks, listed in falling order (hi_tau, lo_tau), so a block
    seen twice is always the one just before: skip it. For l < B every block in range is a candidate
    and the tile test decides."""
    if l >= B:
        A, C = (n - 1 - x0) // l, xl // l
        t_lo, t_hi = ((0 if causal else -A), C) if not transposed else (-A, (0 if causal else C))
        for u in range(2 * (t_hi - t_lo + 1)):
            tau = t_lo + u // 2
            hi_b = min(xl - tau * l, n - 1) // B
            lo_b = max(x0 - tau * l, 0) // B
            if u % 2 == 0:
                prev_lo = max(x0 - (tau - 1) * l, 0) // B
                yield hi_b, not (tau > t_lo and hi_b == prev_lo)
            else:
                yield lo_b, lo_b != hi_b
    else:
        lo = xb if (causal and transposed) else 0
        hi = xb if (causal and not transposed) else nb - 1
        for blk in range(lo, hi + 1):
            b0, bl = blk * B, min(blk * B + B, n) - 1
            t = (b0, bl, x0, xl) if transposed else (x0, xl, b0, bl)
            yield blk, _touch_stride(*t, l, causal)


def _dilated_candidates(x0, xl, xb, s, r, off, n, causal, transposed, B) -> Iterable[tuple[int, bool]]:
    """Blocks of the segments the fixed block spans that hold a position p % r == off."""
    if _first_residue(x0, r, off) > xl:
        return
    pos_lo = (x0 // s) * s
    pos_hi = min((xl // s + 1) * s, n) - 1
    if causal and not transposed:
        pos_hi = min(pos_hi, xl)
    if causal and transposed:
        pos_lo = max(pos_lo, x0)
    b_lo, b_hi = pos_lo // B, pos_hi // B
    if r >= B:
        p0 = _first_residue(b_lo * B, r, off)
        p_end = min((b_hi + 1) * B, n) - 1
        count = (p_end - p0) // r + 1 if p0 <= p_end else 0
        for u in range(count):
            yield (p0 + u * r) // B, True
    else:
        for blk in range(b_lo, b_hi + 1):
            b0, bl = blk * B, min(blk * B + B, n) - 1
            yield blk, _first_residue(b0, r, off) <= bl


def visit_csr(ptr, idx, head: int, n: int, block: int, xb: int, causal: bool,
              transposed: bool) -> list[tuple[int, bool]]:
    """The same for an explicit layout: ``ptr`` (heads, rows + 1) and ``idx`` are its CSR tensors
    (the transposed ones when ``transposed``). Mirrors the LAYOUT_CSR branch of ``_sweep``."""
    h = head % ptr.shape[0]
    nbc = n // block
    out_full, out_masked = [], []
    for blk in idx[int(ptr[h, xb]): int(ptr[h, xb + 1])].tolist():
        strict = (blk > xb) if transposed else (blk < xb)
        if causal and not (blk >= xb if transposed else blk <= xb):
            continue  # entirely above the diagonal: nothing attended
        full = xb < nbc and blk < nbc and (strict or not causal)
        (out_full if full else out_masked).append((blk, full))
    return out_full + out_masked
