"""One source for the model's arguments: the constructor, the config tree and exports share
``ModelArgs``' fields, defaults and validation."""
import dataclasses
import json

import pytest
import torch

from terrabyte.data_pipeline.basics.errors import ConfigError
from terrabyte.pretrain import TerraByte
from terrabyte.pretrain.train.config import Config, load_config
from terrabyte.pretrain.model.args import ModelArgs

SMALL = dict(dim=(32, 16), depth=(1, 1), max_seq_len=(8, 4), dim_head=8, heads=2)


def test_keywords_and_a_model_args_build_the_same_model():
    torch.manual_seed(0)
    a = TerraByte(**SMALL)
    torch.manual_seed(0)
    b = TerraByte(ModelArgs(**SMALL))
    assert a.config == b.config
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    with pytest.raises(TypeError, match="not both"):
        TerraByte(ModelArgs(), dim=(8, 8))
    with pytest.raises(TypeError, match=r"unknown argument\(s\) \['dims'\]"):
        TerraByte(dims=(8, 8))


def test_one_set_of_defaults():
    model = TerraByte()
    assert model.config == {k: list(v) if isinstance(v, tuple) else v for k, v in Config().model.kwargs().items()}
    assert model.dims == (128, 64) and model.stages[0].heads == 4 and model.stages[0].dim_head == 32
    assert type(Config().model) is ModelArgs
    # a config without a model section builds exactly the model of the constructor's defaults
    assert TerraByte(**Config().model.kwargs()).config == model.config


@pytest.mark.parametrize("key, value, message", [
    ("heads", 0, "config key model.heads must be positive, got 0"),
    ("depth", (1, 1, 1), "config key model.depth=(1, 1, 1) has 3 entries but model.max_seq_len=(8, 4) gives 2"),
    ("dim_head", 7, "config key model.dim_head=7 must be even with model.rotary"),
    ("unit_embedding", "sum", "model.unit_embedding='sum' must be 'grouped' or 'concat'"),
    ("chunk_bytes", 6, "model.chunk_bytes=6 must be a positive multiple of the global patch (4 bytes)"),
    ("attention", [{"kind": "sparse", "pattern": [{"local": 4}] * 3}, None],
     "config key model.attention[0].pattern"),
    ("attention", [{"kind": "flash"}, None], "config key model.attention[0]"),
])
def test_constructor_and_config_refuse_alike(key, value, message):
    with pytest.raises(ConfigError) as built:
        TerraByte(**{**SMALL, key: value})
    overrides = [f"--model.{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in {**SMALL, key: value}.items()]
    with pytest.raises(ConfigError) as loaded:
        load_config("tiny", overrides)
    assert message in str(built.value)
    assert str(built.value) == str(loaded.value)


def test_checked_broadcasts_per_stage_values():
    args = ModelArgs(dim=(8, 8, 8), depth=1, max_seq_len=(4, 4, 4), heads=(2, 1, 1), ff_mult=2.0).checked()
    assert args.depth == (1, 1, 1) and args.heads == (2, 1, 1) and args.ff_mult == (2.0,) * 3
    assert args.attention == (None,) * 3 and dataclasses.is_dataclass(args)
