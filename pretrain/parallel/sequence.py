"""DeepSpeed-Ulysses sequence parallelism: each rank of a sequence-parallel group holds a contiguous
run of patches. The global stage's attention runs through Ulysses ``DistributedAttention``
(all-to-all: whole sequence, a slice of the heads); the lower stages are independent per patch given
the global stage's output, so they run on the rank's own patches with no communication. DeepSpeed is
imported lazily."""
from __future__ import annotations

from typing import Callable

from torch import Tensor, nn

from terrabyte.data_pipeline.basics.errors import ConfigError

from ..model.terrabyte import TerraByte
from .layout import Layout
from .pipeline import _hold, _whole_sequences
from .tensor import heads_slice


def sequence_parallel_ranks(layout: Layout) -> list[list[int]]:
    """The sequence-parallel groups: the ranks of one replica with the same tensor-parallel rank."""
    tp, sp = layout.tensor, layout.sequence
    return [[(replica * sp + s) * tp + t for s in range(sp)]
            for replica in range(layout.world // (tp * sp)) for t in range(tp)]


def sequence_parallel_group(layout: Layout):
    """This rank's sequence-parallel group. Every rank creates every group (a collective), in the
    same order."""
    import deepspeed.comm as dist

    mine = None
    for ranks in sequence_parallel_ranks(layout):
        group = dist.new_group(ranks)
        if layout.rank in ranks:
            mine = group
    return mine


class UlyssesAttention(nn.Module):
    """A stage's attention callable under DeepSpeed-Ulysses: takes this rank's positions for all its
    ``heads`` (b, heads, n/sp, d); the all-to-all hands rank r of the group the whole sequence for
    heads [r * heads/sp, (r + 1) * heads/sp), attended by ``full`` sliced to those heads (global
    index ``first_head`` + ...); returns (b, heads, n/sp, d)."""

    def __init__(self, full: Callable, group, rank: int, size: int, heads: int, first_head: int = 0):
        super().__init__()
        from deepspeed.sequence.layer import DistributedAttention

        self.full, self.rank, self.size, self.first_head = full, rank, size, 0
        self.for_heads(first_head, heads)  # sets self.local: this rank's slice of the heads
        # scatter the head axis (2), gather the sequence axis (1) of (b, n, h, d) tensors
        self.ulysses = DistributedAttention(self._attend_bnhd, group, scatter_idx=2, gather_idx=1)

    def for_heads(self, start: int, count: int) -> "UlyssesAttention":
        """Tensor parallelism on top: this rank keeps heads [start, start + count) of its current ones,
        split again over the group. In place: the module DeepSpeed already hooked stays."""
        if count % self.size:
            raise ConfigError(f"sequence parallel size {self.size} must divide the {count} heads left on a rank")
        self.first_head += start
        per = count // self.size
        self.local = heads_slice(self.full, self.first_head + self.rank * per, per)
        return self

    def _attend_bnhd(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        # (b, n, h/sp, d) -> (b, h/sp, n, d) for the model's attention callables, and back
        out = self.local(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        out = self.ulysses(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), batch_dim_idx=0)
        return out.transpose(1, 2)


class SequenceParallel(nn.Module):
    """``TerraByte`` with each sequence's patches split over a sequence-parallel group.

    Holds the model's modules under the same names (same state-dict keys). Rank r of the group runs
    the model's walk (``forward_patches``) over patches [r * P/sp, (r+1) * P/sp) of every sequence:
    global-stage activations, local-stage activations and logits all shrink by the group size. The
    global stage's attention goes through Ulysses (its ``attend`` callables are replaced in place);
    everything else is per position.

    ``forward(x, return_loss=True)`` returns this rank's share of the loss, scaled so that the mean over
    the group equals the plain model's mean loss over the whole micro-batch (gradients are averaged
    over all ranks); ``return_loss="sum"`` the group's summed nats on every rank (scoring: only a
    scalar crosses ranks). There are no logits: no rank ever holds the whole sequence's, and
    evaluation reduces losses.
    """

    def __init__(self, model: TerraByte, group, rank: int, size: int):
        super().__init__()
        if model.max_seq_len[0] % size:
            raise ConfigError(f"sequence parallel size {size} must divide the {model.max_seq_len[0]} global patches")
        _hold(self, model)
        self.group, self.sp_rank, self.sp_size = group, rank, size
        for block in model.stages[0].layers.values():
            block.attn.attend = UlyssesAttention(block.attn.attend, group, rank, size, block.attn.heads)

    def forward(self, x: Tensor, return_loss=False) -> Tensor:
        if not (return_loss is True or return_loss in ("mean", "sum")):
            raise ConfigError(f"sequence parallelism computes losses (return_loss True, 'mean' or 'sum'), not "
                              f"return_loss={return_loss!r}: no rank holds the whole sequence's logits; run the "
                              f"plain model (e.g. the exported one) for them")
        model = self.model
        ids = x.reshape(x.shape[0], -1)
        # every rank has the same rows, so the same layout: P (data-dependent where patches follow the
        # data) is the same on every rank, rounded up to split evenly
        layout = _whole_sequences(model, ids, "sequence-parallel", multiple=self.sp_size)
        per = layout.patches // self.sp_size
        p0 = self.sp_rank * per
        nats = model.forward_patches(layout, p0, p0 + per, reduction="sum")
        if return_loss == "sum":
            return self._sum_over_group(nats)
        # the entropy model's auxiliary gradient over this rank's share of the bytes
        n = ids.shape[1]
        aux = model.patcher_loss(ids, self.sp_rank * n // self.sp_size, (self.sp_rank + 1) * n // self.sp_size)
        nats = nats if aux is None else nats + aux
        scored = (ids != model.pad_id).sum().clamp(min=1)  # the whole micro-batch: every rank has it
        return nats * self.sp_size / scored

    def _sum_over_group(self, value: Tensor) -> Tensor:
        """The group's total on every rank (for scoring: not differentiable)."""
        import deepspeed.comm as dist

        total = value.detach().clone()
        dist.all_reduce(total, group=self.group)
        return total
