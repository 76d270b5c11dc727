"""ZeRO-3 over 2 real ranks (torchrun, gloo): the same losses as 1 rank on the same global batch; a
2-rank resume continues exactly; a 2-rank checkpoint resumes on 1 rank through DeepSpeed's universal
format (and refuses to without it); a damaged checkpoint stops with one line; the export and the raw
checkpoint generate the same bytes; the CPU-offload preset and bf16 train the same way."""
import shutil

import pytest

from tests.unit.test_train import generate_greedy

from .conftest import assert_losses_match, launch, losses, scalars

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(tmp_path_factory, shards):
    root = tmp_path_factory.mktemp("zero3")
    split, straight = root / "split", root / "straight"
    launch(split, shards, 2)  # steps 1-6, checkpoint at 6
    shutil.copytree(split, root / "at6")  # the 2-rank checkpoint, before the run goes on
    first_half = losses(split)
    resumed = launch(split, shards, 2, steps=12)
    launch(straight, shards, 2, steps=12)
    return {"root": root, "split": split, "straight": straight, "at6": root / "at6", "first_half": first_half,
            "resumed": resumed}


def copy_run(src, dst):
    shutil.copytree(src, dst)
    shutil.rmtree(dst / "tensorboard")
    return dst


def test_two_ranks_match_one(runs, baseline):
    two = runs["first_half"]
    assert sorted(two) == list(range(1, 7))
    assert_losses_match(two, losses(baseline), range(1, 7))
    assert scalars(runs["split"], "val/bits_per_byte")[6] == pytest.approx(
        scalars(baseline, "val/bits_per_byte")[6], rel=1e-4)
    # ZeRO-3 really sharded: each rank wrote its own partition of the optimizer state
    parts = sorted(p.name for p in (runs["at6"] / "checkpoints" / "step6").glob("*optim_states.pt"))
    assert parts == ["zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]


def test_two_rank_resume_is_exact(runs):
    assert "resumed from step 6" in runs["resumed"].stderr
    resumed, straight = losses(runs["split"]), losses(runs["straight"])
    assert_losses_match(resumed, straight, range(7, 13), rel=1e-6)


def test_universal_checkpoint_resumes_on_one_rank(runs, baseline, shards):
    run = copy_run(runs["at6"], runs["root"] / "to_one")
    proc = launch(run, shards, 1, steps=12)
    assert "through a universal checkpoint (2 rank(s) (data 2" in proc.stderr
    assert (run / "checkpoints" / "step6" / "universal" / "zero").is_dir()
    # weights, Adam moments and step, schedule and data position all carried over
    assert_losses_match(losses(run), losses(baseline), range(7, 13))


def test_layout_change_without_conversion_is_refused(runs, shards):
    run = copy_run(runs["at6"], runs["root"] / "refused")
    proc = launch(run, shards, 1, "--checkpoint.universal", "false", steps=12, check=False)
    assert proc.returncode == 2
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("terrabyte: error: checkpoint") and "was written by 2 rank(s)" in line
    assert "drop --checkpoint.universal false" in line and "Traceback" not in proc.stderr


def test_truncated_checkpoint_file_is_one_line(runs, shards):
    run = copy_run(runs["at6"], runs["root"] / "truncated")
    optim = run / "checkpoints" / "step6" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    optim.write_bytes(optim.read_bytes()[:1000])
    proc = launch(run, shards, 2, steps=12, check=False)
    assert proc.returncode != 0
    # both ranks stop with the same line (no hang, no traceback of ours; torchrun adds its own report)
    lines = [l for l in proc.stderr.splitlines() if l.startswith("terrabyte: error:")]
    assert len(lines) == 2 and lines[0] == lines[1], proc.stderr[-3000:]
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt has 1000 of" in lines[0] and "truncated" in lines[0]
    assert "[rank0]: Traceback" not in proc.stderr and "[rank1]: Traceback" not in proc.stderr


def test_export_matches_checkpoint_and_generates(runs):
    import torch
    from safetensors.torch import load_file

    from terrabyte.pretrain.checkpoint.weights import load_state

    straight = runs["straight"]
    exported = load_file(str(straight / "model.safetensors"))
    _, consolidated = load_state(straight / "checkpoints")  # the 2 ZeRO-3 shards merged offline
    assert set(exported) == set(consolidated)
    for name, tensor in consolidated.items():
        assert torch.equal(exported[name], tensor), name
    outs = [generate_greedy(source, "document ") for source in (straight / "model.safetensors", straight / "checkpoints")]
    assert outs[0] == outs[1] and outs[0].startswith(b"document ") and len(outs[0]) > len(b"document \n")



def test_cpu_offload_matches(tmp_path, shards, baseline):
    # parameters and optimizer state in CPU memory, DeepSpeed's CPU Adam (compiled on first use, ~1 min)
    run = tmp_path / "offload"
    launch(run, shards, 2, "--parallel.offload", "cpu", timeout=600)
    assert_losses_match(losses(run), losses(baseline), range(1, 7))


def test_bf16_two_ranks_match_one(tmp_path, shards):
    import torch
    from safetensors.torch import load_file

    from terrabyte.pretrain.checkpoint.weights import load_state

    one, two = tmp_path / "one", tmp_path / "two"
    launch(one, shards, 1, "--train.precision", "bf16")
    launch(two, shards, 2, "--train.precision", "bf16")
    # bf16 keeps 8 bits of mantissa: 1e-2 is about two units in the last place at these losses
    assert_losses_match(losses(two), losses(one), range(1, 7), rel=1e-2)
    exported = load_file(str(two / "model.safetensors"))  # the bf16 weights the model ran with
    _, masters = load_state(two / "checkpoints")  # the fp32 master weights from the ZeRO shards
    assert {t.dtype for t in exported.values()} == {torch.bfloat16}
    assert {t.dtype for t in masters.values()} == {torch.float32}
    for name, master in masters.items():
        assert torch.equal(exported[name], master.to(torch.bfloat16)), name


def _build_rank(rank: int, port: int, out: str, source: str) -> None:
    """One of 2 ranks: the model built partitioned (engine.build_model), then gathered to rank 0."""
    import os

    import deepspeed
    import torch

    from terrabyte.pretrain.engine import engine as eng
    from terrabyte.pretrain.train.config import load_config
    from terrabyte.pretrain.parallel.layout import plan_layout

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    eng.init_distributed()
    result = {}
    for precision in ("fp32", "bf16"):
        cfg = load_config("tiny", [*BUILD, "--train.precision", precision])
        torch.manual_seed(cfg.run.seed)  # as the trainer seeds before building
        model = eng.build_model(cfg, plan_layout(cfg, 2, rank))
        after = torch.rand(4)
        # what this rank holds: its shard of each partitioned parameter, the whole of each small one
        # that ZeRO-3 keeps on every rank (stage3_param_persistence_threshold)
        held = sum(p.ds_numel if p.ds_persist else p.ds_tensor.numel() for p in model.parameters())
        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        result[precision] = {"state": state, "held": held, "after": after}
        if precision == "fp32":
            from terrabyte.pretrain.checkpoint.pretrained import init_from

            init_from(model, source)
            with deepspeed.zero.GatheredParameters(list(model.parameters())):
                result["init_from"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if rank == 0:
        torch.save(result, out)
    eng.barrier()


# 3 stages with grouped upper-stage embeddings (levels), rotary, dilated attention: every initialiser
BUILD = ["--model.dim", "256,48,32", "--model.depth", "2,1,1", "--model.max_seq_len", "16,4,4",
         "--model.dim_head", "16", "--model.heads", "2", "--train.micro_batch", "2", "--train.global_batch", "4",
         "--run.seed", "7"]


def test_partitioned_build_matches_one_rank(tmp_path):
    """Under ZeRO-3 no rank holds the whole model while it is built, and the same seed gives the same
    weights (and leaves the random generator where a one-rank build leaves it), in fp32 and bf16."""
    import torch
    import torch.multiprocessing as mp

    from terrabyte.data_pipeline.basics.system import free_port
    from terrabyte.pretrain.train.config import load_config
    from terrabyte.pretrain.model.terrabyte import TerraByte

    out, source = tmp_path / "gathered.pt", tmp_path / "trained"
    cfg = load_config("tiny", BUILD)
    torch.manual_seed(11)  # other weights than the build's: what --init-from copies into the shards
    trained = TerraByte(**cfg.model.kwargs())
    trained.save_pretrained(source)
    mp.spawn(_build_rank, args=(free_port(), str(out), str(source)), nprocs=2, join=True)
    results = torch.load(out, weights_only=False)
    torch.manual_seed(cfg.run.seed)
    plain = TerraByte(**cfg.model.kwargs())
    want = plain.state_dict()
    after = torch.rand(4)
    total = sum(p.numel() for p in plain.parameters())
    for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        got = results[precision]
        assert got["held"] < 0.6 * total
        assert set(got["state"]) == set(want)
        for name, tensor in want.items():
            # bf16: what DeepSpeed makes of the fp32 weights of a plain build when it wraps them
            assert torch.equal(got["state"][name], tensor.to(dtype)), (precision, name)
        assert torch.equal(got["after"], after), precision
    # --init-from into the partitioned fp32 model: every shard holds the trained weights
    for name, tensor in trained.state_dict().items():
        assert torch.equal(results["init_from"][name], tensor), name
