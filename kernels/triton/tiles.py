"""Tile bodies, one per kernel, and the row loads and stores they share (``@triton.jit``)."""
from __future__ import annotations

import triton
import triton.language as tl

from .walk import _allowed


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
def _scores(q, k_ptr, v_ptr, stride_k, stride_v, kb, qb, n, qk_scale, MASKED: tl.constexpr, BLOCK: tl.constexpr,
            HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr):
    """Rows of query block ``qb`` and key block ``kb``, the key block's K and V, and the scaled scores
    Q K^T (base 2) of the tile: what the forward and dQ tiles start from."""
    offs_m = qb * BLOCK + tl.arange(0, BLOCK)
    offs_n = kb * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_rows(k_ptr, offs_n, stride_k, offs_d, n, MASKED, HEAD_DIM, BLOCK_D)
    v = _load_rows(v_ptr, offs_n, stride_v, offs_d, n, MASKED, HEAD_DIM, BLOCK_D)
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
    return offs_m, offs_n, k, v, qk


@triton.jit
def _fwd_tile(acc, l_i, m_i, q, k_ptr, v_ptr, stride_k, stride_v, kb, qb, n, prm, qk_scale,
              MASKED: tl.constexpr, CAUSAL: tl.constexpr, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr,
              BLOCK_D: tl.constexpr, HAS_GLOBAL: tl.constexpr, HAS_STRIDE: tl.constexpr, NUM_DIL: tl.constexpr,
              LAYOUT_CSR: tl.constexpr, DOT_PREC: tl.constexpr):
    """Online softmax over key block ``kb``: the running output ``acc`` (BLOCK, BLOCK_D) fp32, row sum
    ``l_i`` and row max ``m_i`` (base 2, scores already scaled by ``qk_scale``) of query block ``qb``."""
    offs_m, offs_n, k, v, qk = _scores(q, k_ptr, v_ptr, stride_k, stride_v, kb, qb, n, qk_scale, MASKED, BLOCK,
                                       HEAD_DIM, BLOCK_D, DOT_PREC)
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
    offs_m, offs_n, k, v, qk = _scores(q, k_ptr, v_ptr, stride_k, stride_v, kb, qb, n, qk_scale, MASKED, BLOCK,
                                       HEAD_DIM, BLOCK_D, DOT_PREC)
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
