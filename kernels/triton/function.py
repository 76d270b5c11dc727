"""The host side of the Triton kernels: input checks, launch metadata, the autograd Function.

Public: ``triton_attention`` (the kernels on inputs already checked, one launch per
``batch_slices``: what ``sparse_attention`` of ``dispatch.py`` runs on CUDA tensors or with
``backend="triton"``), ``SparseAttentionFunction`` (the autograd.Function), ``count_tiles`` (the walk
alone, compared with ``pattern/tile_walk.py`` by the tests).
"""
from __future__ import annotations

import math
from contextlib import nullcontext

import torch
import triton

from ..pattern import SparsePattern
from .backward import _bwd_dkdv_kernel, _bwd_dq_kernel, _bwd_preprocess_kernel
from .count import _count_kernel
from .forward import _fwd_kernel

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MIN_HEAD_DIM, MAX_HEAD_DIM = 32, 128
# CUDA caps grid axis 1 (our batch x heads axis) at 65535 programs; larger batches launch in slices.
GRID_LIMIT = 65535


def _empty(shape, dtype, device) -> torch.Tensor:
    """Every kernel output is allocated here, so that a check can fill them with NaN instead and
    see any element a kernel never wrote (tests/unit/test_sparse_attention.py, tools/gpu_check.py)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _interpreting() -> bool:
    """Were the kernels decorated for Triton's interpreter? Triton decides when ``@triton.jit``
    runs (the import of
    forward.py, backward.py, count.py), so a TRITON_INTERPRET set later changes nothing."""
    return type(_fwd_kernel).__name__ == "InterpretedFunction"


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
                         "the kernels are first loaded (Triton reads it when terrabyte.kernels.triton "
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
    """``_launch_options`` of a compiled (not interpreted) launch; ``kernels.tools.aot`` compiles with these."""
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
