"""A real one-node SLURM cluster (munged + slurmctld + slurmd) on localhost, for tests.

    with LocalSlurm(tmp_dir) as cluster:
        job = cluster.sbatch(script)            # job id
        cluster.wait_state(job, {"COMPLETED"})   # polls `scontrol show job`, faster than sbatch --wait

Everything lives in its own state directory with its own munge socket and free ports, so it never
touches a system-wide SLURM; the daemons are stopped by the pids in their pid files. The Debian
packages (slurmctld, slurmd, slurm-client, munge) must be installed; without them `start` raises,
it does not skip, so CI cannot go green without running the cluster tests.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from terrabyte.data_pipeline.basics.system import free_port

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel")
TERMINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}

# cred_expire=10: a requeued job may start again after the job credential lifetime, 120 s by default;
# restarting earlier fails ("Job credential revoked"). sched_interval=2: pending jobs are looked at
# every 2 s instead of every 60 s.
SLURM_CONF = """\
ClusterName=terrabytetest
SlurmctldHost=localhost
SlurmUser={user}
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={d}/run/munge.socket,cred_expire=10
CredType=cred/munge
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/run/slurmctld.pid
SlurmdPidFile={d}/run/slurmd.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
KillWait=10
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory} State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


def _node_hardware() -> tuple[int, int]:
    """(CPUs, RealMemory MB) as slurmd itself detects them, so the node registers without draining."""
    out = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout
    cpus = int(re.search(r"\bCPUs=(\d+)", out).group(1))
    memory = int(re.search(r"\bRealMemory=(\d+)", out).group(1))
    return cpus, memory


class LocalSlurm:
    """``state_dir`` defaults to a fresh directory under /tmp, removed by ``stop`` if nothing failed.

    munged insists that every directory above its socket is world-executable, which pytest's 0700
    ``tmp_path`` is not: hence the default.
    """

    def __init__(self, state_dir: str | Path | None = None):
        self._own_dir = state_dir is None
        self.dir = Path(state_dir or tempfile.mkdtemp(prefix="terrabyte-slurm-"))
        self.env = dict(os.environ)
        self.cpus = 0

    # ------------------------------------------------------------------ lifecycle

    def start(self, timeout: float = 30.0) -> "LocalSlurm":
        try:
            self._start(timeout)
        except BaseException:
            self.stop(keep=True)  # no daemon left behind; the logs stay for the error message
            raise
        return self

    def _start(self, timeout: float) -> None:
        missing = [tool for tool in DAEMONS if shutil.which(tool) is None]
        if missing:
            raise RuntimeError(
                f"SLURM test cluster needs {', '.join(missing)}: "
                "apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge"
            )
        d = self.dir
        os.chmod(d, 0o755)
        for sub in ("munge", "run", "state", "spool", "log"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(d / "munge", 0o700)
        os.chmod(d / "run", 0o755)
        key = d / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        subprocess.run(
            ["munged", f"--socket={d}/run/munge.socket", f"--key-file={key}", f"--pid-file={d}/run/munged.pid",
             f"--log-file={d}/log/munged.log", f"--seed-file={d}/munge/munged.seed"],
            check=True, capture_output=True,
        )
        self.cpus, memory = _node_hardware()
        conf = d / "slurm.conf"
        conf.write_text(SLURM_CONF.format(
            d=d, user=_user(), ctld_port=free_port(), slurmd_port=free_port(), cpus=self.cpus, memory=memory,
        ))
        self.env["SLURM_CONF"] = str(conf)
        subprocess.run(["slurmctld", "-f", str(conf)], check=True, env=self.env, capture_output=True)
        subprocess.run(["slurmd", "-f", str(conf), "-N", "localhost"], check=True, env=self.env, capture_output=True)
        self._wait_node_idle(timeout)

    def _wait_node_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            r = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True, env=self.env) \
                if shutil.which("sinfo") else self.scontrol("show", "node", "localhost", check=False)
            state = r.stdout.strip()
            if "idle" in state.lower():
                return
            time.sleep(0.2)
        raise RuntimeError(f"SLURM node did not become idle in {timeout:.0f} s (state {state!r}); see {self.dir / 'log'}")

    def stop(self, keep: bool = False) -> None:
        """Cancel jobs (their steps are not children of slurmd), then stop the daemons by pid."""
        if "SLURM_CONF" in self.env:
            subprocess.run(["scancel", "--full", "--user", _user()], env=self.env, capture_output=True)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and self.squeue_ids():
                time.sleep(0.3)
        pids = [_pid_from(self.dir / "run" / f"{name}.pid") for name in ("slurmd", "slurmctld", "munged")]
        _terminate([pid for pid in pids if pid is not None])
        if self._own_dir and not keep:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "LocalSlurm":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ client commands

    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(list(cmd), capture_output=True, text=True, env=self.env, check=check)

    def scontrol(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.run("scontrol", *args, check=check)

    def sbatch(self, script: str | Path, *args: str) -> int:
        out = self.run("sbatch", "--parsable", *args, str(script)).stdout.strip()
        return int(out.split(";")[0])

    def squeue_ids(self) -> list[int]:
        r = self.run("squeue", "-h", "-o", "%i", check=False)
        return [int(x.split("_")[0]) for x in r.stdout.split()] if r.returncode == 0 else []

    def job_info(self, job_id: int) -> dict[str, str]:
        """``scontrol show job -o`` as a dict (JobState, Restarts, ExitCode, ...)."""
        out = self.scontrol("show", "job", "-o", str(job_id)).stdout.strip()
        info = {}
        for token in out.split():
            key, _, value = token.partition("=")
            info.setdefault(key, value)
        return info

    def wait_state(self, job_id: int, states: set[str], timeout: float = 120.0, poll: float = 0.5) -> dict[str, str]:
        """Poll until the job is in one of ``states``; fail fast if it ends in another terminal state."""
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job_info(job_id)
            state = info.get("JobState", "")
            if state in states:
                return info
            if state in TERMINAL_STATES:
                raise AssertionError(f"job {job_id} ended {state} (wanted {sorted(states)}): {info}")
            time.sleep(poll)
        raise AssertionError(f"job {job_id} not in {sorted(states)} after {timeout:.0f} s: {info}")

    def log_tail(self, name: str = "slurmctld", lines: int = 40) -> str:
        path = self.dir / "log" / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


def _user() -> str:
    import pwd

    return pwd.getpwuid(os.getuid()).pw_name


def _pid_from(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (ProcessLookupError, FileNotFoundError):
        return False
    return state != "Z"  # a zombie has exited; only its parent can reap it


def _terminate(pids: list[int], timeout: float = 10.0) -> None:
    """SIGTERM to each pid, wait for all, SIGKILL the ones still there."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_alive(pid) for pid in pids):
        time.sleep(0.05)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
