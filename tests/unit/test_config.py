import pytest

from terrabyte.pretrain.train.config import available_configs, load_config, validate_world


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
    from terrabyte.pretrain.train.dry_run import describe, meta_model, stage_parameters

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
    from terrabyte.pretrain.train.dry_run import decode_cache_bytes
    from terrabyte.pretrain.model.terrabyte import TerraByte

    model = TerraByte(num_tokens=256, dim=(32, 24, 16), depth=(2, 1, 3), max_seq_len=(6, 4, 2), dim_head=8,
                      heads=(4, 2, 2))
    cache = model.init_cache(1)
    assert decode_cache_bytes(model, 4) == sum(st.kv.numel() * st.kv.element_size() for st in cache.stages)


def test_dry_run_memory_names_the_chunk_that_fits():
    """long_1g fits one 141 GB GPU; on less memory the estimate names the largest chunk that fits, or
    says that none does; the same line stops a run at start-up."""
    from terrabyte.pretrain.train.dry_run import (activation_bytes, chunk_activation_bytes, describe,
                                                  global_activation_bytes, global_backward_bytes, largest_chunk,
                                                  memory_verdict, meta_model, model_state_bytes)

    cfg = load_config("long_1g")
    model = meta_model(cfg)
    assert model.context_length == 2**30 and model.max_seq_len[0] <= 2**18 and model.num_stages >= 3
    text = describe(cfg, 141)
    assert "fits 141 GiB with model.chunk_bytes=1048576" in text
    # twice the chunk, twice its activations: the chunk term is linear and the rest does not move
    assert chunk_activation_bytes(model, cfg, 2 << 20) == pytest.approx(2 * chunk_activation_bytes(model, cfg, 1 << 20))
    memory = model_state_bytes(model, cfg) + activation_bytes(model, cfg, 3 << 18) + 1
    fits = largest_chunk(model, cfg, memory)
    assert fits is not None and (3 << 18) <= fits < (1 << 20) and fits % model.unit_sizes[0] == 0
    verdict = memory_verdict(model, cfg, memory, "cuda memory")
    assert f"model.chunk_bytes={fits} would fit (now 1048576)" in verdict
    none = memory_verdict(model, cfg, 4 * 2**30, "--memory 4")
    assert "even with one patch per chunk" in none and "sequence parallelism" in none
    # a sequence-parallel group of 8 splits the global stage's activations (and ZeRO-3 the states):
    # what one rank cannot hold, each of 8 can
    tight = model_state_bytes(model, cfg) / 8 + activation_bytes(model, cfg, sequence=8) + 1
    def stage0(sequence):
        return global_activation_bytes(model, cfg, sequence) + global_backward_bytes(model, cfg, sequence)

    assert stage0(8) < stage0(1) / 4  # the byte-embedding chunk stays whole on each rank
    assert memory_verdict(model, cfg, tight, "cuda memory", shards=8, sequence=8) is None
    alone = memory_verdict(model, cfg, tight, "cuda memory")
    assert alone is not None and "over the" in alone
    assert "per rank of a sequence-parallel group of 8" in memory_verdict(model, cfg, tight / 8, "cuda memory", 8, 8)


def test_start_up_stops_when_the_context_cannot_fit(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "terrabyte.pretrain", "--config", "long_1g", "--run.dir", str(tmp_path / "run"),
         "--model.chunk_bytes", str(2**21)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [l for l in proc.stderr.splitlines() if l.startswith("terrabyte: error")]
    assert len(lines) == 1 and "cpu memory" in lines[0] and "GiB available" in lines[0], proc.stderr[-2000:]
    assert not (tmp_path / "run" / "data").exists()  # stopped before building the default corpus


@pytest.mark.parametrize("override, message", [
    (["--optim.lr", "nan"], "config key optim.lr expects a finite number, got nan"),
    (["--optim.lr", ".inf"], "config key optim.lr expects a finite number, got inf"),
    (["--optim.lr", "1e400"], "config key optim.lr expects a finite number"),
    (["--optim.lr", "-0.1"], "config key optim.lr must be positive, got -0.1"),
    (["--train.grad_clip", "nan"], "config key train.grad_clip expects a finite number, got nan"),
    (["--train.grad_clip", "-1"], "config key train.grad_clip must be at least 0, got -1.0"),
    (["--optim.warmup_steps", "-5"], "config key optim.warmup_steps must be at least 0, got -5"),
    (["--optim.beta1", "5"], "config key optim.beta1 must be at least 0 and below 1, got 5.0"),
    (["--optim.beta2", "1"], "config key optim.beta2 must be at least 0 and below 1, got 1.0"),
    (["--optim.eps", "0"], "config key optim.eps must be positive, got 0.0"),
    (["--optim.weight_decay", "-0.1"], "config key optim.weight_decay must be at least 0"),
    (["--optim.min_lr_ratio", "2"], "config key optim.min_lr_ratio must be at least 0 and at most 1, got 2.0"),
    (["--model.attn_dropout", "1"], "config key model.attn_dropout must be at least 0 and below 1"),
    (["--model.dim", "0,64"], "config key model.dim must be positive, got 0"),
    (["--model.heads", "-2"], "config key model.heads must be positive, got -2"),
    (["--model.ff_mult", "0"], "config key model.ff_mult must be positive"),
    (["--data.num_workers", "-1"], "config key data.num_workers must be at least 0, got -1"),
    (["--run.seed", "-1"], "config key run.seed must be at least 0"),
    (["--logging.peak_tflops", "-3"], "config key logging.peak_tflops must be positive"),
    (["--logging.level", "loud"], "config key logging.level must be one of DEBUG, INFO"),
    (["--model.dim", "64,["], "config key model.dim: '[' is not a value"),
    (["--model.rotary", "[1,"], "config key model.rotary: '[1,' is not a value"),
    (["--model.attention", "{a: [}"], "config key model.attention: '{a: [}' is not a value"),
])
def test_numbers_out_of_range_and_malformed_values_are_one_line(override, message):
    with pytest.raises(ValueError) as info:
        load_config("tiny", override)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_random_overrides_give_a_config_or_one_line():
    """Any key of the tree with any text: a valid config, or one ConfigError line; never another exception."""
    import dataclasses

    hypothesis = pytest.importorskip("hypothesis", reason="in the dev extra: pip install -e .[dev]")
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from terrabyte.data_pipeline.basics.errors import ConfigError
    from terrabyte.pretrain.train.config import Config

    keys = [f"{section.name}.{f.name}" for section in dataclasses.fields(Config)
            for f in dataclasses.fields(section.default_factory())]
    tricky = st.sampled_from(["nan", "-nan", ".inf", "-.inf", "1e400", "-1", "0", "0.5", "1", "2", "1.0e-3", "true",
                              "no", "null", "~", "", "[", "{", "[1,", "1,2", "1,[", "a: b: c", "[[[[[[[[", "'",
                              "!!python/object:os.system", "- 1", "99999999999999999999999", "0x10", "1_000",
                              "2001-01-01", "[1, 2]", "{kind: sparse, pattern: 5}", "[null, {kind: x}]",
                              "[" * 2000 + "]" * 2000, "\x00", "é", "1\n2"])

    @settings(max_examples=150, deadline=None, derandomize=True)
    @given(key=st.sampled_from(keys), value=st.one_of(tricky, st.text(max_size=12)))
    def check(key, value):
        try:
            load_config("tiny", [f"--{key}", value])
        except ConfigError as exc:
            assert str(exc).strip() and "\n" not in str(exc), (key, value, str(exc))

    check()
