"""Which attention runs: ``sparse_attention`` picks the Triton kernels (``triton/``, CUDA tensors or
``backend="triton"``), the block-gathered PyTorch path (``cpu/gathered_attention.py``, other
tensors) or the dense masked reference (``reference.py``, the exact oracle).

Nothing here imports Triton: ``triton/`` is loaded on the first kernel launch, so the CPU paths
work on a machine without Triton (setup.py installs it on Linux only).
"""
from __future__ import annotations

import torch

from .cpu.gathered_attention import gathered_attention
from .pattern import SparsePattern, check_attention_inputs
from .reference import reference_attention

BACKENDS = ("auto", "triton", "gather", "reference")


def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: SparsePattern,
                     causal: bool = True, scale: float | None = None, *, backend: str = "auto",
                     chunk: int | None = None) -> torch.Tensor:
    """Softmax attention over the pattern's attended set; q, k, v (batch, heads, seq, head_dim).

    ``backend="auto"`` runs the Triton kernels on CUDA tensors and the block-gathered PyTorch path
    (``gathered_attention``: cost linear in n, any dtype and head_dim) on others; ``"triton"`` forces
    the kernels (on CPU tensors that needs TRITON_INTERPRET=1 set before the kernels are first
    loaded, the first Triton launch of the process); ``"gather"`` forces the gathered path;
    ``"reference"`` the dense masked reference, the exact oracle (``chunk`` applies there only).
    """
    if backend not in BACKENDS:
        raise ValueError(f"sparse_attention: backend must be one of {BACKENDS}, got {backend!r}")
    scale = check_attention_inputs(q, k, v, pattern, causal, scale)
    if chunk is not None and backend != "reference":
        raise ValueError(f"sparse_attention: chunk={chunk!r} applies to backend='reference' only, "
                         f"not {backend!r}")
    if backend == "reference":
        return reference_attention(q, k, v, pattern, causal=causal, scale=scale, chunk=chunk)
    if backend == "gather" or (backend == "auto" and not q.is_cuda):
        return gathered_attention(q, k, v, pattern, causal=causal, scale=scale)
    from .triton.function import triton_attention  # Triton is imported here, on the first launch

    return triton_attention(q, k, v, pattern, causal, scale)
