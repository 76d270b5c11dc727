"""Launcher commands, hostfile checks and SLURM job scripts as rendered (fast, nothing started)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from terrabyte.launch import cli
from terrabyte.launch.launchers import (
    Host,
    LaunchSpec,
    build_command,
    check_allocation,
    is_trainer,
    parse_hostfile,
)
from terrabyte.launch.slurm import JobSpec, render, time_limit_seconds

PY = "/venv/bin/python"


def _spec(**kw) -> LaunchSpec:
    kw.setdefault("python", PY)
    kw.setdefault("trainer_args", ["--config", "tiny"])
    return LaunchSpec(**kw)


def _two_hosts(tmp_path, text="# two nodes\nnode-a slots=8\n\nnode-b slots=8  # spare\n"):
    path = tmp_path / "hostfile"
    path.write_text(text)
    return path, parse_hostfile(path)


# --------------------------------------------------------------------------- hostfiles


def test_hostfile_parses_hosts_slots_and_skips_comments(tmp_path):
    _, hosts = _two_hosts(tmp_path)
    assert hosts == [Host("node-a", 8, 2), Host("node-b", 8, 4)]


@pytest.mark.parametrize("line", ["node-b slot=8", "node-b", "node-b slots=eight", "node-b slots=8 extra"])
def test_hostfile_bad_line_names_file_and_line(tmp_path, line):
    path = tmp_path / "hostfile"
    path.write_text(f"# nodes\nnode-a slots=8\n{line}\n")
    with pytest.raises(ValueError) as err:
        parse_hostfile(path)
    assert str(err.value) == f"hostfile {path} line 3: expected 'HOST slots=N', got {line!r}"


def test_hostfile_duplicate_empty_and_zero_slots(tmp_path):
    path = tmp_path / "hostfile"
    path.write_text("a slots=2\nb slots=2\na slots=2\n")
    with pytest.raises(ValueError, match=r"line 3: host 'a' already listed on line 1"):
        parse_hostfile(path)
    path.write_text("# nothing\n\n")
    with pytest.raises(ValueError, match="lists no hosts"):
        parse_hostfile(path)
    path.write_text("a slots=0\n")
    with pytest.raises(ValueError, match="line 1: slots must be at least 1"):
        parse_hostfile(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        parse_hostfile(tmp_path / "missing")


def test_node_count_must_match_hostfile_and_slots(tmp_path):
    path, hosts = _two_hosts(tmp_path)
    with pytest.raises(ValueError, match=r"lists 2 host\(s\) but --nodes is 3"):
        build_command("deepspeed", _spec(nodes=3, procs_per_node=8, hosts=hosts, hostfile=str(path)))
    with pytest.raises(ValueError, match=r"line 2: host 'node-a' has slots=8, fewer than --gpus-per-node 16"):
        build_command("deepspeed", _spec(nodes=2, procs_per_node=16, hosts=hosts, hostfile=str(path)))


def test_node_count_must_match_slurm_allocation():
    check_allocation(2, {"SLURM_JOB_NUM_NODES": "2"})
    check_allocation(2, {})  # outside SLURM nothing to compare
    with pytest.raises(ValueError, match=r"--nodes 4 does not match this SLURM allocation of 2 node\(s\)"):
        check_allocation(4, {"SLURM_JOB_NUM_NODES": "2"})


def test_cli_reports_bad_hostfile_in_one_line(tmp_path, capsys):
    path = tmp_path / "hosts"
    path.write_text("node-a slots=8\nnode-b:8\n")
    code = cli.main(["launch", "--nodes", "2", "--hostfile", str(path), "--", "--config", "tiny"])
    err = capsys.readouterr().err
    assert code == 2
    assert err == f"terrabyte: error: hostfile {path} line 2: expected 'HOST slots=N', got 'node-b:8'\n"


# --------------------------------------------------------------------------- commands


def test_deepspeed_commands(tmp_path):
    assert build_command("deepspeed", _spec(procs_per_node=2, master_port=1234)) == [
        "deepspeed", "--num_gpus", "2", "--master_port", "1234", "--no_local_rank",
        "--module", "terrabyte.pretrain", "--config", "tiny",
    ]
    path, hosts = _two_hosts(tmp_path)
    assert build_command("deepspeed", _spec(nodes=2, procs_per_node=8, hosts=hosts, hostfile=str(path))) == [
        "deepspeed", "--hostfile", str(path), "--num_nodes", "2", "--master_addr", "node-a",
        "--num_gpus", "8", "--master_port", "29500", "--no_local_rank", "--module", "terrabyte.pretrain",
        "--config", "tiny",
    ]
    # SLURM: each node starts its own ranks, no ssh
    cmd = build_command("deepspeed", _spec(nodes=2, procs_per_node=8, hosts=hosts, hostfile=str(path), node_rank=1))
    assert cmd[cmd.index("--no_ssh") + 1: cmd.index("--no_ssh") + 3] == ["--node_rank", "1"]
    # one host in a hostfile: DeepSpeed would otherwise ssh to it
    one = tmp_path / "one"
    one.write_text("localhost slots=2\n")
    cmd = build_command("deepspeed", _spec(procs_per_node=2, hosts=parse_hostfile(one), hostfile=str(one)))
    assert "--no_ssh_check" in cmd and cmd[cmd.index("--master_addr") + 1] == "localhost"
    with pytest.raises(ValueError, match="needs --hostfile"):
        build_command("deepspeed", _spec(nodes=2, procs_per_node=8))


def test_torchrun_commands_have_finite_rendezvous(tmp_path):
    assert build_command("torchrun", _spec(procs_per_node=2, rdzv_timeout=120)) == [
        "torchrun", "--nnodes", "1", "--nproc-per-node", "2", "--standalone",
        "--rdzv-conf", "join_timeout=120,read_timeout=60", "--max-restarts", "0",
        "-m", "terrabyte.pretrain", "--config", "tiny",
    ]
    cmd = build_command("torchrun", _spec(nodes=4, procs_per_node=8, master_addr="n0", master_port=7000, rdzv_id="42"))
    assert cmd[:13] == [
        "torchrun", "--nnodes", "4", "--nproc-per-node", "8", "--rdzv-backend", "c10d",
        "--rdzv-endpoint", "n0:7000", "--rdzv-id", "42", "--rdzv-conf", "join_timeout=300,read_timeout=60",
    ]
    with pytest.raises(ValueError, match="needs --master-addr or --hostfile"):
        build_command("torchrun", _spec(nodes=2, procs_per_node=8))


def test_mpirun_commands(tmp_path):
    assert build_command("mpirun", _spec(procs_per_node=2, master_port=1234)) == [
        "mpirun", "-n", "2", "-genv", "MASTER_PORT", "1234", PY, "-m", "terrabyte.pretrain", "--config", "tiny",
    ]
    path, hosts = _two_hosts(tmp_path)
    spec = _spec(nodes=2, procs_per_node=4, hosts=hosts, hostfile=str(path))
    assert build_command("mpirun", spec)[:8] == ["mpirun", "-n", "8", "-hosts", "node-a,node-b", "-ppn", "4", "-genv"]
    spec.mpi_flavor = "openmpi"
    assert build_command("mpirun", spec)[:7] == ["mpirun", "-n", "8", "--host", "node-a:4,node-b:4", "--npernode", "4"]


def test_count_errors():
    with pytest.raises(ValueError, match="--gpus-per-node must be at least 1, got 0"):
        build_command("torchrun", _spec(procs_per_node=0))
    with pytest.raises(ValueError, match=r"--node-rank 2 is outside 0..1"):
        build_command("torchrun", _spec(nodes=2, procs_per_node=1, master_addr="n0", node_rank=2))


def test_unresolvable_master_stops_before_any_rank():
    result = subprocess.run(
        [sys.executable, "-m", "terrabyte.launch.cli", "launch", "--nodes", "2", "--launcher", "torchrun",
         "--master-addr", "no-such-host.invalid", "--node-rank", "1", "--run", "--", "--config", "tiny"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert "terrabyte: error: master address 'no-such-host.invalid' does not resolve" in result.stderr
    assert "torchrun" not in result.stderr  # nothing was started


def test_trainer_processes_are_told_from_launchers():
    assert is_trainer(["python", "-u", "-m", "terrabyte.pretrain", "--config", "tiny"])
    assert is_trainer(["/v/bin/python3", "-mterrabyte.pretrain"])
    assert not is_trainer(["python", "/v/bin/torchrun", "--nnodes", "1", "-m", "terrabyte.pretrain"])
    assert not is_trainer(["python", "-u", "-m", "deepspeed.launcher.launch", "--module", "terrabyte.pretrain"])
    assert not is_trainer(["python", "-m", "terrabyte.launch.launchers", "torchrun", "-m", "terrabyte.pretrain"])
    assert not is_trainer(["python", "-c", "pass", "-m", "terrabyte.pretrain"])


# --------------------------------------------------------------------------- SLURM scripts


def _job(**kw) -> JobSpec:
    base = dict(nodes=4, gpus_per_node=8, time="1-00:00:00", partition="gpu", config="tiny", run_dir="/runs/a",
                venv="/venv", workdir="/work", log_dir="/runs/a/slurm", overrides=["--train.steps", "100"])
    base.update(kw)
    return JobSpec(**base)


def test_slurm_script_counts_come_from_one_source(tmp_path):
    text = render(_job(signal_seconds=600))
    lines = text.splitlines()
    for expected in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                     "#SBATCH --time=\"1-00:00:00\"", "#SBATCH --partition=\"gpu\"", "#SBATCH --requeue",
                     "#SBATCH --signal=B:USR1@600", "#SBATCH --output=\"/runs/a/slurm/%x-%j.out\"",
                     "TB_NODES=4", "TB_PROCS_PER_NODE=8", "TB_REQUEUE=1", "TB_VENV=/venv",
                     "TB_TRAIN_ARGS=(--config tiny --run.dir /runs/a --train.steps 100)"):
        assert expected in lines, expected
    assert "{{" not in text
    assert not any(line.startswith("#SBATCH --array") for line in lines)
    script = tmp_path / "job.sh"
    script.write_text(text)
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0


def test_slurm_script_cpu_ranks_and_array():
    lines = render(_job(gpus_per_node=0, tasks_per_node=2, array=5, nodes=1)).splitlines()
    assert "#SBATCH --cpus-per-task=2" in lines
    assert "TB_PROCS_PER_NODE=2" in lines
    assert "#SBATCH --array=1-5%1" in lines
    assert '#SBATCH --output="/runs/a/slurm/%x-%A_%a.out"' in lines
    assert "TB_REQUEUE=0" in lines  # chained array tasks resume instead of requeueing
    assert not any(line.startswith("#SBATCH --gpus-per-node") for line in lines)


@pytest.mark.parametrize("kw, message", [
    (dict(gpus_per_node=0), "--gpus-per-node 0 needs --tasks-per-node N"),
    (dict(tasks_per_node=4), "--tasks-per-node 4 differs from --gpus-per-node 8"),
    (dict(time="4h"), "--time '4h' is not a SLURM time"),
    (dict(time="04:00", signal_seconds=300), "--requeue-signal-seconds 300 is not shorter than --time 04:00"),
    (dict(overrides=["--run.dir", "/x"]), "give --run.dir through `terrabyte slurm --run-dir`"),
    (dict(launcher="mpirun"), "--launcher 'mpirun' is not one of torchrun, deepspeed"),
])
def test_slurm_bad_input(kw, message):
    with pytest.raises(ValueError) as err:
        render(_job(**kw))
    assert message in str(err.value)


@pytest.mark.parametrize("text, seconds", [
    ("90", 5400), ("10:30", 630), ("04:00:00", 14400), ("2-0", 172800), ("1-12:30", 131400), ("1-00:00:10", 86410),
])
def test_slurm_time_formats(text, seconds):
    assert time_limit_seconds(text) == seconds
