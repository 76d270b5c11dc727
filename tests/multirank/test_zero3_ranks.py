"""ZeRO-3 over 2 real ranks (torchrun, gloo) against 1 rank on the same global batch."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.unit.test_train import TINY, scalars

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from terrabyte.data_pipeline.builder import build_shards

    src = tmp_path_factory.mktemp("corpus")
    for i in range(30):
        (src / f"m{i}.txt").write_bytes(bytes(range(256)) * 3 + f"document {i} ".encode() * 50)
    out = tmp_path_factory.mktemp("shards")
    build_shards([str(src)], str(out), val_fraction=0.2, progress=False)
    return out


def train(run_dir: Path, shards: Path, ranks: int, micro_batch: int):
    args = ["--config", "tiny", "--data.path", str(shards), *TINY, "--run.dir", str(run_dir),
            "--train.steps", "6", "--train.eval_interval", "6", "--checkpoint.interval", "6",
            "--train.micro_batch", str(micro_batch), "--train.global_batch", "4"]
    if ranks == 1:
        cmd = [sys.executable, "-m", "terrabyte.pretrain", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
               "-m", "terrabyte.pretrain", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-5000:]
    return scalars(run_dir, "train/loss"), scalars(run_dir, "val/bits_per_byte")


def test_two_ranks_match_one(tmp_path, shards):
    one_loss, one_val = train(tmp_path / "one", shards, ranks=1, micro_batch=2)   # 2 micro-batches accumulated
    two_loss, two_val = train(tmp_path / "two", shards, ranks=2, micro_batch=2)   # 1 micro-batch per rank
    assert sorted(one_loss) == sorted(two_loss) == list(range(1, 7))
    # fp32 on CPU; only the order of the gradient reductions differs between the two layouts
    for step in one_loss:
        assert two_loss[step] == pytest.approx(one_loss[step], rel=1e-4), step
    assert two_val[6] == pytest.approx(one_val[6], rel=1e-4)
    # ZeRO-3 really sharded: each rank wrote its own partition of the optimizer state
    parts = sorted(p.name for p in (tmp_path / "two" / "checkpoints" / "step6").glob("*optim_states.pt"))
    assert len(parts) == 2, parts
