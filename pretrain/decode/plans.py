"""The fused decode path: weight copies prepared once per stage (``decode_plans``) and one
stage's new positions through its blocks against its key/value cache (``stage_decode``).
See the package docstring for what is fused and why."""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Activation memory one prefill piece may take beyond the caches (on top of the weights and the KV
# caches, which grow with the context anyway): the automatic piece size follows from it, and so do
# the query row groups when many queries attend over a long cache.
PREFILL_MEMORY_BYTES = 64 * 2**20


# --------------------------------------------------------------------------------------------
# Decode plans: folded weight copies, one per stage
# --------------------------------------------------------------------------------------------

@dataclass
class _LayerWeights:
    # transposed views (in, out) of (out, in) matrices: torch.mm(x, w) runs as a transposed GEMM
    # over contiguous rows, the fast case for one-row inputs
    wqkv: Tensor   # (dim, 3 * heads * dim_head), attention norm folded in; columns (q|k|v, head, d)
    wo: Tensor
    wgu: Tensor    # (dim, 2 * hidden), feed-forward norm folded in; columns gate then up
    wdown: Tensor


@dataclass
class _StagePlan:
    layers: list
    dim: int
    heads: int
    dim_head: int
    norm_eps: Tensor  # 0-dim: sqrt(dim * eps), the hypot partner of a row norm
    freqs: Optional[Tensor]  # (seq_len, 2, 1, dim_head / 2) complex: rows for q and k
    allowed: Optional[Callable]  # sparse pattern's mask function (q_idx, k_idx), None for dense
    sparse: Optional[Callable]  # the stage's sparse attention (q, k, v), for a fresh sequence
    keys: Optional[Callable]  # (q_start, q_end, n, device=) -> attended keys (idx, valid) (H, m, kmax)
    w_out: Tensor  # (dim, out): final norm folded into to_next (upper stages) or to_logits (last)
    embed: Callable  # the stage's unit embedding without module-call overhead, see embed_units


def _fold_norm(weight: Tensor, norm: nn.RMSNorm) -> Tensor:
    """(weight @ diag(gain * sqrt(dim))).T: a matrix reading a normalised row, made to read x / |x|."""
    return (weight * (norm.weight * math.sqrt(norm.weight.numel()))).detach().contiguous().t()


def embed_units(embed: nn.Module, units: Tensor) -> Tensor:
    """PatchEmbed.forward without the module-call overhead: (b, n, unit_size) ids -> (b, n, dim).

    Reads the live embedding weights (not a copy), so it never goes stale."""
    if embed.proj is None:
        return F.embedding(units.squeeze(-1), embed.token_emb.weight)
    if embed.levels is not None or embed.ngrams is not None:  # rarely on the decode path: the module
        return embed(units)
    return F.linear(F.embedding(units, embed.token_emb.weight).flatten(-2), embed.proj.weight)


def stage_plan(stage: nn.Module, w_out: Tensor) -> _StagePlan:
    """Fused decode weights of one ``Stage``; ``w_out`` is the matrix after its final norm."""
    layers = []
    for block in stage.layers.values():
        attn, ff = block.attn, block.ff
        layers.append(_LayerWeights(
            wqkv=_fold_norm(torch.cat((attn.to_q.weight, attn.to_k.weight, attn.to_v.weight)), block.attn_norm),
            wo=attn.to_out.weight.detach().t(),
            wgu=_fold_norm(torch.cat((ff.gate_proj.weight, ff.up_proj.weight)), block.ff_norm),
            wdown=ff.down_proj.weight.detach().t(),
        ))
    freqs = None
    if stage.rotary is not None:
        f = stage.rotary.freqs
        freqs = torch.stack((f, f), dim=1)[:, :, None]
    # sparse attention is known by its interface, an allowed(q_idx, k_idx, heads) mask method: a
    # fresh prompt runs through the callable itself, later queries over the cache attend the keys
    # its key lister names (see key_lister), or without one take mask rows from allowed
    attend = stage.layers["0"].attn.attend
    allowed = sparse = keys = None
    if hasattr(attend, "allowed"):
        allowed = functools.partial(attend.allowed, heads=stage.heads)
        sparse = attend
        keys = key_lister(attend, stage.heads)
    # the eps RMSNorm itself uses (None: the dtype's machine epsilon)
    eps = stage.norm.eps if stage.norm.eps is not None else torch.finfo(w_out.dtype).eps
    norm_eps = torch.tensor(math.sqrt(stage.dim * eps), dtype=w_out.dtype, device=w_out.device)
    return _StagePlan(layers, stage.dim, stage.heads, stage.dim_head, norm_eps, freqs, allowed, sparse, keys,
                      _fold_norm(w_out, stage.norm), functools.partial(embed_units, stage.embed))


def key_lister(attend: Callable, heads: int) -> Optional[Callable]:
    """The attended keys of a sparse callable as ``(q_start, q_end, n, device=) -> (idx, valid)``,
    both (H, m, kmax) (H = 1 when every head sees the same keys), or None when it has no lister.

    Looked up on the callable, then on its ``pattern`` (``SparseAttention`` keeps its
    ``SparsePattern`` there): ``attended_key_rows`` (all rows at once, as ``SparsePattern`` has
    it), else ``attended_keys(q_pos, n, head, causal)`` (one sorted list per query and head)."""
    for owner in (attend, getattr(attend, "pattern", None)):
        rows = getattr(owner, "attended_key_rows", None)
        if rows is not None:
            return functools.partial(rows, heads=heads, causal=True)
    for owner in (attend, getattr(attend, "pattern", None)):
        lists = getattr(owner, "attended_keys", None)
        if lists is not None:
            return functools.partial(_rows_from_lists, lists, heads)
    return None


def _rows_from_lists(attended_keys: Callable, heads: int, q_start: int, q_end: int, n: int,
                     device=None) -> tuple[Tensor, Tensor]:
    """attended_keys(q, n, head, causal) per query and head, padded: (idx, valid) (heads, m, kmax)."""
    lists = [[torch.as_tensor(attended_keys(q, n, head, True), dtype=torch.long).cpu()
              for q in range(q_start, q_end)] for head in range(heads)]
    kmax = max(1, max(len(k) for row in lists for k in row))
    idx = torch.zeros(heads, q_end - q_start, kmax, dtype=torch.long)
    valid = torch.zeros(heads, q_end - q_start, kmax, dtype=torch.bool)
    for h, row in enumerate(lists):
        for r, k in enumerate(row):
            idx[h, r, :len(k)], valid[h, r, :len(k)] = k, True
    return idx.to(device), valid.to(device)


def decode_plans(model: nn.Module) -> list:
    """Fused decode weights of a ``TerraByte``, one plan per stage. In eval mode they are kept (in
    ``model._plans``) for the next cache while no parameter changed (same storage, same version
    counter: in-place updates such as optimizer steps or load_state_dict bump it), so repeated
    generate calls skip the copies; ``model.train()`` drops them."""
    key = tuple((p.data_ptr(), p._version) for p in model.parameters())
    if model._plans is not None and model._plans[0] == key:
        return model._plans[1]
    plans = [stage_plan(stage, model.to_logits.weight if stage.to_next is None else stage.to_next.weight)
             for stage in model.stages]
    model._plans = None if model.training else (key, plans)
    return plans


# --------------------------------------------------------------------------------------------
# One stage's new positions through its blocks
# --------------------------------------------------------------------------------------------

def _visible_keys(mask: Tensor) -> Optional[tuple[Tensor, Tensor]]:
    """For one query row of a sparse stage, mask (heads or 1, 1, end): the visible key positions
    per head, left-aligned and padded, (H, 1, kmax), and which of them are real, (H, 1, kmax).
    None when the pattern still covers half the keys or more (gathering would then cost more than
    reading them all). The fallback for a callable with ``allowed`` but no key lister: O(end)."""
    visible = mask.reshape(-1, mask.shape[-1])  # (H, end)
    count = visible.sum(-1)
    kmax = int(count.max())  # one host sync per call, not per layer
    if 2 * kmax > visible.shape[-1]:
        return None
    # a stable sort of "hidden" puts each row's visible keys first, in position order
    idx = torch.sort((~visible).to(torch.uint8), dim=-1, stable=True).indices[:, :kmax]
    real = torch.arange(kmax, device=mask.device) < count[:, None]
    return idx[:, None, :], real[:, None, :]


def _gather_keys(layer_kv: Tensor, end: int, idx: Tensor) -> tuple[Tensor, Tensor]:
    """Keys and values at positions idx (H, kmax) of each head (H = heads, or 1 for all heads):
    (b, heads, kmax, d) each, read from layer_kv (2, b, heads, seq_len, d)."""
    _, b, h, _, d = layer_kv.shape
    index = idx[None, :, :, None].expand(b, h, -1, d)
    keys, values = layer_kv.narrow(3, 0, end).unbind(0)
    return torch.gather(keys, 2, index), torch.gather(values, 2, index)


def _decode_mask(plan: _StagePlan, start: int, end: int, device) -> Tensor:
    """Which keys [0, end) queries [start, end) see: causal, and the pattern's own mask if any.
    (end - start) x end booleans: meant for a few query rows."""
    q_idx = torch.arange(start, end, device=device)[:, None]
    k_idx = torch.arange(end, device=device)[None, :]
    mask = k_idx <= q_idx
    return mask if plan.allowed is None else mask & plan.allowed(q_idx, k_idx)


def _gathered_attention(q: Tensor, layer_kv: Tensor, end: int, idx: Tensor, valid: Tensor) -> Tensor:
    """Each query row over its own keys: q (b, h, r, d), idx and valid (H, r, kmax) -> (b, h, r, d).

    Rows fold into the head axis, so one SDPA call serves them all (for r = 1 exactly the call of
    one decode step)."""
    b, h, r, d = q.shape
    kmax = idx.shape[-1]
    keys, values = _gather_keys(layer_kv, end, idx.reshape(idx.shape[0], r * kmax))  # (b, h, r * kmax, d)
    keys, values = (t.view(b, h * r, kmax, d) for t in (keys, values))
    mask = valid.expand(h, r, kmax).reshape(h * r, 1, kmax)
    out = F.scaled_dot_product_attention(q.reshape(b, h * r, 1, d), keys, values, attn_mask=mask)
    return out.view(b, h, r, d)


def _row_groups(rows: int, row_bytes: int, budget: int) -> list[tuple[int, int]]:
    """[lo, hi) slices of ``rows`` query rows, each at most ``budget`` bytes of temporaries."""
    step = max(1, budget // max(row_bytes, 1))
    return [(lo, min(lo + step, rows)) for lo in range(0, rows, step)]


def _cached_attention(plan: _StagePlan, start: int, end: int, b: int, itemsize: int,
                      budget: int, device) -> Callable[[Tensor, Tensor], Tensor]:
    """Attention of queries [start, end) (start > 0) over the cached keys [0, end): a function
    (q (b, h, m, d), layer_kv) -> (b, h, m, d), set up once per call and used by every layer.

    A sparse stage with a key lister gathers each query's attended keys (cost O(attended keys),
    not O(end)); other stages take mask rows, dense causal or from ``allowed``. Many rows (a later
    prefill piece) go in groups of at most ``budget`` bytes of gathered keys or scores.
    """
    m, h, d = end - start, plan.heads, plan.dim_head
    if plan.keys is not None:
        idx, valid = plan.keys(start, end, end, device=device)  # (H, m, kmax)
        kmax = idx.shape[-1]
        if m == 1 and 2 * kmax > end:  # half the cache or more: read it all under a mask row
            mask = torch.zeros(idx.shape[0], 1, end + 1, dtype=torch.bool, device=idx.device)
            mask = mask.scatter_(2, idx.masked_fill(~valid, end), True)[..., :end]
            return functools.partial(_masked_attention, end=end, mask=mask)
        # gathered keys and values, then the scores
        groups = _row_groups(m, b * h * kmax * (2 * d * itemsize + 4), budget)
        return functools.partial(_grouped, groups=groups, attend=lambda q, kv, lo, hi: _gathered_attention(
            q, kv, end, idx[:, lo:hi], valid[:, lo:hi]))
    if m == 1:
        if plan.allowed is None:  # one dense query sees every cached key
            return functools.partial(_masked_attention, end=end, mask=None)
        mask = _decode_mask(plan, start, end, device)
        gathered = _visible_keys(mask) if plan.sparse is not None else None
        if gathered is not None:
            return lambda q, kv: _gathered_attention(q, kv, end, *gathered)
        return functools.partial(_masked_attention, end=end, mask=mask)
    groups = _row_groups(m, b * h * end * 4 + end, budget)

    def rows(q, kv, lo, hi):
        mask = _decode_mask(plan, start + lo, start + hi, q.device)  # ([H,] hi - lo, start + hi)
        return _masked_attention(q, kv, start + hi, mask)
    return functools.partial(_grouped, groups=groups, attend=rows)


def _masked_attention(q: Tensor, layer_kv: Tensor, end: int, mask: Optional[Tensor]) -> Tensor:
    keys, values = layer_kv.narrow(3, 0, end).unbind(0)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)


def _grouped(q: Tensor, layer_kv: Tensor, groups: list, attend: Callable) -> Tensor:
    """``attend(q rows, layer_kv, lo, hi)`` over query row groups, concatenated: (b, h, m, d)."""
    if len(groups) == 1:
        return attend(q, layer_kv, *groups[0])
    return torch.cat([attend(q.narrow(2, lo, hi - lo), layer_kv, lo, hi) for lo, hi in groups], dim=2)


def _fresh_attention(plan: _StagePlan) -> Callable[[Tensor, Tensor], Tensor]:
    """Attention of a fresh sequence [0, m) (m > 1) over itself: the sparse stage's own callable,
    linear in m (a mask over every query row would be quadratic: 131072 patches, 17 G booleans),
    or dense causal SDPA."""
    def attend(q, layer_kv):
        keys, values = layer_kv.narrow(3, 0, q.shape[2]).unbind(0)
        if plan.sparse is not None:
            return plan.sparse(q, keys, values)
        return F.scaled_dot_product_attention(q, keys, values, is_causal=True)
    return attend


def _normed_mm(x: Tensor, w: Tensor, norm_eps: Tensor) -> Tensor:
    """rms_norm(x) @ w for rows x: (r, dim), with the norm's gain folded into w."""
    scale = torch.hypot(torch.linalg.vector_norm(x, dim=-1, keepdim=True), norm_eps)
    return torch.mm(x, w).div_(scale)


def stage_decode(plan: _StagePlan, x: Tensor, kv: Tensor, start: int,
                 budget: Optional[int] = None) -> Tensor:
    """Run new tokens x: (b, m, dim) at positions [start, start + m) through one stage's blocks,
    reading and extending kv: (depth, 2, b, heads, seq_len, dim_head). Returns the last
    position's output through the final norm and ``w_out``: (b, w_out rows). ``budget`` bounds the
    attention temporaries of many queries over a long cache (row groups; default
    PREFILL_MEMORY_BYTES)."""
    budget = PREFILL_MEMORY_BYTES if budget is None else budget
    b, m, dim = x.shape
    h, d = plan.heads, plan.dim_head
    end = start + m

    def attention_for(first: int) -> Optional[Callable]:
        """How queries [first, end) attend; None for the first position alone (it sees only itself)."""
        if end == 1:
            return None
        if first == 0:
            return _fresh_attention(plan)
        return _cached_attention(plan, first, end, b, x.element_size(), budget, x.device)

    attend = attention_for(start)
    x = x.reshape(b * m, dim)
    last = len(plan.layers) - 1
    # narrow/select rather than [] indexing: per-call Python overhead matters here
    freqs = None if plan.freqs is None else plan.freqs.narrow(0, start, m)
    for i, w in enumerate(plan.layers):
        qkv = _normed_mm(x, w.wqkv, plan.norm_eps).view(b, m, 3, h, d)
        if freqs is not None:
            qkv_f = qkv.float()  # qkv itself in fp32: a fresh product, free to overwrite
            torch.view_as_complex(qkv_f.view(b, m, 3, h, d // 2, 2)).narrow(2, 0, 2).mul_(freqs)
            qkv = qkv_f.type_as(x)
        layer_kv = kv[i]  # (2, b, h, seq_len, d)
        layer_kv.narrow(3, start, m).copy_(qkv.narrow(2, 1, 2).permute(2, 0, 3, 1, 4))
        if i == last and m > 1:
            # only the last position's output is needed from the last layer
            qkv, x, m = qkv.narrow(1, m - 1, 1), x.view(b, m, dim).select(1, m - 1), 1
            attend = attention_for(end - 1)
        if attend is None:
            out = qkv.select(2, 2)  # a single visible key: attention returns its value
        else:
            out = attend(qkv.select(2, 0).transpose(1, 2), layer_kv).transpose(1, 2)  # (b, m, h, d)
        x = torch.addmm(x, out.reshape(b * m, h * d), w.wo)
        gate, up = _normed_mm(x, w.wgu, plan.norm_eps).chunk(2, dim=-1)
        x = torch.addmm(x, F.silu(gate).mul_(up), w.wdown)
    return _normed_mm(x.view(b, -1, dim).select(1, -1), plan.w_out, plan.norm_eps)
