"""The sampler of ``generate``: temperature, top-k (``filter_thres``) and top-p over (b, vocab) logits."""
from __future__ import annotations

import torch
from torch import Tensor


def top_k_count(vocab: int, filter_thres: float) -> int:
    """How many logits a top-k filter keeps: the top (1 - filter_thres) fraction, at least one."""
    # round first: (1 - 0.9) * 20 is 1.9999999999999996 in floating point, and 10% of 20 is 2
    return max(int(round((1 - filter_thres) * vocab, 6)), 1)


def sample(logits: Tensor, temperature, filter_thres, top_p, generator) -> Tensor:
    """(b, vocab) float logits -> (b,) ids.

    Samples among the top-k candidates only (sorted by topk), so every op after topk works on
    k values instead of the vocabulary: the same distribution as masking the rest to -inf.
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    vocab = logits.shape[-1]
    k = top_k_count(vocab, filter_thres) if filter_thres else vocab
    idx = None
    if k < vocab or (top_p is not None and top_p < 1.0):
        logits, idx = logits.topk(k, dim=-1)  # sorted, largest first
    if temperature != 1.0:
        logits = logits / temperature
    if top_p is not None and top_p < 1.0:
        probs = logits.softmax(dim=-1)
        # drop a candidate when the mass before it already reaches top_p (the first stays)
        logits = logits.masked_fill(probs.cumsum(dim=-1) - probs >= top_p, float("-inf"))
    # exponential race: argmax(logits - log E), E ~ Exp(1), draws from softmax(logits)
    # (Gumbel-max) in three small ops instead of softmax + multinomial
    noise = torch.empty_like(logits).exponential_(generator=generator)
    choice = (logits - noise.log_()).argmax(dim=-1, keepdim=True)
    return (choice if idx is None else idx.gather(-1, choice)).squeeze(-1)
