"""The tile counter: the walk alone, no tile loaded. Per (head, fixed block) it counts the visited
tiles and can record them in a visit map, which the tests compare with ``pattern/tile_walk.py``
(``count_tiles`` in function.py launches it)."""
from __future__ import annotations

import triton
import triton.language as tl

from .sweep import _COUNT, _sweep


@triton.jit
def _count_inner(n_full, n_masked, map_ptr, xb, n, prm, csr_ptr, csr_idx, PASS: tl.constexpr,
                 TRANSPOSED: tl.constexpr, CAUSAL: tl.constexpr, BLOCK: tl.constexpr, HAS_GLOBAL: tl.constexpr,
                 HAS_STRIDE: tl.constexpr, NUM_DIL: tl.constexpr, LAYOUT_CSR: tl.constexpr, HAS_MAP: tl.constexpr):
    """Pass PASS of fixed block ``xb`` (a key block when TRANSPOSED): ``_count_tile`` on each tile.
    No tile is loaded, so head dim, scale and dot precision are placeholders."""
    n_full, n_masked = _sweep((n_full, n_masked), (map_ptr,), (map_ptr,), xb, n, prm, csr_ptr, csr_idx, 1.0,
                              _COUNT, PASS == 0, PASS == 1, TRANSPOSED, CAUSAL, BLOCK, 32, 32, HAS_GLOBAL,
                              HAS_STRIDE, NUM_DIL, LAYOUT_CSR, HAS_MAP, "ieee")
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
