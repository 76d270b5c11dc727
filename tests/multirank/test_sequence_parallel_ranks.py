"""DeepSpeed-Ulysses sequence parallelism (SP=2) on 2 real ranks: the sharded forward and backward equal
the single-rank model (outputs, loss, every gradient), activations per rank halve, and ZeRO-3 training
with SP=2 follows the 1-rank loss curve."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import assert_losses_match, launch, losses, scalars

pytestmark = pytest.mark.slow


def test_outputs_and_gradients_equal_the_single_rank_model():
    script = Path(__file__).with_name("sp_check.py")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)],
        capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    ok = [line for line in proc.stdout.splitlines() if line.startswith("SP_CHECK_OK")]
    # 2 ranks x (dense with and without activation checkpointing, per-head sparse, 3-stage dilated, space and
    # entropy patches)
    assert len(ok) == 12, proc.stdout


def test_zero3_training_with_sp2_matches_one_rank(tmp_path, shards, baseline):
    run = tmp_path / "sp"
    proc = launch(run, shards, 2, "--parallel.sequence_parallel", "2")
    assert "data 1 x pipeline 1 x tensor 1 x sequence 2" in proc.stderr
    assert_losses_match(losses(run), losses(baseline), range(1, 7))
    assert scalars(run, "val/bits_per_byte")[6] == pytest.approx(scalars(baseline, "val/bits_per_byte")[6], rel=1e-4)
