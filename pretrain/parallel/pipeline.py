"""Pipeline parallelism: the hierarchy as a flat list of layers (embedding, global blocks, then the
lower stages with the loss as one chunked layer), each a pruned part of the real model
(``model_part``) running one step of its walk, for DeepSpeed's pipeline engine, split into stages at
boundaries computed here (``pipeline_parts``: by default balancing the stages' training FLOPs, which
DeepSpeed's own partitioners cannot see). DeepSpeed is imported lazily."""
from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Optional

from torch import Tensor, nn

from terrabyte.data_pipeline.basics.errors import ConfigError

from ..engine import ds_seams
from ..model.patching import PatchLayout
from ..model.terrabyte import TerraByte
from ..train.dry_run import pipeline_layer_costs

if TYPE_CHECKING:
    from ..train.config import Config


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


def _whole_sequences(model: TerraByte, x: Tensor, layout: str, multiple: int = 1) -> PatchLayout:
    """The ``patches`` layout of x (b, context_length) for a layout that splits whole sequences (the
    pipeline's activations, a sequence-parallel rank's range), P a multiple of ``multiple``."""
    if x.ndim != 2 or x.shape[1] != model.context_length:
        raise ConfigError(f"{layout} input has shape {tuple(x.shape)}; it takes whole sequences "
                          f"(batch, {model.context_length})")
    return model.patches(x, multiple=multiple)


class EmbedLayer(_PipeLayer):
    """ids (b, n) -> (global-stage tokens (b, patches, dim0), patches (b, patches, patch))."""

    def __init__(self, source: _Source):
        super().__init__(source, ["stages.0.embed", "stages.0.start_token", "patcher"])

    def forward(self, ids: Tensor):
        units = _whole_sequences(self.model, ids, "pipeline").units  # fixed patches (see train/config.py)
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
        return self.model.lower(self.model.stages[0].norm(x), PatchLayout(units), 0, "sum")


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
    the stages' training FLOPs (``dry_run.pipeline_layer_costs``, or ``costs`` when the caller has
    them), ``parameters`` their parameter counts and ``uniform`` their layer counts (DeepSpeed's own
    partitioners for those two)."""
    costs = pipeline_layer_costs(model, cfg) if costs is None else costs
    stages, method = cfg.parallel.pipeline_stages, cfg.parallel.pipeline_partition
    if method == "flops":
        return balanced_parts([layer["flops"] for layer in costs], stages)
    return ds_seams.partition(method, [layer["parameters"] for layer in costs], stages)


def describe_pipeline(cfg: Config) -> str:
    """``--dry-run``'s table of the pipeline stages: their layers, parameters and training FLOPs."""
    from ..train.dry_run import meta_model

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
