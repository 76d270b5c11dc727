"""The backward kernels, as in the Triton fused-attention tutorial: a preprocessing kernel
(``delta = rowsum(dO * O)``), a dK/dV kernel that walks, for each key block, the query blocks whose
lists contain it (the transposed walk), and a dQ kernel that walks the forward's lists again. Every
output tile is owned by one program: no atomics, deterministic results."""
from __future__ import annotations

import triton
import triton.language as tl

from .sweep import _DKDV, _DQ, _program, _sweep
from .tiles import _load_rows, _store_rows


@triton.jit
def _bwd_preprocess_kernel(O, DO, DELTA, sob, soh, sos, sdb, sdh, sds, n, H,
                           BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """delta = rowsum(dO * O) per row, which both gradient kernels read."""
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
    state = _sweep((dq,), (q, do, lse, delta), (k_ptr, v_ptr, stride_k, stride_v),
                   qb, n, prm, csr_ptr, csr_idx, qk_scale, _DQ, PASS == 0, PASS == 1, False, CAUSAL, BLOCK,
                   HEAD_DIM, BLOCK_D, HAS_GLOBAL, HAS_STRIDE, NUM_DIL, LAYOUT_CSR, False, DOT_PREC)
    return state[0]


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, DQ, LSE, DELTA, PRM, PTR, IDX,
                   sqb, sqh, sqs, skb, skh, sks, svb, svh, svs, sdb, sdh, sds, sdqb, sdqh, sdqs,
                   n, H, prm_row, csr_heads, qk_scale, sm_scale,
                   CAUSAL: tl.constexpr, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                   HAS_GLOBAL: tl.constexpr, HAS_STRIDE: tl.constexpr, NUM_DIL: tl.constexpr,
                   LAYOUT_CSR: tl.constexpr, DOT_PREC: tl.constexpr):
    """Each program: dQ of one query block of one (batch, head), over the forward's walk."""
    qb, bh, b, h, prm, ptr = _program(PRM, PTR, n, H, prm_row, csr_heads, BLOCK)
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
    dk, dv = _sweep((dk, dv), (k, v), (q_ptr, do_ptr, lse_ptr, delta_ptr, stride_q, stride_do),
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
    """Each program: dK and dV of one key block of one (batch, head), over the transposed walk (the
    query blocks whose lists contain the key block); no two programs write the same rows."""
    kb, bh, b, h, prm, ptr = _program(PRM, PTR, n, H, prm_row, csr_heads, BLOCK)
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
