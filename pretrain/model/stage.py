"""One level of the hierarchy (``Stage``), the loss every layout shares (``cross_entropy``) and
the bookkeeping of the chunked walk below the global stage: which unit precedes each group
(``units_before``, ``_inner_before``) and how rows and patches fall into chunks (``chunk_plan``).
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from terrabyte.data_pipeline.basics.errors import ConfigError

from .layers import NORM_EPS, Block, PatchEmbed, Rotary, as_is, init_fan_in


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
                 embed_groups: Optional[tuple] = None, ngram_sizes: tuple = (), ngram_buckets: int = 0):
        super().__init__()
        self.dim, self.seq_len, self.unit_size = dim, seq_len, unit_size
        self.heads, self.dim_head, self.depth = heads, dim_head, depth
        groups = (unit_size,) if embed_groups is None else tuple(embed_groups)
        if math.prod(groups) != unit_size:
            raise ConfigError(f"embed_groups={groups} must multiply to the unit size {unit_size}")
        self.embed = PatchEmbed(vocab_size, byte_dim, groups, dim, ngram_sizes, ngram_buckets)
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



# ---------------------------------------------------------------------------- Chunks

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


