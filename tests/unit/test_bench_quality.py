"""`terrabyte bench quality`: both models on one stream, scored on the trainer's validation bytes."""
import argparse
import json
import math

import pytest
import torch

from terrabyte.pretrain.bench import quality as bq
from tests.unit.test_train import shards  # noqa: F401  (the fixture: a small learnable corpus)

SMALL = ["--model.dim", "32,16", "--model.depth", "1,1", "--model.max_seq_len", "16,4", "--model.dim_head", "8",
         "--model.heads", "2", "--train.micro_batch", "2", "--train.global_batch", "4", "--data.val_sequences", "4",
         "--optim.warmup_steps", "1"]


def _args(tmp_path, shards, *flags):
    parser = argparse.ArgumentParser()
    bq.add_arguments(parser)
    return parser.parse_args(["--dir", str(tmp_path / "work"), "--threads", "1", *flags,
                              "--", "--data.path", str(shards), *SMALL])


def test_validation_set_is_the_trainers(shards):
    cfg = bq.load_config("tiny", ["--data.path", str(shards), *SMALL])
    batches = bq.validation_batches(cfg, str(shards))
    assert [tuple(b.shape) for b in batches] == [(2, 64), (2, 64)]
    again = bq.validation_batches(cfg, str(shards))
    assert all(torch.equal(a, b) for a, b in zip(batches, again))


def test_terrabyte_alone_when_peer_missing(tmp_path, shards, capsys, caplog, monkeypatch):
    monkeypatch.setattr(bq, "megabyte_class", lambda: None)
    args = _args(tmp_path, shards, "--steps", "3", "--seeds", "0,1", "--eval-interval", "2", "--baselines", "megabyte")
    with caplog.at_level("WARNING"):
        assert bq.run(args) == 0
    assert bq.PEER_INSTALL in caplog.text
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| TerraByte")]
    assert len(rows) == 1 and "MEGABYTE" not in out.split("| model")[1]
    results = json.loads((tmp_path / "work" / "quality.json").read_text())
    assert [r["seed"] for r in results] == [0, 1]
    for r in results:
        curve = r["curves"]["TerraByte"]
        assert [point[0] for point in curve] == [1, 2, 3]
        assert curve[0][3] is None and curve[1][3] is not None  # validation at step 2 and the last
        assert math.isfinite(r["final_bpb"]["TerraByte"]) and r["final_bpb"]["TerraByte"] == curve[-1][3]
    # different seeds: different init and data order
    assert results[0]["final_bpb"] != results[1]["final_bpb"]


def test_merge_prints_one_table_of_both_runs(tmp_path, shards, capsys, monkeypatch):
    monkeypatch.setattr(bq, "megabyte_class", lambda: None)
    for seed in ("0", "1"):
        parser = argparse.ArgumentParser()
        bq.add_arguments(parser)
        args = parser.parse_args(["--dir", str(tmp_path / seed), "--threads", "1", "--steps", "2", "--seeds", seed,
                                  "--no-baseline", "--", "--data.path", str(shards), *SMALL])
        assert bq.run(args) == 0
    capsys.readouterr()
    parser = argparse.ArgumentParser()
    bq.add_arguments(parser)
    files = [str(tmp_path / seed / "quality.json") for seed in ("1", "0")]
    assert bq.run(parser.parse_args(["--merge", *files])) == 0
    out = capsys.readouterr().out
    per_seed = [json.loads(open(f).read())[0]["final_bpb"]["TerraByte"] for f in reversed(files)]
    assert "(seeds 0, 1)" in out and f"{per_seed[0]:.3f} / {per_seed[1]:.3f}" in out
    with pytest.raises(bq.ConfigError, match="--merge"):
        bq.run(parser.parse_args(["--merge", str(tmp_path / "missing.json")]))


def test_same_seed_same_numbers(tmp_path, shards, monkeypatch):
    monkeypatch.setattr(bq, "megabyte_class", lambda: None)
    cfg = bq.with_sections(bq.load_config("tiny", ["--data.path", str(shards), *SMALL]), train={"steps": 2})
    val = bq.validation_batches(cfg, str(shards))
    first = bq.run_seed(cfg, str(shards), 3, bq.Baselines(), eval_interval=1, val=val)
    second = bq.run_seed(cfg, str(shards), 3, bq.Baselines(), eval_interval=1, val=val)
    assert first.final_bpb == second.final_bpb
    assert [p[2] for p in first.curves["TerraByte"]] == [p[2] for p in second.curves["TerraByte"]]


@pytest.mark.skipif(bq.megabyte_class() is None, reason="MEGABYTE-pytorch is not installed (optional peer)")
def test_both_models_and_equal_time(tmp_path, shards, capsys):
    assert bq.run(_args(tmp_path, shards, "--steps", "2", "--seeds", "0", "--baselines", "megabyte")) == 0
    out = capsys.readouterr().out
    assert "| TerraByte" in out and "| MEGABYTE-pytorch" in out and "equal wall-clock" in out
    (result,) = json.loads((tmp_path / "work" / "quality.json").read_text())
    budget, _ = result["equal_time"]["MEGABYTE-pytorch"]
    ratio = result["seconds_per_step"]["TerraByte"] / result["seconds_per_step"]["MEGABYTE-pytorch"]
    assert budget == max(1, round(2 * ratio))
    assert result["equal_time"]["TerraByte"][0] == 2


def test_bad_seeds_name_the_flag(tmp_path, shards):
    with pytest.raises(bq.ConfigError, match="--seeds"):
        bq.run(_args(tmp_path, shards, "--seeds", "a,b"))


def test_flat_and_bpe_baselines_at_equal_steps_time_and_flops(tmp_path, shards, capsys):
    args = _args(tmp_path, shards, "--steps", "2", "--seeds", "0", "--baselines", "bytes,bpe", "--bpe-vocab", "300",
                 "--baseline-dim", "16", "--baseline-depth", "1")
    assert bq.run(args) == 0
    out = capsys.readouterr().out
    assert "| byte GPT" in out and "| BPE GPT" in out and "300-token byte-level BPE" in out
    assert "TerraByte - BPE GPT:" in out and "at equal FLOPs" in out
    (result,) = json.loads((tmp_path / "work" / "quality.json").read_text())
    flops = result["flops_per_step"]
    assert all(f > 0 for f in flops.values())
    for name in ("byte GPT", "BPE GPT"):
        steps, bpb = result["equal_flops"][name]
        assert steps == max(1, round(2 * flops["TerraByte"] / flops[name]))
        assert math.isfinite(bpb)
        steps, _ = result["equal_time"][name]
        assert steps == max(1, round(2 * result["seconds_per_step"]["TerraByte"] / result["seconds_per_step"][name]))
    assert result["equal_flops"]["TerraByte"] == [2, result["final_bpb"]["TerraByte"]]


def test_patching_schemes_train_beside_terrabyte(tmp_path, shards, capsys):
    """--patching adds TerraByte with space and entropy patches on the same rows, with the baselines'
    equal wall-clock and FLOPs runs; the config's own scheme is the reference, not added twice."""
    args = _args(tmp_path, shards, "--steps", "2", "--seeds", "0", "--no-baseline", "--patching", "fixed,space,entropy")
    assert bq.run(args) == 0
    out = capsys.readouterr().out
    assert "| TerraByte space" in out and "| TerraByte entropy" in out and "| TerraByte fixed" not in out
    assert "TerraByte space: max_seq_len [32, 4]" in out  # twice the 16 fixed patches of a 64-byte row
    (result,) = json.loads((tmp_path / "work" / "quality.json").read_text())
    for name in ("TerraByte space", "TerraByte entropy"):
        assert math.isfinite(result["final_bpb"][name]) and result["flops_per_step"][name] > 0
        assert result["equal_flops"][name][0] >= 1 and math.isfinite(result["equal_time"][name][1])
    cfg = bq.load_config("tiny", ["--data.path", str(shards), *SMALL])
    assert bq.patched_model_args(cfg, "entropy", 2.0)["context_bytes"] == 64
    assert bq.patched_model_args(cfg, "fixed", 2.0)["max_seq_len"] == (16, 4)
    with pytest.raises(bq.ConfigError, match="--patching 'bpe': unknown"):
        bq.run(_args(tmp_path, shards, "--patching", "bpe"))


def test_bpe_tokens_are_lossless_and_scored_over_the_same_bytes():
    from terrabyte.data_pipeline.basics.vocab import BYTES
    from terrabyte.pretrain.bench.baselines import BytePairTokens

    rng = torch.Generator().manual_seed(0)
    docs = [bytes(torch.randint(0, 256, (int(n),), generator=rng).tolist()) for n in torch.randint(1, 40, (30,), generator=rng)]
    docs += [b"def f(x):\n    return x\n" * 5, "caf\u00e9 \u2603".encode(), b"\xff\xfe\x00 bad utf-8 \x80"]
    tokens = BytePairTokens(docs, 320)
    for doc in docs:
        assert tokens.decode(tokens.encode(doc)) == doc
    # a packed row: two documents cut by EOS, the last one running into PAD
    row = list(docs[-3]) + [BYTES.eos_id] + list(docs[-2]) + [BYTES.pad_id] * 5
    (ids,) = tokens.encode_rows(torch.tensor([row]), BYTES).tolist()
    eos = ids.index(tokens.vocab.eos_id)
    assert tokens.decode(ids[:eos]) == docs[-3]
    assert tokens.decode([t for t in ids[eos + 1:] if t != tokens.vocab.pad_id]) == docs[-2]


def test_flop_count_is_three_forward_matmuls():
    from terrabyte.pretrain.bench.baselines import TokenGPT, train_step_flops

    b, n, dim, depth, vocab = 2, 12, 32, 2, 256
    model = TokenGPT(num_tokens=vocab, dim=dim, depth=depth, max_len=n, dim_head=16)
    x = torch.randint(0, vocab, (b, n))
    linear = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear))
    attention = depth * 2 * (2 * b * n * n * dim)  # q @ k^T and probs @ v over all heads (math path: n <= 16)
    forward = 2 * b * n * linear + attention
    assert train_step_flops(model, bq._terrabyte_nats, [x], vocab) == 3 * forward
    assert all(p.grad is None for p in model.parameters())


def test_calibrated_baseline_trains_only_its_budgets(tmp_path, shards, capsys):
    """--calibrate-steps: the baseline is timed on the first steps of the shared loop, has no
    equal-steps score, and trains again for exactly its equal-time and equal-FLOPs budgets."""
    args = _args(tmp_path, shards, "--steps", "3", "--seeds", "0", "--baselines", "bytes", "--baseline-dim", "16",
                 "--baseline-depth", "1", "--calibrate-steps", "1", "--eval-interval", "1")
    assert bq.run(args) == 0
    out = capsys.readouterr().out
    (result,) = json.loads((tmp_path / "work" / "quality.json").read_text())
    assert result["final_bpb"]["byte GPT"] is None and math.isfinite(result["final_bpb"]["TerraByte"])
    assert [point[0] for point in result["curves"]["byte GPT"]] == [1]  # one step of the shared loop
    steps, bpb = result["equal_time"]["byte GPT"]
    assert steps == max(1, round(3 * result["seconds_per_step"]["TerraByte"] / result["seconds_per_step"]["byte GPT"]))
    assert math.isfinite(bpb)
    assert "| byte GPT" in out and "at equal steps" not in out.split("TerraByte - byte GPT:")[1].splitlines()[0]
    # the retrained runs' curves are kept (and drawn): validation at every interval, the last the table's
    (curve,) = [c for c in result["budget_curves"]["byte GPT"] if c[-1][0] == steps]
    assert [point[0] for point in curve] == list(range(1, steps + 1)) and curve[-1][3] == bpb
    assert all(math.isfinite(point[3]) for point in curve)


def test_calibrate_steps_must_leave_a_shared_loop(tmp_path, shards):
    with pytest.raises(bq.ConfigError, match="--calibrate-steps"):
        bq.run(_args(tmp_path, shards, "--steps", "2", "--calibrate-steps", "2"))


def test_timing_and_flops_steps_spread_over_the_run():
    """A baseline is timed (--calibrate-steps) and its FLOPs counted on steps spread over the run, not
    on its first stretch of text (seed 1's first 8 steps cost 1.7x the FLOPs of 8 spread ones)."""
    assert sorted(bq.spread(10, 250)) == [1, 26, 51, 76, 101, 126, 151, 176, 201, 226]
    assert sorted(bq.spread(3, 3)) == [1, 2, 3] and sorted(bq.spread(5, 2)) == [1, 2]
    assert sorted(bq.spread(1, 250)) == [1]
