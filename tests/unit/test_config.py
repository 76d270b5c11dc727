import pytest

from terrabyte.pretrain.args import available_configs, load_config, validate_world


def test_tiny_loads_with_overrides():
    cfg = load_config("tiny", ["--train.steps", "7", "--model.dim=96,48", "--run.dir", "/tmp/x", "--data.path", "null"])
    assert cfg.train.steps == 7
    assert cfg.model.dim == (96, 48)
    assert cfg.run.dir == "/tmp/x"
    assert cfg.data.path is None
    assert load_config("tiny", ["--optim.lr", "3e-3"]).optim.lr == 0.003
    # string keys keep the text as typed, even words YAML would read as booleans or numbers
    assert load_config("tiny", ["--run.dir", "off", "--data.path", "123"]).run.dir == "off"
    assert load_config("tiny", ["--data.path", "123"]).data.path == "123"
    assert cfg.parallel.zero_stage == 3
    assert cfg.model.seq_len == cfg.model.max_seq_len[0] * cfg.model.max_seq_len[1]


def test_every_shipped_config_loads():
    names = available_configs()
    assert "tiny" in names
    for name in names:
        assert load_config(name).model.num_tokens == 256


@pytest.mark.parametrize(
    "override, message",
    [
        (["--train.stepz", "3"], "unknown config key 'train.stepz'"),
        (["--trian.steps", "3"], "unknown config section 'trian'"),
        (["--train.steps", "three"], "config key train.steps expects an integer, got 'three'"),
        (["--train.steps", "1.5"], "config key train.steps expects an integer, got 1.5"),
        (["--optim.lr", "fast"], "config key optim.lr expects a number, got 'fast'"),
        (["--model.flash_attn", "maybe"], "config key model.flash_attn expects true or false"),
        (["--model.dim", "64,x"], "config key model.dim expects a list of integers"),
        (["--model.depth", "2,2,2"], "one entry per stage"),
        (["--train.global_batch", "6", "--train.micro_batch", "4"], "must be a multiple of train.micro_batch"),
        (["--optim.schedule", "step"], "optim.schedule must be one of cosine, linear, constant"),
        (["--train.steps"], "override --train.steps has no value"),
        (["steps=3"], "unexpected argument 'steps=3'"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ValueError) as info:
        load_config("tiny", override)
    assert message in str(info.value)


def test_unknown_key_in_yaml_names_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  steps: 3\n  warmup: 5\n")
    with pytest.raises(ValueError, match=r"bad.yaml: unknown config key 'train.warmup'"):
        load_config(str(path))


def test_missing_config():
    with pytest.raises(ValueError, match="unknown config 'nosuch'"):
        load_config("nosuch")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config("/nonexistent/cfg.yaml")


def test_world_size_divides_batch():
    cfg = load_config("tiny", ["--train.global_batch", "8", "--train.micro_batch", "2"])
    assert validate_world(cfg, 2) == 2
    with pytest.raises(ValueError, match="world size"):
        validate_world(cfg, 3)


def test_dry_run_counts_without_allocating():
    from terrabyte.pretrain.estimate import describe, meta_model, stage_parameters

    cfg = load_config("1b")
    model = meta_model(cfg)
    assert all(p.is_meta for p in model.parameters())
    total = sum(p.numel() for p in model.parameters())
    assert total >= 1_000_000_000
    per_stage = stage_parameters(model)
    assert sum(s["total"] for s in per_stage) == total
    text = describe(cfg)
    assert f"{total:,}" in text and "FLOPs/byte" in text and "activation memory" in text
    assert "key/value cache per sequence" in text


def test_decode_cache_estimate_is_what_generation_allocates():
    from terrabyte.pretrain.estimate import decode_cache_bytes
    from terrabyte.pretrain.model import TerraByte

    model = TerraByte(num_tokens=256, dim=(32, 24, 16), depth=(2, 1, 3), max_seq_len=(6, 4, 2), dim_head=8,
                      heads=(4, 2, 2))
    cache = model.init_cache(1)
    assert decode_cache_bytes(model, 4) == sum(st.kv.numel() * st.kv.element_size() for st in cache.stages)
