"""Parallelism applied to a plain ``TerraByte`` from outside: the rank layout, the pipeline layers,
DeepSpeed-Ulysses sequence parallelism and the AutoTP partition specs.

The model file knows nothing of ranks. Everything here reuses the model's own modules (and methods,
where they fit: ``Stage.inputs`` builds every stage's input tokens, ``model.cross_entropy`` is the
loss) so the parallel forms compute what ``TerraByte.forward`` computes:

* ``plan_layout``: which ranks form a data-parallel replica (pipeline stages, tensor- or
  sequence-parallel peers) and which data-parallel rank reads which data.
* ``pipeline_module``: the hierarchy as a flat list of ``deepspeed.pipe.LayerSpec`` (embedding,
  global blocks, the global->local projection, local blocks, head) for DeepSpeed's pipeline engine.
* ``SequenceParallel``: each rank of a sequence-parallel group holds a contiguous run of patches.
  The global stage's attention runs through Ulysses ``DistributedAttention`` (all-to-all: whole
  sequence, a slice of the heads); the lower stages are independent per patch given the global
  stage's output, so they run on the rank's own patches with no communication.
* ``autotp_config``: column/row partition specs for the attention and feed-forward projections.

DeepSpeed is imported lazily, inside the functions that need it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from terrabyte.data_pipeline.errors import ConfigError

from .args import validate_world
from .model import Attention, Stage, TerraByte, cross_entropy, units_before

if TYPE_CHECKING:
    from .args import Config


# --------------------------------------------------------------------------- rank layout


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
    def sp_rank(self) -> int:
        return self.rank % self.sequence

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
        # AutoTP's (data, tensor) mesh and our sequence-parallel groups keep a replica's ranks adjacent
        dp_rank = rank // (tp * sp)
    return Layout(world, rank, pp, tp, sp, dp, dp_rank, accumulation)


# --------------------------------------------------------------------------- pipeline


class _Source:
    """Holds the built model while the pipeline layers are built, then lets it go (the layer specs
    stay referenced by the PipelineModule; the model's other stages must not)."""

    def __init__(self, model: TerraByte):
        self.model: Optional[TerraByte] = model


def _adopt(owner: nn.Module, model: nn.Module, names: list[str]) -> None:
    """Register ``model``'s submodules/parameters under ``owner`` at the same dotted paths, so a pipeline
    layer's state-dict keys are the plain model's keys."""
    for name in names:
        *path, leaf = name.split(".")
        src, dst = model, owner
        for part in path:
            src = getattr(src, part)
            if part not in dst._modules:
                dst.add_module(part, nn.Module())
            dst = dst._modules[part]
        obj = getattr(src, leaf)
        if isinstance(obj, nn.Parameter):
            dst.register_parameter(leaf, obj)
        else:
            dst.add_module(leaf, obj)


class _PipeLayer(nn.Module):
    """Base of the pipeline layers: owns a part of the model under its original names."""

    def __init__(self, source: _Source, names: list[str]):
        super().__init__()
        model = source.model
        if model is None:
            raise RuntimeError("pipeline layer specs can only be built while pipeline_module() runs")
        _adopt(self, model, names)
        self.vocab_size = model.vocab_size
        self.seq_lens = model.max_seq_len
        self.unit_sizes = model.unit_sizes

    def stage(self, s: int) -> nn.Module:
        """The adopted part of ``model.stages[s]``; Stage methods run on it as on the full stage."""
        return self.stages._modules[str(s)]


class EmbedLayer(_PipeLayer):
    """ids (b, n) -> (global-stage tokens (b, patches, dim0), ids)."""

    def __init__(self, source: _Source):
        super().__init__(source, ["stages.0.embed", "stages.0.start_token"])
        self.context_length = source.model.context_length

    def forward(self, ids: Tensor):
        if ids.ndim != 2 or ids.shape[1] != self.context_length:
            raise ConfigError(
                f"pipeline input has shape {tuple(ids.shape)}; it takes whole sequences (batch, {self.context_length})"
            )
        units = ids.view(ids.shape[0], -1, self.unit_sizes[0])  # (b, patches, patch bytes)
        return Stage.inputs(self.stage(0), units, None), ids


class BlockLayer(_PipeLayer):
    """One transformer block of stage ``s``: (x, ids) -> (x, ids)."""

    def __init__(self, source: _Source, s: int, i: int):
        stage = source.model.stages[s]
        names = [f"stages.{s}.layers.{i}"] + ([f"stages.{s}.rotary"] if stage.rotary is not None else [])
        super().__init__(source, names)
        self.s, self.i = s, str(i)
        self.checkpoint_activations = source.model.checkpoint_activations

    def forward(self, inputs):
        x, ids = inputs
        node = self.stage(self.s)
        block = node.layers._modules[self.i]
        freqs = node.rotary.freqs[: x.shape[1]] if "rotary" in node._modules else None
        if self.checkpoint_activations and torch.is_grad_enabled():
            x = checkpoint(block, x, freqs, use_reentrant=False)
        else:
            x = block(x, freqs)
        return x, ids


class TransitionLayer(_PipeLayer):
    """Stage s's final norm and projection down, then stage s+1's inputs: (x_s, ids) -> (x_{s+1}, ids)."""

    def __init__(self, source: _Source, s: int):
        super().__init__(source, [f"stages.{s}.norm", f"stages.{s}.to_next",
                                  f"stages.{s + 1}.embed", f"stages.{s + 1}.start_token"])
        self.s = s
        self.stage(s).next_seq_len = source.model.stages[s].next_seq_len

    def forward(self, inputs):
        x, ids = inputs
        upper, lower = self.stage(self.s), self.stage(self.s + 1)
        ctx = Stage.project_down(upper, upper.norm(x))  # (B * positions, next_seq_len, next_dim)
        units = ids.view(-1, self.seq_lens[self.s + 1], self.unit_sizes[self.s + 1])
        before, starts = units_before(ids, self.unit_sizes[self.s], self.unit_sizes[self.s + 1])
        return Stage.inputs(lower, units, ctx, before=before, starts=starts), ids


class HeadLayer(_PipeLayer):
    """The last stage's norm and the output projection: (x, ids) -> logits (b, n, vocab)."""

    def __init__(self, source: _Source):
        last = len(source.model.stages) - 1
        super().__init__(source, [f"stages.{last}.norm", "to_logits"])
        self.last = last

    def forward(self, inputs):
        x, ids = inputs
        h = self.stage(self.last).norm(x)
        return self.to_logits(h).view(ids.shape[0], -1, self.vocab_size)


class PipelineLoss:
    """Cross-entropy over non-PAD targets; ``reduction`` is ``mean`` for training (as the plain
    model's loss) and ``sum`` while scoring."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id
        self.reduction = "mean"

    def __call__(self, logits: Tensor, labels: Tensor) -> Tensor:
        return cross_entropy(logits, labels, self.pad_id, self.reduction)


def pipeline_layers(source: _Source) -> list[tuple[type, tuple]]:
    """The hierarchy as one flat sequence of (layer class, arguments): embedding, stage 0's blocks,
    0->1 transition, stage 1's blocks, ..., head."""
    model = source.model
    layers: list[tuple[type, tuple]] = [(EmbedLayer, (source,))]
    for s, stage in enumerate(model.stages):
        layers += [(BlockLayer, (source, s, i)) for i in range(stage.depth)]
        last = s == len(model.stages) - 1
        layers.append((HeadLayer, (source,)) if last else (TransitionLayer, (source, s)))
    return layers


def pipeline_layer_specs(source: _Source) -> list:
    """The layers as ``deepspeed.pipe.LayerSpec``: each stage builds only its own."""
    from deepspeed.pipe import LayerSpec

    return [LayerSpec(cls, *args) for cls, args in pipeline_layers(source)]


def pipeline_module(model: TerraByte, cfg: Config) -> nn.Module:
    """``deepspeed.pipe.PipelineModule`` of ``model``; this rank keeps only its stage's layers."""
    from deepspeed.pipe import PipelineModule

    source = _Source(model)
    module = PipelineModule(
        layers=pipeline_layer_specs(source),
        num_stages=cfg.parallel.pipeline_stages,
        loss_fn=PipelineLoss(model.pad_id),
        partition_method=cfg.parallel.pipeline_partition,
        activation_checkpoint_interval=0,  # the block layers checkpoint themselves (model.checkpoint_activations)
    )
    source.model = None
    return module


def pipeline_key(key: str) -> str:
    """PipelineModule state-dict key -> plain model key: drop the leading layer index."""
    return key.split(".", 1)[1]


# --------------------------------------------------------------------------- sequence parallelism


def sequence_parallel_group(layout: Layout):
    """This rank's sequence-parallel group: ``sequence`` adjacent ranks. Every rank creates every
    group (a collective), in the same order."""
    import deepspeed.comm as dist

    mine = None
    for replica in range(layout.world // layout.sequence):
        ranks = list(range(replica * layout.sequence, (replica + 1) * layout.sequence))
        group = dist.new_group(ranks)
        if layout.rank in ranks:
            mine = group
    return mine


class UlyssesAttention(nn.Module):
    """A stage's attention callable under DeepSpeed-Ulysses: takes this rank's positions for all heads,
    (b, h, n/sp, d); the all-to-all hands ``local`` the whole sequence for h/sp heads; returns
    (b, h, n/sp, d)."""

    def __init__(self, local: Callable, group):
        super().__init__()
        from deepspeed.sequence.layer import DistributedAttention

        self.local = local
        # scatter the head axis (2), gather the sequence axis (1) of (b, n, h, d) tensors
        self.ulysses = DistributedAttention(self._attend_bnhd, group, scatter_idx=2, gather_idx=1)

    def _attend_bnhd(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        # (b, n, h/sp, d) -> (b, h/sp, n, d) for the model's attention callables, and back
        out = self.local(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        out = self.ulysses(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), batch_dim_idx=0)
        return out.transpose(1, 2)


class SequenceParallel(nn.Module):
    """``TerraByte`` with each sequence's patches split over a sequence-parallel group.

    Holds the model's ``stages`` and ``to_logits`` under the same names (same state-dict keys). Rank r
    of the group computes patches [r * P/sp, (r+1) * P/sp) of every sequence: global-stage activations,
    local-stage activations and logits all shrink by the group size. The global stage's attention goes
    through Ulysses (its ``attend`` callables are replaced in place); everything else is per position.

    ``forward(x, return_loss=True)`` returns this rank's share of the loss, scaled so that the mean over
    the group equals the plain model's mean loss over the whole micro-batch (gradients are averaged
    over all ranks). Without ``return_loss`` it returns the whole sequence's logits on every rank (for
    evaluation; not differentiable).
    """

    def __init__(self, model: TerraByte, group, rank: int, size: int):
        super().__init__()
        if model.max_seq_len[0] % size:
            raise ConfigError(f"sequence parallel size {size} must divide the {model.max_seq_len[0]} global patches")
        self.stages = model.stages
        self.to_logits = model.to_logits
        self.group, self.sp_rank, self.sp_size = group, rank, size
        self.pad_id, self.vocab_size = model.pad_id, model.vocab_size
        self.patches, self.unit_sizes = model.max_seq_len[0], model.unit_sizes
        self.context_length = model.context_length
        for block in model.stages[0].layers.values():
            block.attn.attend = UlyssesAttention(block.attn.attend, group)

    def _global_stage(self, ids: Tensor) -> Tensor:
        """Stage 0 for this rank's patches [p0, p1): (b, p1 - p0, dim0), normalised."""
        stage, b = self.stages[0], ids.shape[0]
        per = self.patches // self.sp_size
        p0, p1 = self.sp_rank * per, (self.sp_rank + 1) * per
        units = ids.view(b, self.patches, self.unit_sizes[0])
        x = stage.inputs(units, start=p0, end=p1)  # (b, p1 - p0, dim0)
        if p0 > 0:
            # every rank uses the start token, if only with weight 0: ZeRO-3 gathers a parameter and
            # reduces its gradient as collectives, so all ranks must touch the same parameters
            x = x + 0 * stage.start_token.to(x.dtype)
        return stage(x, start=p0)  # rotary positions of this rank's patches

    def forward(self, x: Tensor, return_loss: bool = False) -> Tensor:
        ids = x.reshape(x.shape[0], -1)
        if ids.shape[1] != self.context_length:
            raise ConfigError(
                f"sequence-parallel input has {ids.shape[1]} bytes per row; it takes whole sequences of "
                f"{self.context_length}"
            )
        b = ids.shape[0]
        h = self._global_stage(ids)
        span = h.shape[1] * self.unit_sizes[0]
        mine = ids[:, self.sp_rank * span:(self.sp_rank + 1) * span]  # this rank's bytes (b, n / sp)
        ctx = self.stages[0].project_down(h)
        for s, stage in enumerate(self.stages):
            if s == 0:
                continue
            units = mine.reshape(-1, stage.seq_len, stage.unit_size)
            # this rank's groups of the stage, and the unit before each, which may be another rank's
            parent = self.unit_sizes[s - 1]
            lo = self.sp_rank * span // parent
            before, starts = units_before(ids, parent, stage.unit_size, lo, lo + span // parent)
            h = stage(stage.inputs(units, ctx, before=before, starts=starts))
            if stage.to_next is not None:
                ctx = stage.project_down(h)
        logits = self.to_logits(h).view(b, span, self.vocab_size)
        if return_loss:
            nats = cross_entropy(logits, mine, self.pad_id, reduction="sum")
            scored = (ids != self.pad_id).sum().clamp(min=1)  # the whole micro-batch: every rank has it
            return nats * self.sp_size / scored
        return self._gather_sequence(logits).view(*x.shape, self.vocab_size)

    def _gather_sequence(self, part: Tensor) -> Tensor:
        import deepspeed.comm as dist

        parts = [torch.empty_like(part) for _ in range(self.sp_size)]
        dist.all_gather(parts, part.contiguous(), group=self.group)
        return torch.cat(parts, dim=1)


# --------------------------------------------------------------------------- tensor parallelism

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


def shard_attention_heads(module: nn.Module, tp: int) -> int:
    """After AutoTP split q/k/v by heads, each rank's ``Attention`` holds ``heads / tp`` of them: fix
    the head count its reshapes use (AutoTP only knows HF attribute names). Returns modules changed."""
    changed = 0
    for sub in module.modules():
        if isinstance(sub, Attention):
            sub.heads //= tp
            changed += 1
    return changed
