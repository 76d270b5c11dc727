"""TerraByte: a MEGABYTE-style hierarchical byte transformer, generalised to N stages.

MEGABYTE (Yu et al. 2023, "Predicting Million-byte Sequences with Multiscale Transformers",
arXiv:2305.07185) splits a byte sequence into patches: a large *global* transformer runs once per
patch, a small *local* transformer runs once per byte inside a patch. Here the hierarchy has any
number of stages >= 2. ``max_seq_len=(16, 8, 4)`` means 16 patches of 8 sub-patches of 4 bytes;
stage 0 is the coarsest, the last stage works on single bytes.

Data flow for stage s with units of ``unit_sizes[s]`` bytes, grouped ``max_seq_len[s]`` per parent
unit of the stage above:

    input[i] = embed_s(unit i-1)  +  ctx_{s-1}[i]
    ctx_s    = to_next_s(stage_s(input))            one vector per child position of stage s+1

where unit -1 is the last unit of the previous parent (the stream shifted by one unit, as in
MEGABYTE's local model), or the learned start token at the very start of the sequence. So the
output at position i has seen only units < i of its own parent, the unit just before the parent,
and, through ctx, all earlier parents. The last stage's output at byte position j is the prediction of byte j itself
from bytes < j: strictly causal, no shift in the loss.

Below stage 0 the forward runs in chunks of patches (``TerraByte.lower``: each chunk through every
lower stage, its logits and its loss, recomputed in backward), so activation memory is O(global
stage) + O(one chunk) whatever the context. Every layout runs this one walk (``TerraByte.patches``
decides which positions form a patch, ``forward_patches`` runs a range of them); parallelism changes
only the range and modules, from outside (``parallel.py``).

This file holds the layers, ``Stage``, the chunked execution and ``TerraByte`` with its forward and loss; cached
decoding and sampling (``model.generate``, ``init_cache``, ``forward_cached``) live in
``decode.py``, which this file imports and which imports nothing from it.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import math
from typing import Callable, ContextManager, Optional

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from terrabyte.data_pipeline.basics.errors import ConfigError
from terrabyte.data_pipeline.basics.vocab import Vocab

from . import decode
from .hub import HubMixin
from .model_args import MODEL_KEYS, ModelArgs

logger = logging.getLogger(__name__)

ROPE_THETA = 10000.0
NORM_EPS = 1e-6
# SwiGLU has three matrices instead of two: hidden = 2/3 * ff_mult * dim keeps the parameter count
# of a GELU MLP with the same ff_mult (LLaMA convention); rounded up to a multiple of 8 for kernels.
SWIGLU_FRACTION = 2 / 3
FF_MULTIPLE_OF = 8
# On CPU, SDPA's flash kernel is 1.5-3x slower (fwd+bwd) than plain matmul-softmax for the local
# stages' very short sequences (4-16 positions, thousands of them); measured with torch 2.13.
CPU_MATH_ATTENTION_MAX_LEN = 16


# ---------------------------------------------------------------------------- Argument helpers

def _ff_hidden(dim: int, mult: float) -> int:
    hidden = int(SWIGLU_FRACTION * mult * dim)
    return max(FF_MULTIPLE_OF, FF_MULTIPLE_OF * math.ceil(hidden / FF_MULTIPLE_OF))


# -------------------------------------------- Attention callables: (q, k, v) (b, heads, n, d) -> (b, heads, n, d), causal

@functools.lru_cache(maxsize=None)
def _flash_attn_func():
    try:
        from flash_attn import flash_attn_func
    except ImportError:
        return None
    return flash_attn_func


@functools.lru_cache(maxsize=None)
def _log_flash_fallback_once(reason: str) -> None:
    logger.debug("flash_attn requested but not used (%s); using scaled_dot_product_attention", reason)


def math_attention(q: Tensor, k: Tensor, v: Tensor, dropout: float = 0.0) -> Tensor:
    """Plain causal softmax attention; reference for the fused paths. (b, h, n, d) -> (b, h, n, d)."""
    n = q.shape[-2]
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5  # (b, h, n, n)
    causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    probs = scores.masked_fill(~causal, float("-inf")).softmax(dim=-1)
    return F.dropout(probs, dropout) @ v if dropout else probs @ v


class DenseAttention(nn.Module):
    """Causal softmax attention through SDPA, or flash-attn when asked for and usable; short
    sequences on CPU take the math path (see CPU_MATH_ATTENTION_MAX_LEN)."""

    def __init__(self, dropout: float = 0.0, flash: bool = False):
        super().__init__()
        self.dropout = dropout
        self.flash = flash

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        p = self.dropout if self.training else 0.0
        if self.flash:
            fn = _flash_attn_func()
            if fn is None:
                _log_flash_fallback_once("flash_attn is not installed")
            elif not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16):
                _log_flash_fallback_once("needs CUDA tensors in fp16/bf16")
            else:
                # flash-attn wants (b, n, heads, d)
                out = fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=p, causal=True)
                return out.transpose(1, 2)
        if q.device.type == "cpu" and q.shape[-2] <= CPU_MATH_ATTENTION_MAX_LEN:
            return math_attention(q, k, v, p)
        return F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)


class SparseAttention(nn.Module):
    """Block-sparse causal attention from ``terrabyte.kernels`` (imported lazily)."""

    def __init__(self, pattern_config: dict):
        super().__init__()
        from terrabyte.kernels import SparsePattern, sparse_attention

        try:
            self.pattern = SparsePattern.from_config(pattern_config)
        except ValueError as exc:  # the pattern comes from the config: name it, in one line
            raise ConfigError(f"sparse attention pattern {pattern_config!r}: {exc}") from None
        self._sparse_attention = sparse_attention

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return self._sparse_attention(q, k, v, self.pattern, causal=True)

    def for_heads(self, start: int, count: int) -> "SparseAttention":
        """This attention for heads [start, start + count) of the stage held on their own (a rank's
        share under sequence or tensor parallelism): the pattern keeps the global head index."""
        return SparseAttention(self.pattern.for_heads(start, count))

    def allowed(self, q_idx: Tensor, k_idx: Tensor, heads: Optional[int] = None) -> Tensor:
        """Boolean mask (broadcast of q_idx, k_idx; a leading head axis when heads differ): used to
        build decode-time mask rows."""
        return self.pattern.allowed(q_idx, k_idx, heads=heads)


def build_attention(spec, *, dropout: float, flash: bool) -> Callable:
    """Turn one stage's attention spec (None, dict or callable) into an attention callable.

    A custom callable gets (q, k, v) and must be causal. Cached decoding treats it as dense causal
    attention unless it has an ``allowed(q_idx, k_idx, heads=None)`` mask method like
    ``SparseAttention``: then decode-time mask rows come from ``allowed`` and a fresh prompt runs
    through the callable itself. The spec is one ``ModelArgs.checked`` accepted.
    """
    if callable(spec):
        return spec
    if spec is None or spec["kind"] == "dense":
        return DenseAttention(dropout, flash)
    return SparseAttention(spec["pattern"])


# ---------------------------------------------------------------------------- Layers

def trunc_normal(weight: Tensor, std: float) -> None:
    nn.init.trunc_normal_(weight, std=std, a=-3 * std, b=3 * std)


def as_is(module: nn.Module) -> ContextManager:
    """``init_weights``' default ``whole``: a plain module's parameters are whole already."""
    return contextlib.nullcontext()


def init_fan_in(linear: nn.Linear) -> None:
    """std = 1 / sqrt(fan_in), truncated at 3 std: a unit-RMS input gives a unit-RMS output."""
    trunc_normal(linear.weight, linear.in_features ** -0.5)


def apply_rotary(x: Tensor, freqs: Tensor) -> Tensor:
    """Rotary embedding on adjacent pairs (x[2i], x[2i+1]) as complex numbers (RoFormer; the layout
    torchtitan uses): one complex multiply, ~4x faster fwd+bwd on CPU than the rotate-half form.

    x: (..., n, d) real; freqs: (n, d/2) complex, broadcasting over x's leading axes.
    """
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))  # (..., n, d/2)
    return torch.view_as_real(pairs * freqs).flatten(-2).type_as(x)


class Rotary(nn.Module):
    """Rotation table for positions [0, max_len); non-persistent so meta-built models recompute it.
    Always complex64, whatever dtype the model is cast to (see ``_apply``)."""

    def __init__(self, dim_head: int, max_len: int):
        super().__init__()
        self.dim_head, self.max_len = dim_head, max_len
        self.register_buffer("freqs", torch.empty(max_len, dim_head // 2, dtype=torch.complex64), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        device = self.freqs.device
        if device.type == "meta":
            return
        inv_freq = 1.0 / ROPE_THETA ** (torch.arange(0, self.dim_head, 2, device=device).float() / self.dim_head)
        angles = torch.outer(torch.arange(self.max_len, device=device).float(), inv_freq)  # (n, d/2)
        self.freqs.copy_(torch.polar(torch.ones_like(angles), angles))

    def _apply(self, fn, recurse=True):
        # Module.to(dtype) would cast the table to a real dtype too, keeping only the cosines: let
        # it follow the conversion's device only
        freqs = self._buffers.pop("freqs")
        try:
            super()._apply(fn, recurse)
        finally:
            device = fn(torch.empty(0, device=freqs.device)).device
            moved = torch.empty_like(freqs, device=device) if freqs.is_meta else freqs.to(device)
            self.register_buffer("freqs", moved, persistent=False)
        return self


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int, attend: Callable):
        super().__init__()
        inner = heads * dim_head
        self.heads, self.dim_head = heads, dim_head
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)
        self.attend = attend

    def _qkv(self, x: Tensor, freqs: Optional[Tensor]):
        b, n, _ = x.shape
        # (b, n, h*d) -> (b, h, n, d)
        q, k, v = (proj(x).view(b, n, self.heads, self.dim_head).transpose(1, 2)
                   for proj in (self.to_q, self.to_k, self.to_v))
        if freqs is not None:
            q, k = apply_rotary(q, freqs), apply_rotary(k, freqs)
        return q, k, v

    def _out(self, out: Tensor) -> Tensor:
        b, _, n, _ = out.shape
        return self.to_out(out.transpose(1, 2).reshape(b, n, self.heads * self.dim_head))

    def forward(self, x: Tensor, freqs: Optional[Tensor]) -> Tensor:
        return self._out(self.attend(*self._qkv(x, freqs)))


class SwiGLU(torch.autograd.Function):
    """silu(gate) * up that saves only gate and up for backward (autograd would also keep
    silu(gate)): one hidden-sized activation less per block, recomputed cheaply in backward."""

    @staticmethod
    def forward(ctx, gate: Tensor, up: Tensor) -> Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad: Tensor):
        gate, up = ctx.saved_tensors
        sig = torch.sigmoid(gate)
        silu = gate * sig
        # d silu / d gate = sig * (1 + gate * (1 - sig))
        return grad * up * (sig + silu * (1 - sig)), grad * silu


class FeedForward(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, dim: int, hidden: int, dropout: float):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.dropout(SwiGLU.apply(self.gate_proj(x), self.up_proj(x))))


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, dim, heads, dim_head, ff_hidden, attend, ff_dropout):
        super().__init__()
        self.attn_norm = nn.RMSNorm(dim, eps=NORM_EPS)
        self.attn = Attention(dim, heads, dim_head, attend)
        self.ff_norm = nn.RMSNorm(dim, eps=NORM_EPS)
        self.ff = FeedForward(dim, ff_hidden, ff_dropout)

    def forward(self, x: Tensor, freqs: Optional[Tensor]) -> Tensor:
        x = x + self.attn(self.attn_norm(x), freqs)
        return x + self.ff(self.ff_norm(x))

    def init_weights(self, residual_scale: float, whole: Optional[Callable] = None) -> None:
        whole = whole or as_is
        for norm in (self.attn_norm, self.ff_norm):
            with whole(norm):
                norm.reset_parameters()
        # dim^-0.5 for what reads the unit-RMS stream, times the residual scale for what writes to
        # it: GPT-2's fixed 0.02 wrote ~100x below the stream and cost 0.3 bits per byte after 120
        # steps of the tiny config (pretrain/BENCHMARKS.md, "Model quality")
        std = self.attn.to_q.in_features ** -0.5
        for lin in (self.attn.to_q, self.attn.to_k, self.attn.to_v, self.ff.gate_proj, self.ff.up_proj):
            with whole(lin):
                trunc_normal(lin.weight, std)
        for lin in (self.attn.to_out, self.ff.down_proj):
            with whole(lin):
                trunc_normal(lin.weight, std * residual_scale)


class PatchEmbed(nn.Module):
    """Embed units of bytes: byte embeddings concatenated group by group, projected to ``dim``.

    ``groups`` are the unit's nesting from the top, e.g. ``(8, 8)`` for a unit of 8 sub-units of 8
    bytes. With one group this is MEGABYTE's embedding: the unit's byte embeddings concatenated and
    projected, ``unit_size * byte_dim * dim`` parameters. With more, each inner group of bytes is
    first projected back to ``byte_dim`` (``levels``), so a unit's embedding costs
    ``sum(groups) * byte_dim * ...`` parameters instead of ``prod(groups)``: a 4096-byte unit into a
    2048-wide stage would otherwise need 4.3B parameters (and its lookup a unit_size x byte_dim
    tensor per unit). The inner projections are linear, so the embedding stays a linear map of the
    unit's bytes, as in MEGABYTE, only a factored one; the top stage of the 3-stage quality bench
    learns as well with it (pretrain/BENCHMARKS.md, "Upper-stage embeddings").

    Input (..., unit_size) ids, output (..., dim). A unit of one byte is a plain embedding.
    """

    def __init__(self, vocab_size: int, byte_dim: int, groups: tuple, dim: int):
        super().__init__()
        self.unit_size = math.prod(groups)
        self.groups = tuple(groups)
        if self.unit_size == 1:
            self.token_emb = nn.Embedding(vocab_size, dim)
            self.proj = None
            self.levels = None
            return
        self.token_emb = nn.Embedding(vocab_size, byte_dim)
        inner = [g for g in self.groups[1:] if g > 1][::-1]  # innermost first
        top = self.unit_size // math.prod(inner)
        self.levels = nn.ModuleList([nn.Linear(g * byte_dim, byte_dim, bias=False) for g in inner]) if inner else None
        self._level_groups = tuple(inner)
        self.proj = nn.Linear(top * byte_dim, dim, bias=False)

    def forward(self, units: Tensor) -> Tensor:
        if self.proj is None:
            return self.token_emb(units.squeeze(-1))
        x = self.token_emb(units)  # (..., unit_size, byte_dim)
        if self.levels is not None:
            for g, level in zip(self._level_groups, self.levels):
                x = level(rearrange(x, "... (k g) e -> ... k (g e)", g=g))  # (..., unit_size / g..., byte_dim)
        return self.proj(rearrange(x, "... k e -> ... (k e)"))

    def init_weights(self, emb_std: float, whole: Optional[Callable] = None) -> None:
        whole = whole or as_is
        with whole(self.token_emb):
            nn.init.normal_(self.token_emb.weight, std=emb_std)
        for linear in [*(self.levels or ()), *([self.proj] if self.proj is not None else [])]:
            with whole(linear):
                init_fan_in(linear)


def units_before(groups: Tensor, unit_size: int, lo: int = 0, hi: Optional[int] = None) -> tuple[Tensor, Tensor]:
    """For groups lo..hi-1 of ids (b, groups, span) (one lower-stage sequence each, in stream order
    along each row): the previous group's last unit and whether the group starts its row, for
    ``Stage.inputs``: (before (B, unit_size), starts (B,)), B = b * (hi - lo)."""
    b, count, span = groups.shape
    hi = count if hi is None else hi
    ends = groups[:, :, span - unit_size:]  # (b, groups, unit_size): each group's last unit
    before = ends[:, max(lo - 1, 0): hi - 1]  # before groups max(lo, 1) .. hi-1
    starts = torch.zeros(b, hi - lo, dtype=torch.bool, device=groups.device)
    if lo == 0:
        before = torch.cat((ends[:, :1], before), dim=1)  # any unit: the start token replaces it
        starts[:, 0] = True
    return before.reshape(-1, unit_size), starts.reshape(-1)


class Stage(nn.Module):
    """One level of the hierarchy: embedder, start token, blocks, final norm, projection down."""

    def __init__(self, *, dim, depth, seq_len, unit_size, vocab_size, byte_dim, heads, dim_head,
                 ff_hidden, attend_factory, ff_dropout, rotary, next_dim=None, next_seq_len=None,
                 embed_groups: Optional[tuple] = None):
        super().__init__()
        self.dim, self.seq_len, self.unit_size = dim, seq_len, unit_size
        self.heads, self.dim_head, self.depth = heads, dim_head, depth
        groups = (unit_size,) if embed_groups is None else tuple(embed_groups)
        if math.prod(groups) != unit_size:
            raise ConfigError(f"embed_groups={groups} must multiply to the unit size {unit_size}")
        self.embed = PatchEmbed(vocab_size, byte_dim, groups, dim)
        self.start_token = nn.Parameter(torch.empty(dim))
        self.rotary = Rotary(dim_head, seq_len) if rotary else None
        self.layers = nn.ModuleDict(
            {str(i): Block(dim, heads, dim_head, ff_hidden, attend_factory(), ff_dropout) for i in range(depth)}
        )
        self.norm = nn.RMSNorm(dim, eps=NORM_EPS)
        self.next_seq_len = next_seq_len
        self.to_next = nn.Linear(dim, next_seq_len * next_dim, bias=False) if next_dim else None
        self.checkpoint_activations = False

    def inputs(self, units: Tensor, ctx: Optional[Tensor] = None, *, start: int = 0,
               end: Optional[int] = None, embed: Optional[Callable] = None,
               before: Optional[Tensor] = None, starts: Optional[Tensor] = None) -> Tensor:
        """Input tokens of positions [start, end) of this stage's sequence: (B, end - start, dim).

        Position i sees unit i-1; position 0 sees ``before`` (B, unit_size), the unit before the
        sequence in the stream (MEGABYTE's shifted input: a patch's first byte sees the byte before
        it directly), or the start token where none comes before (``before`` None: all rows;
        ``starts`` (B,) bool: those rows). units: (B, >= end - 1, unit_size) ids, at least those
        before ``end`` (default units.shape[1]); ctx: (B, end - start, dim) or None. The forward,
        pipeline, sequence-parallel and decode paths (with a lighter ``embed``) all build inputs here.
        """
        embed = self.embed if embed is None else embed
        end = units.shape[1] if end is None else end
        first = max(start - 1, 0)
        n = end - 1 - first  # units read: first .. end - 2
        emb = None
        # decoding often needs position 0 alone; under autograd the empty call stays, so every
        # parameter takes part in backward (DDP and ZeRO expect a gradient for each)
        if n > 0 or torch.is_grad_enabled():
            emb = embed(units.narrow(1, first, n))  # (B, n, dim)
        if start == 0:
            tok = self.start_token.expand(units.shape[0], 1, -1)
            if before is not None:
                prev = embed(before.unsqueeze(1))  # (B, 1, dim)
                tok = prev if starts is None else torch.where(starts.view(-1, 1, 1), tok.to(prev.dtype), prev)
            x = tok if emb is None else torch.cat((tok.to(emb.dtype), emb), dim=1)
        elif torch.is_grad_enabled():
            # the start token takes part, if only with weight 0, wherever the sequence is entered:
            # ZeRO-3 reduces gradients as collectives in the order they become ready, so every
            # rank (and every chunk of the global embedding) must touch the same parameters
            x = emb + 0 * self.start_token.to(emb.dtype)
        else:
            x = emb
        return x if ctx is None else x + ctx

    def forward(self, x: Tensor, start: int = 0, checkpoint_blocks: Optional[bool] = None) -> Tensor:
        """x: (B, n, dim) tokens at positions [start, start + n) of this stage's sequence: every
        block, then the final norm."""
        return self.norm(self.run_blocks(x, 0, self.depth, start=start, checkpoint_blocks=checkpoint_blocks))

    def run_blocks(self, x: Tensor, first: int, last: int, *, start: int = 0,
                   checkpoint_blocks: Optional[bool] = None) -> Tensor:
        """Blocks [first, last) on x (B, n, dim), tokens at positions [start, start + n); a pipeline
        layer runs its own range of them. ``checkpoint_blocks`` (default: ``checkpoint_activations``)
        recomputes each block in backward; the lower stages run inside recomputed chunks, where it
        would only recompute twice."""
        freqs = None if self.rotary is None else self.rotary.freqs[start : start + x.shape[1]]
        per_block = self.checkpoint_activations if checkpoint_blocks is None else checkpoint_blocks
        for i in range(first, last):
            block = self.layers[str(i)]
            if per_block and torch.is_grad_enabled():
                x = checkpoint(block, x, freqs, use_reentrant=False)
            else:
                x = block(x, freqs)
        return x

    def project_down(self, x: Tensor) -> Tensor:
        """(B, n, dim) -> (B * n, next_seq_len, next_dim): context for each child position."""
        return rearrange(self.to_next(x), "b n (l d) -> (b n) l d", l=self.next_seq_len)

    def init_weights(self, emb_std: float, whole: Optional[Callable] = None) -> None:
        whole = whole or as_is
        self.embed.init_weights(emb_std, whole)
        with whole(self):
            nn.init.normal_(self.start_token, std=1.0)
        if self.rotary is not None:
            self.rotary.reset_parameters()
        for block in self.layers.values():
            # two residual writes per block: the stream's variance stays O(1) whatever the depth
            block.init_weights(residual_scale=1 / math.sqrt(2 * self.depth), whole=whole)
        with whole(self.norm):
            self.norm.reset_parameters()
        if self.to_next is not None:
            with whole(self.to_next):
                init_fan_in(self.to_next)


# ---------------------------------------------------------------------------- Loss

def cross_entropy(logits: Tensor, targets: Tensor, pad_id: int, reduction: str = "mean") -> Tensor:
    """Cross-entropy of (..., vocab) logits against (...) target ids, PAD targets ignored.

    The one loss of every layout (plain, pipeline, sequence-parallel, evaluation): it accumulates in
    fp32 whatever the logits' dtype, so bf16 and fp32 runs report the same number.
    """
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                           ignore_index=pad_id, reduction=reduction)


# ---------------------------------------------------------------------------- Chunked execution
#
# Below the global stage every patch is independent once stage 0's output for it is known, so the
# lower stages, the logits and the loss run over a few patches at a time: under autograd each chunk
# but the last is recomputed in backward (its activations are dropped after its forward), so
# activation memory is O(global stage) + O(one chunk), the (n, vocab) logits never exist and the
# loss is summed chunk by chunk (the tiled loss of ALST, with torch.utils.checkpoint). The plain
# forward, the pipeline's last layer, sequence parallelism (a rank's own patches) and evaluation
# all run ``TerraByte.lower``; stage 0's embedding runs in chunks the same way (``embed_patches``).

# CUDA caps a grid's y and z axes at 65,535 and flash-attn, SDPA and our sparse kernel put the batch
# (times heads) there: no chunk may hand a kernel more sequences x heads than this
MAX_KERNEL_BATCH = 65535
# what one chunk's activations may take when ``chunk_bytes`` is left automatic (counted in fp32)
AUTO_CHUNK_ACTIVATION_BYTES = 1 << 30
# checkpoint_activations=None ("auto"): a training step checkpoints the global stage's blocks when
# their activations without it would take more than this share of the memory available on the
# device (the rest: the chunks below, the backward's transients, the allocator's slack, others)
AUTO_CHECKPOINT_SHARE = 0.5
# glibc's mmap threshold, pinned (see pin_malloc_threshold)
MALLOC_MMAP_THRESHOLD = 128 << 10
REDUCTIONS = ("mean", "sum", "none")


def block_activation_values(stage: "Stage") -> int:
    """Values autograd keeps per token per block: norm inputs, q/k/v, attention output, feed-forward."""
    inner = stage.heads * stage.dim_head
    hidden = stage.layers["0"].ff.up_proj.out_features if stage.depth else 0
    return 4 * stage.dim + 4 * inner + 3 * hidden


@functools.lru_cache(maxsize=None)
def pin_malloc_threshold() -> bool:
    """Pin glibc's mmap threshold (as ``MALLOC_MMAP_THRESHOLD_`` does) for this process; True if set.

    glibc raises the threshold after each large free (up to 32 MiB), so a long step's later
    tensors land on the heap, between blocks that stay alive, and the holes freed there are never
    given back: a 16 MiB step on CPU held about 1 KB of RSS per context byte beyond its live
    tensors. With the threshold pinned, every large tensor is its own mapping, returned on free.
    Off glibc (or where the call is unavailable) nothing changes."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(-3, MALLOC_MMAP_THRESHOLD))  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def available_memory_bytes(device: torch.device) -> int:
    """Memory a step may still take on ``device``: free CUDA memory plus what torch's allocator
    holds unused, or the host's MemAvailable."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _recompute_if(recompute: bool, fn: Callable, *args) -> Tensor:
    if recompute and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def chunk_plan(rows: int, patches: int, per_chunk: int) -> list[tuple[int, int, int, int]]:
    """(row0, row1, patch0, patch1) chunks in row-major order: runs of one row's patches, or whole
    rows together when a row has fewer than ``per_chunk`` patches."""
    if patches >= per_chunk:
        return [(r, r + 1, q, min(q + per_chunk, patches)) for r in range(rows) for q in range(0, patches, per_chunk)]
    together = max(1, per_chunk // max(patches, 1))
    return [(r, min(r + together, rows), 0, patches) for r in range(0, rows, together)]


def _inner_before(chunk_ids: Tensor, patch_before: Tensor, patch_starts: Tensor, span: int, unit: int):
    """``units_before`` inside a chunk for a stage whose sequences span ``span`` bytes: the first
    group of a patch sees the end of the previous patch (``patch_before`` (R, >= unit)), the others
    the group before them. chunk_ids (R, patch) -> (before (R * k, unit), starts (R * k,))."""
    rows, patch = chunk_ids.shape
    k = patch // span
    ends = chunk_ids.view(rows, k, span)[:, :, span - unit:]  # (R, k, unit): each group's last unit
    before = torch.cat((patch_before[:, None, patch_before.shape[1] - unit:], ends[:, :-1]), dim=1)
    starts = torch.zeros(rows, k, dtype=torch.bool, device=chunk_ids.device)
    starts[:, 0] = patch_starts
    return before.reshape(-1, unit), starts.reshape(-1)


# ---------------------------------------------------------------------------- The model

class TerraByte(nn.Module, HubMixin):
    """Hierarchical byte transformer. See the module docstring for the data flow.

    Ids come from ``Vocab(num_tokens)``: data values are 0..num_tokens-1; PAD = num_tokens,
    EOS = num_tokens + 1, BOS = num_tokens + 2; vocab_size = num_tokens + 3. Loss ignores PAD only,
    so byte 0 is data.

    ``TerraByte.from_pretrained(path_or_repo_id)``, ``model.save_pretrained(dir)`` and
    ``model.push_to_hub(repo_id)`` come from ``hub.HubMixin`` (huggingface_hub's conventions).
    """

    def __init__(self, args: Optional[ModelArgs] = None, /, *,
                 whole: Optional[Callable[[nn.Module], ContextManager]] = None, **kwargs):
        """The arguments are ``ModelArgs``' fields, as keywords (``TerraByte(num_tokens=256, dim=...)``)
        or as one ``ModelArgs``; what is not given takes ``ModelArgs``' default. ``whole``: how
        ``init_weights`` reaches each module's parameters (see there); by default they are whole.
        ``checkpoint_activations``: True or False, or None (automatic: each training step checkpoints
        the global stage's blocks when its activations would not fit otherwise, ``auto_checkpoint``)."""
        if args is None:
            unknown = sorted(set(kwargs) - set(MODEL_KEYS))
            if unknown:
                raise TypeError(f"TerraByte got unknown argument(s) {unknown}; known: {list(MODEL_KEYS)}")
            args = ModelArgs(**kwargs)
        elif kwargs:
            raise TypeError("TerraByte takes a ModelArgs or keyword arguments, not both")
        # the arguments as given, JSON-ready: what save_pretrained writes to config.json
        config = {k: list(v) if isinstance(v, tuple) else v for k, v in vars(args).items()}
        super().__init__()
        self.config = config
        # the submodules' own initialisers draw from whichever generator their device has (none on
        # meta): init_weights starts from the CPU generator's state as found here, so the weights
        # depend on the seed alone, wherever and however the modules are allocated
        rng = torch.get_rng_state()
        a = args.checked()
        num_tokens, max_seq_len, dim, depth, heads, dim_head = (a.num_tokens, a.max_seq_len, a.dim, a.depth, a.heads,
                                                                a.dim_head)
        stages = len(max_seq_len)

        self.vocab = Vocab(num_tokens)
        self.max_seq_len = max_seq_len
        self.num_stages = stages
        self.dims = dim
        # bytes per unit at each stage: (16, 8, 4) -> (32, 4, 1)
        self.unit_sizes = tuple(math.prod(max_seq_len[s + 1:]) for s in range(stages))
        self.context_length = math.prod(max_seq_len)
        self.tie_embeddings = a.tie_embeddings

        self.stages = nn.ModuleList()
        for s in range(stages):
            last = s == stages - 1
            self.stages.append(Stage(
                dim=dim[s], depth=depth[s], seq_len=max_seq_len[s], unit_size=self.unit_sizes[s],
                vocab_size=self.vocab_size, byte_dim=dim[-1], heads=heads[s], dim_head=dim_head[s],
                ff_hidden=_ff_hidden(dim[s], a.ff_mult[s]),
                attend_factory=functools.partial(build_attention, a.attention[s], dropout=a.attn_dropout,
                                                 flash=a.flash_attn),
                ff_dropout=a.ff_dropout, rotary=a.rotary,
                next_dim=None if last else dim[s + 1], next_seq_len=None if last else max_seq_len[s + 1],
                embed_groups=max_seq_len[s + 1:] or (1,) if a.unit_embedding == "grouped" else None,
            ))
        self.to_logits = nn.Linear(dim[-1], self.vocab_size, bias=False)
        if a.tie_embeddings:
            self.to_logits.weight = self.stages[-1].embed.token_emb.weight
        self.auto_checkpoint_activations = a.checkpoint_activations is None
        self.checkpoint_activations = bool(a.checkpoint_activations)
        self.chunk_bytes = self._resolve_chunk_bytes(a.chunk_bytes)
        pin_malloc_threshold()
        self._plans = None  # (parameter key, decode plans), see _decode_plans
        torch.set_rng_state(rng)
        self.init_weights(whole)

    @classmethod
    def from_config(cls, cfg: dict) -> "TerraByte":
        """Build from a plain dict (e.g. YAML); lists become per-stage tuples."""
        known = set(MODEL_KEYS)
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise ConfigError(f"model config has unknown key(s) {unknown}; known keys: {sorted(known)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()})

    # the special ids, read from the vocabulary
    num_tokens = property(lambda self: self.vocab.num_tokens)
    pad_id = property(lambda self: self.vocab.pad_id)
    eos_id = property(lambda self: self.vocab.eos_id)
    bos_id = property(lambda self: self.vocab.bos_id)
    vocab_size = property(lambda self: self.vocab.size)

    @property
    def checkpoint_activations(self) -> bool:
        return self._checkpoint_activations

    @checkpoint_activations.setter
    def checkpoint_activations(self, value: bool) -> None:
        self._checkpoint_activations = bool(value)
        for stage in self.stages:
            stage.checkpoint_activations = bool(value)

    @torch.no_grad()
    def init_weights(self, whole: Optional[Callable[[nn.Module], ContextManager]] = None) -> None:
        """(Re)initialise every parameter and buffer; call after ``to_empty`` on a meta-built model.

        ``whole(module)``: a context in which ``module``'s own parameters (not its children's) are
        whole, entered around each write in turn. By default they already are; a model built
        partitioned (ZeRO-3's ``zero.Init``, ``engine.build_model``) gathers one module at a time
        (as fp32 CPU tensors, the ones a plain build draws into), so no rank ever holds the whole
        model, and the random draws come in the same order: the same seed gives the same weights
        however the model is built."""
        whole = whole or as_is
        last_dim = self.dims[-1]
        for s, stage in enumerate(self.stages):
            is_last = s == self.num_stages - 1
            # a tied table doubles as the output layer: keep its logits O(1) with std dim^-0.5
            stage.init_weights(emb_std=last_dim ** -0.5 if (is_last and self.tie_embeddings) else 1.0, whole=whole)
        if not self.tie_embeddings:
            with whole(self.to_logits):
                init_fan_in(self.to_logits)

    # ---------------------------------------------------------------- chunk size

    def lower_block_values_per_byte(self) -> float:
        """Values the lower stages' blocks keep for backward per byte of a chunk."""
        return sum(self.stages[s].depth * block_activation_values(self.stages[s]) / self.stages[s].unit_size
                   for s in range(1, self.num_stages))

    def auto_chunk_bytes(self) -> int:
        """Bytes per lower-stage chunk whose activations take about AUTO_CHUNK_ACTIVATION_BYTES."""
        per_byte = self.lower_block_values_per_byte() + 2 * self.vocab_size  # and the logits, their gradient
        return int(AUTO_CHUNK_ACTIVATION_BYTES / (4 * per_byte))

    def max_chunk_bytes(self) -> int:
        """The largest chunk whose kernel calls stay within MAX_KERNEL_BATCH sequences x heads."""
        return min(MAX_KERNEL_BATCH // self.stages[s].heads * self.unit_sizes[s - 1]
                   for s in range(1, self.num_stages))

    def _resolve_chunk_bytes(self, chunk_bytes: Optional[int]) -> int:
        patch = self.unit_sizes[0]
        if chunk_bytes is None:
            chunk_bytes = min(self.auto_chunk_bytes(), self.max_chunk_bytes()) // patch * patch
            return max(patch, min(chunk_bytes, self.context_length))
        limit = self.max_chunk_bytes() // patch * patch
        if chunk_bytes > limit:
            logger.warning("model.chunk_bytes=%d would give a kernel more than %d sequences x heads; using %d",
                           chunk_bytes, MAX_KERNEL_BATCH, limit)
            chunk_bytes = limit
        return max(patch, min(chunk_bytes, self.context_length))

    def global_activation_bytes(self, batch: int, checkpoint: bool, bytes_per_value: int = 4,
                                patches: Optional[int] = None, sequence: int = 1) -> float:
        """What a training step keeps for stage 0 over ``batch`` rows of ``patches`` patches (default:
        the whole context) until its backward: each block's activations, or with ``checkpoint`` each
        block's input; its output; one chunk of byte embeddings. ``sequence``: ranks the patches are
        split over."""
        stage = self.stages[0]
        tokens = batch * (self.max_seq_len[0] if patches is None else patches) // sequence
        per_block = tokens * block_activation_values(stage)
        kept = tokens * stage.dim * stage.depth if checkpoint else per_block * stage.depth
        embedding = 3 * batch * self.patches_per_chunk(batch) * self.unit_sizes[0] * self.dims[-1]
        return (kept + tokens * stage.dim + embedding) * bytes_per_value

    def global_backward_bytes(self, batch: int, checkpoint: bool, bytes_per_value: int = 4,
                              patches: Optional[int] = None, sequence: int = 1) -> float:
        """What stage 0's backward adds to what it kept, one block at a time: the gradients of the
        block's activations, and under checkpointing the block's recomputed activations too. It runs
        after the lower stages' chunks are done, so a step's peak is the kept part plus the larger of
        this and the chunks."""
        stage = self.stages[0]
        tokens = batch * (self.max_seq_len[0] if patches is None else patches) // sequence
        return (2 if checkpoint else 1) * tokens * block_activation_values(stage) * bytes_per_value

    def auto_checkpoint(self, ids: Tensor) -> bool:
        """Whether this step checkpoints the global stage's blocks: as set, or when automatic, when
        its activations without checkpointing would take more than AUTO_CHECKPOINT_SHARE of the
        memory available on the device."""
        if not self.auto_checkpoint_activations:
            return self.checkpoint_activations
        if not (self.training and torch.is_grad_enabled()):
            return False
        half = ids.is_cuda and torch.is_autocast_enabled("cuda") or self.to_logits.weight.element_size() < 4
        patches, width = ids.shape[1] // self.unit_sizes[0], 2 if half else 4
        need = (self.global_activation_bytes(ids.shape[0], False, width, patches=patches)
                + self.global_backward_bytes(ids.shape[0], False, width, patches=patches))
        budget = AUTO_CHECKPOINT_SHARE * available_memory_bytes(ids.device)
        on = need > budget
        if on != self.checkpoint_activations:
            logger.info("activation checkpointing %s: the global stage's activations without it, %.2f GB, %s %.0f%% of "
                        "the %.2f GB available", "on" if on else "off", need / 1e9, "exceed" if on else "fit in",
                        100 * AUTO_CHECKPOINT_SHARE, budget / AUTO_CHECKPOINT_SHARE / 1e9)
        return on

    def patches_per_chunk(self, rows: int = 1) -> int:
        """Global patches per chunk when ``rows`` rows are embedded together (at least one)."""
        return max(1, self.chunk_bytes // (self.unit_sizes[0] * rows))

    # ---------------------------------------------------------------- input handling

    def _check_ids(self, ids: Tensor) -> None:
        if ids.dtype in (torch.bool,) or ids.is_floating_point() or ids.is_complex():
            raise ConfigError(f"input ids must be an integer tensor, got dtype {ids.dtype}")
        if ids.numel() == 0:
            return
        lo, hi = torch.aminmax(ids)
        lo, hi = int(lo), int(hi)
        if lo < 0 or hi >= self.vocab_size:
            bad = lo if lo < 0 else hi
            raise ConfigError(
                f"input contains id {bad}, outside data values 0..{self.num_tokens - 1} and specials "
                f"PAD={self.pad_id}, EOS={self.eos_id}, BOS={self.bos_id} (num_tokens={self.num_tokens})"
            )

    def _flatten_input(self, x: Tensor) -> Tensor:
        """(b, n) or (b, k, *max_seq_len[1:]) -> (b, n) checked ids."""
        if x.ndim == self.num_stages + 1:
            if tuple(x.shape[2:]) != self.max_seq_len[1:] or x.shape[1] > self.max_seq_len[0]:
                raise ConfigError(
                    f"input shape {tuple(x.shape)} must be (batch, k<={self.max_seq_len[0]}, "
                    f"*{self.max_seq_len[1:]}) or (batch, n)"
                )
            x = x.reshape(x.shape[0], -1)
        elif x.ndim != 2:
            raise ConfigError(
                f"input has {x.ndim} dims; give (batch, n) or (batch, k, *{self.max_seq_len[1:]})"
            )
        n = x.shape[1]
        if n > self.context_length:
            raise ConfigError(
                f"sequence length {n} exceeds the model context prod(max_seq_len)={self.context_length}"
            )
        self._check_ids(x)
        return x

    # ---------------------------------------------------------------- the walk of every layout
    #
    # patches -> embed_patches -> stage 0's blocks and norm -> lower. The plain forward runs it over
    # every patch, a sequence-parallel rank over its own run of patches (with its attention swapped
    # from outside), a pipeline layer one step of it on its part of the model.

    def patches(self, ids: Tensor) -> Tensor:
        """The global stage's units of ids (b, n): (b, P, patch) ids, PAD filling the last patch.

        The one place that decides which positions form a patch: every layout groups its rows here,
        and every step of the walk takes this grouping."""
        patch, n = self.unit_sizes[0], ids.shape[1]
        padded = max(patch, patch * math.ceil(n / patch))
        if padded != n:
            ids = F.pad(ids, (0, padded - n), value=self.pad_id)
        return ids.view(ids.shape[0], -1, patch)

    def embed_patches(self, units: Tensor, start: int, end: int) -> Tensor:
        """Stage 0's input tokens for patches [start, end) of units (b, P, patch): (b, end - start,
        dim0), embedded a chunk of patches at a time (the byte embeddings of a patch are patch x
        byte_dim values: never all at once)."""
        stage, per_chunk = self.stages[0], self.patches_per_chunk(units.shape[0])
        pieces = []
        for lo in range(start, end, per_chunk):
            hi = min(lo + per_chunk, end)
            pieces.append(_recompute_if(hi < end, functools.partial(stage.inputs, start=lo, end=hi), units))
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)

    def global_stage(self, units: Tensor, start: int = 0, end: Optional[int] = None) -> Tensor:
        """Stage 0 over patches [start, end) of units (b, P, patch): (b, end - start, dim0), normalised,
        at their own rotary positions."""
        end = units.shape[1] if end is None else end
        return self.stages[0](self.embed_patches(units, start, end), start=start)

    def lower(self, h0: Tensor, units: Tensor, first_patch: int, reduction: str) -> Tensor:
        """Stages 1.., the head and the loss for patches [first_patch, first_patch + p) of every row,
        chunk by chunk (see "Chunked execution").

        h0: (b, p, dim0) stage 0's normalised output for those patches; units: (b, P, patch) whole
        rows (the unit before a patch may lie outside the range). Of stage 0 only ``to_next`` is used.
        Returns for ``reduction`` "sum" the 0-dim fp32 nats over non-PAD bytes, "none" the nats (b, p *
        patch), "logits" (b, p * patch, vocab)."""
        b, p, _ = h0.shape
        patch = units.shape[-1]
        chunks = chunk_plan(b, p, self.patches_per_chunk())
        run = functools.partial(self._lower_chunk, reduction=reduction)
        outs = []
        for k, (r0, r1, q0, q1) in enumerate(chunks):
            lo, hi = first_patch + q0, first_patch + q1
            before, starts = units_before(units[r0:r1], self.stages[1].unit_size, lo, hi)  # (R, u1), (R,)
            rows = h0[r0:r1, q0:q1].reshape(-1, h0.shape[-1])  # (R, dim0)
            chunk_ids = units[r0:r1, lo:hi].reshape(-1, patch)  # (R, patch)
            outs.append(_recompute_if(k < len(chunks) - 1, run, rows, chunk_ids, before, starts))
        if reduction == "sum":
            return torch.stack(outs).sum()
        out = torch.cat(outs)
        return out.view(b, p * patch, *out.shape[1:])

    def _lower_chunk(self, rows: Tensor, chunk_ids: Tensor, before: Tensor, starts: Tensor, *,
                     reduction: str) -> Tensor:
        """One chunk of R patches through stages 1.. and the head. rows (R, dim0): stage 0's output
        for them; chunk_ids (R, patch); before (R, unit_sizes[1]) and starts (R,) as ``units_before``."""
        stages = self.stages
        ctx = stages[0].project_down(rows[:, None])  # (R, seq_len1, dim1)
        patch_before, patch_starts = before, starts
        for s in range(1, self.num_stages):
            stage = stages[s]
            if s > 1:
                before, starts = _inner_before(chunk_ids, patch_before, patch_starts, stages[s - 1].unit_size,
                                               stage.unit_size)
            units = chunk_ids.view(-1, stage.seq_len, stage.unit_size)  # (B_s, positions, unit bytes)
            h = stage(stage.inputs(units, ctx, before=before, starts=starts), checkpoint_blocks=False)
            if stage.to_next is not None:
                ctx = stage.project_down(h)  # (B_s * positions, next_seq_len, next_dim)
        logits = self.to_logits(h).view(-1, self.vocab_size)  # (R * patch, vocab)
        if reduction == "logits":
            return logits
        nats = cross_entropy(logits, chunk_ids.reshape(-1).long(), self.pad_id, reduction="none")
        return nats.sum() if reduction == "sum" else nats

    def forward_patches(self, units: Tensor, start: int = 0, end: Optional[int] = None, *,
                        reduction: str) -> Tensor:
        """Patches [start, end) of every row of units (b, P, patch) through the whole model, as
        ``lower`` returns them for ``reduction``."""
        return self.lower(self.global_stage(units, start, end), units, start, reduction)

    def forward(self, x: Tensor, return_loss=False) -> Tensor:
        """x: (b, n) or (b, k, *max_seq_len[1:]) ids (any integer dtype).

        Returns logits of shape x.shape + (vocab_size,) (logits[..., j, :] predicts byte j from
        bytes < j), or with ``return_loss`` the cross-entropy over non-PAD targets: True or "mean"
        the mean, "sum" the sum, "none" per byte (x.shape, 0 at PAD). The loss never builds the
        logits of more than one chunk (``chunk_bytes``).
        """
        reduction = "mean" if return_loss is True else return_loss
        if reduction is not False and reduction not in REDUCTIONS:
            raise ConfigError(f"return_loss={return_loss!r} must be a bool or one of {REDUCTIONS}")
        in_shape = x.shape
        ids = self._flatten_input(x)
        n = ids.shape[1]
        if reduction and n == 0:
            raise ConfigError("cannot compute a loss on an empty sequence")
        if self.auto_checkpoint_activations:
            self.checkpoint_activations = self.auto_checkpoint(ids)
        units = self.patches(ids)
        out = self.forward_patches(units, reduction={False: "logits", "mean": "sum"}.get(reduction, reduction))
        if reduction == "mean":
            return out / (ids != self.pad_id).sum()
        if reduction == "sum":
            return out
        if reduction == "none":
            return out[:, :n].reshape(in_shape)
        return out[:, :n].reshape(*in_shape, self.vocab_size)

    # ---------------------------------------------------------------- cached decoding (decode.py)

    def train(self, mode: bool = True) -> "TerraByte":
        self._plans = None  # training changes the weights the fused decode copies were made from
        return super().train(mode)

    # decode.py's entry points as methods: model.generate(prime, ...), model.init_cache(b),
    # model.forward_cached(new_tokens, cache); generate steps through self._advance
    generate = decode.generate
    init_cache = decode.init_cache
    forward_cached = decode.forward_cached
    _advance = decode.advance
    _decode_plans = decode.decode_plans
    _sample = staticmethod(decode.sample)

