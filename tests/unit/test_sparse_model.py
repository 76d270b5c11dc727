"""TerraByte with sparse attention in its global stage, on CPU (the PyTorch reference path)."""
import random

import pytest
import torch

from terrabyte.pretrain.model.terrabyte import TerraByte

SEQ = (16, 4)  # 16 patches of 4 bytes: the global stage attends over 16 positions


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny shapes gain nothing from intra-op threads (see test_model.py)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def build(attention=None, seed=0):
    torch.manual_seed(seed)
    return TerraByte(num_tokens=256, dim=(32, 16), depth=(2, 1), max_seq_len=SEQ, dim_head=8, heads=2,
                     attention=attention)


def sparse(pattern: dict):
    return ({"kind": "sparse", "pattern": pattern}, None)


def random_bytes(b, n, seed):
    return torch.randint(0, 256, (b, n), generator=torch.Generator().manual_seed(seed))


def test_covering_pattern_trains_exactly_like_dense_attention():
    """A pattern whose union covers every key (a dilation-1 LongNet segment as long as the global
    sequence, plus a local window) is dense causal attention: same loss, same gradients, and the
    same loss curve over training steps, which does fall."""
    covering = build(sparse({"local": 3, "dilated": [[16, 1]], "block": 16}))
    dense = build()
    dense.load_state_dict(covering.state_dict())
    x = random_bytes(2, 64, seed=random.randrange(2**31))  # fresh data each run
    losses = {}
    for name, model in (("sparse", covering), ("dense", dense)):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        losses[name] = []
        for _ in range(8):
            loss = model(x, return_loss=True)
            opt.zero_grad()
            loss.backward()
            if not losses[name]:
                losses[name + "_grads"] = [p.grad.clone() for p in model.parameters()]
            opt.step()
            losses[name].append(loss.item())
    for a, b in zip(losses["sparse_grads"], losses["dense_grads"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(torch.tensor(losses["sparse"]), torch.tensor(losses["dense"]), rtol=1e-4, atol=1e-5)
    assert losses["sparse"][-1] < losses["sparse"][0] - 0.5


@pytest.mark.parametrize("pattern", [
    {"local": 2, "stride": 5, "block": 16},
    {"dilated": [[8, 2], [16, 4]], "global_tokens": 1, "block": 16},  # LongNet offsets differ per head
])
def test_sparse_pattern_stays_causal_and_changes_the_model(pattern):
    model = build(sparse(pattern)).eval()
    dense = build().eval()
    dense.load_state_dict(model.state_dict())
    x = random_bytes(2, 64, seed=1)
    logits = model(x)
    assert not torch.allclose(logits, dense(x), atol=1e-4)  # the pattern is applied
    for p in (5, 22, 41):
        y = x.clone()
        y[:, p] = (y[:, p] + 1) % 256
        changed = model(y)
        # logits at j predict byte j from bytes < j: positions <= p must not see the change
        torch.testing.assert_close(changed[:, :p + 1], logits[:, :p + 1], rtol=0, atol=1e-6)
        assert not torch.allclose(changed[:, p + 1:], logits[:, p + 1:], atol=1e-4)


def test_per_head_pattern_cached_decoding_equals_forward():
    """Decode-time mask rows come from pattern.allowed per head (dilated offsets follow the head)."""
    model = build(sparse({"local": 2, "dilated": [[8, 2]], "block": 16})).eval()
    x = random_bytes(2, 64, seed=2)
    full = model(x)
    cache = model.init_cache(2)
    torch.testing.assert_close(model.forward_cached(x[:, :9], cache), full[:, 9], rtol=0, atol=1e-5)
    for j in range(10, 64):
        torch.testing.assert_close(model.forward_cached(x[:, j - 1:j], cache), full[:, j], rtol=0, atol=1e-5,
                                   msg=f"position {j}")


def test_sparse_prompt_runs_the_sparse_kernel_not_a_dense_mask(monkeypatch):
    """A prompt of many patches goes through the stage's sparse attention; each later query
    attends over just the keys the pattern names (no mask row over the cache, none over every
    prompt row: that is quadratic in its length)."""
    from terrabyte.pretrain.decode import plans

    gathered, gather = [], plans._gather_keys

    def recording_gather(layer_kv, end, idx):
        gathered.append((end, idx.shape[-1]))
        return gather(layer_kv, end, idx)

    monkeypatch.setattr(plans, "_gather_keys", recording_gather)
    model = build(sparse({"local": 2, "dilated": [[8, 2]], "global_tokens": 1, "block": 16})).eval()
    x = random_bytes(2, 64, seed=5)
    full = model(x)
    plan = model._decode_plans()[0]  # the global stage's, shared with the caches below
    calls = {"allowed": [], "keys": [], "sparse": []}
    for name in calls:
        fn = getattr(plan, name)
        setattr(plan, name, lambda *a, _fn=fn, _log=calls[name], **k: _log.append(a) or _fn(*a, **k))
    cache = model.init_cache(2)
    assert cache.stages[0].plan is plan
    torch.testing.assert_close(model.forward_cached(x[:, :50], cache), full[:, 50], rtol=0, atol=1e-5)
    for j in range(51, 64):
        torch.testing.assert_close(model.forward_cached(x[:, j - 1:j], cache), full[:, j], rtol=0, atol=1e-5)
    # the 13-patch prompt through the first layer (the last one needs the last row only)
    assert [q.shape[2] for q, _, _ in calls["sparse"]] == [13]
    assert not calls["allowed"]  # no mask row
    assert calls["keys"] and all(q_end - q_start == 1 for q_start, q_end, _ in calls["keys"])
    assert gathered and all(kmax * 2 <= end for end, kmax in gathered)


class MaskOnly(torch.nn.Module):
    """A custom sparse callable with an ``allowed`` mask method and no key lister: decoding falls
    back to mask rows."""

    def __init__(self, attend):
        super().__init__()
        self.attend = attend

    def forward(self, q, k, v):
        return self.attend(q, k, v)

    def allowed(self, q_idx, k_idx, heads=None):
        return self.attend.allowed(q_idx, k_idx, heads=heads)


LONG = {"local": 3, "dilated": [[32, 4]], "global_tokens": 2, "stride": 40, "block": 16}


def long_models():
    """fp64 twins with a sparse global stage over 256 patches: one with the pattern's key lister,
    one with a mask-only callable around the same pattern."""
    cfg = dict(num_tokens=256, dim=(32, 16), depth=(2, 1), max_seq_len=(256, 2), dim_head=8, heads=2)
    torch.manual_seed(0)
    lister = TerraByte(attention=sparse(LONG), **cfg).double().eval()
    torch.manual_seed(0)
    masked = TerraByte(attention=sparse(LONG), **cfg).double().eval()
    for block in masked.stages[0].layers.values():
        block.attn.attend = MaskOnly(block.attn.attend)
    masked.load_state_dict(lister.state_dict())
    return lister, masked


def test_sparse_decode_step_over_a_long_cache_equals_the_mask_path(monkeypatch):
    """Steps late in a long context gather just the attended keys: the same logits as mask rows
    over the whole cache (a callable without a key lister), and far fewer keys than the context."""
    from terrabyte.pretrain.decode import plans

    gathered, gather = [], plans._gather_keys
    monkeypatch.setattr(plans, "_gather_keys",
                        lambda kv, end, idx: gathered.append((end, idx.shape[-1])) or gather(kv, end, idx))
    lister, masked = long_models()
    assert lister._decode_plans()[0].keys is not None and masked._decode_plans()[0].keys is None
    x = random_bytes(1, 500, seed=3)
    caches = [m.init_cache(1) for m in (lister, masked)]
    for j in (480, *range(481, 500)):
        step = x[:, :480] if j == 480 else x[:, j - 1:j]
        a, b = (m.forward_cached(step, c) for m, c in zip((lister, masked), caches))
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12, msg=f"byte {j}")
    lister_steps = [kmax for end, kmax in gathered if end > 200]
    assert lister_steps and max(lister_steps) < 30  # 3 + 2 + 7 + 8 keys at most, of 240


def one_shot_and_chunked(model, prompt, chunk_bytes, new_bytes=6):
    """Greedy generation and the prefill state with the prompt in one piece and in pieces."""
    runs = []
    for chunk in (10**9, chunk_bytes):
        cache = model.init_cache(prompt.shape[0], prefill_chunk_bytes=chunk)
        logits = model.forward_cached(prompt, cache)
        kv = [st.kv[..., :st.length, :].clone() for st in cache.stages]
        out = model.generate(prompt, max_new_bytes=new_bytes, temperature=0.0, ignore_eos=True,
                             prefill_chunk_bytes=chunk)
        runs.append((logits, kv, out))
    return runs


@pytest.mark.parametrize("msl,prompt_len,chunk", [
    ((24, 4), 53, 1),        # one patch a piece (chunk rounds up to a whole patch)
    ((24, 4), 53, 9),        # two patches a piece
    ((12, 3, 2), 47, 13),    # three stages, two patches a piece
])
def test_chunked_prefill_equals_one_shot(msl, prompt_len, chunk):
    """Prefilling in pieces gives the one-shot prefill's logits, caches and greedy output (fp64)."""
    stages = len(msl)
    torch.manual_seed(0)
    model = TerraByte(num_tokens=256, dim=(32, 24, 16)[-stages:], depth=2, max_seq_len=msl, dim_head=8, heads=2,
                      attention=(sparse({"local": 2, "dilated": [[8, 2]], "global_tokens": 1, "block": 16})[0],
                                 *(None,) * (stages - 1))).double().eval()
    prompt = random_bytes(2, prompt_len, seed=7)
    (logits, kv, out), (c_logits, c_kv, c_out) = one_shot_and_chunked(model, prompt, chunk)
    torch.testing.assert_close(c_logits, logits, rtol=0, atol=1e-12)
    for a, b in zip(c_kv, kv):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert torch.equal(c_out, out)
    full = model(torch.nn.functional.pad(prompt, (0, 1)))[:, -1]
    torch.testing.assert_close(logits, full, rtol=0, atol=1e-6)  # rotary runs in fp32 on both paths


def test_pieces_and_row_groups_follow_the_memory_budget(monkeypatch):
    """A tiny PREFILL_MEMORY_BYTES makes automatic pieces of one patch, and attention row groups of
    one row in pieces of many (the mask-only callable's too): still the one-shot result."""
    from terrabyte.pretrain.decode import cache as decode_cache, generate as generation, plans

    lister, masked = long_models()
    x = random_bytes(1, 101, seed=4)
    ref = [m.forward_cached(x, m.init_cache(1)) for m in (lister, masked)]
    torch.testing.assert_close(ref[0], ref[1], rtol=0, atol=1e-12)
    monkeypatch.setattr(plans, "PREFILL_MEMORY_BYTES", 1)
    assert decode_cache.prefill_patches(lister, lister.init_cache(1)) == 1
    pieces = []
    monkeypatch.setattr(generation, "_advance_stages",
                        lambda model, cache, stages, _f=generation._advance_stages:
                        pieces.append(cache.length) or _f(model, cache, stages))
    for model, expect in zip((lister, masked), ref):
        cache = model.init_cache(1, prefill_chunk_bytes=33)  # 16 patches of 2 bytes a piece
        torch.testing.assert_close(model.forward_cached(x, cache), expect, rtol=0, atol=1e-12)
        assert pieces == [32, 64, 96, 101]
        pieces.clear()


def test_sparse_stage_from_a_config_dict():
    cfg = {"num_tokens": 256, "dim": [32, 16], "depth": [1, 1], "max_seq_len": [16, 4], "dim_head": 8, "heads": 2,
           "attention": [{"kind": "sparse", "pattern": {"local": 4, "global_tokens": 1, "block": 16}}, None]}
    model = TerraByte.from_config(cfg)
    attend = model.stages[0].layers["0"].attn.attend
    assert attend.pattern.to_config() == {"block": 16, "local": 4, "global_tokens": 1}
    bad = dict(cfg, attention=[{"kind": "sparse", "pattern": {"dilated": [[16, 0]]}}, None])
    with pytest.raises(ValueError, match="dilation must be between 1"):
        TerraByte.from_config(bad)
