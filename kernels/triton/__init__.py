"""Block-sparse flash attention in Triton, with the layout computed inside the kernels.

Algorithm: FlashAttention-2 (Dao 2023, https://tridao.me/publications/flash2/flash2.pdf) as in the
Triton fused-attention tutorial (``python/tutorials/06-fused-attention.py``): an online-softmax
forward that stores the log-sum-exp per row (``forward.py``); a backward made of a preprocessing
kernel, a dK/dV kernel over the transposed walk and a dQ kernel over the forward's walk
(``backward.py``); the autograd Function and the launches (``function.py``).

Sparsity (``pattern/``): each head's attended set is a union of parts (local window, strided,
LongNet dilated segments, global tokens) given by a few integers per head, or an explicit CSR block
layout. A program never reads a list of blocks: ``sweep._sweep`` enumerates, from those integers
(``walk.py``), the blocks each part touches, skips the ones an earlier part owns, and visits every
touched tile exactly once in two passes: tiles that are entirely attended without any mask, then the
partly attended ones with the element-wise predicate ``walk._allowed``. ``pattern/tile_walk.py`` is
the plain-Python twin of the walk; the tests compare them tile by tile through ``count.py``.

Reading order, as in the tutorial: each kernel calls its inner function once per pass
(``_attn_fwd_inner``, ``_attn_bwd_dq_inner``, ``_attn_bwd_dkdv_inner``, ``_count_inner``), which runs
the shared walk ``_sweep`` with the kernel's tile body (``tiles.py``). This is the package's only
folder that imports Triton, and nothing imports it before a kernel launches (``dispatch.py``), so
the PyTorch paths work where Triton is not installed.
"""
