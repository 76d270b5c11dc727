"""The layers of ``TerraByte``: attention callables, rotary positions, attention, the SwiGLU
feed-forward, the transformer block, the unit embedder and the initialisers they share.

Plain PyTorch; a stage (``stage.py``) stacks them and ``terrabyte.py`` stacks the stages.
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

from terrabyte.data_pipeline.basics.errors import ConfigError

from .args import NGRAM_HASH_VALUES

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
        # steps of the tiny config (pretrain/BENCHMARKS.md, "Initialisation and the first byte of a
        # patch")
        std = self.attn.to_q.in_features ** -0.5
        for lin in (self.attn.to_q, self.attn.to_k, self.attn.to_v, self.ff.gate_proj, self.ff.up_proj):
            with whole(lin):
                trunc_normal(lin.weight, std)
        for lin in (self.attn.to_out, self.ff.down_proj):
            with whole(lin):
                trunc_normal(lin.weight, std * residual_scale)


# Rolling hash of an n-gram of ids: polynomial in a base above every id, modulo a Mersenne prime
# small enough that base * prime stays far inside int64 (no overflow on any device)
NGRAM_BASE = 1_000_003
NGRAM_PRIME = NGRAM_HASH_VALUES


class NgramEmbed(nn.Module):
    """Hashed n-gram embeddings inside a unit (BLT, Pagnoni et al. 2024, arXiv:2412.09871, sec. 3.2.1):
    byte j of a unit gets, for each n in ``sizes``, the embedding of a hash of bytes j-n+1..j of the
    same unit (none where the unit has fewer than n bytes up to j). ``PatchEmbed`` adds them to the
    byte embeddings before its projection, so a unit's embedding is no longer a linear map of its
    bytes: which word piece a patch holds is looked up, not composed.

    Only bytes of the unit itself take part, so the embedding stays a function of the unit alone and
    every layout, the decode path and the chunked walk use it unchanged; causality holds because a
    unit is embedded only where all its bytes are already given.

    (..., unit_size) ids -> (..., unit_size, byte_dim)."""

    def __init__(self, sizes: tuple, buckets: int, byte_dim: int, vocab_size: int):
        super().__init__()
        if vocab_size >= NGRAM_BASE:
            raise ConfigError(f"hashed n-grams need ids below {NGRAM_BASE}, got vocab_size {vocab_size}")
        self.sizes, self.buckets = tuple(sizes), buckets
        # one table for all sizes, each its own range of rows, and a last all-zero row for "no n-gram";
        # a parameter of this module itself (not of a child nn.Embedding whose forward is never
        # called), so a ZeRO-3 engine gathers it when this module runs
        self.none = len(self.sizes) * buckets
        self.weight = nn.Parameter(torch.empty(self.none + 1, byte_dim))

    def indices(self, units: Tensor) -> Tensor:
        """(..., unit_size) ids -> (..., unit_size, len(sizes)) rows of the table."""
        u = units.long()
        none = self.none
        cols = []
        for k, n in enumerate(self.sizes):
            h = torch.zeros_like(u[..., n - 1:])
            for i in range(n):  # bytes j-n+1 .. j, oldest first
                h = (h * NGRAM_BASE + u[..., i: u.shape[-1] - n + 1 + i]) % NGRAM_PRIME
            rows = h % self.buckets + k * self.buckets
            cols.append(F.pad(rows, (n - 1, 0), value=none))
        return torch.stack(cols, dim=-1)

    def forward(self, units: Tensor) -> Tensor:
        idx = self.indices(units)
        flat = F.embedding_bag(idx.reshape(-1, idx.shape[-1]), self.weight, mode="sum", padding_idx=self.none)
        return flat.view(*units.shape, -1)

    def init_weights(self, emb_std: float, whole: Optional[Callable] = None) -> None:
        whole = whole or as_is
        with whole(self), torch.no_grad():
            # each byte's n-gram terms together about as large as its byte embedding
            nn.init.normal_(self.weight, std=emb_std / math.sqrt(len(self.sizes)))
            self.weight[self.none].zero_()


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

    def __init__(self, vocab_size: int, byte_dim: int, groups: tuple, dim: int,
                 ngram_sizes: tuple = (), ngram_buckets: int = 0):
        super().__init__()
        self.unit_size = math.prod(groups)
        self.groups = tuple(groups)
        self.ngrams = None
        if self.unit_size == 1:
            self.token_emb = nn.Embedding(vocab_size, dim)
            self.proj = None
            self.levels = None
            return
        self.token_emb = nn.Embedding(vocab_size, byte_dim)
        sizes = tuple(n for n in ngram_sizes if n <= self.unit_size)
        if sizes and ngram_buckets:
            self.ngrams = NgramEmbed(sizes, ngram_buckets, byte_dim, vocab_size)
        inner = [g for g in self.groups[1:] if g > 1][::-1]  # innermost first
        top = self.unit_size // math.prod(inner)
        self.levels = nn.ModuleList([nn.Linear(g * byte_dim, byte_dim, bias=False) for g in inner]) if inner else None
        self._level_groups = tuple(inner)
        self.proj = nn.Linear(top * byte_dim, dim, bias=False)

    def forward(self, units: Tensor) -> Tensor:
        if self.proj is None:
            return self.token_emb(units.squeeze(-1))
        x = self.token_emb(units)  # (..., unit_size, byte_dim)
        if self.ngrams is not None:
            x = x + self.ngrams(units)
        if self.levels is not None:
            for g, level in zip(self._level_groups, self.levels):
                x = level(rearrange(x, "... (k g) e -> ... k (g e)", g=g))  # (..., unit_size / g..., byte_dim)
        return self.proj(rearrange(x, "... k e -> ... (k e)"))

    def init_weights(self, emb_std: float, whole: Optional[Callable] = None) -> None:
        whole = whole or as_is
        with whole(self.token_emb):
            nn.init.normal_(self.token_emb.weight, std=emb_std)
        if self.ngrams is not None:
            self.ngrams.init_weights(emb_std, whole)
        for linear in [*(self.levels or ()), *([self.proj] if self.proj is not None else [])]:
            with whole(linear):
                init_fan_in(linear)


