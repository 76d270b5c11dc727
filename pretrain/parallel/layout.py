"""The rank layout: which ranks form a data-parallel replica (pipeline stages, tensor- or
sequence-parallel peers) and which data-parallel rank reads which data."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..train.config import validate_world

if TYPE_CHECKING:
    from ..train.config import Config


@dataclass(frozen=True)
class Layout:
    """How the world is split. A data-parallel replica is ``pipeline x tensor x sequence`` ranks that
    work on the same sequences; ``dp`` replicas read different data."""

    world: int
    rank: int
    pipeline: int
    tensor: int
    sequence: int
    dp: int
    dp_rank: int
    accumulation: int
    """Micro-batches per rank per optimizer step."""

    @property
    def replica(self) -> int:
        return self.pipeline * self.tensor * self.sequence

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tensor

    @property
    def sp_rank(self) -> int:
        return (self.rank // self.tensor) % self.sequence

    def as_dict(self) -> dict:
        return {"world": self.world, "pipeline": self.pipeline, "tensor": self.tensor,
                "sequence": self.sequence, "dp": self.dp}

    def describe(self) -> str:
        return (f"{self.world} rank(s): data {self.dp} x pipeline {self.pipeline} x tensor {self.tensor} x "
                f"sequence {self.sequence}, {self.accumulation} micro-batch(es) per step")


def plan_layout(cfg: Config, world: int, rank: int) -> Layout:
    """Check the parallel degrees and the batch against the world size (ValueError naming what to
    change) and place this rank."""
    accumulation = validate_world(cfg, world)
    p = cfg.parallel
    pp, tp, sp = p.pipeline_stages, p.tensor_parallel, p.sequence_parallel
    dp = world // (pp * tp * sp)
    if pp > 1:
        # DeepSpeed's PipeDataParallelTopology numbers ranks stage-major: rank = stage * dp + dp_rank
        dp_rank = rank % dp
    else:
        # a replica's ranks are adjacent, tensor-parallel peers innermost (AutoTP's (data, tensor)
        # mesh): rank = (dp_rank * sp + sp_rank) * tp + tp_rank
        dp_rank = rank // (tp * sp)
    return Layout(world, rank, pp, tp, sp, dp, dp_rank, accumulation)
