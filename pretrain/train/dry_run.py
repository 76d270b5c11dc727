"""Model size and cost estimates for ``terrabyte pretrain --dry-run``, without allocating the model.

The model is built on the meta device, so even the 1B config costs no memory. FLOPs count matrix
multiplies (2 per multiply-add) and attention scores/values over the causal half of each stage's
window (for a sparse stage: over the tiles the kernel computes); forward + backward = 3x forward. Activation memory is a per-micro-batch estimate of what
autograd keeps per block (inputs of the norms, q/k/v, attention output, the three feed-forward
projections), plus logits; with activation checkpointing only each block's input is kept. The peak
of a step is what the global stage keeps plus the larger of two phases of the backward, which never
overlap: the lower stages' chunks (two chunks of ``model.chunk_bytes``: one recomputed, its
gradients), then the global stage's blocks one at a time (a block's activation gradients, and under
checkpointing its recomputed activations). Measured against the peak RSS of CPU steps in
``terrabyte bench context --estimate`` (pretrain/BENCHMARKS.md, "Memory estimate").
"""
from __future__ import annotations

import logging
import math
import os

import torch

from terrabyte.data_pipeline.basics.errors import ConfigError

from .config import Config
from ..model.terrabyte import TerraByte

logger = logging.getLogger(__name__)


def meta_model(cfg: Config) -> TerraByte:
    with torch.device("meta"):
        return TerraByte(**cfg.model.kwargs())


def stage_parameters(model: TerraByte) -> list[dict]:
    """Per stage: total parameters and those used in matrix multiplies (embedding lookups excluded)."""
    out = []
    for s, stage in enumerate(model.stages):
        total = sum(p.numel() for p in stage.parameters())
        lookup = stage.embed.token_emb.weight.numel()
        out.append({"total": total, "matmul": total - lookup - stage.start_token.numel()})
    head = model.to_logits.weight.numel()
    out[-1]["matmul"] += head
    if not model.tie_embeddings:
        out[-1]["total"] += head
    return out


def flops_per_byte(model: TerraByte, cfg: Config) -> list[float]:
    """Training FLOPs per byte (forward + backward) contributed by each stage."""
    lens = model.max_seq_len
    per_stage = []
    for s, (params, stage) in enumerate(zip(stage_parameters(model), model.stages)):
        # per byte of a row; where patches follow the data, a row that fills max_seq_len[0] (the most)
        tokens_per_byte = math.prod(lens[: s + 1]) / cfg.model.seq_len
        attn = 2 * 2 * stage.depth * stage.heads * stage.dim_head * keys_per_query(cfg, s, lens[s])
        forward = 2 * params["matmul"] + attn
        per_stage.append(3 * forward * tokens_per_byte)
    return per_stage


def pipeline_layer_costs(model: TerraByte, cfg: Config) -> list[dict]:
    """Per pipeline layer (``parallel.pipeline_layers``: the embedding, each global block, then stage
    0's norm and projection with every lower stage and the head): name, parameters and training
    FLOPs per sequence, counted as ``flops_per_byte`` counts them (the layers sum to its total)."""
    stage, patches = model.stages[0], model.max_seq_len[0]
    per_byte = flops_per_byte(model, cfg)
    attn = 2 * 2 * stage.heads * stage.dim_head * keys_per_query(cfg, 0, patches)

    def count(*modules) -> int:
        return sum(p.numel() for m in modules for p in (m.parameters() if isinstance(m, torch.nn.Module) else [m]))

    embed_matmul = count(stage.embed) - stage.embed.token_emb.weight.numel()
    layers = [{"name": "embedding", "parameters": count(stage.embed, stage.start_token),
               "flops": 3 * 2 * embed_matmul * patches}]
    for i, block in stage.layers.items():
        layers.append({"name": f"block {i}", "parameters": count(block),
                       "flops": 3 * (2 * count(block) + attn) * patches})
    lower = [stage.norm] + ([stage.to_next] if stage.to_next is not None else []) + list(model.stages[1:])
    head = [] if model.tie_embeddings else [model.to_logits]
    layers.append({"name": "lower stages + head", "parameters": count(*lower, *head),
                   "flops": 3 * 2 * count(*lower[:2]) * patches + sum(per_byte[1:]) * model.context_length})
    return layers


def keys_per_query(cfg: Config, stage: int, window: int) -> float:
    """Keys each query scores: half the window when dense causal; for a sparse stage, what the
    kernel computes (whole tiles, counted on head 0)."""
    spec = (cfg.model.attention or [None] * len(cfg.model.dim))[stage]
    if not spec or spec.get("kind", "dense") == "dense":
        return (window + 1) / 2
    from terrabyte.kernels import SparsePattern

    pattern = SparsePattern.from_config(spec["pattern"])
    full, masked = pattern.num_tiles(window, 1)
    return (full + masked) * pattern.block**2 / window


def _bytes_per_value(cfg: Config) -> int:
    return 4 if cfg.train.precision == "fp32" else 2


def global_activation_bytes(model: TerraByte, cfg: Config, sequence: int = 1) -> float:
    """Stage 0 over a micro-batch (``TerraByte.global_activation_bytes``): what autograd keeps for
    its blocks (each block's input alone with checkpointing, plus one block being recomputed), and
    one chunk of its byte embeddings. ``sequence``: the sequence-parallel degree; each rank keeps its
    own patches (Ulysses gives its attention the whole sequence for a slice of the heads: the same
    share)."""
    return model.global_activation_bytes(cfg.train.micro_batch, bool(cfg.model.checkpoint_activations),
                                         _bytes_per_value(cfg), sequence=sequence)


def global_backward_bytes(model: TerraByte, cfg: Config, sequence: int = 1) -> float:
    """What the global stage's backward adds, one block at a time (``TerraByte.global_backward_bytes``)."""
    return model.global_backward_bytes(cfg.train.micro_batch, bool(cfg.model.checkpoint_activations),
                                       _bytes_per_value(cfg), sequence=sequence)


def chunk_activation_bytes(model: TerraByte, cfg: Config, chunk_bytes: int | None = None) -> float:
    """Two chunks of the lower stages (the one kept for backward, the one being recomputed): every
    lower block's activations, the logits and their gradient in fp32."""
    chunk = model.chunk_bytes if chunk_bytes is None else chunk_bytes
    per_byte = model.lower_block_values_per_byte() * _bytes_per_value(cfg) + 2 * 4 * model.vocab_size
    return 2 * chunk * per_byte


def activation_bytes(model: TerraByte, cfg: Config, chunk_bytes: int | None = None, sequence: int = 1) -> float:
    return global_activation_bytes(model, cfg, sequence) + max(global_backward_bytes(model, cfg, sequence),
                                                                chunk_activation_bytes(model, cfg, chunk_bytes))


def model_state_bytes(model: TerraByte, cfg: Config) -> float:
    """Parameters, gradients and Adam moments on one device with no sharding: fp32 master weights
    and moments (12 bytes per parameter) plus the training copy and its gradient."""
    params = sum(p.numel() for p in model.parameters())
    return params * (12 + 2 * _bytes_per_value(cfg))


def largest_chunk(model: TerraByte, cfg: Config, memory_bytes: float, shards: int = 1,
                  sequence: int = 1) -> int | None:
    """The largest chunk_bytes (a multiple of the global patch, within the kernel batch limit)
    whose estimate fits ``memory_bytes``; None when even one patch per chunk does not."""
    patch = model.unit_sizes[0]
    free = memory_bytes - model_state_bytes(model, cfg) / shards - global_activation_bytes(model, cfg, sequence)
    per_patch = chunk_activation_bytes(model, cfg, patch)
    if free < max(per_patch, global_backward_bytes(model, cfg, sequence)):
        return None
    top = min(model.max_chunk_bytes(), model.context_length * cfg.train.micro_batch)
    return max(patch, min(int(free // per_patch) * patch, top // patch * patch))


def device_memory_bytes(device: torch.device) -> int:
    """Total memory of a CUDA device, or of the host for any other."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_fits(cfg: Config, device: torch.device, shards: int = 1, sequence: int = 1,
               model: TerraByte | None = None) -> None:
    """Stop before the model is built when one micro-batch cannot fit the device (ConfigError naming
    the chunk size that would fit). Where it would not fit as configured, activation checkpointing
    is turned on, then (``model.chunk_bytes`` unset) the largest chunk that fits is chosen, both in
    ``cfg``, before giving up. ``shards``: ranks the model states are split over (ZeRO-3,
    tensor parallelism); ``sequence``: ranks a sequence is split over (Ulysses); ``model``: the
    config's meta model, when the caller has one."""
    model = meta_model(cfg) if model is None else model
    memory = device_memory_bytes(device)
    verdict = memory_verdict(model, cfg, memory, f"{device.type} memory", shards, sequence)
    if verdict is not None and not cfg.model.checkpoint_activations:
        # what a user gets by default: checkpointing turned on where the step would not fit without
        cfg.model.checkpoint_activations = True
        verdict = memory_verdict(model, cfg, memory, f"{device.type} memory", shards, sequence)
        logger.info("model.checkpoint_activations turned on: without it one micro-batch would not fit %.1f GiB of "
                    "%s memory", memory / 2**30, device.type)
    if cfg.model.checkpoint_activations is None:
        # decided here, once, from the estimate: ranks deciding per step from their own free memory
        # could recompute in different orders, and ZeRO-3 gathers parameters in that order
        cfg.model.checkpoint_activations = False
    if verdict is not None and cfg.model.chunk_bytes is None:
        fits = largest_chunk(model, cfg, memory, shards, sequence)
        if fits is not None:
            cfg.model.chunk_bytes = fits
            logger.info("model.chunk_bytes set to %d: the automatic %d would not fit %.1f GiB of %s memory",
                        fits, model.chunk_bytes, memory / 2**30, device.type)
            return
    if verdict is not None:
        raise ConfigError(verdict)


def memory_verdict(model: TerraByte, cfg: Config, memory_bytes: float, where: str, shards: int = 1,
                   sequence: int = 1) -> str | None:
    """None when the estimate fits ``memory_bytes``; else one line saying what would fit."""
    need = model_state_bytes(model, cfg) / shards + activation_bytes(model, cfg, sequence=sequence)
    if need <= memory_bytes:
        return None
    fits = largest_chunk(model, cfg, memory_bytes, shards, sequence)
    split = f" per rank of a sequence-parallel group of {sequence}" if sequence > 1 else ""
    head = (f"{where}: the estimate for one micro-batch of {cfg.train.micro_batch} x {model.context_length} bytes{split} "
            f"is {need / 2**30:.1f} GiB, over the {memory_bytes / 2**30:.1f} GiB available")
    if fits is not None:
        return f"{head}; model.chunk_bytes={fits} would fit (now {model.chunk_bytes})"
    return (f"{head} even with one patch per chunk: the global stage alone needs "
            f"{(global_activation_bytes(model, cfg, sequence) + global_backward_bytes(model, cfg, sequence)) / 2**30:.1f} GiB; "
            "use activation checkpointing, a smaller "
            f"micro-batch or {'more ' if sequence > 1 else ''}sequence parallelism")


def decode_cache_bytes(model: TerraByte, bytes_per_value: int) -> int:
    """Key/value caches that generation allocates per sequence (``TerraByte.init_cache``)."""
    return sum(2 * st.depth * st.heads * st.seq_len * st.dim_head for st in model.stages) * bytes_per_value


def describe(cfg: Config, memory_gib: float | None = None) -> str:
    model = meta_model(cfg)
    params = stage_parameters(model)
    flops = flops_per_byte(model, cfg)
    lines = [
        f"TerraByte: {model.num_stages} stages, max_seq_len={model.max_seq_len} "
        f"({model.context_length} bytes per sequence)",
        "",
        "| stage | dim | depth | window | parameters | train FLOPs/byte |",
        "|---|---|---|---|---|---|",
    ]
    for s, stage in enumerate(model.stages):
        lines.append(
            f"| {s} | {stage.dim} | {stage.depth} | {model.max_seq_len[s]} | {params[s]['total']:,} | {flops[s]:.3g} |"
        )
    total_params = sum(p.numel() for p in model.parameters())
    lines += [
        f"| all | | | | {total_params:,} | {sum(flops):.3g} |",
        "",
        f"activation memory per micro-batch of {cfg.train.micro_batch} (estimate, "
        f"{'fp32' if cfg.train.precision == 'fp32' else 'bf16'}, checkpointing "
        f"{'on' if cfg.model.checkpoint_activations else 'off'}): {activation_bytes(model, cfg) / 2**30:.2f} GiB "
        f"= global stage {global_activation_bytes(model, cfg) / 2**30:.2f} GiB + the larger of its backward "
        f"{global_backward_bytes(model, cfg) / 2**30:.2f} GiB and the lower-stage chunks of "
        f"{model.chunk_bytes} bytes {chunk_activation_bytes(model, cfg) / 2**30:.2f} GiB",
        f"model states on one device, unsharded (fp32 master, Adam): {model_state_bytes(model, cfg) / 2**30:.2f} GiB",
        f"training FLOPs per optimizer step: {sum(flops) * cfg.train.global_batch * model.context_length:.3g}",
        f"generation key/value cache per sequence (bf16): {decode_cache_bytes(model, 2) / 2**30:.2f} GiB",
    ]
    if memory_gib is not None:
        fits = largest_chunk(model, cfg, memory_gib * 2**30)
        verdict = memory_verdict(model, cfg, memory_gib * 2**30, f"--memory {memory_gib:g}")
        lines.append(f"largest chunk that fits {memory_gib:g} GiB: "
                     + (f"model.chunk_bytes={fits}" if fits is not None else "none"))
        lines.append(verdict or f"fits {memory_gib:g} GiB with model.chunk_bytes={model.chunk_bytes}")
    return "\n".join(lines)
