"""Which bytes form a global patch: the boundary rules (``fixed``, ``space``, ``entropy``), the
entropy scheme's small byte model, and the layout that turns a row of bytes and its patch starts
into the global stage's units.

Every rule is causal: ``starts[:, j]`` (byte j begins a new patch) depends only on bytes < j, so a
byte's prediction never depends on a later byte through the grouping, and decoding knows where the
next byte goes before it is sampled.

- ``fixed``: every ``L`` bytes (MEGABYTE, today's default).
- ``space``: SpaceByte's rule (Slagle 2024, kjslag/spacebyte): byte j starts a patch when byte j-1
  is space-like (not an ASCII letter or digit, not a UTF-8 continuation byte 0x80-0xBF) and byte j-2
  is not (a run of spaces or punctuation starts one patch, after its first byte); the position
  before the row counts as not space-like.
- ``entropy``: BLT's rule (Pagnoni et al. 2024, facebookresearch/blt) with its relative threshold:
  byte j starts a patch when the small byte model's next-byte entropy rises by more than
  ``threshold`` bits from byte j-1 to byte j, H(j) - H(j-1) > threshold. The relative form, not a
  global H(j) > threshold, because the model trains jointly with the main model: from
  initialisation its entropy is ~8 bits everywhere, so a global threshold would start a patch at
  every byte (the patch count collapses to the byte count, BLT's issue #141, and the row no longer
  fits ``max_seq_len[0]`` patches), while a rise stays rare until the model has learnt which bytes
  are hard: patches begin at the length cap, as ``fixed``, and follow the data as it learns.

Every scheme also cuts when the current patch reaches ``L`` bytes (the lower stages' capacity), and
after an EOS byte (documents never share a patch; ``fixed`` keeps its exact grouping). With the
cap the rule stays causal: the cap depends on earlier starts only. A budget keeps every row within
``max_seq_len[0]`` patches whatever its bytes (``within_budget``): a candidate is taken only while
the rest of a context-long row would still fit; rows far from the budget (all but odd ones: a
2,048-byte row of stdlib code has 361 space patches on average, 527 at most) never meet it.

The entropy model (``EntropyModel``) sees the ``ENTROPY_WINDOW`` bytes before each position, each
row on its own (padded with its own "before the row" id, never the previous row's bytes: BLT's
issue #123), and trains on an auxiliary next-byte loss; its inputs are byte ids, so its gradient
never reaches the main model, and boundaries are computed under ``no_grad``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from terrabyte.data_pipeline.basics.errors import ConfigError

from .args import PATCHING as SCHEMES
from .layers import as_is

# bytes the entropy model sees before each position, its embedding width and hidden width
ENTROPY_WINDOW = 8
ENTROPY_DIM = 32
ENTROPY_HIDDEN = 256
# entropy scheme: a rise of the next-byte entropy (bits) from one byte to the next that starts a patch;
# 1.5 gives ~5.4-byte patches on stdlib code at L = 8 once the model has trained a few hundred steps
# (space: 5.7), so the two dynamic schemes cost the global stage about the same
ENTROPY_RISE_BITS = 1.5
# positions the entropy model scores at once (its logits are positions x vocab values)
ENTROPY_CHUNK_BYTES = 1 << 16


# ---------------------------------------------------------------------------- boundary rules

def space_like(ids: Tensor) -> Tensor:
    """Bytes that are not ASCII letters or digits and not UTF-8 continuation bytes (0x80-0xBF);
    special ids (PAD, EOS, BOS: 256 and above) count as space-like."""
    digit = (ids >= 0x30) & (ids <= 0x39)
    upper = (ids >= 0x41) & (ids <= 0x5A)
    lower = (ids >= 0x61) & (ids <= 0x7A)
    continuation = (ids >= 0x80) & (ids <= 0xBF)
    return ~(digit | upper | lower | continuation)


def space_candidates(ids: Tensor, eos_id: Optional[int] = None) -> Tensor:
    """(b, n) ids -> (b, n) bool: byte j follows a space-like byte that follows a byte that is not
    (or the row start), or follows EOS; byte 0 always starts."""
    like = space_like(ids)
    prev = F.pad(like, (1, 0), value=False)[:, :-1]  # byte j-1
    prev2 = F.pad(like, (2, 0), value=False)[:, :-2]  # byte j-2; before the row: not space-like
    cand = prev & ~prev2
    cand[:, 0] = True
    return cand | after_eos(ids, eos_id)


def after_eos(ids: Tensor, eos_id: Optional[int]) -> Tensor:
    """(b, n) bool: byte j - 1 is EOS."""
    out = torch.zeros_like(ids, dtype=torch.bool)
    if eos_id is not None and ids.shape[1] > 1:
        out[:, 1:] = ids[:, :-1] == eos_id
    return out


def rise_candidates(entropy: Tensor, threshold: float) -> Tensor:
    """(b, n) entropies (bits; entropy[:, j] is of byte j given bytes < j) -> (b, n) bool: the
    entropy rises by more than ``threshold`` from byte j-1 to byte j; byte 0 always starts."""
    cand = torch.ones_like(entropy, dtype=torch.bool)
    cand[:, 1:] = entropy[:, 1:] - entropy[:, :-1] > threshold
    return cand


def cap_length(candidates: Tensor, max_len: int) -> Tensor:
    """Starts from candidate starts (b, n) (column 0 True): each candidate, and every ``max_len``
    bytes after the last start (the greedy cut, vectorised: between two candidates the cuts fall
    every ``max_len`` bytes from the first)."""
    n = candidates.shape[1]
    pos = torch.arange(n, device=candidates.device)
    last = torch.where(candidates, pos, torch.zeros_like(pos)).cummax(dim=1).values  # last candidate <= j
    return (pos - last) % max_len == 0


def within_budget(starts: Tensor, candidates: Tensor, max_len: int, budget: int, row_bytes: int) -> Tensor:
    """``starts`` (from ``cap_length``) with every row fitting ``budget`` patches when it is
    ``row_bytes`` long: a candidate at byte j starts a patch only while the patches so far, plus the
    fewest the bytes from j to ``row_bytes`` need, stay within the budget (cuts at the cap always
    happen). Causal: the rule reads bytes < j and two constants. A row whose unguarded count fits
    never meets the guard (had it bound at j, the row would need more), so only rows over budget
    take the sequential walk."""
    b, n = starts.shape
    over = (starts.sum(dim=1) + (row_bytes - n + max_len - 1) // max_len > budget).nonzero().flatten().tolist()
    if not over:
        return starts
    starts = starts.clone()
    for r in over:
        cand, row = candidates[r].tolist(), [False] * n
        count = last = 0
        for j in range(n):
            start = j == 0 or j - last == max_len or (
                cand[j] and count + (row_bytes - j + max_len - 1) // max_len <= budget)
            if start:
                row[j], count, last = True, count + 1, j
        starts[r] = torch.tensor(row, device=starts.device)
    return starts


def fixed_starts(b: int, n: int, max_len: int, device=None) -> Tensor:
    return (torch.arange(n, device=device) % max_len == 0).expand(b, n)


# ---------------------------------------------------------------------------- layout

@dataclass
class PatchLayout:
    """A batch of rows grouped into patches.

    units: (b, P, L) ids, each patch's bytes left-aligned, PAD after them; rows with fewer than P
    patches end in all-PAD patches. before: (b, P, u1) the u1 bytes before each patch's start in
    its row (PAD before the row), the lower stages' first input, or None where ``units_before``
    on the units gives it (fixed patches). index: (b, n) each byte's slot in units.view(b, P * L),
    or None where it is the byte's own position (fixed patches). P is the batch's patch count."""

    units: Tensor
    before: Optional[Tensor] = None
    index: Optional[Tensor] = None

    @property
    def patches(self) -> int:
        return self.units.shape[1]

    def scatter_back(self, per_slot: Tensor, n: int) -> Tensor:
        """(b, P * L, ...) values per slot -> (b, n, ...) values per byte of the row."""
        if self.index is None:
            return per_slot[:, :n]
        idx = self.index.view(*self.index.shape, *(1,) * (per_slot.ndim - 2)).expand(-1, -1, *per_slot.shape[2:])
        return per_slot.gather(1, idx)


def layout(ids: Tensor, starts: Tensor, max_len: int, before_len: int, pad_id: int,
           multiple: int = 1, min_patches: int = 1) -> PatchLayout:
    """ids (b, n) grouped at starts (b, n) bool (column 0 True, no patch longer than ``max_len``)
    into a ``PatchLayout`` with ``before_len`` bytes before each patch. P is the batch's largest
    patch count, at least ``min_patches``, rounded up to a multiple of ``multiple``."""
    b, n = ids.shape
    pos = torch.arange(n, device=ids.device)
    pid = starts.long().cumsum(dim=1) - 1  # (b, n) each byte's patch
    first = torch.where(starts, pos, torch.zeros_like(pos)).cummax(dim=1).values  # its patch's start
    slot = pos - first
    counts = pid[:, -1] + 1 if n else torch.zeros(b, dtype=torch.long, device=ids.device)
    patches = max(int(counts.max()) if b else 0, min_patches)
    patches = multiple * math.ceil(patches / multiple)
    index = pid * max_len + slot
    units = torch.full((b, patches * max_len), pad_id, dtype=ids.dtype, device=ids.device)
    units.scatter_(1, index, ids)
    # each patch's start; the padding patches after a row's last one read the row's end
    begin = torch.full((b, patches), n, dtype=torch.long, device=ids.device)
    rows = torch.arange(b, device=ids.device)[:, None].expand(b, n)
    begin[rows[starts], pid[starts]] = pos.expand(b, n)[starts]
    shifted = F.pad(ids, (before_len, 0), value=pad_id)  # shifted[:, i + before_len] = ids[:, i]
    window = begin[:, :, None] + torch.arange(before_len, device=ids.device)  # (b, P, u1)
    before = shifted.gather(1, window.view(b, -1)).view(b, patches, before_len)
    return PatchLayout(units.view(b, patches, max_len), before, index)


def patch_stats(starts: Tensor, ids: Optional[Tensor] = None, pad_id: Optional[int] = None) -> dict:
    """Mean patch length (bytes per patch) and boundary rate (patches per byte) of starts (b, n),
    over non-PAD bytes when ``ids`` and ``pad_id`` are given: what a trainer logs to see a scheme
    collapse (patches of ~1 byte) or stall (patches at the length cap)."""
    keep = torch.ones_like(starts) if ids is None else ids != pad_id
    count = int((starts & keep).sum())
    total = int(keep.sum())
    return {"mean_patch_bytes": total / count if count else float("nan"),
            "boundary_rate": count / total if total else float("nan")}


# ---------------------------------------------------------------------------- the entropy model

class EntropyModel(nn.Module):
    """A small causal byte model for the entropy scheme: p(byte j | the ``window`` bytes before it),
    an MLP over their concatenated embeddings (a byte n-gram model; linear in n, each row alone).
    Positions before the row read a dedicated id (``vocab_size``), never another row's bytes."""

    def __init__(self, vocab_size: int, window: int = ENTROPY_WINDOW, dim: int = ENTROPY_DIM,
                 hidden: int = ENTROPY_HIDDEN):
        super().__init__()
        self.vocab_size, self.window = vocab_size, window
        self.emb = nn.Embedding(vocab_size + 1, dim)  # + the "before the row" id
        self.hidden = nn.Linear(window * dim, hidden)
        self.out = nn.Linear(hidden, vocab_size)

    def init_weights(self, whole=None) -> None:
        whole = whole or as_is
        with whole(self.emb):
            nn.init.normal_(self.emb.weight, std=1.0)
        for lin in (self.hidden, self.out):
            with whole(lin):
                nn.init.normal_(lin.weight, std=lin.in_features ** -0.5)
                nn.init.zeros_(lin.bias)

    def padded(self, ids: Tensor) -> Tensor:
        """(b, n) -> (b, window + n): the row after ``window`` "before the row" ids."""
        return F.pad(ids, (self.window, 0), value=self.vocab_size)

    def logits(self, padded: Tensor, lo: int, hi: int) -> Tensor:
        """Logits (b, hi - lo, vocab) of bytes [lo, hi) of the row ``padded`` (see ``padded``)."""
        windows = padded[:, lo: hi + self.window - 1].unfold(1, self.window, 1)  # (b, hi - lo, window)
        x = self.emb(windows).flatten(-2)
        return self.out(F.gelu(self.hidden(x)))

    @torch.no_grad()
    def entropy(self, ids: Tensor, chunk: int = ENTROPY_CHUNK_BYTES) -> Tensor:
        """(b, n) ids -> (b, n) fp32 bits: entropy of byte j's predicted distribution, from bytes < j."""
        padded = self.padded(ids)
        n = ids.shape[1]
        step = max(1, chunk // max(ids.shape[0], 1))
        out = []
        for lo in range(0, n, step):
            logp = self.logits(padded, lo, min(lo + step, n)).float().log_softmax(-1)
            out.append(-(logp.exp() * logp).sum(-1) / math.log(2))
        return torch.cat(out, dim=1) if out else ids.new_zeros(ids.shape, dtype=torch.float32)

    def nats(self, ids: Tensor, lo: int, hi: int, pad_id: int, chunk: int = ENTROPY_CHUNK_BYTES) -> Tensor:
        """Summed next-byte cross-entropy (nats, fp32, 0-dim) of bytes [lo, hi) of every row, PAD
        targets ignored: the auxiliary loss. Chunked; each chunk but the last is recomputed in
        backward, so its logits are never kept."""
        padded = self.padded(ids)
        step = max(1, chunk // max(ids.shape[0], 1))
        total = torch.zeros((), dtype=torch.float32, device=ids.device)
        for a in range(lo, hi, step):
            b_ = min(a + step, hi)
            fn = lambda p, a=a, b_=b_: F.cross_entropy(  # noqa: E731
                self.logits(p, a, b_).float().flatten(0, 1), ids[:, a:b_].reshape(-1), ignore_index=pad_id,
                reduction="sum")
            recompute = b_ < hi and torch.is_grad_enabled()
            total = total + (checkpoint(fn, padded, use_reentrant=False) if recompute else fn(padded))
        return total


# ---------------------------------------------------------------------------- the patcher

class Patcher(nn.Module):
    """A scheme's boundaries and layout for a model whose patches hold at most ``max_len`` bytes and
    whose lower stages read ``before_len`` bytes before each patch. Owns the entropy model of the
    ``entropy`` scheme (``entropy_model``; None otherwise)."""

    def __init__(self, scheme: str, max_len: int, before_len: int, vocab_size: int, pad_id: int,
                 eos_id: int, threshold: Optional[float] = None, budget: Optional[int] = None,
                 row_bytes: Optional[int] = None):
        """``budget``: the most patches a row of ``row_bytes`` bytes may have (``max_seq_len[0]`` and
        the model's context in bytes); None: no budget."""
        super().__init__()
        self.budget, self.row_bytes = budget, row_bytes
        if scheme not in SCHEMES:
            raise ConfigError(f"config key model.patching={scheme!r} must be one of {', '.join(SCHEMES)}")
        self.scheme, self.max_len, self.before_len = scheme, max_len, before_len
        self.pad_id, self.eos_id = pad_id, eos_id
        self.threshold = ENTROPY_RISE_BITS if threshold is None else float(threshold)
        self.entropy_model = EntropyModel(vocab_size) if scheme == "entropy" else None
        self.last_stats: dict = {}  # the last layout's patch_stats
        self.last_bits_per_byte: Optional[float] = None  # the entropy model's last auxiliary loss

    @property
    def dynamic(self) -> bool:
        """Whether the grouping depends on the bytes."""
        return self.scheme != "fixed"

    @property
    def history(self) -> int:
        """Bytes before j that decide whether byte j starts a patch (besides the length cap)."""
        return {"fixed": 0, "space": 2, "entropy": ENTROPY_WINDOW + 1}[self.scheme]

    def candidates(self, ids: Tensor) -> Tensor:
        """(b, n) ids -> (b, n) bool: the scheme's own boundaries, before the length cap."""
        b, n = ids.shape
        if self.scheme == "fixed":
            return fixed_starts(b, n, self.max_len, ids.device).clone()
        if self.scheme == "space":
            return space_candidates(ids, self.eos_id)
        return rise_candidates(self.entropy_model.entropy(ids), self.threshold) | after_eos(ids, self.eos_id)

    @torch.no_grad()
    def starts(self, ids: Tensor) -> Tensor:
        """(b, n) ids -> (b, n) bool: byte j begins a patch (from bytes < j only)."""
        if self.scheme == "fixed":
            return fixed_starts(*ids.shape, self.max_len, ids.device)
        cand = self.candidates(ids)
        starts = cap_length(cand, self.max_len)
        if self.budget is None:
            return starts
        return within_budget(starts, cand, self.max_len, self.budget, max(self.row_bytes, ids.shape[1]))

    def allows(self, count: Tensor, t: int) -> Tensor:
        """(b,) patches so far -> (b,) bool: whether the budget lets a candidate at byte t start one."""
        if self.budget is None:
            return torch.ones_like(count, dtype=torch.bool)
        return count + (self.row_bytes - t + self.max_len - 1) // self.max_len <= self.budget

    def candidate_next(self, ids: Tensor) -> Tensor:
        """(b, t) ids -> (b,) bool: whether the scheme would start a patch at byte t (before the length
        cap and the budget, see ``allows``), reading only the last ``history`` bytes: the decode
        step's question."""
        t = ids.shape[1]
        if t == 0 or self.scheme == "fixed":
            return torch.full((ids.shape[0],), t == 0, dtype=torch.bool, device=ids.device)
        recent = ids[:, max(0, t - self.history):]
        with torch.no_grad():
            return self.candidates(F.pad(recent, (0, 1), value=self.pad_id))[:, -1]

    def start_next(self, ids: Tensor, count: Tensor, last: Tensor) -> Tensor:
        """(b, t) ids, (b,) patches so far and (b,) byte where the current patch starts -> (b,) bool:
        whether byte t starts a patch. The rule of ``starts`` one byte at a time (the length cap,
        then the scheme's candidate within the budget), for the decode step."""
        t = ids.shape[1]
        if t == 0:
            return torch.ones(ids.shape[0], dtype=torch.bool, device=ids.device)
        return (t - last == self.max_len) | (self.candidate_next(ids) & self.allows(count, t))

    def layout(self, ids: Tensor, multiple: int = 1, min_patches: int = 1) -> PatchLayout:
        """ids (b, n) grouped by the scheme (see ``layout``); the grouping's ``patch_stats`` are kept
        in ``last_stats`` for logging."""
        starts = self.starts(ids)
        self.last_stats = patch_stats(starts, ids, self.pad_id)
        return layout(ids, starts, self.max_len, self.before_len, self.pad_id, multiple, min_patches)

    def aux_nats(self, ids: Tensor, lo: int = 0, hi: Optional[int] = None) -> Optional[Tensor]:
        """The entropy model's summed next-byte nats over bytes [lo, hi) (None without one)."""
        if self.entropy_model is None:
            return None
        return self.entropy_model.nats(ids, lo, ids.shape[1] if hi is None else hi, self.pad_id)
