"""Attention kernels: block-sparse flash attention whose layout costs O(1) metadata per head.

``SparsePattern`` (``pattern/``) describes the attended set: a few integers per head, or an explicit
CSR block layout (O(blocks) metadata). ``sparse_attention`` (``dispatch.py``) runs the Triton kernels
(``triton/``) on CUDA tensors and the block-gathered PyTorch path (``cpu/``, linear in n) on others;
``reference_attention`` (``reference.py``, dense mask) is the exact oracle. Triton is imported only
when a kernel first launches, so everything else works without it. To run the Triton kernels on CPU
tensors (``backend="triton"``), set TRITON_INTERPRET=1 before that first launch: ``@triton.jit``
reads it when the kernels are decorated. ``tools/``: the benchmark, the GPU check, the sm_90
compile check.
"""
from .cpu.gathered_attention import GatheredAttentionFunction, gathered_attention
from .dispatch import sparse_attention
from .pattern import SparsePattern
from .reference import reference_attention

__all__ = ["SparsePattern", "SparseAttentionFunction", "GatheredAttentionFunction", "gathered_attention",
           "reference_attention", "sparse_attention"]


def __getattr__(name):
    if name == "SparseAttentionFunction":  # the Triton Function: Triton is imported with it
        from .triton.function import SparseAttentionFunction

        return SparseAttentionFunction
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
