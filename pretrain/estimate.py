"""Model size and cost estimates for ``terrabyte pretrain --dry-run``, without allocating the model.

The model is built on the meta device, so even the 1B config costs no memory. FLOPs count matrix
multiplies (2 per multiply-add) and attention scores/values over the causal half of each stage's
window (for a sparse stage: over the tiles the kernel computes); forward + backward = 3x forward. Activation memory is a per-micro-batch estimate of what
autograd keeps per block (inputs of the norms, q/k/v, attention output, the three feed-forward
projections), plus logits; with activation checkpointing only each block's input is kept, plus one
block being recomputed.
"""
from __future__ import annotations

import math

import torch

from .args import Config
from .model import TerraByte


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
        tokens_per_byte = math.prod(lens[: s + 1]) / math.prod(lens)
        attn = 2 * 2 * stage.depth * stage.heads * stage.dim_head * keys_per_query(cfg, s, lens[s])
        forward = 2 * params["matmul"] + attn
        per_stage.append(3 * forward * tokens_per_byte)
    return per_stage


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


def activation_bytes(model: TerraByte, cfg: Config) -> float:
    bytes_per_value = 4 if cfg.train.precision == "fp32" else 2
    lens, mb = model.max_seq_len, cfg.train.micro_batch
    total = 0.0
    for s, stage in enumerate(model.stages):
        tokens = mb * math.prod(lens[: s + 1])
        ff_hidden = stage.layers["0"].ff.up_proj.out_features if stage.depth else 0
        inner = stage.heads * stage.dim_head
        per_block = tokens * (4 * stage.dim + 4 * inner + 3 * ff_hidden)
        if cfg.model.checkpoint_activations:
            total += tokens * stage.dim * stage.depth + per_block
        else:
            total += per_block * stage.depth
    total += 2 * mb * math.prod(lens) * model.vocab_size  # logits and their gradient
    return total * bytes_per_value


def decode_cache_bytes(model: TerraByte, bytes_per_value: int) -> int:
    """Key/value caches that generation allocates per sequence (``TerraByte.init_cache``)."""
    return sum(2 * st.depth * st.heads * st.seq_len * st.dim_head for st in model.stages) * bytes_per_value


def describe(cfg: Config) -> str:
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
        f"{'on' if cfg.model.checkpoint_activations else 'off'}): {activation_bytes(model, cfg) / 2**30:.2f} GiB",
        f"training FLOPs per optimizer step: {sum(flops) * cfg.train.global_batch * model.context_length:.3g}",
        f"generation key/value cache per sequence (bf16): {decode_cache_bytes(model, 2) / 2**30:.2f} GiB",
    ]
    return "\n".join(lines)
