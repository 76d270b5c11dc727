"""Block-sparse flash attention in Triton, with the layout computed inside the kernels.

Algorithm: FlashAttention-2 (Dao 2023, https://tridao.me/publications/flash2/flash2.pdf) as in the
Triton fused-attention tutorial (``python/tutorials/06-fused-attention.py``): an online-softmax
forward that stores the log-sum-exp per row; a backward made of a preprocessing kernel
(``delta = rowsum(dO * O)``), a dK/dV kernel that walks, for each key block, the query blocks whose
lists contain it (the transposed layout), and a dQ kernel that walks the forward lists again. No
atomics: every output tile is owned by one program, so results are deterministic.

Sparsity (``patterns.py``): each head's attended set is a union of parts (local window, strided,
LongNet dilated segments, global tokens) given by a few integers per head, or an explicit CSR block
layout. A program never reads a list of blocks: ``_sweep`` enumerates, from those integers, the
blocks each part touches, skips the ones an earlier part owns, and visits every touched tile exactly
once in two passes: tiles that are entirely attended without any mask, then the partly attended
ones with the element-wise predicate ``_allowed``. ``tile_walk.visit`` is the plain-Python twin of
``_sweep``; the tests compare them tile by tile through ``_count_kernel`` (``count_tiles``).

Reading order, as in the tutorial: each kernel calls its inner function once per pass
(``_attn_fwd_inner(acc, l_i, m_i, q, ...)``, ``_attn_bwd_dq_inner(dq, q, do, lse, delta, ...)``,
``_attn_bwd_dkdv_inner(dk, dv, k, v, ...)``, ``_count_inner``), which runs the shared walk
``_sweep`` with the kernel's tile body (``_fwd_tile``, ``_dq_tile``, ``_dkdv_tile``,
``_count_tile``). The walk carries the kernel's values in positional slots it never reads; the inner
function and ``_tile`` are the two places that bind them to names.

Public: ``triton_attention`` (the kernels on inputs already checked, one launch per
``batch_slices``: what ``sparse_attention`` of ``dispatch.py`` runs on CUDA tensors or with
``backend="triton"``), ``SparseAttentionFunction`` (the autograd.Function), ``count_tiles``.
This is the package's only module that imports Triton, and nothing imports it before a kernel
launches, so the PyTorch paths work where Triton is not installed.
"""
from __future__ import annotations

import math
from contextlib import nullcontext

import torch
import triton
import triton.language as tl

from .patterns import SparsePattern

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MIN_HEAD_DIM, MAX_HEAD_DIM = 32, 128
# CUDA caps grid axis 1 (our batch x heads axis) at 65535 programs; larger batches launch in slices.
GRID_LIMIT = 65535

# Which kernel's tile body the walk runs (constexpr KIND of _sweep / _tile).
_FWD = tl.constexpr(0)
_DQ = tl.constexpr(1)
_DKDV = tl.constexpr(2)
_COUNT = tl.constexpr(3)  # record visited tiles only (tests, benchmark tile counts)

def _empty(shape, dtype, device) -> torch.Tensor:
    """Every kernel output is allocated here, so that a check can fill them with NaN instead and
    see any element a kernel never wrote (tests/unit/test_sparse_attention.py, gpu_check.py)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _interpreting() -> bool:
    """Were the kernels decorated for Triton's interpreter? Triton decides when ``@triton.jit``
    runs (this module's import), so a TRITON_INTERPRET set later changes nothing."""
    return type(_fwd_kernel).__name__ == "InterpretedFunction"


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
# Tile bodies, one per kernel. A tile is the (BLOCK x BLOCK) square between the program's fixed
# block and one moving block of the walk: forward and dQ fix a query block ``qb`` and move over key
# blocks ``kb``; dK/dV fixes a key block and moves over query blocks. MASKED: the tile is only partly
# attended, so the element-wise predicate applies (and the moving rows may run past n).
# ================================================================================================

@triton.jit
def _load_rows(base, rows, stride, offs_d, n, ROW_MASK: tl.constexpr, HEAD_DIM: tl.constexpr,
               BLOCK_D: tl.constexpr):
    ptrs = base + rows.to(tl.int64)[:, None] * stride + offs_d[None, :]
    if ROW_MASK:
        if BLOCK_D == HEAD_DIM:
            x = tl.load(ptrs, mask=rows[:, None] < n, other=0.0)
        else:
            x = tl.load(ptrs, mask=(rows[:, None] < n) & (offs_d[None, :] < HEAD_DIM), other=0.0)
    else:
        if BLOCK_D == HEAD_DIM:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    return x


@triton.jit
def _store_rows(base, rows, stride, offs_d, n, x, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    ptrs = base + rows.to(tl.int64)[:, None] * stride + offs_d[None, :]
    tl.store(ptrs, x, mask=(rows[:, None] < n) & (offs_d[None, :] < HEAD_DIM))


@triton.jit
def _fwd_tile(acc, l_i, m_i, q, k_ptr, v_ptr, stride_k, stride_v, kb, qb, n, prm, qk_scale,
              MASKED: tl.constexpr, CAUSAL: tl.constexpr, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr,
              BLOCK_D: tl.constexpr, HAS_GLOBAL: tl.constexpr, HAS_STRIDE: tl.constexpr, NUM_DIL: tl.constexpr,
              LAYOUT_CSR: tl.constexpr, DOT_PREC: tl.constexpr):
    """Online softmax over key block ``kb``: the running output ``acc`` (BLOCK, BLOCK_D) fp32, row sum
    ``l_i`` and row max ``m_i`` (base 2, scores already scaled by ``qk_scale``) of query block ``qb``."""
    offs_m = qb * BLOCK + tl.arange(0, BLOCK)
    offs_n = kb * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_rows(k_ptr, offs_n, stride_k, offs_d, n, MASKED, HEAD_DIM, BLOCK_D)
    v = _load_rows(v_ptr, offs_n, stride_v, offs_d, n, MASKED, HEAD_DIM, BLOCK_D)
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
    if MASKED:
        ok = _allowed(offs_m[:, None], offs_n[None, :], n, prm, CAUSAL, HAS_GLOBAL, HAS_STRIDE, NUM_DIL, LAYOUT_CSR)
        qk = tl.where(ok, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    # A row with nothing attended so far keeps m = -inf; shift by 0 then, so no inf - inf.
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(qk - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    return acc, l_i, m_new


@triton.jit
def _dq_tile(dq, q, do, lse, delta, k_ptr, v_ptr, stride_k, stride_v, kb, qb, n, prm, qk_scale,
             MASKED: tl.constexpr, CAUSAL: tl.constexpr, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr,
             BLOCK_D: tl.constexpr, HAS_GLOBAL: tl.constexpr, HAS_STRIDE: tl.constexpr, NUM_DIL: tl.constexpr,
             LAYOUT_CSR: tl.constexpr, DOT_PREC: tl.constexpr):
    """dQ of query block ``qb`` (fp32, before the softmax scale) plus key block ``kb``'s share:
    P = exp2(S - lse), dS = P * (dO V^T - delta), dQ += dS K."""
    offs_m = qb * BLOCK + tl.arange(0, BLOCK)
    offs_n = kb * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_rows(k_ptr, offs_n, stride_k, offs_d, n, MASKED, HEAD_DIM, BLOCK_D)
    v = _load_rows(v_ptr, offs_n, stride_v, offs_d, n, MASKED, HEAD_DIM, BLOCK_D)
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
    p = tl.math.exp2(qk - lse[:, None])
    if MASKED:
        ok = _allowed(offs_m[:, None], offs_n[None, :], n, prm, CAUSAL, HAS_GLOBAL, HAS_STRIDE, NUM_DIL, LAYOUT_CSR)
        p = tl.where(ok, p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
    ds = p * (dp - delta[:, None])
    dq = dq + tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)
    return dq


@triton.jit
def _dkdv_tile(dk, dv, k, v, q_ptr, do_ptr, lse_ptr, delta_ptr, stride_q, stride_do, qb, kb, n, prm, qk_scale,
               MASKED: tl.constexpr, CAUSAL: tl.constexpr, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr,
               BLOCK_D: tl.constexpr, HAS_GLOBAL: tl.constexpr, HAS_STRIDE: tl.constexpr, NUM_DIL: tl.constexpr,
               LAYOUT_CSR: tl.constexpr, DOT_PREC: tl.constexpr):
    """dK, dV of key block ``kb`` (fp32, dK before the softmax scale) plus query block ``qb``'s share,
    on the transposed tile (rows are keys, columns queries): dV += P^T dO, dK += dS^T Q."""
    offs_n = kb * BLOCK + tl.arange(0, BLOCK)
    offs_m = qb * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(q_ptr, offs_m, stride_q, offs_d, n, MASKED, HEAD_DIM, BLOCK_D)
    do = _load_rows(do_ptr, offs_m, stride_do, offs_d, n, MASKED, HEAD_DIM, BLOCK_D)
    if MASKED:
        lse = tl.load(lse_ptr + offs_m, mask=offs_m < n, other=0.0)
        delta = tl.load(delta_ptr + offs_m, mask=offs_m < n, other=0.0)
    else:
        lse = tl.load(lse_ptr + offs_m)
        delta = tl.load(delta_ptr + offs_m)
    qk_t = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale
    p_t = tl.math.exp2(qk_t - lse[None, :])
    if MASKED:
        ok = _allowed(offs_m[None, :], offs_n[:, None], n, prm, CAUSAL, HAS_GLOBAL, HAS_STRIDE, NUM_DIL, LAYOUT_CSR)
        p_t = tl.where(ok, p_t, 0.0)
    dv = dv + tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PREC)
    dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
    ds_t = p_t * (dp_t - delta[None, :])
    dk = dk + tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PREC)
    return dk, dv


@triton.jit
def _count_tile(n_full, n_masked, map_ptr, blk, MASKED: tl.constexpr, HAS_MAP: tl.constexpr):
    """Count the visit (per lane) and, with HAS_MAP (tests), add to the visit map: 1 per unmasked
    visit, 16 per masked one, so repeats show."""
    if MASKED:
        n_masked = n_masked + 1.0
    else:
        n_full = n_full + 1.0
    if HAS_MAP:
        seen = tl.load(map_ptr + blk)
        if MASKED:
            tl.store(map_ptr + blk, seen + 16)
        else:
            tl.store(map_ptr + blk, seen + 1)
    return n_full, n_masked


# ================================================================================================
# Enumeration of the tiles of one fixed block (a query block; a key block when TRANSPOSED).
# Twin of tile_walk.visit: same parts, same order, same ownership rules.
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
def _claimed(p, q0, ql, k0, kl, w, g, l, prm, FULL_PASS: tl.constexpr, CAUSAL: tl.constexpr, BLOCK: tl.constexpr,
             HAS_GLOBAL: tl.constexpr, HAS_STRIDE: tl.constexpr):
    """Does a part before ``p`` own the tile (fill it, in the unmasked pass; touch it, otherwise)?"""
    c = q0 < 0
    for e in range(0, p):
        if e == 0:
            if FULL_PASS:
                c = c | _full_local(q0, ql, k0, kl, w, CAUSAL, BLOCK)
            else:
                c = c | _touch_local(q0, ql, k0, kl, w, CAUSAL)
        elif e == 1:
            if HAS_GLOBAL:
                if FULL_PASS:
                    c = c | _full_global(q0, ql, k0, kl, g, CAUSAL, BLOCK)
                else:
                    c = c | _touch_global(q0, ql, k0, kl, g, CAUSAL)
        elif e == 2:
            if HAS_STRIDE:
                if not FULL_PASS:
                    c = c | _touch_stride(q0, ql, k0, kl, l, CAUSAL)
        else:
            d = e - 3
            s = tl.load(prm + 3 + 3 * d)
            r = tl.load(prm + 4 + 3 * d)
            if FULL_PASS:
                c = c | _full_dilated(q0, ql, k0, kl, s, r, CAUSAL, BLOCK)
            else:
                c = c | _touch_dilated(q0, ql, k0, kl, s, r, tl.load(prm + 5 + 3 * d), CAUSAL)
    return c


# ------------------------------------------------------------------------------------------------
# The walk shared by the four kernels. It carries the calling kernel's state through the tiles
# without reading it: three carried values s0..s2, four read-only operands f0..f3 of the fixed
# block, and the moving side's pointers (rows a_ptr / b_ptr with their strides, per-row vectors
# av_ptr / bv_ptr). ``_tile`` binds these slots to the named arguments of the kernel's tile body;
# each kernel's ``_*_inner`` binds its names to them. An unused slot carries any value unchanged.
# ------------------------------------------------------------------------------------------------

@triton.jit
def _tile(s0, s1, s2, f0, f1, f2, f3, a_ptr, b_ptr, av_ptr, bv_ptr, stride_a, stride_b, blk, xb, n, prm, qk_scale,
          KIND: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr, BLOCK: tl.constexpr,
          HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_GLOBAL: tl.constexpr, HAS_STRIDE: tl.constexpr,
          NUM_DIL: tl.constexpr, LAYOUT_CSR: tl.constexpr, HAS_MAP: tl.constexpr, DOT_PREC: tl.constexpr):
    """The tile of fixed block ``xb`` and moving block ``blk``, by the body of kernel KIND."""
    if KIND == _FWD:  # s0..s2 = acc, m_i, l_i; f0 = q; a, b = K, V rows
        s0, s2, s1 = _fwd_tile(s0, s2, s1, f0, a_ptr, b_ptr, stride_a, stride_b, blk, xb, n, prm, qk_scale,
                               MASKED, CAUSAL, BLOCK, HEAD_DIM, BLOCK_D, HAS_GLOBAL, HAS_STRIDE, NUM_DIL,
                               LAYOUT_CSR, DOT_PREC)
    elif KIND == _DQ:  # s0 = dq; f0..f3 = q, do, lse, delta; a, b = K, V rows
        s0 = _dq_tile(s0, f0, f1, f2, f3, a_ptr, b_ptr, stride_a, stride_b, blk, xb, n, prm, qk_scale,
                      MASKED, CAUSAL, BLOCK, HEAD_DIM, BLOCK_D, HAS_GLOBAL, HAS_STRIDE, NUM_DIL, LAYOUT_CSR, DOT_PREC)
    elif KIND == _DKDV:  # s0, s1 = dk, dv; f0, f1 = k, v; a, b = Q, dO rows; av, bv = LSE, DELTA
        s0, s1 = _dkdv_tile(s0, s1, f0, f1, a_ptr, b_ptr, av_ptr, bv_ptr, stride_a, stride_b, blk, xb, n, prm,
                            qk_scale, MASKED, CAUSAL, BLOCK, HEAD_DIM, BLOCK_D, HAS_GLOBAL, HAS_STRIDE, NUM_DIL,
                            LAYOUT_CSR, DOT_PREC)
    else:  # _COUNT: s0, s1 = n_full, n_masked; a = the visit-map row
        s0, s1 = _count_tile(s0, s1, a_ptr, blk, MASKED, HAS_MAP)
    return s0, s1, s2


@triton.jit
def _sweep(s0, s1, s2, f0, f1, f2, f3, a_ptr, b_ptr, av_ptr, bv_ptr, stride_a, stride_b,
           xb, n, prm, ptr_ptr, idx_ptr, qk_scale,
           KIND: tl.constexpr, FULL_PASS: tl.constexpr, MASKED: tl.constexpr, TRANSPOSED: tl.constexpr,
           CAUSAL: tl.constexpr, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
           HAS_GLOBAL: tl.constexpr, HAS_STRIDE: tl.constexpr, NUM_DIL: tl.constexpr, LAYOUT_CSR: tl.constexpr,
           HAS_MAP: tl.constexpr, DOT_PREC: tl.constexpr):
    """One pass over the tiles of fixed block ``xb``: the entirely attended ones without a mask
    (FULL_PASS) or the partly attended ones with the element-wise predicate (MASKED, its negation).
    Each tile belongs to the first part that fills it (unmasked pass) or touches it (masked pass)."""
    x0 = xb * BLOCK
    xl = tl.minimum(x0 + BLOCK, n) - 1
    if LAYOUT_CSR:
        nbc = n // BLOCK
        for u in range(tl.load(ptr_ptr + xb), tl.load(ptr_ptr + xb + 1)):
            blk = tl.load(idx_ptr + u)
            if TRANSPOSED:
                strict = blk > xb
                inside = blk >= xb
            else:
                strict = blk < xb
                inside = blk <= xb
            if not CAUSAL:
                strict = blk >= 0
                inside = blk >= 0
            full = (xb < nbc) & (blk < nbc) & strict
            if FULL_PASS:
                take = full
            else:
                take = inside & (full == 0)
            if take:
                s0, s1, s2 = _tile(s0, s1, s2, f0, f1, f2, f3, a_ptr, b_ptr, av_ptr, bv_ptr, stride_a, stride_b,
                                   blk, xb, n, prm, qk_scale, KIND, MASKED, CAUSAL, BLOCK, HEAD_DIM, BLOCK_D,
                                   HAS_GLOBAL, HAS_STRIDE, NUM_DIL, LAYOUT_CSR, HAS_MAP, DOT_PREC)
    else:
        w = tl.load(prm)
        g = tl.load(prm + 1)
        l = tl.load(prm + 2)
        for p in range(0, 3 + NUM_DIL):
            count, base, stepping = _part_setup(p, xb, x0, xl, n, w, g, l, prm, FULL_PASS, CAUSAL, TRANSPOSED,
                                                BLOCK, HAS_GLOBAL, HAS_STRIDE)
            for u in range(0, count):
                blk, ok = _part_candidate(p, u, base, stepping, xb, x0, xl, n, l, prm, CAUSAL, TRANSPOSED, BLOCK,
                                          HAS_STRIDE)
                q0, ql, k0, kl = _orient(blk, x0, xl, n, BLOCK, TRANSPOSED)
                skip = (ok == 0) | _claimed(p, q0, ql, k0, kl, w, g, l, prm, FULL_PASS, CAUSAL, BLOCK, HAS_GLOBAL,
                                            HAS_STRIDE)
                if MASKED:
                    skip = skip | _full_any(q0, ql, k0, kl, w, g, prm, CAUSAL, BLOCK, HAS_GLOBAL, NUM_DIL)
                if skip == 0:
                    s0, s1, s2 = _tile(s0, s1, s2, f0, f1, f2, f3, a_ptr, b_ptr, av_ptr, bv_ptr, stride_a,
                                       stride_b, blk, xb, n, prm, qk_scale, KIND, MASKED, CAUSAL, BLOCK, HEAD_DIM,
                                       BLOCK_D, HAS_GLOBAL, HAS_STRIDE, NUM_DIL, LAYOUT_CSR, HAS_MAP, DOT_PREC)
    return s0, s1, s2


# ================================================================================================
# Kernels. Grid: (blocks of the sequence, batch * heads). Offsets are int64 from the start. Each
# kernel runs its inner function twice over its fixed block: PASS 0 computes the entirely attended
# tiles without a mask, PASS 1 the partly attended ones with the element-wise predicate.
# ================================================================================================

@triton.jit
def _attn_fwd_inner(acc, l_i, m_i, q, k_ptr, v_ptr, stride_k, stride_v, qb, n, prm, csr_ptr, csr_idx, qk_scale,
                    PASS: tl.constexpr, CAUSAL: tl.constexpr, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr,
                    BLOCK_D: tl.constexpr, HAS_GLOBAL: tl.constexpr, HAS_STRIDE: tl.constexpr, NUM_DIL: tl.constexpr,
                    LAYOUT_CSR: tl.constexpr, DOT_PREC: tl.constexpr):
    """Pass PASS of query block ``qb`` over its key blocks: ``_fwd_tile`` on each tile."""
    # Slots s0, s1, s2 = acc, m_i, l_i: in this order the sm_90 code is the same as before the slots
    # were named (another order reschedules it).
    acc, m_i, l_i = _sweep(acc, m_i, l_i, q, q, q, q, k_ptr, v_ptr, v_ptr, v_ptr, stride_k, stride_v,
                           qb, n, prm, csr_ptr, csr_idx, qk_scale, _FWD, PASS == 0, PASS == 1, False, CAUSAL, BLOCK,
                           HEAD_DIM, BLOCK_D, HAS_GLOBAL, HAS_STRIDE, NUM_DIL, LAYOUT_CSR, False, DOT_PREC)
    return acc, l_i, m_i


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, PRM, PTR, IDX,
                sqb, sqh, sqs, skb, skh, sks, svb, svh, svs, sob, soh, sos,
                n, H, prm_row, csr_heads, qk_scale,
                CAUSAL: tl.constexpr, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                HAS_GLOBAL: tl.constexpr, HAS_STRIDE: tl.constexpr, NUM_DIL: tl.constexpr,
                LAYOUT_CSR: tl.constexpr, DOT_PREC: tl.constexpr):
    qb = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    prm = PRM + h * prm_row
    ptr = PTR + (h % csr_heads) * (tl.cdiv(n, BLOCK) + 1)
    offs_m = qb * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(Q + b * sqb + h * sqh, offs_m, sqs, offs_d, n, True, HEAD_DIM, BLOCK_D)
    acc = tl.zeros([BLOCK, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK], dtype=tl.float32)
    k_ptr = K + b * skb + h * skh
    v_ptr = V + b * svb + h * svh
    for PASS in tl.static_range(2):
        acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, k_ptr, v_ptr, sks, svs, qb, n, prm, ptr, IDX, qk_scale,
                                        PASS, CAUSAL, BLOCK, HEAD_DIM, BLOCK_D, HAS_GLOBAL, HAS_STRIDE, NUM_DIL,
                                        LAYOUT_CSR, DOT_PREC)
    # Rows past the end never get a key (l = 0); they are not stored, keep them finite anyway.
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    _store_rows(O + b * sob + h * soh, offs_m, sos, offs_d, n, (acc / l_safe[:, None]).to(O.dtype.element_ty),
                HEAD_DIM, BLOCK_D)
    tl.store(LSE + bh * n + offs_m, m_i + tl.math.log2(l_safe), mask=offs_m < n)


@triton.jit
def _bwd_preprocess_kernel(O, DO, DELTA, sob, soh, sos, sdb, sdh, sds, n, H,
                           BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    xb = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    offs_x = xb * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    o = _load_rows(O + b * sob + h * soh, offs_x, sos, offs_d, n, True, HEAD_DIM, BLOCK_D).to(tl.float32)
    do = _load_rows(DO + b * sdb + h * sdh, offs_x, sds, offs_d, n, True, HEAD_DIM, BLOCK_D).to(tl.float32)
    tl.store(DELTA + bh * n + offs_x, tl.sum(o * do, 1), mask=offs_x < n)


@triton.jit
def _attn_bwd_dq_inner(dq, q, do, lse, delta, k_ptr, v_ptr, stride_k, stride_v, qb, n, prm, csr_ptr, csr_idx,
                       qk_scale, PASS: tl.constexpr, CAUSAL: tl.constexpr, BLOCK: tl.constexpr,
                       HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_GLOBAL: tl.constexpr,
                       HAS_STRIDE: tl.constexpr, NUM_DIL: tl.constexpr, LAYOUT_CSR: tl.constexpr,
                       DOT_PREC: tl.constexpr):
    """Pass PASS of query block ``qb`` over its key blocks (the forward's walk): ``_dq_tile`` on each."""
    dq, _, _ = _sweep(dq, dq, dq, q, do, lse, delta, k_ptr, v_ptr, v_ptr, v_ptr, stride_k, stride_v,
                      qb, n, prm, csr_ptr, csr_idx, qk_scale, _DQ, PASS == 0, PASS == 1, False, CAUSAL, BLOCK,
                      HEAD_DIM, BLOCK_D, HAS_GLOBAL, HAS_STRIDE, NUM_DIL, LAYOUT_CSR, False, DOT_PREC)
    return dq


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, DQ, LSE, DELTA, PRM, PTR, IDX,
                   sqb, sqh, sqs, skb, skh, sks, svb, svh, svs, sdb, sdh, sds, sdqb, sdqh, sdqs,
                   n, H, prm_row, csr_heads, qk_scale, sm_scale,
                   CAUSAL: tl.constexpr, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                   HAS_GLOBAL: tl.constexpr, HAS_STRIDE: tl.constexpr, NUM_DIL: tl.constexpr,
                   LAYOUT_CSR: tl.constexpr, DOT_PREC: tl.constexpr):
    qb = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    prm = PRM + h * prm_row
    ptr = PTR + (h % csr_heads) * (tl.cdiv(n, BLOCK) + 1)
    offs_m = qb * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(Q + b * sqb + h * sqh, offs_m, sqs, offs_d, n, True, HEAD_DIM, BLOCK_D)
    do = _load_rows(DO + b * sdb + h * sdh, offs_m, sds, offs_d, n, True, HEAD_DIM, BLOCK_D)
    lse = tl.load(LSE + bh * n + offs_m, mask=offs_m < n, other=0.0)
    delta = tl.load(DELTA + bh * n + offs_m, mask=offs_m < n, other=0.0)
    dq = tl.zeros([BLOCK, BLOCK_D], dtype=tl.float32)
    k_ptr = K + b * skb + h * skh
    v_ptr = V + b * svb + h * svh
    for PASS in tl.static_range(2):
        dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, k_ptr, v_ptr, sks, svs, qb, n, prm, ptr, IDX, qk_scale,
                                PASS, CAUSAL, BLOCK, HEAD_DIM, BLOCK_D, HAS_GLOBAL, HAS_STRIDE, NUM_DIL, LAYOUT_CSR,
                                DOT_PREC)
    _store_rows(DQ + b * sdqb + h * sdqh, offs_m, sdqs, offs_d, n, (dq * sm_scale).to(DQ.dtype.element_ty),
                HEAD_DIM, BLOCK_D)


@triton.jit
def _attn_bwd_dkdv_inner(dk, dv, k, v, q_ptr, do_ptr, lse_ptr, delta_ptr, stride_q, stride_do, kb, n, prm,
                         csr_ptr, csr_idx, qk_scale, PASS: tl.constexpr, CAUSAL: tl.constexpr, BLOCK: tl.constexpr,
                         HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_GLOBAL: tl.constexpr,
                         HAS_STRIDE: tl.constexpr, NUM_DIL: tl.constexpr, LAYOUT_CSR: tl.constexpr,
                         DOT_PREC: tl.constexpr):
    """Pass PASS of key block ``kb`` over the query blocks that attend it (the transposed walk):
    ``_dkdv_tile`` on each."""
    dk, dv, _ = _sweep(dk, dv, dv, k, v, k, k, q_ptr, do_ptr, lse_ptr, delta_ptr, stride_q, stride_do,
                       kb, n, prm, csr_ptr, csr_idx, qk_scale, _DKDV, PASS == 0, PASS == 1, True, CAUSAL, BLOCK,
                       HEAD_DIM, BLOCK_D, HAS_GLOBAL, HAS_STRIDE, NUM_DIL, LAYOUT_CSR, False, DOT_PREC)
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, DK, DV, LSE, DELTA, PRM, PTR, IDX,
                     sqb, sqh, sqs, skb, skh, sks, svb, svh, svs, sdb, sdh, sds, sdkb, sdkh, sdks, sdvb, sdvh, sdvs,
                     n, H, prm_row, csr_heads, qk_scale, sm_scale,
                     CAUSAL: tl.constexpr, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                     HAS_GLOBAL: tl.constexpr, HAS_STRIDE: tl.constexpr, NUM_DIL: tl.constexpr,
                     LAYOUT_CSR: tl.constexpr, DOT_PREC: tl.constexpr):
    kb = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    prm = PRM + h * prm_row
    ptr = PTR + (h % csr_heads) * (tl.cdiv(n, BLOCK) + 1)
    offs_n = kb * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_rows(K + b * skb + h * skh, offs_n, sks, offs_d, n, True, HEAD_DIM, BLOCK_D)
    v = _load_rows(V + b * svb + h * svh, offs_n, svs, offs_d, n, True, HEAD_DIM, BLOCK_D)
    dk = tl.zeros([BLOCK, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK, BLOCK_D], dtype=tl.float32)
    for PASS in tl.static_range(2):
        dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, Q + b * sqb + h * sqh, DO + b * sdb + h * sdh, LSE + bh * n,
                                      DELTA + bh * n, sqs, sds, kb, n, prm, ptr, IDX, qk_scale, PASS, CAUSAL, BLOCK,
                                      HEAD_DIM, BLOCK_D, HAS_GLOBAL, HAS_STRIDE, NUM_DIL, LAYOUT_CSR, DOT_PREC)
    _store_rows(DK + b * sdkb + h * sdkh, offs_n, sdks, offs_d, n, (dk * sm_scale).to(DK.dtype.element_ty),
                HEAD_DIM, BLOCK_D)
    _store_rows(DV + b * sdvb + h * sdvh, offs_n, sdvs, offs_d, n, dv.to(DV.dtype.element_ty), HEAD_DIM, BLOCK_D)


@triton.jit
def _count_inner(n_full, n_masked, map_ptr, xb, n, prm, csr_ptr, csr_idx, PASS: tl.constexpr,
                 TRANSPOSED: tl.constexpr, CAUSAL: tl.constexpr, BLOCK: tl.constexpr, HAS_GLOBAL: tl.constexpr,
                 HAS_STRIDE: tl.constexpr, NUM_DIL: tl.constexpr, LAYOUT_CSR: tl.constexpr, HAS_MAP: tl.constexpr):
    """Pass PASS of fixed block ``xb`` (a key block when TRANSPOSED): ``_count_tile`` on each tile.
    No tile is loaded, so head dim, scale and dot precision are placeholders."""
    n_full, n_masked, _ = _sweep(n_full, n_masked, n_masked, n_full, n_full, n_full, n_full, map_ptr, map_ptr,
                                 map_ptr, map_ptr, 0, 0, xb, n, prm, csr_ptr, csr_idx, 1.0, _COUNT, PASS == 0,
                                 PASS == 1, TRANSPOSED, CAUSAL, BLOCK, 32, 32, HAS_GLOBAL, HAS_STRIDE, NUM_DIL,
                                 LAYOUT_CSR, HAS_MAP, "ieee")
    return n_full, n_masked


@triton.jit
def _count_kernel(COUNTS, MAP, PRM, PTR, IDX, n, prm_row, csr_heads,
                  CAUSAL: tl.constexpr, TRANSPOSED: tl.constexpr, BLOCK: tl.constexpr, HAS_GLOBAL: tl.constexpr,
                  HAS_STRIDE: tl.constexpr, NUM_DIL: tl.constexpr, LAYOUT_CSR: tl.constexpr, HAS_MAP: tl.constexpr):
    """Tiles visited per fixed block and head: (full, masked) counts, and the visit map if HAS_MAP."""
    xb = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    nb = tl.cdiv(n, BLOCK)
    prm = PRM + h * prm_row
    ptr = PTR + (h % csr_heads) * (nb + 1)
    row = h * nb + xb
    n_full = tl.zeros([BLOCK], dtype=tl.float32)
    n_masked = tl.zeros([BLOCK], dtype=tl.float32)
    for PASS in tl.static_range(2):
        n_full, n_masked = _count_inner(n_full, n_masked, MAP + row * nb, xb, n, prm, ptr, IDX, PASS, TRANSPOSED,
                                        CAUSAL, BLOCK, HAS_GLOBAL, HAS_STRIDE, NUM_DIL, LAYOUT_CSR, HAS_MAP)
    tl.store(COUNTS + row * 2, tl.max(n_full, 0).to(tl.int64))
    tl.store(COUNTS + row * 2 + 1, tl.max(n_masked, 0).to(tl.int64))


# ================================================================================================
# Host side
# ================================================================================================

def _check_triton_inputs(q: torch.Tensor) -> None:
    """What the kernels support beyond check_attention_inputs."""
    batch, heads, n, head_dim = q.shape
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"sparse_attention: dtype {q.dtype} is not supported by the kernels "
                         "(use float16, bfloat16 or float32)")
    if not MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"sparse_attention: head_dim {head_dim} is not supported by the kernels "
                         f"(must be in [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}])")
    if heads > GRID_LIMIT:
        raise ValueError(f"sparse_attention: {heads} heads exceed the kernels' grid limit {GRID_LIMIT} "
                         "(batch x heads per launch)")
    if not q.is_cuda and not _interpreting():
        raise ValueError("sparse_attention: backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before "
                         "the kernels are first loaded (Triton reads it when terrabyte.kernels.sparse_attention "
                         "decorates them)")


def _launch_meta(pattern: SparsePattern, heads: int, n: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device) -> tuple[tuple, dict]:
    """Pointer arguments (table, csr) and the constexpr set shared by all kernels."""
    if pattern.is_csr:
        indptr, indices, t_indptr, t_indices = pattern.layout.on(device)
        prm = torch.zeros(heads, 3, dtype=torch.int32, device=device)
        csr_heads = pattern.layout.indptr.shape[0]
        fwd_csr, bwd_csr = (indptr, indices), (t_indptr, t_indices)
    else:
        prm = pattern.param_table(heads, n, device=device)
        dummy = torch.zeros(1, dtype=torch.int32, device=device)
        csr_heads = 1
        fwd_csr = bwd_csr = (dummy, dummy)
    block = pattern.block
    meta = dict(
        CAUSAL=None, BLOCK=block, HEAD_DIM=head_dim, BLOCK_D=max(triton.next_power_of_2(head_dim), 16),
        HAS_GLOBAL=pattern.has_global, HAS_STRIDE=pattern.has_stride, NUM_DIL=pattern.num_dilated,
        LAYOUT_CSR=pattern.is_csr, DOT_PREC="ieee" if dtype == torch.float32 else "tf32",
    )
    return (prm, fwd_csr, bwd_csr, csr_heads), meta


def _launch_options(block: int, head_dim: int = 32) -> dict:
    """Warps per program: 8 once a tile side reaches 128 (at 4 the D=128 accumulators spill on sm_90,
    checked with cuobjdump --dump-resource-usage). Stages: the loads sit behind the tile-selection
    branch, so Triton does not software-pipeline them; 2 keeps shared memory low."""
    return {} if _interpreting() else compiled_options(block, head_dim)


def compiled_options(block: int, head_dim: int = 32) -> dict:
    """``_launch_options`` of a compiled (not interpreted) launch; ``kernels.aot`` compiles with these."""
    return {"num_warps": 8 if max(block, head_dim) >= 128 else 4, "num_stages": 2}


def _on_device(t: torch.Tensor):
    """Launch on the tensor's GPU, not the current one (several GPUs per process)."""
    return torch.cuda.device(t.device) if t.is_cuda else nullcontext()


class SparseAttentionFunction(torch.autograd.Function):
    """Triton forward and backward; q, k, v (batch, heads, seq, head_dim)."""

    @staticmethod
    def forward(ctx, q, k, v, pattern: SparsePattern, causal: bool, scale: float):
        with _on_device(q):
            return SparseAttentionFunction._forward(ctx, q, k, v, pattern, causal, scale)

    @staticmethod
    def backward(ctx, do):
        with _on_device(do):
            return SparseAttentionFunction._backward(ctx, do)

    @staticmethod
    def _forward(ctx, q, k, v, pattern: SparsePattern, causal: bool, scale: float):
        batch, heads, n, head_dim = q.shape
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        (prm, fwd_csr, bwd_csr, csr_heads), meta = _launch_meta(pattern, heads, n, head_dim, q.dtype, q.device)
        meta["CAUSAL"] = causal
        o = _empty(q.shape, q.dtype, q.device)
        lse = _empty((batch, heads, n), torch.float32, q.device)
        grid = (triton.cdiv(n, pattern.block), batch * heads)
        _fwd_kernel[grid](q, k, v, o, lse, prm, *fwd_csr,
                          *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3],
                          n, heads, prm.shape[1], csr_heads, scale * math.log2(math.e),
                          **meta, **_launch_options(pattern.block, meta["BLOCK_D"]))
        ctx.save_for_backward(q, k, v, o, lse, prm, *fwd_csr, *bwd_csr)
        ctx.pattern, ctx.causal, ctx.scale, ctx.meta, ctx.csr_heads = pattern, causal, scale, meta, csr_heads
        return o

    @staticmethod
    def _backward(ctx, do):
        q, k, v, o, lse, prm, ptr, idx, t_ptr, t_idx = ctx.saved_tensors
        batch, heads, n, head_dim = q.shape
        do = do if do.stride(-1) == 1 else do.contiguous()
        block, meta, scale = ctx.pattern.block, ctx.meta, ctx.scale
        grid = (triton.cdiv(n, block), batch * heads)
        options = _launch_options(block, meta["BLOCK_D"])
        delta = _empty((batch, heads, n), torch.float32, q.device)
        _bwd_preprocess_kernel[grid](o, do, delta, *o.stride()[:3], *do.stride()[:3], n, heads,
                                     BLOCK=block, HEAD_DIM=head_dim, BLOCK_D=meta["BLOCK_D"], **options)
        dq = _empty(q.shape, q.dtype, q.device)
        dk = _empty(k.shape, k.dtype, k.device)
        dv = _empty(v.shape, v.dtype, v.device)
        qk_scale = scale * math.log2(math.e)
        _bwd_dkdv_kernel[grid](q, k, v, do, dk, dv, lse, delta, prm, t_ptr, t_idx,
                               *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3],
                               *dk.stride()[:3], *dv.stride()[:3],
                               n, heads, prm.shape[1], ctx.csr_heads, qk_scale, scale, **meta, **options)
        _bwd_dq_kernel[grid](q, k, v, do, dq, lse, delta, prm, ptr, idx,
                             *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3], *dq.stride()[:3],
                             n, heads, prm.shape[1], ctx.csr_heads, qk_scale, scale, **meta, **options)
        return dq, dk, dv, None, None, None


def count_tiles(pattern: SparsePattern, n: int, heads: int, causal: bool = True, transposed: bool = False,
                device: torch.device | str = "cpu", with_map: bool = False):
    """Run the kernels' enumeration alone: per (head, fixed block) the (full, masked) tile counts
    (int64 (heads, blocks, 2)) and, with ``with_map``, the visit map (heads, blocks, blocks) where an
    unmasked visit adds 1 and a masked visit adds 16."""
    pattern.check_length(n, "count_tiles")
    (prm, fwd_csr, bwd_csr, csr_heads), meta = _launch_meta(pattern, heads, n, 32, torch.float32, torch.device(device))
    nb = triton.cdiv(n, pattern.block)
    counts = torch.zeros(heads, nb, 2, dtype=torch.int64, device=device)
    visit_map = torch.zeros(heads * nb * nb if with_map else 1, dtype=torch.int32, device=device)
    ptr, idx = bwd_csr if transposed else fwd_csr
    _count_kernel[(nb, heads)](counts, visit_map, prm, ptr, idx, n, prm.shape[1], csr_heads,
                               CAUSAL=causal, TRANSPOSED=transposed, BLOCK=pattern.block, HAS_GLOBAL=meta["HAS_GLOBAL"],
                               HAS_STRIDE=meta["HAS_STRIDE"], NUM_DIL=meta["NUM_DIL"], LAYOUT_CSR=meta["LAYOUT_CSR"],
                               HAS_MAP=with_map, **_launch_options(pattern.block))
    if with_map:
        return counts, visit_map.view(heads, nb, nb)
    return counts


def batch_slices(batch: int, heads: int, limit: int = GRID_LIMIT) -> list[tuple[int, int]]:
    """[start, stop) batch ranges with (stop - start) * heads <= limit, covering [0, batch) in order:
    one kernel launch each, since the grid's batch x heads axis may not exceed ``limit``."""
    for name, value in (("batch", batch), ("heads", heads), ("limit", limit)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"batch_slices: {name} must be a positive integer, got {value!r}")
    if heads > limit:
        raise ValueError(f"batch_slices: {heads} heads exceed the grid limit {limit} even for one batch element")
    step = limit // heads
    return [(start, min(start + step, batch)) for start in range(0, batch, step)]


def triton_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: SparsePattern, causal: bool,
                     scale: float) -> torch.Tensor:
    """The kernels on inputs ``check_attention_inputs`` accepted, one launch per ``batch_slices``."""
    _check_triton_inputs(q)
    slices = batch_slices(q.shape[0], q.shape[1], GRID_LIMIT)
    if len(slices) == 1:
        return SparseAttentionFunction.apply(q, k, v, pattern, causal, scale)
    return torch.cat([SparseAttentionFunction.apply(q[a:b], k[a:b], v[a:b], pattern, causal, scale)
                      for a, b in slices])
