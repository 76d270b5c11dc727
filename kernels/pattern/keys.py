"""The key-list face of ``SparsePattern``: the keys a query (a decode step) or a block of queries (a
prefill piece) attends, enumerated from the parts rather than tested against every key."""
from __future__ import annotations

from array import array

import torch

from .parts import unpack_params


class KeyLists:
    """Mixed into ``SparsePattern``: uses its ``layout``, ``block``, ``num_heads``, ``head_invariant``,
    ``head`` and ``check_heads``."""

    def attended_keys(self, q_pos: int, n: int, head: int = 0, causal: bool = True) -> torch.Tensor:
        """The key positions in [0, n) that query ``q_pos`` attends, sorted: int64 (count,).

        Exactly ``{k : allowed(q_pos, k, head=head, causal=causal)}``, enumerated from the parts
        instead of tested against every key, so the cost follows the number of attended keys, not
        ``n``: what a decode step over a long cache needs (one query, a few of its keys).
        """
        return torch.tensor(self._key_list(q_pos, n, head, causal), dtype=torch.long)

    def attended_key_rows(self, q_start: int, q_end: int, n: int, head: int | None = None,
                          heads: int | None = None, causal: bool = True,
                          device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """Attended keys of queries [q_start, q_end), padded: (idx, valid), both (H, m, kmax).

        Row r of head h lists the keys of query q_start + r in order, then padding (index 0,
        valid False). H is 1 for one ``head``, or when every head attends the same set (any
        number of heads); otherwise ``heads`` (default: the pattern's own count), padded to one
        kmax across heads, so one gather serves all of them. One query (a decode step) is listed
        in plain Python, tens of microseconds; many rows (a prefill piece) in tensor ops.
        """
        if head is None and heads is not None:
            self.check_heads(heads, "attended_key_rows")
        if head is not None:
            head_list = [head]
        elif self.head_invariant:
            head_list = [0]
        elif (heads or self.num_heads) is None:
            raise ValueError("sparse pattern: the attended keys differ per head (dilated offsets follow the "
                             "head index); pass head= or heads=")
        else:
            head_list = list(range(heads or self.num_heads))
        if q_end - q_start == 1:
            lists = [self._key_list(q_start, n, h, causal) for h in head_list]
            kmax = max(1, max(len(k) for k in lists))
            flat = array("q")  # one buffer, no per-element conversion: ~10 us against ~40
            for k in lists:
                flat.extend(k)
                flat.extend([-1] * (kmax - len(k)))
            idx = torch.frombuffer(flat, dtype=torch.long).view(len(lists), 1, kmax).to(device)
            return idx.clamp(min=0), idx >= 0
        q = torch.arange(q_start, q_end)
        rows = [self._candidates(q, n, h, causal) for h in head_list]  # each (m, c_h), n = padding
        width = max(r.shape[1] for r in rows)
        cand = torch.stack([torch.nn.functional.pad(r, (0, width - r.shape[1]), value=n) for r in rows])
        idx, valid = _sorted_unique(cand, n)
        return idx.to(device), valid.to(device)

    def _key_list(self, q: int, n: int, head: int, causal: bool) -> list[int]:
        """The sorted keys of one query, from Python ranges (no tensor op: a decode step's cost)."""
        hi = min(q + 1, n) if causal else n  # keys lie in [0, hi)
        if self.layout is not None:
            lay, b = self.layout, self.block
            if q < 0 or q // b >= lay.num_blocks:
                return []
            ptr = lay.indptr[head % lay.indptr.shape[0]]
            blocks = lay.indices[int(ptr[q // b]): int(ptr[q // b + 1])].tolist()  # sorted, distinct
            return [k for kb in blocks for k in range(kb * b, min(kb * b + b, hi))]
        w, g, l, dilated = unpack_params(self.head(head).params(head, None))
        keys = set(range(max(q - w + 1, 0), min(q + w, hi)))
        if g > 0:
            keys.update(range(hi if q < g else min(g, hi)))  # a global query attends every key
        if l > 0:
            keys.update(range(q % l, hi, l))
        for s, r, off in dilated:
            if q % r == off:
                start = q // s * s
                keys.update(range(start + (off - start) % r, min(start + s, hi), r))
        return sorted(keys)

    def _candidates(self, q: torch.Tensor, n: int, head: int, causal: bool) -> torch.Tensor:
        """Every key that a part gives queries q (m,), duplicates and all: (m, c) int64, ``n``
        where a slot holds none. c is the sum of the parts' sizes, never n itself (unless a part is
        that large)."""
        if q.numel() == 0:
            return torch.full((0, 1), n, dtype=torch.long)
        if self.layout is not None:
            cand = self._csr_candidates(q, n, head)
        else:
            w, g, l, dilated = unpack_params(self.head(head).params(head, None))
            parts = [_window(q, min(w, n), causal)]
            if g > 0:
                parts.append(torch.arange(min(g, n)).expand(q.numel(), -1))
                if not causal and int(q.min()) < g:  # a global query attends every key
                    parts.append(torch.where(q[:, None] < g, torch.arange(n), n))
            if l > 0:
                parts.append(_strided(q, n, l))
            parts += [_dilated(q, n, s, r, off) for s, r, off in dilated]
            cand = torch.cat(parts, dim=1)
        keep = (cand >= 0) & (cand < n)
        if causal:
            keep &= cand <= q[:, None]
        return torch.where(keep, cand, n)

    def _csr_candidates(self, q: torch.Tensor, n: int, head: int) -> torch.Tensor:
        """Whole key blocks of each query's block row: (m, blocks * block) positions."""
        lay, b = self.layout, self.block
        rows = lay.num_blocks
        ptr = lay.indptr[head % lay.indptr.shape[0]]  # (rows + 1,) offsets into lay.indices
        qb = (q // b).clamp(max=rows - 1)
        lo, count = ptr[qb], ptr[qb + 1] - ptr[qb]
        count = torch.where(q // b < rows, count, 0)  # past the layout: nothing attended
        width = max(int(count.max()), 1)
        slot = torch.arange(width)
        blocks = lay.indices[(lo[:, None] + slot).clamp(max=max(lay.indices.numel() - 1, 0))]
        keys = blocks[:, :, None] * b + torch.arange(b)  # (m, width, b)
        keys = torch.where((slot < count[:, None])[:, :, None], keys, n)
        return keys.flatten(1)



def _window(q: torch.Tensor, w: int, causal: bool) -> torch.Tensor:
    """|q - k| < w (w >= 1): (m, w) keys, or (m, 2w - 1) without causal masking."""
    return q[:, None] + torch.arange(-(w - 1), 1 if causal else w)


def _strided(q: torch.Tensor, n: int, l: int) -> torch.Tensor:
    """k % l == q % l: every l-th key from the query's residue on, (m, ceil(n / l))."""
    return (q % l)[:, None] + l * torch.arange(-(-n // l))


def _dilated(q: torch.Tensor, n: int, s: int, r: int, off: int) -> torch.Tensor:
    """One LongNet part: for queries with q % r == off, the keys of their segment with k % r ==
    off, (m, ceil(min(s, n) / r)); ``n`` (none) for the other queries and past the segment."""
    start = q // s * s
    first = start + (off - start) % r  # the segment's first key with k % r == off
    keys = first[:, None] + r * torch.arange(-(-min(s, n) // r))
    ok = (q % r == off)[:, None] & (keys < (start + s)[:, None])
    return torch.where(ok, keys, n)


def _sorted_unique(cand: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., c) keys with ``n`` as padding -> each row's distinct keys sorted, left-aligned and
    cut to the longest row: (idx with padding 0, valid)."""
    cand = cand.sort(dim=-1).values
    dup = torch.zeros_like(cand, dtype=torch.bool)
    dup[..., 1:] = cand[..., 1:] == cand[..., :-1]
    cand = cand.masked_fill(dup, n).sort(dim=-1).values
    valid = cand < n
    kmax = max(int(valid.sum(-1).max()) if valid.numel() else 0, 1)
    cand, valid = cand[..., :kmax], valid[..., :kmax]
    return cand.masked_fill(~valid, 0), valid
