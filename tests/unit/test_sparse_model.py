"""TerraByte with sparse attention in its global stage, on CPU (the PyTorch reference path)."""
import random

import pytest
import torch

from terrabyte.pretrain.model import TerraByte

SEQ = (16, 4)  # 16 patches of 4 bytes: the global stage attends over 16 positions


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
    """A prompt of many patches goes through the stage's sparse attention; decode-time masks are
    built for one query row at a time (a mask over every prompt row is quadratic in its length),
    and a query that sees few of the cached keys attends over just those."""
    from terrabyte.pretrain import decode as model_module

    gathered, gather = [], model_module._gather_keys

    def recording_gather(layer_kv, end, idx):
        gathered.append((end, idx.shape[-1]))
        return gather(layer_kv, end, idx)

    monkeypatch.setattr(model_module, "_gather_keys", recording_gather)
    model = build(sparse({"local": 2, "dilated": [[8, 2]], "global_tokens": 1, "block": 16})).eval()
    x = random_bytes(2, 64, seed=5)
    full = model(x)
    plan = model._decode_plans()[0]  # the global stage's, shared with the caches below
    rows, allowed = [], plan.allowed

    def recording(q_idx, k_idx):
        rows.append(q_idx.numel())
        return allowed(q_idx, k_idx)

    plan.allowed = recording
    cache = model.init_cache(2)
    assert cache.stages[0].plan is plan
    torch.testing.assert_close(model.forward_cached(x[:, :50], cache), full[:, 50], rtol=0, atol=1e-5)
    for j in range(51, 64):
        torch.testing.assert_close(model.forward_cached(x[:, j - 1:j], cache), full[:, j], rtol=0, atol=1e-5)
    assert rows and max(rows) == 1  # the 12-patch prompt: no 12-row mask
    assert gathered and all(kmax * 2 <= end for end, kmax in gathered)


def test_sparse_stage_from_a_config_dict():
    cfg = {"num_tokens": 256, "dim": [32, 16], "depth": [1, 1], "max_seq_len": [16, 4], "dim_head": 8, "heads": 2,
           "attention": [{"kind": "sparse", "pattern": {"local": 4, "global_tokens": 1, "block": 16}}, None]}
    model = TerraByte.from_config(cfg)
    attend = model.stages[0].layers["0"].attn.attend
    assert attend.pattern.to_config() == {"block": 16, "local": 4, "global_tokens": 1}
    bad = dict(cfg, attention=[{"kind": "sparse", "pattern": {"dilated": [[16, 0]]}}, None])
    with pytest.raises(ValueError, match="dilation must be between 1"):
        TerraByte.from_config(bad)
