"""The parallel section: impossible settings stop up front with one message saying what to change;
the DeepSpeed config each setting produces; where each rank sits; the pipeline decomposition and
the checkpoint file check, all without launching ranks."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from terrabyte.pretrain.train.config import load_config, validate_world
from terrabyte.pretrain.parallel.layout import plan_layout
from terrabyte.pretrain.parallel.pipeline import PipelineLoss, _Source, pipeline_key, pipeline_layers
from terrabyte.pretrain.parallel.sequence import sequence_parallel_ranks
from terrabyte.pretrain.parallel.tensor import TP_COLUMN, TP_ROW

SMALL = ["--model.dim", "64,32", "--model.depth", "2,1", "--model.max_seq_len", "32,4", "--model.dim_head", "16",
         "--model.heads", "4", "--train.micro_batch", "2", "--train.global_batch", "8"]


def cfg(*overrides):
    return load_config("tiny", [*SMALL, *overrides])


@pytest.mark.parametrize("overrides, message", [
    (["--parallel.pipeline_stages", "2", "--parallel.zero_stage", "3"],
     "parallel.pipeline_stages=2 needs parallel.zero_stage 0 or 1"),
    (["--parallel.pipeline_stages", "2", "--parallel.zero_stage", "2"], "set --parallel.zero_stage 1"),
    (["--parallel.sequence_parallel", "3"], "parallel.sequence_parallel=3 must divide the global stage's model.heads=4: "
     "Ulysses hands each rank whole heads; use parallel.sequence_parallel in 1, 2, 4 or change model.heads"),
    (["--parallel.sequence_parallel", "4", "--model.max_seq_len", "30,4"],
     "parallel.sequence_parallel=4 must divide model.max_seq_len[0]=30 (each rank holds an equal run of patches): "
     "use parallel.sequence_parallel in 1, 2 or"),
    # tensor parallelism splits the heads first: Ulysses splits what a rank holds
    (["--parallel.sequence_parallel", "4", "--parallel.tensor_parallel", "2"],
     "parallel.sequence_parallel=4 must divide the 2 global-stage heads a tensor-parallel rank holds"),
    # a per-head pattern that cannot be split across the group says why and what works
    (["--parallel.sequence_parallel", "4", "--model.heads", "6", "--model.dim_head", "8", "--model.attention",
      "[{kind: sparse, pattern: [{local: 4}, {local: 8}, {stride: 4}, {local: 4}, {local: 8}, {stride: 4}]}, null]",
      "--model.max_seq_len", "36,4"],
     "each with its own pattern of model.attention[0] (6 per-head patterns); use parallel.sequence_parallel in 1, 2, 3, 6"),
    (["--parallel.sequence_parallel", "3", "--model.attention", "[{kind: sparse, pattern: {dilated: [[8, 2]]}}, null]"],
     "heads (dilated offsets follow the global head index); use parallel.sequence_parallel in 1, 2, 4"),
    (["--parallel.tensor_parallel", "3"], "parallel.tensor_parallel=3 must divide stage 0's model.heads=4"),
    (["--parallel.tensor_parallel", "16", "--model.heads", "16", "--model.dim", "256,128"],
     "parallel.tensor_parallel=16 must divide stage 1's feed-forward width 344"),
    (["--parallel.pipeline_stages", "2", "--parallel.zero_stage", "1", "--parallel.tensor_parallel", "2"],
     "parallel.pipeline_stages=2 and parallel.tensor_parallel=2 cannot be combined: DeepSpeed 0.19's AutoTP replaces"),
    (["--parallel.pipeline_stages", "2", "--parallel.zero_stage", "1", "--parallel.sequence_parallel", "2"],
     "parallel.pipeline_stages=2 and parallel.sequence_parallel=2 cannot be combined: the pipeline passes whole "
     "sequences between stages and DeepSpeed 0.19's pipeline topology has no sequence axis; use pipeline x data"),
    (["--parallel.pipeline_stages", "9", "--parallel.zero_stage", "1"], "exceeds the model's 6 pipeline layers"),
    (["--parallel.pipeline_stages", "2", "--parallel.zero_stage", "1", "--model.tie_embeddings", "true"],
     "model.tie_embeddings is not supported with parallel.pipeline_stages > 1"),
    (["--parallel.sequence_parallel", "2", "--train.compile", "true"], "train.compile is not supported"),
    (["--train.compile", "true"], "train.compile does not work with parallel.zero_stage 3"),
    (["--parallel.pipeline_partition", "type:Block"], "parallel.pipeline_partition must be one of flops, parameters, uniform"),
    (["--parallel.tensor_parallel", "0"], "parallel.tensor_parallel must be positive"),
    (["--parallel.offload", "nvme", "--parallel.zero_stage", "2"], "parallel.offload nvme needs parallel.zero_stage 3"),
    (["--parallel.offload", "cpu", "--parallel.zero_stage", "0"], "parallel.offload cpu needs parallel.zero_stage 1"),
    (["--parallel.zero_quantized_weights", "true", "--parallel.zero_stage", "2"],
     "parallel.zero_quantized_weights (ZeRO++) needs parallel.zero_stage 3"),
    (["--parallel.zero_hpz_partition_size", "2", "--parallel.zero_stage", "1"], "hpZ) needs parallel.zero_stage 3"),
])
def test_impossible_settings_stop_with_one_line(overrides, message):
    with pytest.raises(ValueError) as err:
        cfg(*overrides)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_world_and_batch_against_the_degrees():
    c = cfg("--parallel.tensor_parallel", "2")
    with pytest.raises(ValueError, match=re.escape("world size 3 is not a multiple of parallel.pipeline_stages x "
                                                   "tensor_parallel x sequence_parallel = 1 x 2 x 1 = 2")):
        validate_world(c, 3)
    assert validate_world(c, 4) == 2  # 2 data-parallel replicas x micro 2 x 2 accumulation = 8
    with pytest.raises(ValueError, match=r"parallel.zero_hpz_partition_size=4 must divide the 2 ranks ZeRO"):
        validate_world(cfg("--parallel.zero_hpz_partition_size", "4"), 2)
    with pytest.raises(ValueError, match=re.escape("train.global_batch (8) must be a multiple of train.micro_batch x "
                                                   "data-parallel world size (2 x 8 = 16")):
        validate_world(c, 16)


def test_ranks_are_placed_like_deepspeed_groups():
    # pipeline: DeepSpeed numbers ranks stage-major, rank = stage * dp + data rank
    pp = cfg("--parallel.pipeline_stages", "2", "--parallel.zero_stage", "1")
    assert [plan_layout(pp, 4, r).dp_rank for r in range(4)] == [0, 1, 0, 1]
    # tensor and sequence parallel peers are adjacent ranks
    tp = cfg("--parallel.tensor_parallel", "2")
    assert [plan_layout(tp, 4, r).dp_rank for r in range(4)] == [0, 0, 1, 1]
    sp = cfg("--parallel.sequence_parallel", "2")
    layouts = [plan_layout(sp, 4, r) for r in range(4)]
    assert [(l.dp_rank, l.sp_rank) for l in layouts] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert layouts[0].dp == 2 and layouts[0].replica == 2 and layouts[0].accumulation == 2
    # tensor x sequence: tensor peers innermost (AutoTP's (data, tensor) mesh), Ulysses groups across them
    tsp = cfg("--parallel.tensor_parallel", "2", "--parallel.sequence_parallel", "2")
    layouts = [plan_layout(tsp, 8, r) for r in range(8)]
    assert [(l.dp_rank, l.sp_rank, l.tp_rank) for l in layouts] == [
        (0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1), (1, 0, 0), (1, 0, 1), (1, 1, 0), (1, 1, 1)]
    assert sequence_parallel_ranks(layouts[0]) == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert layouts[0].dp == 2 and layouts[0].replica == 4 and layouts[0].accumulation == 2


def test_launcher_local_rank_flag(monkeypatch):
    """deepspeed passes --local_rank=N, torch --local-rank N: both reach LOCAL_RANK, which picks the device."""
    from terrabyte.pretrain.train.trainer import parse

    monkeypatch.setenv("LOCAL_RANK", "0")  # restored afterwards
    for flags, want in ((["--local_rank=1"], "1"), (["--local-rank", "2"], "2"), (["--local_rank", "3"], "3")):
        monkeypatch.delenv("LOCAL_RANK")
        args, cfg = parse([*flags, "--config", "tiny", "--train.steps", "2"])
        assert os.environ["LOCAL_RANK"] == want and cfg.train.steps == 2
    with pytest.raises(ValueError, match=r"--local_rank 1 disagrees with LOCAL_RANK=3 in the environment"):
        parse(["--local_rank=1"])


def ds_config(c, world=1, **kw):
    from terrabyte.pretrain.engine.engine import deepspeed_config

    return deepspeed_config(c, plan_layout(c, world, 0), **kw)


def test_deepspeed_config_for_each_setting():
    base = ds_config(cfg(), world=2)
    assert base["zero_optimization"]["stage"] == 3
    assert (base["train_batch_size"], base["train_micro_batch_size_per_gpu"], base["gradient_accumulation_steps"]) \
        == (8, 2, 2)
    assert "offload_param" not in base["zero_optimization"] and base["optimizer"]["params"]["torch_adam"]
    assert "tensor_parallel" not in base and "checkpoint" not in base

    cpu3 = ds_config(cfg("--parallel.offload", "cpu"))["zero_optimization"]
    assert cpu3["offload_param"]["device"] == "cpu" and cpu3["offload_optimizer"]["device"] == "cpu"
    cpu2 = ds_config(cfg("--parallel.offload", "cpu", "--parallel.zero_stage", "2"))
    assert "offload_param" not in cpu2["zero_optimization"]
    assert cpu2["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert cpu2["optimizer"]["params"]["torch_adam"] is False  # DeepSpeed's CPU Adam for offload
    nvme = ds_config(cfg("--parallel.offload", "nvme", "--parallel.nvme_path", "/scratch"))["zero_optimization"]
    assert nvme["offload_param"] == {"device": "nvme", "nvme_path": "/scratch", "pin_memory": False}

    zpp = ds_config(cfg("--parallel.zero_quantized_weights", "true", "--parallel.zero_quantized_gradients", "true",
                        "--parallel.zero_hpz_partition_size", "2"), world=2)["zero_optimization"]
    assert zpp["zero_quantized_weights"] and zpp["zero_quantized_gradients"] and zpp["zero_hpz_partition_size"] == 2

    assert ds_config(cfg("--train.precision", "bf16"))["bf16"] == {"enabled": True}
    assert ds_config(cfg(), universal=True)["checkpoint"] == {"load_universal": True}

    # sequence-parallel peers count as data-parallel ranks to DeepSpeed
    sp = ds_config(cfg("--parallel.sequence_parallel", "2"), world=4)
    assert (sp["train_batch_size"], sp["gradient_accumulation_steps"]) == (16, 2)
    pp = ds_config(cfg("--parallel.pipeline_stages", "2", "--parallel.zero_stage", "1"), world=2)
    assert (pp["train_batch_size"], pp["gradient_accumulation_steps"], pp["zero_optimization"]["stage"]) == (8, 4, 1)


def test_autotp_specs_cover_exactly_the_attention_and_feed_forward_projections():
    from terrabyte.pretrain.model.terrabyte import TerraByte

    tp = ds_config(cfg("--parallel.tensor_parallel", "2"), world=2)["tensor_parallel"]
    assert tp["autotp_size"] == 2 and tp["partition_config"]["use_default_specs"] is False
    specs = {s["partition_type"]: s["patterns"] for s in tp["partition_config"]["layer_specs"]}
    assert specs == {"column": TP_COLUMN, "row": TP_ROW}
    model = TerraByte(**cfg().model.kwargs())

    def matching(patterns):
        return {n.rsplit(".", 2)[-2] for n, _ in model.named_parameters() if any(re.match(p, n) for p in patterns)}

    assert matching(TP_COLUMN) == {"to_q", "to_k", "to_v", "gate_proj", "up_proj"}
    assert matching(TP_ROW) == {"to_out", "down_proj"}
    blocks = sum(len(s.layers) for s in model.stages)
    assert sum(any(re.match(p, n) for p in TP_COLUMN + TP_ROW) for n, _ in model.named_parameters()) == 7 * blocks


@pytest.mark.parametrize("shape, checkpoint", [(((16, 4, 2), (2, 1, 1)), False), (((8, 4), (2, 2)), True)])
def test_pipeline_layers_compute_the_plain_model(shape, checkpoint):
    """The layer list, chained by hand, is the model: same logits, loss, gradients and parameter names
    (with activation checkpointing in the block layers too)."""
    from terrabyte.pretrain.model.terrabyte import TerraByte

    max_seq_len, depth = shape
    torch.manual_seed(0)
    model = TerraByte(num_tokens=256, dim=(48, 32, 16)[:len(depth)], depth=depth, max_seq_len=max_seq_len,
                      dim_head=8, heads=2, checkpoint_activations=checkpoint)
    x = torch.randint(0, 258, (3, model.context_length))
    x[0, -5:] = model.pad_id
    layers = [cls(*args) for cls, args in pipeline_layers(_Source(model))]
    assert len(layers) == depth[0] + 2  # embedding, the global blocks, the chunked lower stages
    names = [k for layer in layers for k in layer.state_dict()]
    assert sorted(names) == sorted(model.state_dict()) and len(set(names)) == len(names)

    ref_loss = model(x, return_loss=True)
    ref_loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    out = x
    for layer in layers:
        out = layer(out)
    assert torch.allclose(out, model(x, return_loss="sum"), atol=1e-5)
    loss = PipelineLoss(model.pad_id)(out, x)
    assert torch.allclose(loss, ref_loss, atol=1e-6)
    loss.backward()
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, ref_grads[n], atol=1e-6), n
    assert pipeline_key("12.stages.1.layers.0.attn.to_q.weight") == "stages.1.layers.0.attn.to_q.weight"


def test_the_pipeline_runs_the_models_own_patching_and_parameters(monkeypatch):
    """``TerraByte.patches`` is the one place that groups bytes into patches: another grouping there
    reaches the pipeline layers too, which run the model's own walk on the model's own parameters."""
    from terrabyte.pretrain.model.terrabyte import TerraByte

    torch.manual_seed(0)
    model = TerraByte(num_tokens=256, dim=(32, 16), depth=(2, 1), max_seq_len=(8, 4), dim_head=8, heads=2)
    x = torch.randint(0, 256, (2, model.context_length))
    layers = [cls(*args) for cls, args in pipeline_layers(_Source(model))]
    assert {id(p) for layer in layers for p in layer.parameters()} == {id(p) for p in model.parameters()}
    fixed = TerraByte.patches
    monkeypatch.setattr(TerraByte, "patches", lambda self, ids, **kw: fixed(self, ids.flip(1), **kw))
    with torch.no_grad():
        out = x
        for layer in layers:
            out = layer(out)
        assert torch.allclose(out, model(x, return_loss="sum"), atol=1e-5)
        monkeypatch.undo()
        assert not torch.allclose(out, model(x, return_loss="sum"), atol=1e-2)  # the grouping mattered


def _best_max_by_enumeration(costs, stages):
    import itertools

    best = None
    for cuts in itertools.combinations(range(1, len(costs)), stages - 1):
        bounds = [0, *cuts, len(costs)]
        worst = max(sum(costs[a:b]) for a, b in zip(bounds, bounds[1:]))
        best = worst if best is None else min(best, worst)
    return best


def test_balanced_parts_minimise_the_slowest_stage():
    import random

    from terrabyte.pretrain.parallel.pipeline import balanced_parts

    # a heavy last layer (the lower stages): alone on its stage, the rest on the other
    assert balanced_parts([1, 2, 2, 2, 9], 2) == [0, 4, 5]
    assert balanced_parts([5, 5], 2) == [0, 1, 2] and balanced_parts([3, 1, 1], 3) == [0, 1, 2, 3]
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 9)
        costs = [rng.choice([0.5, 1, 2, 3, 7]) * rng.random() for _ in range(n)]
        stages = rng.randint(1, n)
        parts = balanced_parts(costs, stages)
        assert parts[0] == 0 and parts[-1] == n and len(parts) == stages + 1
        assert all(a < b for a, b in zip(parts, parts[1:]))  # every stage has a layer
        worst = max(sum(costs[a:b]) for a, b in zip(parts, parts[1:]))
        assert worst == pytest.approx(_best_max_by_enumeration(costs, stages))
    with pytest.raises(ValueError, match="cannot split 2 pipeline layers into 3"):
        balanced_parts([1, 1], 3)


def test_flops_partition_balances_1b_where_parameters_do_not(capsys):
    from terrabyte.pretrain.train.dry_run import flops_per_byte, meta_model, pipeline_layer_costs
    from terrabyte.pretrain.parallel.pipeline import pipeline_parts
    from terrabyte.pretrain.train.trainer import main

    def stage_flops(method):
        c = load_config("1b", ["--parallel.pipeline_stages", "2", "--parallel.zero_stage", "1",
                               "--parallel.pipeline_partition", method])
        model = meta_model(c)
        costs = pipeline_layer_costs(model, c)
        # the layers' FLOPs are the model's, counted as the trainer counts them
        assert sum(layer["flops"] for layer in costs) == pytest.approx(sum(flops_per_byte(model, c)) * model.context_length)
        assert sum(layer["parameters"] for layer in costs) == sum(p.numel() for p in model.parameters())
        parts = pipeline_parts(model, c)
        return [sum(layer["flops"] for layer in costs[a:b]) for a, b in zip(parts, parts[1:])], c

    by_params, _ = stage_flops("parameters")
    by_flops, c = stage_flops("flops")
    assert max(by_params) / min(by_params) > 2  # the issue's bubble: the lower stages' tokens
    assert max(by_flops) / min(by_flops) < 1.02 and max(by_flops) < 0.75 * max(by_params)
    assert load_config("1b").parallel.pipeline_partition == "flops"  # the default
    assert main(["--config", "1b", "--dry-run", "--parallel.pipeline_stages", "2", "--parallel.zero_stage", "1"]) == 0
    table = capsys.readouterr().out
    assert "| 0 | embedding .. block 21 |" in table and "| 1 | block 22 .. lower stages + head |" in table
    assert f"{by_flops[1]:.3g}" in table


def test_checkpoint_files_are_checked_against_the_manifest(tmp_path):
    from terrabyte.pretrain.checkpoint.store import FILES_MANIFEST, verify_files

    ckpt = tmp_path / "step4"
    ckpt.mkdir()
    (ckpt / "a_model_states.pt").write_bytes(b"x" * 100)
    (ckpt / "b_optim_states.pt").write_bytes(b"y" * 50)
    # files.json of format 1 (sizes only) is still read
    (ckpt / FILES_MANIFEST).write_text(json.dumps({"a_model_states.pt": 100, "b_optim_states.pt": 50}))
    verify_files(ckpt)
    (ckpt / "b_optim_states.pt").write_bytes(b"y" * 20)
    with pytest.raises(ValueError, match=r"b_optim_states.pt has 20 of 50 bytes \(truncated\?\)"):
        verify_files(ckpt)
    (ckpt / "a_model_states.pt").unlink()
    with pytest.raises(ValueError, match="is incomplete: a_model_states.pt is missing"):
        verify_files(ckpt)


def test_cli_stops_before_any_work():
    """A single process asked for 2-way tensor parallelism: one line, exit 2, no traceback."""
    proc = subprocess.run([sys.executable, "-m", "terrabyte.pretrain", "--config", "tiny", *SMALL,
                           "--parallel.tensor_parallel", "2", "--run.dir", "/nonexistent/never-created"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "terrabyte: error: world size 1 is not a multiple of" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_tensor_parallel_ranks_attend_with_their_heads_patterns():
    """AutoTP gives rank t heads [2t, 2t + 2) of 4: its attention keeps those heads' patterns (LongNet
    offsets and per-head lists by global head index), in every stage."""
    import copy

    from terrabyte.pretrain.model.terrabyte import TerraByte
    from terrabyte.pretrain.parallel.tensor import shard_attention_heads

    attention = [{"kind": "sparse", "pattern": {"local": 2, "dilated": [[16, 4]], "block": 16}},
                 {"kind": "sparse", "pattern": [{"local": 1}, {"local": 3}, {"stride": 2}, {"dilated": [[8, 2]]}]}]
    model = TerraByte(num_tokens=256, dim=(32, 32), depth=(1, 1), max_seq_len=(16, 16), heads=4, dim_head=8,
                      attention=attention)
    masks = [s.layers["0"].attn.attend.pattern.dense_mask(16, heads=4) for s in model.stages]
    for t in (0, 1):
        rank = copy.deepcopy(model)
        assert shard_attention_heads(rank, 2, t) == 2
        for stage, mask in zip(rank.stages, masks):
            attn = stage.layers["0"].attn
            assert attn.heads == 2 and torch.equal(attn.attend.pattern.dense_mask(16, heads=2), mask[2 * t:2 * t + 2])
