"""Attention kernels: block-sparse flash attention whose layout costs O(1) metadata per head.

``SparsePattern`` (patterns.py) describes the attended set; ``sparse_attention`` runs the Triton
kernels on CUDA tensors (the PyTorch reference elsewhere); ``reference_attention`` is the exact
oracle. To run the Triton kernels on CPU, set TRITON_INTERPRET=1 before importing this package:
``@triton.jit`` reads it when the kernels are decorated, at import.
"""
from .patterns import SparsePattern
from .sparse_attention import SparseAttentionFunction, reference_attention, sparse_attention

__all__ = ["SparsePattern", "SparseAttentionFunction", "reference_attention", "sparse_attention"]
