"""``terrabyte launch``: the deepspeed / torchrun / mpirun command for N nodes x G ranks, printed or run.

    terrabyte launch --nodes 2 --gpus-per-node 8 --hostfile hosts -- --config 1b --run.dir runs/1b
    terrabyte launch --gpus-per-node 2 --launcher torchrun --run -- --config tiny

Every launcher starts ``python -m terrabyte.pretrain <trainer args>`` once per rank. Counts are
checked before anything starts: hostfile syntax (``host slots=N``), hosts against ``--nodes``, and
``--nodes`` against the SLURM allocation when run inside one.

With ``--run`` this process stays as a small supervisor: the launcher is started with SIGUSR1,
SIGTERM and SIGUSR2 ignored (so neither it nor, under SLURM, a signal sent to every process of the
step can kill it before the ranks have checkpointed); a SIGUSR1/SIGTERM sent here is forwarded to
the training processes, SIGUSR2 is sent on to them as SIGUSR1 (the job script's relay), each rank
gets one stop signal at most, and the exit code is the trainer's: 75 (``EXIT_PREEMPTED``) after a
checkpointed stop.
torchrun itself reports any failed worker as exit code 1, so under ``--run`` it is run through
``python -m terrabyte.launch.launchers torchrun ...``, which exits with the first failed rank's code.
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from terrabyte.data_pipeline.basics.errors import ConfigError
from terrabyte.data_pipeline.basics.system import free_port

log = logging.getLogger(__name__)

TRAINER_MODULE = "terrabyte.pretrain"
LAUNCHERS = ("deepspeed", "torchrun", "mpirun")
# torchrun/DeepSpeed's customary port; single-node runs take a free one instead.
DEFAULT_MASTER_PORT = 29500
# Seconds a node waits for the others to join (torchrun's own default is 600 s).
DEFAULT_RDZV_TIMEOUT = 300
# Signals the trainer turns into "checkpoint at the next step, exit 75".
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
# Sent to a whole SLURM step by the job script: SLURM delivers a step signal to every process of
# the step, ranks included; only this supervisor acts on USR2 (everything below it ignores it) and
# sends each rank USR1 exactly once.
RELAY_SIGNAL = signal.SIGUSR2
# torchrun handles these itself (kill workers); SIGTERM is left out so that it stays ignored and
# the workers get the chance to checkpoint (see ``_launcher_env``).
TORCHRUN_SIGNALS = "SIGINT,SIGHUP,SIGQUIT"

HOST_NAME = r"[A-Za-z0-9_.:\[\]-]+"  # host names, IPv4 and bracketed IPv6 addresses: never shell text
_HOST_LINE = re.compile(rf"^(?P<host>{HOST_NAME})\s+slots\s*=\s*(?P<slots>\d+)$")


# --------------------------------------------------------------------------- hostfiles


@dataclass(frozen=True)
class Host:
    name: str
    slots: int
    line: int
    """Line number in the hostfile, for error messages."""


def parse_hostfile(path: str | Path) -> list[Host]:
    """``host slots=N`` per line (DeepSpeed/OpenMPI format); ``#`` comments and blank lines allowed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"hostfile {path} does not exist")
    hosts: list[Host] = []
    seen: dict[str, int] = {}
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        text = raw.split("#", 1)[0].strip()
        if not text:
            continue
        match = _HOST_LINE.match(text)
        if match is None:
            raise ConfigError(f"hostfile {path} line {number}: expected 'HOST slots=N', got {raw.strip()!r}")
        name, slots = match["host"], int(match["slots"])
        if slots < 1:
            raise ConfigError(f"hostfile {path} line {number}: slots must be at least 1, got {slots}")
        if name in seen:
            raise ConfigError(f"hostfile {path} line {number}: host {name!r} already listed on line {seen[name]}")
        seen[name] = number
        hosts.append(Host(name, slots, number))
    if not hosts:
        raise ConfigError(f"hostfile {path} lists no hosts (expected lines 'HOST slots=N')")
    return hosts


def check_hosts(hosts: list[Host], path: str | Path, nodes: int, procs_per_node: int) -> None:
    if len(hosts) != nodes:
        raise ConfigError(
            f"hostfile {path} lists {len(hosts)} host(s) but --nodes is {nodes} (make them agree)"
        )
    for host in hosts:
        if host.slots < procs_per_node:
            raise ConfigError(
                f"hostfile {path} line {host.line}: host {host.name!r} has slots={host.slots}, "
                f"fewer than --gpus-per-node {procs_per_node}"
            )


def check_allocation(nodes: int, env: dict[str, str] | None = None) -> None:
    """Inside a SLURM allocation, ``--nodes`` must be its node count: a mismatch would hang rendezvous."""
    env = os.environ if env is None else env
    allocated = env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES")
    if allocated and allocated.isdigit() and int(allocated) != nodes:
        raise ConfigError(
            f"--nodes {nodes} does not match this SLURM allocation of {allocated} node(s) "
            f"(SLURM_JOB_NUM_NODES); use --nodes {allocated} or request {nodes} node(s)"
        )


# --------------------------------------------------------------------------- commands


@dataclass
class LaunchSpec:
    """Everything a launcher command is rendered from: one source for all counts."""

    nodes: int = 1
    procs_per_node: int = 1
    hosts: list[Host] | None = None
    hostfile: str | None = None
    master_addr: str | None = None
    master_port: int | None = None
    node_rank: int | None = None
    """Start only this node's ranks (SLURM, or any setup that starts each node itself)."""
    rdzv_id: str = "terrabyte"
    rdzv_timeout: int = DEFAULT_RDZV_TIMEOUT
    python: str = field(default_factory=lambda: sys.executable)
    mpi_flavor: str = "mpich"
    trainer_args: list[str] = field(default_factory=list)

    @property
    def world_size(self) -> int:
        return self.nodes * self.procs_per_node

    def resolved_master_addr(self) -> str | None:
        if self.master_addr:
            return self.master_addr
        if self.hosts:
            return self.hosts[0].name
        return None

    def port(self) -> int:
        return self.master_port if self.master_port is not None else DEFAULT_MASTER_PORT


def validate(spec: LaunchSpec, launcher: str) -> None:
    if launcher not in LAUNCHERS:
        raise ConfigError(f"--launcher {launcher!r} is not one of {', '.join(LAUNCHERS)}")
    if spec.nodes < 1:
        raise ConfigError(f"--nodes must be at least 1, got {spec.nodes}")
    if spec.procs_per_node < 1:
        raise ConfigError(
            f"--gpus-per-node must be at least 1, got {spec.procs_per_node} "
            "(on a CPU machine give the number of CPU ranks per node)"
        )
    if spec.hosts is not None:
        check_hosts(spec.hosts, spec.hostfile, spec.nodes, spec.procs_per_node)
    if spec.node_rank is not None and not 0 <= spec.node_rank < spec.nodes:
        raise ConfigError(f"--node-rank {spec.node_rank} is outside 0..{spec.nodes - 1} for --nodes {spec.nodes}")
    if spec.rdzv_timeout < 1:
        raise ConfigError(f"--rdzv-timeout must be a positive number of seconds, got {spec.rdzv_timeout}")
    if spec.master_addr is not None and not re.fullmatch(HOST_NAME, spec.master_addr):
        raise ConfigError(f"--master-addr {spec.master_addr!r} is not a host name or address (letters, digits "
                          f"and . _ : - [ ] only, as in a hostfile)")
    multi = spec.nodes > 1
    if multi and launcher == "deepspeed" and spec.hosts is None:
        raise ConfigError(f"--launcher deepspeed with --nodes {spec.nodes} needs --hostfile (lines 'HOST slots=N')")
    if multi and launcher == "torchrun" and spec.resolved_master_addr() is None:
        raise ConfigError(f"--launcher torchrun with --nodes {spec.nodes} needs --master-addr or --hostfile")
    if multi and launcher == "mpirun" and spec.hosts is None:
        raise ConfigError(f"--launcher mpirun with --nodes {spec.nodes} needs --hostfile (lines 'HOST slots=N')")


def deepspeed_command(spec: LaunchSpec) -> list[str]:
    cmd = ["deepspeed"]
    if spec.hosts is not None:
        cmd += ["--hostfile", str(spec.hostfile), "--num_nodes", str(spec.nodes)]
        # DeepSpeed treats any hostfile as multi-node: it checks ssh to the first host and asks it for
        # `hostname -I` unless told the master address. Neither is needed when this node starts its
        # own ranks (--no_ssh) or when the one host is this machine.
        cmd += ["--master_addr", spec.resolved_master_addr()]
        if spec.node_rank is not None:
            cmd += ["--no_ssh", "--node_rank", str(spec.node_rank)]
        elif spec.nodes == 1:
            cmd += ["--no_ssh_check"]
    cmd += ["--num_gpus", str(spec.procs_per_node), "--master_port", str(spec.port())]
    # --no_local_rank: the trainer reads LOCAL_RANK from the environment and takes no --local_rank flag.
    cmd += ["--no_local_rank", "--module", TRAINER_MODULE]
    return cmd + spec.trainer_args


def torchrun_command(spec: LaunchSpec) -> list[str]:
    cmd = ["torchrun", "--nnodes", str(spec.nodes), "--nproc-per-node", str(spec.procs_per_node)]
    master = spec.resolved_master_addr()
    if spec.nodes == 1 and master is None:
        cmd += ["--standalone"]  # a private c10d store on a free local port
    else:
        cmd += [
            "--rdzv-backend", "c10d",
            "--rdzv-endpoint", f"{master}:{spec.port()}",
            "--rdzv-id", spec.rdzv_id,
        ]
    # Finite waits: join_timeout for all nodes to arrive, read_timeout for reaching the store.
    read_timeout = min(spec.rdzv_timeout, 60)
    cmd += ["--rdzv-conf", f"join_timeout={spec.rdzv_timeout},read_timeout={read_timeout}"]
    # No restarts: a stopped trainer (exit 75) must stay stopped; resuming is the job's decision.
    cmd += ["--max-restarts", "0", "-m", TRAINER_MODULE]
    return cmd + spec.trainer_args


def mpirun_command(spec: LaunchSpec) -> list[str]:
    cmd = ["mpirun", "-n", str(spec.world_size)]
    if spec.mpi_flavor == "openmpi":
        if spec.hosts is not None:
            cmd += ["--host", ",".join(f"{h.name}:{spec.procs_per_node}" for h in spec.hosts)]
            cmd += ["--npernode", str(spec.procs_per_node)]
        cmd += ["-x", f"MASTER_PORT={spec.port()}"]
    else:  # MPICH / Hydra (the `mpich` wheel), also Intel MPI
        if spec.hosts is not None:
            cmd += ["-hosts", ",".join(h.name for h in spec.hosts), "-ppn", str(spec.procs_per_node)]
        cmd += ["-genv", "MASTER_PORT", str(spec.port())]
    # Ranks come from mpi4py (DeepSpeed's MPI discovery); the master address is rank 0's `hostname -I`.
    return cmd + [spec.python, "-m", TRAINER_MODULE] + spec.trainer_args


BUILDERS = {"deepspeed": deepspeed_command, "torchrun": torchrun_command, "mpirun": mpirun_command}


def build_command(launcher: str, spec: LaunchSpec) -> list[str]:
    validate(spec, launcher)
    return BUILDERS[launcher](spec)


def mpi_flavor(executable: str = "mpirun") -> str:
    """``openmpi`` or ``mpich`` (Hydra, the default when mpirun is missing or unrecognised)."""
    path = shutil.which(executable)
    if path is None:
        return "mpich"
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return "mpich"
    return "openmpi" if "Open MPI" in out.stdout + out.stderr else "mpich"


# --------------------------------------------------------------------------- running


def is_trainer(cmdline: list[str]) -> bool:
    """True for ``python [-u ...] -m terrabyte.pretrain ...`` (not for launchers naming the module)."""
    args = cmdline[1:]
    i = 0
    while i < len(args) and args[i].startswith("-"):
        arg = args[i]
        if arg == "-m":
            return i + 1 < len(args) and args[i + 1] == TRAINER_MODULE
        if arg.startswith("-m"):
            return arg[2:] == TRAINER_MODULE
        if arg.startswith("-c"):
            return False  # the rest belongs to the -c program
        i += 2 if arg in ("-X", "-W") else 1
    return False


def trainer_processes(root_pid: int) -> list:
    """The training processes below ``root_pid`` (psutil is a DeepSpeed dependency)."""
    import psutil

    try:
        children = psutil.Process(root_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    found = []
    for proc in children:
        try:
            if is_trainer(proc.cmdline()):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def forward_signal(root_pid: int, signum: int, already: set[int] | None = None) -> int:
    """Send ``signum`` to the training processes below ``root_pid``; returns how many got it.

    Pids in ``already`` are skipped and the ones signalled are added: a trainer gets at most one
    stop signal from here (a second one can reach it while it exits, when Python has restored the
    default action, and kill it with the wrong exit code).
    """
    import psutil

    already = set() if already is None else already
    sent = 0
    for proc in trainer_processes(root_pid):
        if proc.pid in already:
            continue
        try:
            proc.send_signal(signum)
            already.add(proc.pid)
            sent += 1
        except psutil.NoSuchProcess:
            pass
    return sent


def _ignore_stop_signals() -> None:
    # Runs in the launcher child before exec; ignored dispositions survive exec and are inherited
    # by the ranks, which install their own USR1/TERM handlers once training starts (USR2 stays
    # ignored below this process: it is the relay signal, see RELAY_SIGNAL).
    for sig in STOP_SIGNALS + (RELAY_SIGNAL,):
        signal.signal(sig, signal.SIG_IGN)


def _launcher_env(launcher: str, base: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    env.setdefault("PYTHONUNBUFFERED", "1")
    if launcher == "torchrun":
        env["TORCHELASTIC_SIGNALS_TO_HANDLE"] = TORCHRUN_SIGNALS
    return env


def runnable(launcher: str, cmd: list[str]) -> list[str]:
    """The command actually executed for ``cmd``: torchrun goes through the exit-code-preserving shim."""
    if launcher == "torchrun":
        return [sys.executable, "-m", "terrabyte.launch.launchers", "torchrun"] + cmd[1:]
    if shutil.which(cmd[0]) is None:
        raise FileNotFoundError(f"{cmd[0]} not found on PATH (activate the environment that has it)")
    return cmd


def supervise(cmd: list[str], env: dict[str, str] | None = None) -> int:
    """Run ``cmd``; pass SIGUSR1/SIGTERM (and USR2 as USR1) to its ranks; return the trainer's exit code."""
    signalled: set[int] = set()
    child: list[subprocess.Popen] = []

    def forward(signum, _frame):
        sent_as = signal.SIGUSR1 if signum == RELAY_SIGNAL else signum
        count = forward_signal(child[0].pid, sent_as, signalled) if child else 0
        log.warning("received %s: sent %s to %d training process(es)", signal.Signals(signum).name,
                    signal.Signals(sent_as).name, count)

    # Handlers first: a signal between the start of the launcher and here must not kill this process.
    previous = {sig: signal.signal(sig, forward) for sig in STOP_SIGNALS + (RELAY_SIGNAL,)}
    try:
        proc = subprocess.Popen(cmd, env=env, preexec_fn=_ignore_stop_signals)
    except BaseException:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        raise
    child.append(proc)
    interrupted = False
    try:
        while True:
            try:
                code = proc.wait()
                break
            except KeyboardInterrupt:
                if interrupted:
                    log.warning("interrupted again: killing the launcher and its ranks")
                    _kill_tree(proc.pid)
                else:
                    interrupted = True
                    count = forward_signal(proc.pid, signal.SIGTERM, signalled)
                    log.warning("interrupted: %d rank(s) checkpoint and stop; interrupt again to kill", count)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return code if code >= 0 else 128 - code


def _kill_tree(pid: int) -> None:
    import psutil

    try:
        root = psutil.Process(pid)
        procs = root.children(recursive=True) + [root]
    except psutil.NoSuchProcess:
        return
    for proc in procs:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass


def check_master_resolves(spec: LaunchSpec) -> None:
    master = spec.resolved_master_addr()
    if spec.nodes > 1 and master:
        try:
            socket.getaddrinfo(master, spec.port())
        except OSError:
            raise ConfigError(
                f"master address {master!r} does not resolve from {socket.gethostname()} "
                "(check --master-addr or the first hostfile line)"
            ) from None


def torchrun_preserving_exit(argv: list[str]) -> int:
    """torchrun, exiting with the exit code of the first rank that failed (75 after a stop).

    When one rank exits, torchrun sends SIGTERM to the others, so later "failures" are its own
    doing; a rank exits 75 only after every rank finished the checkpoint, so the first code is the
    one that tells what happened.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    try:
        run(parse_args(argv))
    except ChildFailedError as exc:
        rank, first = exc.get_first_failure()
        codes = {r: f.exitcode for r, f in sorted(exc.failures.items())}
        log.warning("torchrun: first failed rank %d exited with %d (all: %s)", rank, first.exitcode, codes)
        return first.exitcode if first.exitcode > 0 else 128 - first.exitcode
    return 0


# --------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = __doc__.split("\n\n", 1)[0] + "\n\n" + __doc__.split("\n\n", 1)[1]
    parser.add_argument("--nodes", type=int, default=1, help="number of nodes (default: 1)")
    parser.add_argument("--gpus-per-node", "--nproc-per-node", dest="procs_per_node", type=int, default=1,
                        help="ranks per node: GPUs, or CPU ranks on a machine without GPUs (default: 1)")
    parser.add_argument("--hostfile", help="'HOST slots=N' lines, one per node ('#' comments allowed)")
    parser.add_argument("--launcher", choices=LAUNCHERS, default="deepspeed", help="default: deepspeed")
    parser.add_argument("--master-addr", help="rank 0's node (default: first hostfile host; single node: local)")
    parser.add_argument("--master-port", type=int,
                        help=f"rendezvous port (default: {DEFAULT_MASTER_PORT}; a free port on a single node)")
    parser.add_argument("--node-rank", type=int,
                        help="start only this node's ranks (deepspeed --no_ssh; each node runs its own command)")
    parser.add_argument("--rdzv-id", default=None, help="torchrun rendezvous id (default: $SLURM_JOB_ID or 'terrabyte')")
    parser.add_argument("--rdzv-timeout", type=int, default=DEFAULT_RDZV_TIMEOUT,
                        help=f"seconds to wait for all nodes to join (default: {DEFAULT_RDZV_TIMEOUT})")
    parser.add_argument("--mpi", choices=("auto", "mpich", "openmpi"), default="auto",
                        help="mpirun flavour for host flags (default: detected from `mpirun --version`)")
    parser.add_argument("--run", action="store_true",
                        help="run the command (forwarding SIGUSR1/SIGTERM to the ranks) instead of printing it")
    parser.add_argument("trainer_args", nargs="*", metavar="-- PRETRAIN_ARGS",
                        help="flags for `terrabyte pretrain`, after `--`")


def spec_from_args(args: argparse.Namespace) -> LaunchSpec:
    hosts = parse_hostfile(args.hostfile) if args.hostfile else None
    check_allocation(args.nodes)
    port = args.master_port
    if port is None and args.nodes == 1:
        port = free_port()
    flavor = args.mpi if args.mpi != "auto" else (mpi_flavor() if args.launcher == "mpirun" else "mpich")
    return LaunchSpec(
        nodes=args.nodes,
        procs_per_node=args.procs_per_node,
        hosts=hosts,
        hostfile=args.hostfile,
        master_addr=args.master_addr,
        master_port=port,
        node_rank=args.node_rank,
        rdzv_id=args.rdzv_id or os.environ.get("SLURM_JOB_ID") or "terrabyte",
        rdzv_timeout=args.rdzv_timeout,
        mpi_flavor=flavor,
        trainer_args=list(args.trainer_args),
    )


def run(args: argparse.Namespace) -> int:
    spec = spec_from_args(args)
    cmd = build_command(args.launcher, spec)
    if not args.run:
        sys.stdout.write(shlex.join(cmd) + "\n")
        return 0
    check_master_resolves(spec)
    executed = runnable(args.launcher, cmd)
    log.info("running: %s", shlex.join(cmd))
    return supervise(executed, env=_launcher_env(args.launcher))


def main(argv: list[str] | None = None) -> int:
    """``python -m terrabyte.launch.launchers torchrun ARGS``: torchrun keeping the trainer's exit code."""
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not argv or argv[0] != "torchrun":
        sys.stderr.write("usage: python -m terrabyte.launch.launchers torchrun [torchrun args]\n")
        return 2
    return torchrun_preserving_exit(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
