"""The walk shared by the four kernels: ``_sweep`` visits, in one pass, the tiles of one fixed block
(entirely attended tiles in the unmasked pass, the others in the masked pass), enumerating them from
the pattern's integers (``walk.py``) or from a CSR layout; ``_tile`` runs the calling kernel's tile
body (``tiles.py``) on each.

The walk carries the calling kernel's values without reading them, as three tuples whose shape
depends on the kernel (KIND, a constexpr, so each kernel compiles only its own branch of ``_tile``):

=========  ==========================  ======================  ==============================================
KIND       ``state`` (carried, updated) ``fixed`` (read-only)   ``moving`` (rows of the moving block, strides)
=========  ==========================  ======================  ==============================================
_FWD       (acc, m_i, l_i)              (q,)                    (k_ptr, v_ptr, stride_k, stride_v)
_DQ        (dq,)                        (q, do, lse, delta)     (k_ptr, v_ptr, stride_k, stride_v)
_DKDV      (dk, dv)                     (k, v)                  (q_ptr, do_ptr, lse_ptr, delta_ptr, stride_q, stride_do)
_COUNT     (n_full, n_masked)           (map_ptr,)              (map_ptr,)
=========  ==========================  ======================  ==============================================

``_tile`` is the one place that unpacks them into the named arguments of the tile bodies. Tuples as
``@triton.jit`` arguments and loop-carried values compile on the GPU machine's Triton 3.6
(``python -m terrabyte.kernels.tools.aot``, tests/unit/test_kernels_aot.py).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .tiles import _count_tile, _dkdv_tile, _dq_tile, _fwd_tile
from .walk import _claimed, _full_any, _orient, _part_candidate, _part_setup

# Which kernel's tile body the walk runs (constexpr KIND of _sweep / _tile).
_FWD = tl.constexpr(0)
_DQ = tl.constexpr(1)
_DKDV = tl.constexpr(2)
_COUNT = tl.constexpr(3)  # record visited tiles only (tests, benchmark tile counts)


@triton.jit
def _program(PRM, PTR, n, H, prm_row, csr_heads, BLOCK: tl.constexpr):
    """Where a program of the attention kernels works. Grid: (blocks of the sequence, batch * heads).
    Returns its fixed block, its (batch * heads) row ``bh`` (int64: offsets are int64 from the start),
    batch ``b``, head ``h``, the head's parameter row and its CSR pointers."""
    xb = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    prm = PRM + h * prm_row
    ptr = PTR + (h % csr_heads) * (tl.cdiv(n, BLOCK) + 1)
    return xb, bh, b, h, prm, ptr


@triton.jit
def _tile(state, fixed, moving, blk, xb, n, prm, qk_scale,
          KIND: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr, BLOCK: tl.constexpr,
          HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_GLOBAL: tl.constexpr, HAS_STRIDE: tl.constexpr,
          NUM_DIL: tl.constexpr, LAYOUT_CSR: tl.constexpr, HAS_MAP: tl.constexpr, DOT_PREC: tl.constexpr):
    """The tile of fixed block ``xb`` and moving block ``blk``, by the body of kernel KIND."""
    if KIND == _FWD:
        acc, m_i, l_i = state
        q = fixed[0]
        k_ptr, v_ptr, stride_k, stride_v = moving
        acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, k_ptr, v_ptr, stride_k, stride_v, blk, xb, n, prm, qk_scale,
                                  MASKED, CAUSAL, BLOCK, HEAD_DIM, BLOCK_D, HAS_GLOBAL, HAS_STRIDE, NUM_DIL,
                                  LAYOUT_CSR, DOT_PREC)
        state = (acc, m_i, l_i)
    elif KIND == _DQ:
        dq = state[0]
        q, do, lse, delta = fixed
        k_ptr, v_ptr, stride_k, stride_v = moving
        dq = _dq_tile(dq, q, do, lse, delta, k_ptr, v_ptr, stride_k, stride_v, blk, xb, n, prm, qk_scale,
                      MASKED, CAUSAL, BLOCK, HEAD_DIM, BLOCK_D, HAS_GLOBAL, HAS_STRIDE, NUM_DIL, LAYOUT_CSR, DOT_PREC)
        state = (dq,)
    elif KIND == _DKDV:
        dk, dv = state
        k, v = fixed
        q_ptr, do_ptr, lse_ptr, delta_ptr, stride_q, stride_do = moving
        dk, dv = _dkdv_tile(dk, dv, k, v, q_ptr, do_ptr, lse_ptr, delta_ptr, stride_q, stride_do, blk, xb, n, prm,
                            qk_scale, MASKED, CAUSAL, BLOCK, HEAD_DIM, BLOCK_D, HAS_GLOBAL, HAS_STRIDE, NUM_DIL,
                            LAYOUT_CSR, DOT_PREC)
        state = (dk, dv)
    else:  # _COUNT
        n_full, n_masked = state
        n_full, n_masked = _count_tile(n_full, n_masked, moving[0], blk, MASKED, HAS_MAP)
        state = (n_full, n_masked)
    return state


@triton.jit
def _sweep(state, fixed, moving, xb, n, prm, ptr_ptr, idx_ptr, qk_scale,
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
                state = _tile(state, fixed, moving, blk, xb, n, prm, qk_scale, KIND, MASKED, CAUSAL, BLOCK,
                              HEAD_DIM, BLOCK_D, HAS_GLOBAL, HAS_STRIDE, NUM_DIL, LAYOUT_CSR, HAS_MAP, DOT_PREC)
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
                    state = _tile(state, fixed, moving, blk, xb, n, prm, qk_scale, KIND, MASKED, CAUSAL, BLOCK,
                                  HEAD_DIM, BLOCK_D, HAS_GLOBAL, HAS_STRIDE, NUM_DIL, LAYOUT_CSR, HAS_MAP, DOT_PREC)
    return state
