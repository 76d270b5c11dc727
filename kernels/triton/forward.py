"""The forward kernel: FlashAttention-2's online softmax over the tiles the walk visits for one query
block, storing the output and the per-row log-sum-exp (base 2) the backward reads."""
from __future__ import annotations

import triton
import triton.language as tl

from .sweep import _FWD, _program, _sweep
from .tiles import _load_rows, _store_rows


@triton.jit
def _attn_fwd_inner(acc, l_i, m_i, q, k_ptr, v_ptr, stride_k, stride_v, qb, n, prm, csr_ptr, csr_idx, qk_scale,
                    PASS: tl.constexpr, CAUSAL: tl.constexpr, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr,
                    BLOCK_D: tl.constexpr, HAS_GLOBAL: tl.constexpr, HAS_STRIDE: tl.constexpr, NUM_DIL: tl.constexpr,
                    LAYOUT_CSR: tl.constexpr, DOT_PREC: tl.constexpr):
    """Pass PASS of query block ``qb`` over its key blocks: ``_fwd_tile`` on each tile."""
    # state in the order (acc, m_i, l_i): another order reschedules the sm_90 code
    acc, m_i, l_i = _sweep((acc, m_i, l_i), (q,), (k_ptr, v_ptr, stride_k, stride_v),
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
    """Each program: one query block of one (batch, head); PASS 0 the entirely attended tiles without
    a mask, PASS 1 the partly attended ones with the element-wise predicate."""
    qb, bh, b, h, prm, ptr = _program(PRM, PTR, n, H, prm_row, csr_heads, BLOCK)
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
