"""Hashed n-gram embeddings (model.ngram_sizes, layers.NgramEmbed): the hash, the unit-local rule,
causality and cached decoding with them, saving and loading, and the config's checks."""
import json

import pytest
import torch

from terrabyte.data_pipeline.basics.errors import CheckpointError, ConfigError
from terrabyte.pretrain.model import TerraByte
from terrabyte.pretrain.model.layers import NGRAM_BASE, NGRAM_PRIME, NgramEmbed
from tests.unit.test_model import one_thread  # noqa: F401  (autouse: tiny shapes on one thread)
from tests.unit.test_patching import MODEL_SHAPES, model_rows, scheme_model
from tests.unit.test_train import shards  # noqa: F401  (the fixture: a small learnable corpus)

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
    assert torch.equal(idx[2, :2], idx[5, :2]) and idx[2, 2] == emb.none != idx[5, 2]
    assert len(set(idx[5].tolist())) == len(SIZES)


def test_embedding_is_a_function_of_the_unit_alone():
    torch.manual_seed(0)
    emb = NgramEmbed(SIZES, 101, 16, 259)
    emb.init_weights(1.0)
    assert emb.weight[emb.none].abs().sum() == 0
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
    used = set(emb.indices(units).flatten().tolist()) - {emb.none}
    rows = set(emb.weight.grad.abs().sum(-1).nonzero().flatten().tolist())
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
    model.stages[0].embed.ngrams.weight.data.zero_()
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
    assert "stages.0.embed.ngrams.weight" in loaded.state_dict()
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
    with pytest.raises(ConfigError, match="model.ngram_buckets=4294967296 exceeds the 2147483647 values"):
        TerraByte(max_seq_len=(8, 4), ngram_sizes=[3], ngram_buckets=1 << 32)
    # longer than the unit: that size has nothing to hash and is left out, not an error
    model = TerraByte(dim=(16, 8), depth=(1, 1), max_seq_len=(4, 4), dim_head=8, heads=1, ngram_sizes=[3, 9])
    assert model.stages[0].embed.ngrams.sizes == (3,)


def test_a_model_saved_before_ngrams_existed_loads_and_resumes_as_one_without(tmp_path):
    from terrabyte.pretrain.checkpoint.resume import check_same_model

    model = scheme_model("fixed")
    model.save_pretrained(tmp_path / "m")
    config_file = tmp_path / "m" / "config.json"
    old = {k: v for k, v in json.loads(config_file.read_text()).items()
           if k not in ("ngram_sizes", "ngram_buckets", "patching", "patch_threshold", "context_bytes")}
    config_file.write_text(json.dumps(old))
    loaded = TerraByte.from_pretrained(tmp_path / "m")
    assert loaded.stages[0].embed.ngrams is None and loaded.patcher.scheme == "fixed"
    x = model_rows(model)
    torch.testing.assert_close(loaded(x), model(x))
    check_same_model(old, model.config, "old")  # a resume takes it as the same model
    check_same_model(old, {**model.config, "ngram_buckets": 7}, "old")  # without n-grams their table size is moot
    with pytest.raises(CheckpointError, match=r"model.ngram_sizes is \(\) there but \(2, 3, 4\) now"):
        check_same_model(old, {**model.config, "ngram_sizes": [2, 3, 4]}, "old")


def test_zero3_run_trains_the_table_resumes_and_generates(tmp_path, shards):  # noqa: F811
    """`terrabyte pretrain` (a DeepSpeed ZeRO-3 engine) with n-grams: the table is gathered where the
    embedding runs and learns, a resumed run repeats the straight run's losses, and the export
    generates as the checkpoint does."""
    from safetensors.torch import load_file

    from tests.unit.test_train import TINY, generate_greedy, run_cli, scalars

    common = ["--config", "tiny", "--data.path", str(shards), *TINY, "--model.ngram_sizes", "2,3,4",
              "--model.ngram_buckets", "4096", "--optim.weight_decay", "0", "--train.eval_interval", "4",
              "--checkpoint.interval", "4"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    run_cli([*common, "--run.dir", str(straight), "--train.steps", "6"])
    run_cli([*common, "--run.dir", str(split), "--train.steps", "4"])
    key = "stages.0.embed.ngrams.weight"
    at4 = load_file(str(split / "model.safetensors"))[key]
    run_cli([*common, "--run.dir", str(split), "--train.steps", "6"])
    loss, resumed = scalars(straight, "train/loss"), scalars(split, "train/loss")
    for step in (5, 6):
        assert resumed[step] == pytest.approx(loss[step], rel=1e-6, abs=1e-7), step
    table = load_file(str(straight / "model.safetensors"))[key]
    assert table.shape == (3 * 4096 + 1, 32) and table[-1].abs().sum() == 0  # the "no n-gram" row stays 0
    torch.testing.assert_close(load_file(str(split / "model.safetensors"))[key], table)
    # steps 5 and 6 moved the rows of the n-grams seen so far (no weight decay here: only those)
    moved = (table - at4).abs().sum(-1) > 0
    assert 0 < int(moved.sum()) < 3 * 4096 / 2
    outs = [generate_greedy(source, "def ") for source in (straight / "model.safetensors", straight / "checkpoints")]
    assert outs[0] == outs[1] and outs[0].startswith(b"def ")
