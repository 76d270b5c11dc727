"""Hashed n-gram embeddings (model.ngram_sizes, layers.NgramEmbed): the hash, the unit-local rule,
causality and cached decoding with them, saving and loading, and the config's checks."""
import pytest
import torch

from terrabyte.data_pipeline.basics.errors import ConfigError
from terrabyte.pretrain.model import TerraByte
from terrabyte.pretrain.model.layers import NGRAM_BASE, NGRAM_PRIME, NgramEmbed
from tests.unit.test_model import one_thread  # noqa: F401  (autouse: tiny shapes on one thread)
from tests.unit.test_patching import MODEL_SHAPES, model_rows, scheme_model

SIZES = (2, 3, 5)


def reference_rows(unit: list[int], sizes: tuple, buckets: int) -> list[list[int]]:
    """The table rows of each byte of one unit, the rule written out in plain Python."""
    none = len(sizes) * buckets
    out = []
    for j in range(len(unit)):
        row = []
        for k, n in enumerate(sizes):
            if j + 1 < n:
                row.append(none)
                continue
            h = 0
            for byte in unit[j - n + 1: j + 1]:
                h = (h * NGRAM_BASE + byte) % NGRAM_PRIME
            row.append(h % buckets + k * buckets)
        out.append(row)
    return out


def test_indices_match_the_rule_written_out():
    g = torch.Generator().manual_seed(0)
    units = torch.randint(0, 259, (3, 4, 8), generator=g)
    emb = NgramEmbed(SIZES, 101, 16, 259)
    got = emb.indices(units)
    assert got.shape == (3, 4, 8, len(SIZES))
    for unit, rows in zip(units.view(-1, 8).tolist(), got.view(-1, 8, len(SIZES)).tolist()):
        assert rows == reference_rows(unit, SIZES, 101)
    # a repeated n-gram lands on the same row wherever it is, different sizes on their own rows
    same = torch.tensor([[7, 8, 9, 7, 8, 9, 1, 2]])
    idx = emb.indices(same)[0]
    assert torch.equal(idx[2, :2], idx[5, :2]) and idx[2, 2] == emb.table.padding_idx != idx[5, 2]
    assert len(set(idx[5].tolist())) == len(SIZES)


def test_embedding_is_a_function_of_the_unit_alone():
    torch.manual_seed(0)
    emb = NgramEmbed(SIZES, 101, 16, 259)
    emb.init_weights(1.0)
    assert emb.table.weight[emb.table.padding_idx].abs().sum() == 0
    units = torch.randint(0, 256, (2, 5, 8))
    out = emb(units)
    assert out.shape == (2, 5, 8, 16)
    torch.testing.assert_close(emb(units[1:, 3:4]), out[1:, 3:4])  # another batch around it: the same
    # the first byte has no n-gram of 2 or more: nothing added
    assert out[..., 0, :].abs().sum() == 0
    # changing byte 3 changes the terms of bytes 3..3+max(n)-1 only
    changed = units.clone()
    changed[0, 0, 3] = (units[0, 0, 3] + 1) % 256
    diff = (emb(changed)[0, 0] - out[0, 0]).abs().sum(-1)
    assert (diff[:3] == 0).all() and (diff[3:8] > 0).all()


def test_gradient_reaches_only_the_rows_used():
    torch.manual_seed(0)
    emb = NgramEmbed((3,), 1000, 4, 259)
    emb.init_weights(1.0)
    units = torch.tensor([[1, 2, 3, 4]])
    emb(units).sum().backward()
    used = set(emb.indices(units).flatten().tolist()) - {emb.table.padding_idx}
    rows = set(emb.table.weight.grad.abs().sum(-1).nonzero().flatten().tolist())
    assert rows == used and len(used) == 2


def ngram_model(scheme="fixed", msl=(8, 4), **kw):
    return scheme_model(scheme, msl, ngram_sizes=(2, 3, 4), ngram_buckets=61, **kw)


@pytest.mark.parametrize("msl", list(MODEL_SHAPES))
@pytest.mark.parametrize("scheme", ["fixed", "space"])
def test_model_with_ngrams_is_causal(scheme, msl):
    model = ngram_model(scheme, msl)
    assert model.stages[0].embed.ngrams is not None and model.stages[-1].embed.ngrams is None
    x = model_rows(model)
    n = x.shape[1]
    logits, nats = model(x), model(x, return_loss="none")
    g = torch.Generator().manual_seed(5)
    for j in range(n):
        y = x.clone()
        y[:, j] = torch.randint(0, 256, (2,), generator=g)
        torch.testing.assert_close(model(y)[:, :j + 1], logits[:, :j + 1])
        torch.testing.assert_close(model(y, return_loss="none")[:, :j], nats[:, :j])
    # the n-grams take part: without them the same weights give other logits
    model.stages[0].embed.ngrams.table.weight.data.zero_()
    assert not torch.allclose(model(x), logits)


@pytest.mark.parametrize("scheme", ["fixed", "space"])
def test_cached_logits_equal_uncached_with_ngrams(scheme):
    model = ngram_model(scheme)
    x = model_rows(model, b=3)
    want = model(x)
    cache = model.init_cache(3)
    torch.testing.assert_close(model.forward_cached(x[:, :0], cache), want[:, 0], atol=1e-5, rtol=1e-5)
    for j in range(x.shape[1] - 1):
        torch.testing.assert_close(model.forward_cached(x[:, j:j + 1], cache), want[:, j + 1], atol=1e-5, rtol=1e-5)
    cache = model.init_cache(3)
    torch.testing.assert_close(model.forward_cached(x[:, :13], cache), want[:, 13], atol=1e-5, rtol=1e-5)


def test_save_load_round_trip_with_ngrams(tmp_path):
    model = ngram_model()
    x = model_rows(model)
    model.save_pretrained(tmp_path / "m")
    loaded = TerraByte.from_pretrained(tmp_path / "m")
    assert loaded.config["ngram_sizes"] == [2, 3, 4] and loaded.config["ngram_buckets"] == 61
    assert "stages.0.embed.ngrams.table.weight" in loaded.state_dict()
    torch.testing.assert_close(loaded(x, return_loss="none"), model(x, return_loss="none"))


def test_ngram_config_errors_are_one_line():
    with pytest.raises(ConfigError, match=r"model.ngram_sizes=\[1, 3\] must hold integers of at least 2, got 1"):
        TerraByte(max_seq_len=(8, 4), ngram_sizes=[1, 3])
    with pytest.raises(ConfigError, match=r"model.ngram_sizes=\[3, 3\] repeats a length"):
        TerraByte(max_seq_len=(8, 4), ngram_sizes=[3, 3])
    with pytest.raises(ConfigError, match="model.ngram_sizes='345' must be a list"):
        TerraByte(max_seq_len=(8, 4), ngram_sizes="345")
    with pytest.raises(ConfigError, match="model.ngram_buckets must be positive, got 0"):
        TerraByte(max_seq_len=(8, 4), ngram_sizes=[3], ngram_buckets=0)
    # longer than the unit: that size has nothing to hash and is left out, not an error
    model = TerraByte(dim=(16, 8), depth=(1, 1), max_seq_len=(4, 4), dim_head=8, heads=1, ngram_sizes=[3, 9])
    assert model.stages[0].embed.ngrams.sizes == (3,)
