"""The element-level face of ``SparsePattern``: the predicate ``allowed`` (which also serves as a
FlexAttention ``mask_mod``), the dense mask of the reference, and ``_allowed_parts``, the union of
the parts in plain tensor ops."""
from __future__ import annotations

from typing import Callable

import torch

from .parts import PARAMS_FIXED


class ElementMask:
    """Mixed into ``SparsePattern``: uses its ``layout``, ``block``, ``num_heads``, ``head_invariant``,
    ``_heads``, ``has_global``, ``has_stride``, ``num_dilated``, ``check_heads`` and ``param_table``."""

    def _head_index(self, head: int | torch.Tensor | None, heads: int | None) -> torch.Tensor | int:
        if head is not None:
            return head
        if heads is not None:
            self.check_heads(heads, "sparse pattern")
        else:
            heads = self.num_heads
        if heads is None:
            if not self.head_invariant:
                raise ValueError("sparse pattern: the mask differs per head (dilated offsets follow the head index); "
                                 "pass head= or heads=")
            return 0
        return torch.arange(heads)

    def allowed(self, q_idx: torch.Tensor | int, k_idx: torch.Tensor | int, head: int | torch.Tensor | None = None,
                causal: bool = True, heads: int | None = None) -> torch.Tensor:
        """Element-wise predicate: may query position ``q_idx`` attend key position ``k_idx``?

        ``q_idx``, ``k_idx`` and ``head`` broadcast against each other (plain tensor arithmetic, so
        this also serves as a FlexAttention ``mask_mod``). ``head=None`` means all heads: a leading
        head axis of size ``heads`` (or the pattern's own head count) is added, or no axis when every
        head attends the same set.
        """
        q = torch.as_tensor(q_idx)
        k = torch.as_tensor(k_idx, device=q.device)
        h = self._head_index(head, heads)
        if isinstance(h, torch.Tensor) and head is None:
            h = h.to(q.device).view(-1, *([1] * max(q.dim(), k.dim())))
        if self.layout is not None:
            dense = self.layout.dense.to(q.device)
            rows = dense.shape[-1]
            hh = torch.as_tensor(h, device=q.device) % dense.shape[0]
            qb, kb = q // self.block, k // self.block
            inside = (qb < rows) & (kb < rows) & (q >= 0) & (k >= 0)
            ok = dense[hh, qb.clamp(0, rows - 1), kb.clamp(0, rows - 1)] & inside
        else:
            # a per-head pattern has one row per head; one config for all heads has a single row
            table = self.param_table(self.num_heads or 1, None, device=q.device).long()
            hh = torch.as_tensor(h, device=q.device)
            if self.num_heads is None:
                # One config for all heads: only the LongNet offset depends on the head.
                row = table[0]
                ok = self._allowed_row(q, k, row, hh)
            else:
                ok = self._allowed_row(q, k, table[hh], None)
        if causal:
            ok = ok & (k <= q)
        if isinstance(h, torch.Tensor):  # keep the head axis even where no part depends on it
            ok = ok.expand(torch.broadcast_shapes(ok.shape, h.shape))
        return ok

    def _parts(self) -> tuple[bool, bool, tuple[bool, ...]]:
        """Python constants for _allowed_parts: global part?, stride part?, per dilated slot whether
        its offset follows the head. Taken out of the pattern so mask_mod traces (torch.compile)."""
        return self.has_global, self.has_stride, tuple(
            self._heads[0].dilated[d].offset is None if d < len(self._heads[0].dilated) else False
            for d in range(self.num_dilated))

    def _allowed_row(self, q: torch.Tensor, k: torch.Tensor, row: torch.Tensor,
                     head: torch.Tensor | None) -> torch.Tensor:
        return _allowed_parts(q, k, row, head, *self._parts())

    def dense_mask(self, n: int, heads: int | None = None, causal: bool = True,
                   device: torch.device | str = "cpu") -> torch.Tensor:
        """Bool mask (heads, n, n), or (n, n) when ``heads`` is None and every head is the same."""
        i = torch.arange(n, device=device)
        if heads is None and self.num_heads is None:
            return self.allowed(i[:, None], i[None, :], head=None, causal=causal)
        heads = heads or self.num_heads
        return self.allowed(i[:, None], i[None, :], head=None, causal=causal, heads=heads)

    def mask_mod(self, heads: int, causal: bool = True, device: torch.device | str = "cpu") -> Callable:
        """FlexAttention ``mask_mod(b, h, q_idx, kv_idx)`` for exactly this attended set."""
        self.check_heads(heads)
        if self.layout is not None:
            dense = self.layout.dense.to(device)
            block, hn = self.block, dense.shape[0]

            def mask_mod(b, h, q_idx, kv_idx):
                ok = dense[h % hn, q_idx // block, kv_idx // block]
                return ok & (kv_idx <= q_idx) if causal else ok

            return mask_mod
        table = self.param_table(heads, None, device=device).long()  # per-head offsets already in it
        has_global, has_stride, head_offsets = self._parts()
        no_head_offsets = tuple(False for _ in head_offsets)

        def mask_mod(b, h, q_idx, kv_idx):
            ok = _allowed_parts(q_idx, kv_idx, table[h], None, has_global, has_stride, no_head_offsets)
            return ok & (kv_idx <= q_idx) if causal else ok

        return mask_mod


def _allowed_parts(q: torch.Tensor, k: torch.Tensor, row: torch.Tensor, head: torch.Tensor | None,
                   has_global: bool, has_stride: bool, head_offsets: tuple[bool, ...]) -> torch.Tensor:
    """Union of the parts, element-wise, in plain tensor ops (traceable by torch.compile / Flex).

    ``row`` is a parameter-table row, or rows indexed by head (last axis = columns). Dilated slot d
    takes its offset from ``head % dilation`` when ``head`` is given and ``head_offsets[d]``.
    """
    def col(c):
        return row[..., c]

    diff = q - k
    w = col(0)
    ok = (diff < w) & (-diff < w)
    if has_global:
        g = col(1)
        ok = ok | (k < g) | (q < g)
    if has_stride:
        l = col(2)
        ls = l.clamp(min=1)
        ok = ok | ((l > 0) & (q % ls == k % ls))
    for d, from_head in enumerate(head_offsets):
        s, r = col(PARAMS_FIXED + 3 * d), col(PARAMS_FIXED + 3 * d + 1)
        off = col(PARAMS_FIXED + 3 * d + 2)
        if head is not None and from_head:
            off = head % r.clamp(min=1)
        ss, rs = s.clamp(min=1), r.clamp(min=1)
        ok = ok | ((s > 0) & (q // ss == k // ss) & (q % rs == off) & (k % rs == off))
    return ok
