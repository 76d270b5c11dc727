"""deepspeed (hostfile naming localhost), torchrun and mpirun each run 2 CPU ranks of a tiny model
through ``terrabyte launch --run``. A stop signal mid-run (SIGUSR1 or SIGTERM, to the launch
process or straight to one rank) gives a complete checkpoint on all ranks and exit 75; the same
command then resumes from it and finishes with a final checkpoint and the loss in TensorBoard."""
from __future__ import annotations

import math
import signal
import subprocess
import sys

import pytest

from terrabyte.data_pipeline.basics.system import free_port

from .common import (
    EXIT_PREEMPTED,
    checkpoint_complete,
    child_env,
    latest_step,
    resumed_step,
    stopped_step,
    tensorboard_scalars,
    tiny_args,
    wait_for,
)

STEPS = 60
CHECKPOINT_INTERVAL = 4


def _launch_command(launcher: str, tmp_path, run_dir, shards) -> list[str]:
    cmd = [sys.executable, "-m", "terrabyte.launch.cli", "launch", "--launcher", launcher,
           "--gpus-per-node", "2", "--master-port", str(free_port()), "--run"]
    if launcher == "deepspeed":
        hostfile = tmp_path / "hostfile"
        hostfile.write_text("# the one node of this test\nlocalhost slots=2\n")
        cmd += ["--hostfile", str(hostfile)]
    args = tiny_args(shards, steps=STEPS, checkpoint_interval=CHECKPOINT_INTERVAL, eval_interval=30)
    return cmd + ["--", *args, "--run.dir", str(run_dir)]


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        from terrabyte.launch.launchers import _kill_tree

        _kill_tree(proc.pid)
        proc.wait(timeout=30)


def _send_stop(proc: subprocess.Popen, how: str) -> None:
    if how == "USR1 to launch":
        proc.send_signal(signal.SIGUSR1)  # `terrabyte launch --run` forwards it to the ranks
    elif how == "TERM to launch":
        proc.send_signal(signal.SIGTERM)
    else:  # one rank only: the ranks agree on stopping at the next step (all-reduce)
        from terrabyte.launch.launchers import trainer_processes

        ranks = wait_for(lambda: trainer_processes(proc.pid), 30, "the training processes", proc=proc)
        assert len(ranks) == 2
        max(ranks, key=lambda p: p.pid).send_signal(signal.SIGUSR1)


@pytest.mark.slow
@pytest.mark.parametrize("launcher, how", [
    ("deepspeed", "USR1 to launch"),
    ("torchrun", "TERM to launch"),
    ("mpirun", "USR1 to one rank"),
])
def test_two_ranks_stop_on_signal_then_resume(launcher, how, tiny_shards, tmp_path):
    run_dir = tmp_path / "run"
    cmd = _launch_command(launcher, tmp_path, run_dir, tiny_shards)

    first_log = tmp_path / "first.log"
    with open(first_log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=child_env(), cwd=tmp_path)
        try:
            wait_for(lambda: latest_step(run_dir), 180, "the first checkpoint", proc=proc)
            _send_stop(proc, how)
            code = proc.wait(timeout=120)
        finally:
            _kill(proc)
    text = first_log.read_text()
    assert code == EXIT_PREEMPTED, text[-4000:]
    stop = stopped_step(text)
    assert CHECKPOINT_INTERVAL <= stop < STEPS
    # `latest` names the stop checkpoint, and every rank's shard of it is there
    assert latest_step(run_dir) == stop
    assert checkpoint_complete(run_dir, stop, world=2)
    assert not (run_dir / "checkpoints" / "latest.tmp").exists()

    second = subprocess.run(cmd, capture_output=True, text=True, env=child_env(), cwd=tmp_path, timeout=240)
    text = second.stdout + second.stderr
    assert second.returncode == 0, text[-4000:]
    assert resumed_step(text) == stop
    assert latest_step(run_dir) == STEPS
    assert checkpoint_complete(run_dir, STEPS, world=2)

    losses = tensorboard_scalars(run_dir / "tensorboard", "train/loss")
    assert sorted({step for step, _ in losses}) == list(range(1, STEPS + 1))
    values = [value for _, value in sorted(losses)]
    assert all(math.isfinite(v) and v > 0 for v in values)
    assert sum(values[-5:]) < sum(values[:5]), values
