"""AutoTP tensor parallelism (TP=2) on 2 real ranks with ZeRO-1 and ZeRO-3: the projections really are
split column/row-wise, the losses equal the 1-rank run, and the export gathers whole weights."""
import pytest
import torch

from .conftest import assert_losses_match, launch, losses, scalars

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("zero_stage", [1, 3])
def test_tp2_matches_tp1(tmp_path, shards, baseline, zero_stage):
    from safetensors.torch import load_file

    run = tmp_path / "tp"
    proc = launch(run, shards, 2, "--parallel.tensor_parallel", "2", "--parallel.zero_stage", str(zero_stage))
    assert "data 1 x pipeline 1 x tensor 2" in proc.stderr
    assert_losses_match(losses(run), losses(baseline), range(1, 7))
    assert scalars(run, "val/bits_per_byte")[6] == pytest.approx(scalars(baseline, "val/bits_per_byte")[6], rel=1e-4)

    # each tensor-parallel rank saved its own slices: q by output rows (heads), out by input columns
    ckpt = run / "checkpoints" / "step6"
    q, out, down = "stages.0.layers.0.attn.to_q.weight", "stages.0.layers.0.attn.to_out.weight", \
        "stages.0.layers.0.ff.down_proj.weight"
    full = load_file(str(run / "model.safetensors"))
    # the checkpoint's slices merged offline, in this process, with weights-only loads
    from terrabyte.pretrain.checkpoint.weights import load_state

    _, consolidated = load_state(run / "checkpoints")
    assert set(consolidated) == set(full) and all(torch.equal(consolidated[k], full[k]) for k in full)
    assert full[q].shape == (2 * 16, 64) and full[out].shape == (64, 2 * 16)  # heads 2 x dim_head 16
    for tp_rank in (0, 1):
        if zero_stage == 1:
            module = torch.load(ckpt / f"mp_rank_{tp_rank:02d}_model_states.pt", weights_only=False)["module"]
            assert torch.equal(module[q], full[q].chunk(2, dim=0)[tp_rank])
            assert torch.equal(module[out], full[out].chunk(2, dim=1)[tp_rank])
            assert torch.equal(module[down], full[down].chunk(2, dim=1)[tp_rank])
        else:
            shapes = torch.load(ckpt / f"zero_pp_rank_0_mp_rank_{tp_rank:02d}_model_states.pt",
                                weights_only=False)["param_shapes"]
            merged = {k: v for group in shapes for k, v in group.items()}
            assert tuple(merged[q]) == (16, 64) and tuple(merged[out]) == (64, 16)
    plain = load_file(str(baseline / "model.safetensors"))
    assert {k: v.shape for k, v in full.items()} == {k: v.shape for k, v in plain.items()}
