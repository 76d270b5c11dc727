"""Shared pieces of the multi-rank tests: a small corpus, and tiny training runs started through the real
launchers (torchrun, deepspeed) on CPU with gloo, compared against one single-rank baseline run."""
import os
import subprocess
import sys
from pathlib import Path

from terrabyte.data_pipeline.basics.system import free_port

import pytest

from tests.unit.test_train import TINY, scalars

# The same global batch (4 sequences) however the ranks split it; checkpoints every 6 steps. Chunks of
# 16 patches: every layout runs its lower stages in several recomputed chunks (2 per 128-byte row).
RUN = ["--config", "tiny", *TINY, "--train.micro_batch", "2", "--train.global_batch", "4",
       "--train.eval_interval", "6", "--checkpoint.interval", "6", "--model.chunk_bytes", "64"]
# fp32 on CPU: layouts differ only in the order of reductions
REL = 1e-4


def launch(run_dir: Path, shards: Path, ranks: int, *overrides: str, steps: int = 6, launcher: str = "torchrun",
           check: bool = True, timeout: int = 300) -> subprocess.CompletedProcess:
    """``terrabyte.pretrain`` on ``ranks`` processes; a world of one is a plain process."""
    args = [*RUN, "--data.path", str(shards), "--run.dir", str(run_dir), "--train.steps", str(steps), *overrides]
    if ranks == 1:
        cmd = [sys.executable, "-m", "terrabyte.pretrain", *args]
    elif launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
               "-m", "terrabyte.pretrain", *args]
    elif launcher == "deepspeed":
        # as any DeepSpeed script is started: the launcher passes each rank --local_rank=N
        cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(ranks),
               "--master_port", str(free_port()), "--module", "terrabyte.pretrain", *args]
    else:
        raise ValueError(launcher)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}: {' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def losses(run_dir: Path) -> dict[int, float]:
    return scalars(run_dir, "train/loss")


def assert_losses_match(got: dict, want: dict, steps, rel: float = REL) -> None:
    for step in steps:
        assert got[step] == pytest.approx(want[step], rel=rel), (step, got[step], want[step])


@pytest.fixture(scope="session")
def shards(tmp_path_factory):
    from terrabyte.data_pipeline.write.builder import build_shards
    from terrabyte.data_pipeline.write.config import BuildConfig

    src = tmp_path_factory.mktemp("corpus")
    for i in range(30):
        (src / f"m{i}.txt").write_bytes(bytes(range(256)) * 3 + f"document {i} ".encode() * 50)
    out = tmp_path_factory.mktemp("shards")
    build_shards(BuildConfig(inputs=[str(src)], val_fraction=0.2), str(out), progress=False)
    return out


@pytest.fixture(scope="session")
def baseline(tmp_path_factory, shards):
    """One rank, ZeRO-3, 12 steps (checkpoints at 6 and 12): the reference every layout must match."""
    run = tmp_path_factory.mktemp("baseline") / "run"
    launch(run, shards, 1, steps=12)
    return run
