"""Parallelism applied to a plain ``TerraByte`` from outside: the rank layout, the pipeline layers,
DeepSpeed-Ulysses sequence parallelism and the AutoTP partition specs.

The model file knows nothing of ranks. Every form here runs the model's own walk (``TerraByte.patches``,
``embed_patches``, ``Stage.run_blocks``, ``lower``, ``forward_patches``) on the model's own modules, so it
computes what ``TerraByte.forward`` computes; a form only picks the range of patches, the layers or the
attention modules:

* ``plan_layout``: which ranks form a data-parallel replica (pipeline stages, tensor- or
  sequence-parallel peers) and which data-parallel rank reads which data.
* ``pipeline_module``: the hierarchy as a flat list of ``deepspeed.pipe.LayerSpec`` (embedding,
  global blocks, then the lower stages with the loss as one chunked layer) for DeepSpeed's pipeline
  engine, split into stages at boundaries computed here (``pipeline_parts``: by default balancing
  the stages' training FLOPs, which DeepSpeed's own partitioners cannot see).
* ``SequenceParallel``: each rank of a sequence-parallel group holds a contiguous run of patches.
  The global stage's attention runs through Ulysses ``DistributedAttention`` (all-to-all: whole
  sequence, a slice of the heads); the lower stages are independent per patch given the global
  stage's output, so they run on the rank's own patches with no communication.
* ``autotp_config``: column/row partition specs for the attention and feed-forward projections.
* ``heads_slice``: a rank that holds a slice of a stage's heads (Ulysses, AutoTP, or both: Ulysses
  groups run across the tensor-parallel peers) attends with those heads' own patterns, by global
  head index, so no layout changes which keys a query attends.

DeepSpeed is imported lazily, inside the functions that need it.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

from torch import Tensor, nn

from terrabyte.data_pipeline.basics.errors import ConfigError

from . import ds_seams
from .args import validate_world
from .estimate import pipeline_layer_costs
from .model import Attention, TerraByte

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


# --------------------------------------------------------------------------- pipeline


class _Source:
    """Holds the built model while the pipeline layers are built, then lets it go (the layer specs
    stay referenced by the PipelineModule; the model's other stages must not)."""

    def __init__(self, model: TerraByte):
        self.model: Optional[TerraByte] = model


def model_part(model: nn.Module, names: list[str]) -> nn.Module:
    """``model`` holding only the submodules and parameters at the dotted ``names``, as torchtitan's
    pipeline split deletes what a stage does not hold. The modules on the way to them are shallow
    copies (same class and attributes, so the model's methods run on them); the named ones and every
    parameter are the model's own: nothing is allocated and the model itself is left whole."""
    wanted: dict = {}
    for name in names:
        node = wanted
        for part in name.split("."):
            node = node.setdefault(part, {})
    return _pruned(model, wanted)


def _pruned(module: nn.Module, wanted: dict) -> nn.Module:
    if not wanted:
        return module
    part = copy.copy(module)
    part._modules = {k: _pruned(m, wanted[k]) for k, m in module._modules.items() if k in wanted}
    part._parameters = {k: v for k, v in module._parameters.items() if k in wanted}
    part._buffers = {k: v for k, v in module._buffers.items() if k in wanted}
    return part


def _hold(wrapper: nn.Module, model: nn.Module) -> None:
    """Register ``model``'s modules in ``wrapper`` under their own names (its state-dict keys are the
    model's) and keep ``model`` as ``wrapper.model``, unregistered, to run its methods on them."""
    for name, module in model.named_children():
        wrapper.add_module(name, module)
    object.__setattr__(wrapper, "model", model)


class _PipeLayer(nn.Module):
    """Base of the pipeline layers: ``self.model`` is the part of the model a layer computes
    (``model_part``), its modules registered under the plain model's names."""

    def __init__(self, source: _Source, names: list[str]):
        super().__init__()
        if source.model is None:
            raise RuntimeError("pipeline layer specs can only be built while pipeline_module() runs")
        _hold(self, model_part(source.model, names))


def _whole_sequences(model: TerraByte, x: Tensor, layout: str) -> Tensor:
    """The patches of x (b, context_length) for a layout that splits fixed sequences (the pipeline's
    activations, a sequence-parallel rank's range)."""
    if x.ndim != 2 or x.shape[1] != model.context_length:
        raise ConfigError(f"{layout} input has shape {tuple(x.shape)}; it takes whole sequences "
                          f"(batch, {model.context_length})")
    return model.patches(x)


class EmbedLayer(_PipeLayer):
    """ids (b, n) -> (global-stage tokens (b, patches, dim0), patches (b, patches, patch))."""

    def __init__(self, source: _Source):
        super().__init__(source, ["stages.0.embed", "stages.0.start_token"])

    def forward(self, ids: Tensor):
        units = _whole_sequences(self.model, ids, "pipeline")
        return self.model.embed_patches(units, 0, units.shape[1]), units


class BlockLayer(_PipeLayer):
    """Block i of stage 0: (x, patches) -> (x, patches)."""

    def __init__(self, source: _Source, i: int):
        stage = source.model.stages[0]
        super().__init__(source, [f"stages.0.layers.{i}"] + (["stages.0.rotary"] if stage.rotary is not None else []))
        self.i = i

    def forward(self, inputs):
        x, units = inputs
        return self.model.stages[0].run_blocks(x, self.i, self.i + 1), units


class LowerLayer(_PipeLayer):
    """Stage 0's final norm, the lower stages and the loss, chunk by chunk (``TerraByte.lower``, as the
    plain forward): (x_0, patches) -> 0-dim sum of nats over non-PAD bytes. One layer, because a chunk
    runs through every lower stage before the next chunk starts: split over pipeline ranks, the lower
    stages would pass whole-sequence activations."""

    def __init__(self, source: _Source):
        lower = [f"stages.{s}" for s in range(1, source.model.num_stages)]
        super().__init__(source, ["stages.0.norm", "stages.0.to_next", "to_logits", *lower])

    def forward(self, inputs):
        x, units = inputs
        return self.model.lower(self.model.stages[0].norm(x), units, 0, "sum")


class PipelineLoss:
    """The last layer's summed nats over the labels' non-PAD bytes: ``reduction`` is ``mean`` for
    training (as the plain model's loss) and ``sum`` while scoring."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id
        self.reduction = "mean"

    def __call__(self, nats: Tensor, labels: Tensor) -> Tensor:
        return nats if self.reduction == "sum" else nats / (labels != self.pad_id).sum()


def pipeline_layers(source: _Source) -> list[tuple[type, tuple]]:
    """The hierarchy as one flat sequence of (layer class, arguments): embedding, stage 0's blocks,
    then the lower stages with the loss."""
    model = source.model
    layers: list[tuple[type, tuple]] = [(EmbedLayer, (source,))]
    layers += [(BlockLayer, (source, i)) for i in range(model.stages[0].depth)]
    layers.append((LowerLayer, (source,)))
    return layers


def pipeline_layer_specs(source: _Source) -> list:
    """The layers as ``deepspeed.pipe.LayerSpec``: each stage builds only its own."""
    from deepspeed.pipe import LayerSpec

    return [LayerSpec(cls, *args) for cls, args in pipeline_layers(source)]


def balanced_parts(costs: list[float], stages: int) -> list[int]:
    """Boundaries [0, b1, ..., len(costs)] of ``stages`` contiguous, non-empty runs of layers whose
    largest total cost is as small as it can be (a pipeline runs at the pace of its slowest stage);
    among equals, the earliest cuts (under 1F1B the first stages hold the most micro-batches' activations).
    Exact dynamic programme, O(layers^2 x stages)."""
    n = len(costs)
    if not 1 <= stages <= n:
        raise ConfigError(f"cannot split {n} pipeline layers into {stages} non-empty stages")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    # best[j][i]: the smallest largest-stage cost of layers i.. over j stages; cut[j][i]: its first cut
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    cut = [[n] * (n + 1) for _ in range(stages + 1)]
    best[0][n] = 0.0
    for j in range(1, stages + 1):
        for i in range(n - j, -1, -1):
            for k in range(i + 1, n - j + 2):
                value = max(prefix[k] - prefix[i], best[j - 1][k])
                if value < best[j][i]:
                    best[j][i], cut[j][i] = value, k
    parts, i = [0], 0
    for j in range(stages, 0, -1):
        i = cut[j][i]
        parts.append(i)
    return parts


def pipeline_parts(model: TerraByte, cfg: Config, costs: list[dict] | None = None) -> list[int]:
    """Layer boundaries of the pipeline stages for ``parallel.pipeline_partition``: ``flops`` balances
    the stages' training FLOPs (``estimate.pipeline_layer_costs``, or ``costs`` when the caller has
    them), ``parameters`` their parameter counts and ``uniform`` their layer counts (DeepSpeed's own
    partitioners for those two)."""
    costs = pipeline_layer_costs(model, cfg) if costs is None else costs
    stages, method = cfg.parallel.pipeline_stages, cfg.parallel.pipeline_partition
    if method == "flops":
        return balanced_parts([layer["flops"] for layer in costs], stages)
    return ds_seams.partition(method, [layer["parameters"] for layer in costs], stages)


def describe_pipeline(cfg: Config) -> str:
    """``--dry-run``'s table of the pipeline stages: their layers, parameters and training FLOPs."""
    from .estimate import meta_model

    model = meta_model(cfg)
    costs = pipeline_layer_costs(model, cfg)
    parts = pipeline_parts(model, cfg, costs)
    lines = [f"pipeline: {cfg.parallel.pipeline_stages} stages, parallel.pipeline_partition="
             f"{cfg.parallel.pipeline_partition}", "",
             "| pipeline stage | layers | parameters | train FLOPs/sequence | share of FLOPs |", "|---|---|---|---|---|"]
    total = sum(layer["flops"] for layer in costs)
    for s in range(len(parts) - 1):
        mine = costs[parts[s]:parts[s + 1]]
        names = mine[0]["name"] if len(mine) == 1 else f"{mine[0]['name']} .. {mine[-1]['name']}"
        flops = sum(layer["flops"] for layer in mine)
        lines.append(f"| {s} | {names} | {sum(layer['parameters'] for layer in mine):,} | {flops:.3g} | "
                     f"{flops / total:.0%} |")
    return "\n".join(lines)


def pipeline_module(model: TerraByte, cfg: Config) -> nn.Module:
    """``deepspeed.pipe.PipelineModule`` of ``model``; this rank keeps only its stage's layers."""
    parts = pipeline_parts(model, cfg)
    source = _Source(model)
    module = ds_seams.explicit_pipeline_module(
        parts,
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


def heads_slice(attend: Callable, start: int, count: int) -> Callable:
    """``attend`` for heads [start, start + count) of its stage on their own: an attention that
    depends on the head (a sparse pattern's ``for_heads``) keeps the global head index; dense
    attention is the same for every head."""
    for_heads = getattr(attend, "for_heads", None)
    return attend if for_heads is None else for_heads(start, count)


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
        units = _whole_sequences(model, x.reshape(x.shape[0], -1), "sequence-parallel")
        per = units.shape[1] // self.sp_size
        p0 = self.sp_rank * per
        nats = model.forward_patches(units, p0, p0 + per, reduction="sum")
        if return_loss == "sum":
            return self._sum_over_group(nats)
        scored = (units != model.pad_id).sum().clamp(min=1)  # the whole micro-batch: every rank has it
        return nats * self.sp_size / scored

    def _sum_over_group(self, value: Tensor) -> Tensor:
        """The group's total on every rank (for scoring: not differentiable)."""
        import deepspeed.comm as dist

        total = value.detach().clone()
        dist.all_reduce(total, group=self.group)
        return total


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


def shard_attention_heads(module: nn.Module, tp: int, tp_rank: int) -> int:
    """After AutoTP split q/k/v by heads, each rank's ``Attention`` holds ``heads / tp`` of them (rank
    t the t-th run): fix the head count its reshapes use (AutoTP only knows HF attribute names) and
    give its attention those heads' patterns. Returns modules changed."""
    attentions = [sub for sub in module.modules() if isinstance(sub, Attention)]
    for sub in attentions:
        sub.heads //= tp
        sub.attend = heads_slice(sub.attend, tp_rank * sub.heads, sub.heads)
    return len(attentions)
