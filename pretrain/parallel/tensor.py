"""Tensor parallelism (AutoTP): column/row partition specs for the attention and feed-forward
projections, and each rank's slice of a stage's heads (``heads_slice``, which Ulysses uses too)."""
from __future__ import annotations

from typing import Callable

from torch import nn

from ..model.layers import Attention


def heads_slice(attend: Callable, start: int, count: int) -> Callable:
    """``attend`` for heads [start, start + count) of its stage on their own: an attention that
    depends on the head (a sparse pattern's ``for_heads``) keeps the global head index; dense
    attention is the same for every head."""
    for_heads = getattr(attend, "for_heads", None)
    return attend if for_heads is None else for_heads(start, count)


# Column-parallel: output features split (q, k, v by heads; SwiGLU gate/up by hidden units).
# Row-parallel: input features split, partial outputs all-reduced. Everything else is replicated.
TP_COLUMN = [r".*\.attn\.to_[qkv]\.weight$", r".*\.ff\.(gate|up)_proj\.weight$"]
TP_ROW = [r".*\.attn\.to_out\.weight$", r".*\.ff\.down_proj\.weight$"]


def autotp_config(tp: int) -> dict:
    """DeepSpeed ``tensor_parallel`` section with explicit specs (our model is not a HF model, so
    AutoTP cannot guess a policy)."""
    return {
        "autotp_size": tp,
        "partition_config": {
            "use_default_specs": False,
            "layer_specs": [
                {"patterns": TP_COLUMN, "partition_type": "column"},
                {"patterns": TP_ROW, "partition_type": "row"},
            ],
        },
    }


def shard_attention_heads(module: nn.Module, tp: int, tp_rank: int) -> int:
    """After AutoTP split q/k/v by heads, each rank's ``Attention`` holds ``heads / tp`` of them (rank
    t the t-th run): fix the head count its reshapes use (AutoTP only knows HF attribute names) and
    give its attention those heads' patterns. Returns modules changed."""
    attentions = [sub for sub in module.modules() if isinstance(sub, Attention)]
    for sub in attentions:
        sub.heads //= tp
        sub.attend = heads_slice(sub.attend, tp_rank * sub.heads, sub.heads)
    return len(attentions)
