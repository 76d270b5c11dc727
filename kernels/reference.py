"""The dense PyTorch reference: exact masked softmax attention over a pattern's attended set, the
oracle every kernel is tested against (as the Triton tutorial's naive ``ref_out``)."""
from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from .pattern import SparsePattern, check_attention_inputs


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: SparsePattern,
                        causal: bool = True, scale: float | None = None, chunk: int | None = None) -> torch.Tensor:
    """Exact masked softmax attention in plain PyTorch (fp32 or fp64 math, output in q's dtype).

    Without ``chunk`` it builds the (heads, n, n) mask. With ``chunk`` it handles ``chunk`` queries at
    a time from masks computed on the fly, and under autograd recomputes each chunk in backward
    (activation checkpointing), so memory stays O(chunk * n) instead of O(n^2).
    """
    scale = check_attention_inputs(q, k, v, pattern, causal, scale)
    n, heads = q.shape[2], q.shape[1]
    if chunk is None:
        mask = pattern.dense_mask(n, heads=heads, causal=causal, device=q.device)
        return _masked_softmax_attention(q, k, v, mask, scale)
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"reference_attention: chunk must be a positive integer, got {chunk!r}")
    outs = []
    for start in range(0, n, chunk):
        rows = torch.arange(start, min(start + chunk, n), device=q.device)
        if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
            outs.append(checkpoint(_chunk_attention, q, k, v, rows, pattern, causal, scale, use_reentrant=False))
        else:
            outs.append(_chunk_attention(q, k, v, rows, pattern, causal, scale))
    return torch.cat(outs, dim=2)


def _chunk_attention(q, k, v, rows, pattern, causal, scale):
    heads, n = q.shape[1], q.shape[2]
    keys = torch.arange(n, device=q.device)
    mask = pattern.allowed(rows[:, None], keys[None, :], head=None, causal=causal, heads=heads)
    return _masked_softmax_attention(q[:, :, rows[0]: rows[-1] + 1], k, v, mask, scale)


def _masked_softmax_attention(q, k, v, mask, scale):
    compute = torch.promote_types(q.dtype, torch.float32)  # fp16/bf16 in fp32, float64 stays exact
    scores = torch.einsum("bhid,bhjd->bhij", q.to(compute), k.to(compute)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("bhij,bhjd->bhid", probs, v.to(compute)).to(q.dtype)
