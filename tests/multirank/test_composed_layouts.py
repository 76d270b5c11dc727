"""Parallel layouts that compose, on 4 real CPU ranks against one rank: tensor x sequence parallelism
(AutoTP inside Ulysses groups, ZeRO-3 over the rest) with a dilated global pattern whose offsets follow
the global head index. Data x pipeline runs in tests/multirank/test_pipeline_ranks.py (the pipeline
resumes as 2 replicas); what DeepSpeed 0.19 cannot combine stops before start
(tests/unit/test_parallel_config.py)."""
import pytest

from safetensors.torch import load_file

from .conftest import assert_losses_match, launch, losses, scalars

pytestmark = pytest.mark.slow

STEPS = 3
# 4 heads of 8: one head per rank at tensor 2 x sequence 2; LongNet offsets head % 4 tell them apart
FOUR_HEADS = ["--model.heads", "4", "--model.dim_head", "8",
              "--model.attention", "[{kind: sparse, pattern: {local: 4, dilated: [[16, 4]], block: 16}}, null]",
              "--train.sample_bytes", "0"]  # no sample: one fewer gather of the sharded weights


def test_tensor_x_sequence_matches_one_rank(tmp_path, shards):
    one, four = tmp_path / "one", tmp_path / "tp2sp2"
    launch(one, shards, 1, *FOUR_HEADS, steps=STEPS)
    proc = launch(four, shards, 4, *FOUR_HEADS, "--parallel.tensor_parallel", "2", "--parallel.sequence_parallel", "2",
                  steps=STEPS, timeout=600)
    assert "data 1 x pipeline 1 x tensor 2 x sequence 2" in proc.stderr
    assert_losses_match(losses(four), losses(one), range(1, STEPS + 1))
    assert scalars(four, "val/bits_per_byte")[STEPS] == pytest.approx(scalars(one, "val/bits_per_byte")[STEPS], rel=1e-4)
    # the export gathers the tensor slices and ZeRO-3 shards into the plain model's weights
    got, want = (load_file(str(run / "model.safetensors")) for run in (four, one))
    assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in want.items()}
    worst = max((got[k] - want[k]).abs().max().item() for k in want)
    assert worst < 1e-3, worst  # 3 Adam steps of lr 3e-3 each: a wrong slice would be off by far more

