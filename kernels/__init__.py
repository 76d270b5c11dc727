"""Attention kernels: block-sparse flash attention whose layout costs O(1) metadata per head.

``SparsePattern`` (patterns.py) describes the attended set: a few integers per head, or an explicit
CSR block layout (O(blocks) metadata). ``sparse_attention`` runs the Triton kernels on CUDA tensors
and the block-gathered PyTorch path (``gathered_attention``, linear in n) on others;
``reference_attention`` (dense mask) is the exact oracle. To run the Triton
kernels on CPU tensors (``backend="triton"``), set TRITON_INTERPRET=1 before importing this
package: ``@triton.jit`` reads it when the kernels are decorated, at import.

Modules: ``patterns`` (the pattern: config, parameter table, element-wise mask, block lists);
``tile_walk`` (the plain-Python twin of the kernels' tile walk, behind ``key_blocks`` /
``query_blocks`` / ``num_tiles``); ``sparse_attention`` (the Triton kernels, their autograd Function,
``count_tiles``, the PyTorch reference); ``gathered_attention`` (the PyTorch path off the GPU: block
tables from the pattern's integers, gathered K/V, flash-style recompute in backward); ``bench``
(``terrabyte bench attention``); ``gpu_check`` (the one GPU check: correctness, then the benchmark).
"""
from .patterns import SparsePattern
from .sparse_attention import SparseAttentionFunction, reference_attention, sparse_attention
from .gathered_attention import GatheredAttentionFunction, gathered_attention

__all__ = ["SparsePattern", "SparseAttentionFunction", "GatheredAttentionFunction", "gathered_attention",
           "reference_attention", "sparse_attention"]
