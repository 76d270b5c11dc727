"""The job script from ``terrabyte slurm``, submitted to a real one-node SLURM cluster on localhost.

2 CPU ranks per job (torchrun under one srun task). The preemption test sends USR1 to the batch
shell exactly as ``--signal=B:USR1@S`` does near the time limit (``scancel --batch --signal=USR1``),
so it need not wait for SLURM's once-a-minute time-limit check.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from .common import (
    checkpoint_complete,
    child_env,
    latest_step,
    resumed_step,
    stopped_step,
    tensorboard_scalars,
    tiny_args,
    wait_for,
)

pytestmark = pytest.mark.slow


def _slurm_cli(cluster, tmp_path: Path, run_dir: Path, *flags: str, overrides=(), submit=True):
    cmd = [
        sys.executable, "-m", "terrabyte.launch.cli", "slurm",
        "--nodes", "1", "--gpus-per-node", "0", "--tasks-per-node", "2",
        "--time", "10:00", "--partition", "debug", "--config", "tiny",
        "--run-dir", str(run_dir), "--requeue-signal-seconds", "60", *flags,
    ]
    if submit:
        cmd.append("--submit")
    cmd += ["--", *overrides]
    env = child_env(SLURM_CONF=cluster.env["SLURM_CONF"])
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def _job_log(run_dir: Path, job_id: int) -> str:
    path = run_dir / "slurm" / f"terrabyte-{job_id}.out"
    return path.read_text(errors="replace") if path.exists() else ""


def _finish(cluster, job_id: int, run_dir: Path, states=("COMPLETED",), timeout=240.0) -> dict:
    try:
        return cluster.wait_state(job_id, set(states), timeout=timeout)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n--- job log ---\n{_job_log(run_dir, job_id)[-5000:]}\n"
                             f"--- slurmd ---\n{cluster.log_tail('slurmd')}") from None


def test_job_script_trains_to_completion(slurm_cluster, tiny_shards, tmp_path):
    """`deepspeed --no_ssh` under srun here; the preemption test below runs torchrun."""
    run_dir = tmp_path / "run"
    overrides = tiny_args(tiny_shards, steps=6, checkpoint_interval=3, config=False)
    job_id = int(_slurm_cli(slurm_cluster, tmp_path, run_dir, "--launcher", "deepspeed", overrides=overrides))

    info = _finish(slurm_cluster, job_id, run_dir)
    log = _job_log(run_dir, job_id)
    assert info["ExitCode"] == "0:0", log[-3000:]
    assert info["Restarts"] == "0"
    assert "training finished" in log
    hostfile = run_dir / "slurm" / f"hostfile-{job_id}"
    assert f"deepspeed --hostfile {hostfile} --num_nodes 1 --master_addr localhost --no_ssh --node_rank 0 " \
           "--num_gpus 2" in log
    assert latest_step(run_dir) == 6
    assert checkpoint_complete(run_dir, 6, world=2)
    losses = tensorboard_scalars(run_dir / "tensorboard", "train/loss")
    assert [step for step, _ in losses] == [1, 2, 3, 4, 5, 6]
    assert hostfile.read_text() == "localhost slots=2\n"


def test_preempted_job_checkpoints_requeues_and_resumes(slurm_cluster, tiny_shards, tmp_path):
    run_dir = tmp_path / "run"
    steps = 60
    overrides = tiny_args(tiny_shards, steps=steps, checkpoint_interval=4, eval_interval=30, config=False)
    job_id = int(_slurm_cli(slurm_cluster, tmp_path, run_dir, overrides=overrides))

    _finish(slurm_cluster, job_id, run_dir, states=("RUNNING",), timeout=60)
    wait_for(lambda: latest_step(run_dir), 180, "the first checkpoint of the job")
    slurm_cluster.run("scancel", "--batch", "--signal=USR1", str(job_id))

    # A requeued job becomes eligible again after the credential lifetime (cred_expire: 120 s by
    # default, 10 s on the test cluster), then starts from the top of the script.
    def restarted():
        info = slurm_cluster.job_info(job_id)
        return info.get("Restarts") == "1" and info.get("JobState") in ("RUNNING", "COMPLETING", "COMPLETED")

    try:
        wait_for(restarted, 120, "the requeued job to start", poll=0.5)
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {slurm_cluster.job_info(job_id)}\n{slurm_cluster.log_tail('slurmctld')}") from None
    info = _finish(slurm_cluster, job_id, run_dir)
    log = _job_log(run_dir, job_id)
    assert info["ExitCode"] == "0:0", log[-3000:]
    assert info["Restarts"] == "1"

    first, _, second = log.partition(f"job {job_id} restart 1 ")
    assert second, "the requeued run did not start:\n" + log[-3000:]
    stop = stopped_step(first)
    assert 4 <= stop < steps
    assert f"requeueing job {job_id}" in first
    assert "torchrun --nnodes 1 --nproc-per-node 2 --rdzv-backend c10d --rdzv-endpoint localhost:" in first
    assert resumed_step(second) == stop
    assert "training finished" in second
    assert latest_step(run_dir) == steps
    assert checkpoint_complete(run_dir, steps, world=2)
    losses = tensorboard_scalars(run_dir / "tensorboard", "train/loss")
    assert sorted({step for step, _ in losses}) == list(range(1, steps + 1))


def test_missing_venv_stops_before_any_rank(slurm_cluster, tiny_shards, tmp_path):
    run_dir = tmp_path / "run"
    missing = tmp_path / "no-such-venv"
    overrides = tiny_args(tiny_shards, config=False)
    job_id = int(_slurm_cli(slurm_cluster, tmp_path, run_dir, "--venv", str(missing), overrides=overrides))

    info = _finish(slurm_cluster, job_id, run_dir, states=("FAILED",), timeout=60)
    log = _job_log(run_dir, job_id)
    assert info["ExitCode"] == "2:0"
    assert f"virtual environment {missing} not found on" in log
    assert "no rank was started" in log
    assert "terrabyte launch" not in log and not (run_dir / "checkpoints").exists()


def test_node_count_must_match_allocation(slurm_cluster, tiny_shards, tmp_path):
    run_dir = tmp_path / "run"
    overrides = tiny_args(tiny_shards, config=False)
    script = Path(_slurm_cli(slurm_cluster, tmp_path, run_dir, "--nodes", "2", overrides=overrides, submit=False))
    assert "#SBATCH --nodes=2" in script.read_text()
    # the allocation gets 1 node (command-line sbatch options beat #SBATCH lines)
    job_id = slurm_cluster.sbatch(script, "--nodes=1")

    info = _finish(slurm_cluster, job_id, run_dir, states=("FAILED",), timeout=60)
    log = _job_log(run_dir, job_id)
    assert info["ExitCode"] == "2:0"
    assert "the allocation has 1 node(s) but this script was written for 2" in log
    assert not (run_dir / "checkpoints").exists()

    # `terrabyte launch` checks the same inside an allocation
    result = slurm_cluster.run(
        "srun", "--nodes=1", sys.executable, "-m", "terrabyte.launch.cli", "launch", "--nodes", "2",
        "--launcher", "torchrun", "--master-addr", "localhost", check=False,
    )
    assert result.returncode == 2
    assert "--nodes 2 does not match this SLURM allocation of 1 node(s)" in result.stderr


def test_job_values_reach_sbatch_whole(slurm_cluster, tiny_shards, tmp_path):
    """Values with spaces, quotes and '#' are one #SBATCH argument each (sbatch's own quoting), and the
    job is held, so nothing runs."""
    import re

    run_dir = tmp_path / "run dir"
    comment = 'a "quoted" #value'
    script = Path(_slurm_cli(slurm_cluster, tmp_path, run_dir, f"--sbatch-option=--comment={comment}",
                             "--sbatch-option=--hold", overrides=tiny_args(tiny_shards, config=False), submit=False))
    job_id = slurm_cluster.sbatch(script)
    try:
        shown = slurm_cluster.run("squeue", "-h", "-j", str(job_id), "-o", "%k|%P|%j").stdout.strip()
        assert shown == f"{comment}|debug|terrabyte", shown
        details = slurm_cluster.scontrol("show", "job", str(job_id)).stdout
        assert re.search(r"StdOut=(.*)$", details, re.M).group(1) == f"{run_dir}/slurm/terrabyte-{job_id}.out"
    finally:
        slurm_cluster.run("scancel", str(job_id), check=False)
