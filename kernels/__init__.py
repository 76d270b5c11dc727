"""Attention kernels: block-sparse flash attention whose layout costs O(1) metadata per head.

``SparsePattern`` (patterns.py) describes the attended set: a few integers per head, or an explicit
CSR block layout (O(blocks) metadata). ``sparse_attention`` runs the Triton kernels on CUDA tensors
and the block-gathered PyTorch path (``gathered_attention``, linear in n) on others;
``reference_attention`` (dense mask) is the exact oracle. Triton is imported only when a kernel
first launches, so everything else works without it. To run the Triton kernels on CPU tensors
(``backend="triton"``), set TRITON_INTERPRET=1 before that first launch: ``@triton.jit`` reads it
when the kernels are decorated.

Modules: ``patterns`` (the pattern: config, parameter table, element-wise mask, block lists);
``tile_walk`` (the plain-Python twin of the kernels' tile walk, behind ``key_blocks`` /
``query_blocks`` / ``num_tiles``); ``dispatch`` (``sparse_attention``: which path runs, and the
PyTorch reference); ``sparse_attention`` (the Triton kernels, their autograd Function,
``count_tiles``); ``gathered_attention`` (the PyTorch path off the GPU: block
tables from the pattern's integers, gathered K/V, flash-style recompute in backward); ``bench``
(``terrabyte bench attention``); ``gpu_check`` (the one GPU check: correctness, then the benchmark).
"""
import sys
import types

from .patterns import SparsePattern
from .dispatch import reference_attention, sparse_attention
from .gathered_attention import GatheredAttentionFunction, gathered_attention

__all__ = ["SparsePattern", "SparseAttentionFunction", "GatheredAttentionFunction", "gathered_attention",
           "reference_attention", "sparse_attention"]


class _Package(types.ModuleType):
    """The import system sets a submodule as its package's attribute once it is loaded; the
    package's ``sparse_attention`` is the function, and stays so when the Triton module of that
    name is loaded later (on the first launch)."""

    def __setattr__(self, name, value):
        if name == "sparse_attention" and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name):
    if name == "SparseAttentionFunction":  # the Triton Function: Triton is imported with it
        from .sparse_attention import SparseAttentionFunction

        return SparseAttentionFunction
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
