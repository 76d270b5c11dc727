"""SparsePattern: config parsing, element semantics, and the block-level layout the kernels walk."""
import random

import pytest
import torch

from terrabyte.kernels import SparsePattern


def brute_allowed(cfg: dict, head: int, i: int, j: int, causal: bool) -> bool:
    """The module docstring's definitions, written out element by element (independent of patterns.py)."""
    if causal and j > i:
        return False
    if i == j:
        return True
    w, l, g = cfg.get("local", 0), cfg.get("stride", 0), cfg.get("global_tokens", 0)
    if abs(i - j) < w:
        return True
    if l and (i - j) % l == 0:
        return True
    if j < g or i < g:
        return True
    for entry in cfg.get("dilated", []):
        s, r = entry[0], entry[1]
        off = entry[2] if len(entry) == 3 else head % r
        if i // s == j // s and i % r == off and j % r == off:
            return True
    return False


def brute_mask(cfgs: list, n: int, causal: bool) -> torch.Tensor:
    return torch.tensor([[[brute_allowed(c, h, i, j, causal) for j in range(n)] for i in range(n)]
                         for h, c in enumerate(cfgs)])


def random_cfg(rng: random.Random, block: int) -> dict:
    cfg = {"block": block}
    if rng.random() < 0.7:
        cfg["local"] = rng.choice([0, 1, 5, block, block + 1, 2 * block + 8, 300])
    if rng.random() < 0.4:
        cfg["stride"] = rng.choice([1, 3, 7, block, block + 4, 2 * block + 1, 100])
    if rng.random() < 0.4:
        cfg["global_tokens"] = rng.choice([1, 3, block, 2 * block + 8, 300])
    if rng.random() < 0.5:
        dilated = []
        for _ in range(rng.randint(1, 3)):
            r = rng.choice([1, 2, 3, block, block + 4, 2 * block + 8])
            s = max(rng.choice([r, 2 * r, 3 * block, 4 * block, 100, 1000]), r)
            dilated.append([s, r] if rng.random() < 0.7 else [s, r, rng.randrange(r)])
        cfg["dilated"] = dilated
    return cfg


# ---------------------------------------------------------------- config

def test_config_keys_defaults_and_round_trip():
    cfg = {"local": 256, "stride": 128, "dilated": [[512, 2], [2048, 8, 3]], "global_tokens": 4, "block": 64}
    p = SparsePattern.from_config(cfg)
    assert p.block == 64 and p.num_heads is None
    hp = p.head(0)
    assert (hp.local, hp.stride, hp.global_tokens) == (256, 128, 4)
    assert [(d.segment, d.dilation, d.offset) for d in hp.dilated] == [(512, 2, None), (2048, 8, 3)]
    assert p.to_config() == cfg
    assert SparsePattern.from_config({}).to_config() == {"block": 64}
    per_head = [{"local": 8, "block": 32}, {"stride": 4, "block": 32}]
    q = SparsePattern.from_config(per_head)
    assert q.num_heads == 2 and q.block == 32 and q.to_config() == per_head
    # the LongNet offset follows the head index unless fixed
    assert p.param_table(3)[:, 5].tolist() == [0, 1, 0]
    assert p.param_table(3)[:, 8].tolist() == [3, 3, 3]


@pytest.mark.parametrize("cfg, message", [
    ({"local": -1}, "local must be between 0"),
    ({"stride": 2.5}, "stride must be an integer"),
    ({"dilated": [[64, 0]]}, "dilation must be between 1"),
    ({"dilated": [[8, 16]]}, "dilation 16 is larger than its segment 8"),
    ({"dilated": [[64, 4, 4]]}, "offset must be between 0 and 3"),
    ({"dilated": [[64, 2]] * 5}, "at most 4"),
    ({"dilated": [64, 2]}, "must be \\[segment, dilation\\]"),
    ({"global_tokens": True}, "global_tokens must be an integer"),
    ({"window": 4}, "unknown key 'window'"),
    ({"block": 48}, "block must be one of"),
    ([], "empty"),
    ([{"block": 32}, {"block": 64}], "different block sizes"),
    ({"local": 4, "csr": {"indptr": [0, 1], "indices": [0]}}, "gives both 'csr' and 'local'"),
    ({"csr": {"indptr": [0, 2], "indices": [0]}}, "end at len\\(indices\\)"),
    ({"csr": {"indptr": [0, 1, 2], "indices": [0, 5]}}, "key blocks must lie in"),
    ("local: 4", "must be a mapping"),
])
def test_bad_configs_raise_one_clear_error(cfg, message):
    with pytest.raises(ValueError, match=message):
        SparsePattern.from_config(cfg)


# ---------------------------------------------------------------- element level

@pytest.mark.parametrize("causal", [True, False])
def test_dense_mask_matches_definitions(causal):
    rng = random.Random()
    seed = rng.randrange(10**6)
    rng.seed(seed)
    for _ in range(12):
        cfgs = [random_cfg(rng, 16) for _ in range(2)]
        for c in cfgs:
            c["block"] = 16
        n = rng.randint(1, 70)
        got = SparsePattern.from_config(cfgs).dense_mask(n, causal=causal)
        assert torch.equal(got, brute_mask(cfgs, n, causal)), (seed, cfgs, n)
        # one config for all heads: offsets follow the head index
        one = SparsePattern.from_config(cfgs[0])
        got = one.dense_mask(n, heads=3, causal=causal)
        assert torch.equal(got, brute_mask([cfgs[0]] * 3, n, causal)), (seed, cfgs[0], n)


def test_diagonal_rule_and_causality():
    p = SparsePattern.from_config({"dilated": [[16, 4]], "block": 16})  # most rows attend nothing else
    m = p.dense_mask(50, heads=4)
    assert bool(m.diagonal(dim1=1, dim2=2).all())  # every query sees itself: softmax never empty
    assert not bool(m.triu(1).any())  # causal
    assert bool(m.tril(-1).any())  # and the dilated part does attend earlier keys
    assert bool(SparsePattern.from_config({"local": 3}).dense_mask(20, causal=False).triu(1).any())


def test_allowed_broadcasts_and_head_rules():
    p = SparsePattern.from_config({"local": 2, "dilated": [[8, 2]], "block": 16})
    with pytest.raises(ValueError, match="pass head= or heads="):
        p.dense_mask(10)  # offsets differ per head
    row = p.allowed(torch.tensor(7), torch.arange(8), heads=2)  # a decode-time mask row per head
    assert row.shape == (2, 8)
    assert row[0].tolist() == [False] * 6 + [True, True]  # head 0: offset 0, 7 is odd
    assert row[1].tolist() == [False, True, False, True, False, True, True, True]
    assert torch.equal(p.allowed(7, torch.arange(8), head=1), row[1])
    hidx = torch.arange(2).view(2, 1, 1)
    assert torch.equal(p.allowed(torch.arange(8)[:, None], torch.arange(8)[None], head=hidx), p.dense_mask(8, heads=2))
    same = SparsePattern.from_config({"local": 3, "global_tokens": 1})
    assert same.dense_mask(6).shape == (6, 6) and same.dense_mask(6, heads=2).shape == (2, 6, 6)
    # positions far beyond any sequence seen so far: pure arithmetic
    far = 10**9
    assert p.allowed(far, far - 1, head=0).item() and not p.allowed(far, far - 3, head=0).item()


def assert_keys_match_mask(p: SparsePattern, n: int, heads: int, causal: bool, where) -> None:
    """attended_key_rows over every query, and attended_keys of a few, list exactly the mask's keys."""
    mask = p.dense_mask(n, heads=heads, causal=causal)  # (heads, n, n)
    idx, valid = p.attended_key_rows(0, n, n, heads=heads, causal=causal)
    assert idx.shape[0] in (1, heads) and idx.shape[:2] == (idx.shape[0], n), where
    listed = torch.zeros(heads, n, n + 1, dtype=torch.bool)
    listed.scatter_(2, idx.masked_fill(~valid, n).expand(heads, -1, -1), True)
    assert torch.equal(listed[..., :n], mask), where
    assert bool((idx[..., 1:] > idx[..., :-1])[valid[..., 1:]].all()), where  # sorted, distinct
    for q in (0, n // 2, n - 1):
        h = q % heads
        assert torch.equal(p.attended_keys(q, n, head=h, causal=causal), mask[h, q].nonzero().flatten()), where


def test_attended_keys_are_exactly_the_mask():
    """Part-based patterns (one config for all heads, per-head lists) and csr layouts, many n."""
    rng = random.Random()
    seed = rng.randrange(10**6)
    rng.seed(seed)
    for trial in range(40):
        causal = trial % 3 != 0
        n = rng.randint(1, 70)
        if trial % 4 == 3:
            rows, heads = rng.randint(1, 5), rng.randint(1, 3)
            p = SparsePattern.from_block_layout(torch.rand(heads, rows, rows) < 0.4, block=16)
            n = max(1, rows * 16 - rng.randrange(16))
        else:
            cfgs = [random_cfg(rng, 16) for _ in range(rng.choice([1, 2, 3]))]
            for c in cfgs:
                c["block"] = 16
            p = SparsePattern.from_config(cfgs if len(cfgs) > 1 else cfgs[0])
            heads = p.num_heads or 3
        assert_keys_match_mask(p, n, heads, causal, (seed, trial, p, n, causal))


def test_attended_keys_cost_follows_the_pattern_not_the_length():
    """Far into a 2**30-position sequence a query lists its few keys without touching the rest."""
    p = SparsePattern.from_config({"local": 4, "global_tokens": 2, "dilated": [[64, 8]], "block": 16})
    q = 2**30 - 3  # q % 8 == 5: head 5's dilated offset
    keys = p.attended_keys(q, 2**30, head=5)
    seg = q // 64 * 64
    assert keys.tolist() == [0, 1, *range(seg + 5, q - 3, 8), *range(q - 3, q + 1)]
    assert p.attended_keys(q, 2**30, head=0).tolist() == [0, 1, *range(q - 3, q + 1)]
    idx, valid = p.attended_key_rows(q, q + 1, 2**30, heads=8)
    assert idx.shape == (8, 1, 13) and valid.sum(-1).flatten().tolist() == [6] * 5 + [13] + [6] * 2
    with pytest.raises(ValueError, match="pass head= or heads="):
        p.attended_key_rows(0, 4, 8)


def test_mask_mod_is_the_same_predicate():
    cfgs = [{"local": 5, "stride": 7, "block": 16}, {"dilated": [[24, 3]], "global_tokens": 2, "block": 16}]
    p = SparsePattern.from_config(cfgs)
    mod = p.mask_mod(heads=2, causal=True)
    i = torch.arange(40)
    for h in range(2):
        got = mod(torch.tensor(0), torch.tensor(h), i[:, None], i[None, :])
        assert torch.equal(got, brute_mask(cfgs, 40, True)[h])


# ---------------------------------------------------------------- block level

def _tiles(p: SparsePattern, h: int, n: int, causal: bool, transposed: bool) -> dict:
    out = {}
    for xb in range(-(-n // p.block)):
        visits = (p.query_blocks if transposed else p.key_blocks)(xb, n, h, causal, with_full=True)
        blocks = [b for b, _ in visits]
        assert len(blocks) == len(set(blocks)), f"tile visited twice: {visits}"
        for b, full in visits:
            out[(b, xb) if transposed else (xb, b)] = full
    return out


def test_block_layout_is_exact_and_transposes():
    """Both kernels' walks (the Python twin) visit every tile holding an attended pair, each once,
    the same tiles forward and transposed, and only really full tiles unmasked."""
    rng = random.Random()
    seed = rng.randrange(10**6)
    rng.seed(seed)
    for _ in range(60):
        block = rng.choice([16, 32])
        n, causal = rng.randint(1, 170), rng.random() < 0.6
        cfgs = [random_cfg(rng, block) for _ in range(2)]
        p = SparsePattern.from_config(cfgs)
        mask = p.dense_mask(n, causal=causal)
        for h in range(2):
            fwd = _tiles(p, h, n, causal, transposed=False)
            assert fwd == _tiles(p, h, n, causal, transposed=True), (seed, cfgs, n, causal)
            for qb, kb in ((a, b) for a in range(-(-n // block)) for b in range(-(-n // block))):
                tile = mask[h, qb * block:(qb + 1) * block, kb * block:(kb + 1) * block]
                if bool(tile.any()):
                    assert (qb, kb) in fwd, (seed, cfgs, n, causal, h, qb, kb)
                if fwd.get((qb, kb)):
                    assert tile.shape == (block, block) and bool(tile.all()), (seed, cfgs, n, h, qb, kb)


def test_local_layout_blocks_and_counts():
    p = SparsePattern.from_config({"local": 128, "block": 64})
    assert p.key_blocks(5, 1000, with_full=True) == [(3, False), (4, True), (5, False)]
    assert p.query_blocks(3, 1000) == [3, 4, 5]
    assert p.key_blocks(5, 1000, causal=False) == [3, 4, 5, 6, 7]
    # the last, short block is always masked
    assert p.key_blocks(15, 1000, with_full=True) == [(13, False), (14, False), (15, False)]


def test_metadata_is_independent_of_length():
    p = SparsePattern.from_config({"local": 256, "stride": 128, "dilated": [[512, 2], [2048, 8]], "global_tokens": 4})
    sizes = {p.metadata_bytes(n, heads=8) for n in (1000, 10**6, 2**30)}
    assert sizes == {8 * (3 + 3 * 2) * 4}
    assert p.param_table(8, 2**30).shape == p.param_table(8, 1000).shape == (8, 9)
    # Local, global and dilated parts touch O(1) blocks, computed from the integers alone: the
    # layout next to position 2**30 is as cheap and as short as next to position 0. (A strided part
    # touches O(n / stride) blocks by definition.)
    q = SparsePattern.from_config({"local": 256, "dilated": [[512, 2], [2048, 8]], "global_tokens": 4})
    near = q.key_blocks(40, 2**30, with_full=True)
    far_block = 2**30 // 64 - 3
    far = q.key_blocks(far_block, 2**30, with_full=True)
    # global block 0, then the 2048-segment the block lies in, up to the block itself (causal)
    assert [b for b, _ in near] == [0] + list(range(32, 41))
    assert [b for b, _ in far] == [0] + list(range(far_block - 29, far_block + 1))


def test_explicit_csr_layout():
    layout = torch.zeros(4, 4, dtype=torch.bool)
    layout[2, 0] = layout[3, 1] = layout[1, 3] = True
    p = SparsePattern.from_block_layout(layout, block=16)
    assert p.head_invariant and p.num_heads is None
    m = p.dense_mask(60, causal=False)
    expect = (layout | torch.eye(4, dtype=torch.bool)).repeat_interleave(16, 0).repeat_interleave(16, 1)[:60, :60]
    assert torch.equal(m, expect)
    assert p.key_blocks(2, 60, with_full=True) == [(0, True), (2, False)]
    assert p.key_blocks(1, 60, causal=False) == [1, 3]
    assert p.key_blocks(1, 60) == [1]  # block 3 lies above the diagonal
    assert p.query_blocks(1, 60, with_full=True) == [(1, False), (3, False)]  # block 3 is the short one
    q = SparsePattern.from_csr([0, 1, 3, 5, 7], [0, 1, 3, 0, 2, 1, 3], block=16)
    assert torch.equal(q.dense_mask(60), p.dense_mask(60))
    assert SparsePattern.from_config(q.to_config()).dense_mask(60).equal(q.dense_mask(60))
    with pytest.raises(ValueError, match="covers 4 blocks of 16"):
        p.check_length(100)


@pytest.mark.parametrize("cfg, heads", [
    ({"local": 8, "dilated": [[32, 4], [64, 8]], "block": 16}, 8),  # LongNet offsets follow the head
    ([{"local": 4, "dilated": [[32, 2]], "block": 16}, {"stride": 5, "block": 16},
      {"local": 16, "global_tokens": 3, "block": 16}, {"dilated": [[16, 4, 1]], "block": 16}], 4),  # per head
    ([{"csr": {"indptr": [0, 1, 2, 4, 5], "indices": [0, 1, 0, 2, 3]}, "block": 16},
      {"csr": {"indptr": [0, 1, 3, 4, 6], "indices": [0, 0, 1, 2, 1, 3]}, "block": 16}], 2),  # csr per head
])
def test_head_slice_is_those_rows_of_the_full_mask(cfg, heads):
    from terrabyte.kernels import sparse_attention

    full, n = SparsePattern.from_config(cfg), 64
    mask = full.dense_mask(n, heads=heads)
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 1, heads, n, 8).unbind(0)
    out = sparse_attention(q, k, v, full)
    half = heads // 2
    for start, count in ((0, half), (half, half), (heads - 1, 1)):
        part = full.for_heads(start, count)
        assert torch.equal(part.dense_mask(n, heads=count), mask[start:start + count]), (start, count)
        s = slice(start, start + count)
        assert torch.allclose(sparse_attention(q[:, s], k[:, s], v[:, s], part), out[:, s], atol=1e-6)
    with pytest.raises(ValueError, match=r"heads \[3, 5\) are not a slice"):
        SparsePattern.from_config(cfg if isinstance(cfg, list) else [cfg] * 4).for_heads(3, 2)
