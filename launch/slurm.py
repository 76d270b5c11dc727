"""``terrabyte slurm``: write a SLURM job script for a pretraining run (and with ``--submit``, submit it).

    terrabyte slurm --nodes 4 --gpus-per-node 8 --time 24:00:00 --partition gpu --config 1b \\
        --run-dir /scratch/runs/1b --submit -- --train.steps 100000

The script comes from the template ``launch/slurm/train.sh``; every count in it (#SBATCH lines,
ranks per node, the preemption signal) is rendered from these flags, so nothing is edited twice.
One srun task per node runs ``terrabyte launch --run`` (torchrun, or ``deepspeed --no_ssh``) with
the master taken from ``scontrol show hostnames`` and a port derived from the job id. USR1 arrives
``--requeue-signal-seconds`` before the time limit: the ranks checkpoint at the next step and exit
75, the script requeues the job, and the requeued job resumes from the checkpoint. With
``--array K`` the job is K chained array tasks (``--array=1-K%1``) that each resume instead.

CPU clusters: ``--gpus-per-node 0 --tasks-per-node N`` starts N CPU ranks per node.
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from terrabyte.data_pipeline.basics.errors import ConfigError
from terrabyte.data_pipeline.basics.system import atomic_path

from .launchers import DEFAULT_RDZV_TIMEOUT

log = logging.getLogger(__name__)

TEMPLATE = "train.sh"
LAUNCHERS = ("torchrun", "deepspeed")
DEFAULT_SIGNAL_SECONDS = 300
# SLURM's --signal takes at most 0xffff seconds.
MAX_SIGNAL_SECONDS = 65535
# Rendezvous port: PORT_BASE + job id % PORT_RANGE, clear of the ephemeral range (32768+).
PORT_BASE = 12000
PORT_RANGE = 20000
# The trainer's exit code after a checkpointed stop (terrabyte.pretrain.train.trainer.EXIT_PREEMPTED);
# kept literal so that rendering a script does not import torch.
EXIT_PREEMPTED = 75

_TIME = re.compile(r"^(?:(?P<days>\d+)-)?(?P<a>\d+)(?::(?P<b>\d+))?(?::(?P<c>\d+))?$")
_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")
_SBATCH_OPTION = re.compile(r"--[A-Za-z][A-Za-z0-9-]*(=.*)?", re.S)


def time_limit_seconds(text: str) -> int:
    """SLURM time formats: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S."""
    match = _TIME.match(text.strip())
    if match is None:
        raise ConfigError(f"--time {text!r} is not a SLURM time (e.g. 90, 04:00:00 or 1-12:00:00)")
    days, a, b, c = (int(match[g]) if match[g] is not None else None for g in ("days", "a", "b", "c"))
    if days is not None:  # D-H[:M[:S]]
        seconds = days * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
    elif c is not None:  # H:M:S
        seconds = a * 3600 + b * 60 + c
    elif b is not None:  # M:S
        seconds = a * 60 + b
    else:  # M
        seconds = a * 60
    if seconds <= 0:
        raise ConfigError(f"--time {text!r} must be longer than zero")
    return seconds


@dataclass
class JobSpec:
    nodes: int
    gpus_per_node: int
    time: str
    partition: str
    config: str
    run_dir: str
    venv: str
    workdir: str
    log_dir: str
    launcher: str = "torchrun"
    tasks_per_node: int | None = None
    cpus_per_task: int | None = None
    job_name: str = "terrabyte"
    account: str | None = None
    signal_seconds: int = DEFAULT_SIGNAL_SECONDS
    array: int | None = None
    rdzv_timeout: int = DEFAULT_RDZV_TIMEOUT
    sbatch_options: list[str] = field(default_factory=list)
    overrides: list[str] = field(default_factory=list)

    @property
    def procs_per_node(self) -> int:
        return self.gpus_per_node if self.gpus_per_node > 0 else (self.tasks_per_node or 0)

    def train_args(self) -> list[str]:
        return ["--config", self.config, "--run.dir", self.run_dir] + self.overrides


def validate(spec: JobSpec) -> None:
    for flag, value in _text_values(spec):
        if not value.isprintable():
            raise ConfigError(f"{flag} {value!r} holds a newline or another control character: job values "
                              f"are written into the job script and must be one printable line")
    if spec.launcher not in LAUNCHERS:
        raise ConfigError(f"--launcher {spec.launcher!r} is not one of {', '.join(LAUNCHERS)}")
    if spec.nodes < 1:
        raise ConfigError(f"--nodes must be at least 1, got {spec.nodes}")
    if spec.gpus_per_node < 0:
        raise ConfigError(f"--gpus-per-node must be 0 (CPU ranks) or more, got {spec.gpus_per_node}")
    if spec.gpus_per_node == 0 and not spec.tasks_per_node:
        raise ConfigError("--gpus-per-node 0 needs --tasks-per-node N (the number of CPU ranks per node)")
    if spec.gpus_per_node > 0 and spec.tasks_per_node not in (None, spec.gpus_per_node):
        raise ConfigError(
            f"--tasks-per-node {spec.tasks_per_node} differs from --gpus-per-node {spec.gpus_per_node}: "
            "with GPUs there is one rank per GPU (leave --tasks-per-node out)"
        )
    if spec.tasks_per_node is not None and spec.tasks_per_node < 1:
        raise ConfigError(f"--tasks-per-node must be at least 1, got {spec.tasks_per_node}")
    if spec.cpus_per_task is not None and spec.cpus_per_task < 1:
        raise ConfigError(f"--cpus-per-task must be at least 1, got {spec.cpus_per_task}")
    limit = time_limit_seconds(spec.time)
    if not 0 < spec.signal_seconds <= MAX_SIGNAL_SECONDS:
        raise ConfigError(f"--requeue-signal-seconds must be 1..{MAX_SIGNAL_SECONDS}, got {spec.signal_seconds}")
    if spec.signal_seconds >= limit:
        raise ConfigError(
            f"--requeue-signal-seconds {spec.signal_seconds} is not shorter than --time {spec.time} "
            f"({limit} s): the stop signal would come before the job starts training"
        )
    if spec.array is not None and spec.array < 1:
        raise ConfigError(f"--array must be at least 1, got {spec.array}")
    if not re.fullmatch(r"[\w.+-]+", spec.job_name):
        raise ConfigError(f"--job-name {spec.job_name!r} may only use letters, digits and . _ + -")
    for option in spec.sbatch_options:
        if not _SBATCH_OPTION.fullmatch(option):
            raise ConfigError(f"--sbatch-option {option!r} must be a long sbatch option such as --qos=high")
    for flag in ("--run.dir", "--config"):
        if any(arg == flag or arg.startswith(flag + "=") for arg in spec.overrides):
            raise ConfigError(f"give {flag} through `terrabyte slurm {flag.replace('.', '-')}`, not after `--`")


def _text_values(spec: JobSpec) -> list[tuple[str, str]]:
    """Every text value that reaches the script, with the flag that gave it."""
    values = [("--time", spec.time), ("--partition", spec.partition), ("--config", spec.config),
              ("--run-dir", spec.run_dir), ("--venv", spec.venv), ("the working directory", spec.workdir),
              ("--log-dir", spec.log_dir), ("--job-name", spec.job_name), ("--account", spec.account or "")]
    return values + [("--sbatch-option", o) for o in spec.sbatch_options] + [("an override", o) for o in spec.overrides]


def sbatch_quote(value: str) -> str:
    """``value`` as one #SBATCH argument: sbatch reads these lines itself, not through a shell; in
    double quotes, with backslash escaping ``\\``, ``"`` and ``#`` (an unescaped ``#`` starts a comment)."""
    return '"' + re.sub(r'([\\"#])', r"\\\1", value) + '"'


def sbatch_lines(spec: JobSpec) -> list[str]:
    cpus = spec.cpus_per_task or (spec.procs_per_node if spec.gpus_per_node == 0 else None)
    log_name = "%x-%A_%a.out" if spec.array else "%x-%j.out"
    q = sbatch_quote
    options = [
        f"--job-name={q(spec.job_name)}",
        f"--nodes={spec.nodes}",
        "--ntasks-per-node=1",  # one launcher per node; it starts the node's ranks
    ]
    if cpus:
        options.append(f"--cpus-per-task={cpus}")
    if spec.gpus_per_node > 0:
        options.append(f"--gpus-per-node={spec.gpus_per_node}")
    options += [f"--time={q(spec.time)}", f"--partition={q(spec.partition)}"]
    if spec.account:
        options.append(f"--account={q(spec.account)}")
    options += [
        f"--output={q(f'{spec.log_dir}/{log_name}')}",
        "--open-mode=append",  # a requeued job appends to its own log
        "--requeue",
        f"--signal=B:USR1@{spec.signal_seconds}",
    ]
    if spec.array:
        options.append(f"--array=1-{spec.array}%1")
    for option in spec.sbatch_options:
        name, eq, value = option.partition("=")
        options.append(f"{name}={q(value)}" if eq else name)
    return [f"#SBATCH {option}" for option in options]


def settings(spec: JobSpec) -> list[str]:
    q = shlex.quote
    values = {
        "TB_NODES": str(spec.nodes),
        "TB_PROCS_PER_NODE": str(spec.procs_per_node),
        "TB_LAUNCHER": spec.launcher,
        "TB_VENV": spec.venv,
        "TB_WORKDIR": spec.workdir,
        "TB_RUN_DIR": spec.run_dir,
        "TB_LOG_DIR": spec.log_dir,
        "TB_REQUEUE": "0" if spec.array else "1",
        "TB_RDZV_TIMEOUT": str(spec.rdzv_timeout),
        "TB_PORT_BASE": str(PORT_BASE),
        "TB_PORT_RANGE": str(PORT_RANGE),
        "TB_EXIT_PREEMPTED": str(EXIT_PREEMPTED),
    }
    lines = [f"{name}={q(value)}" for name, value in values.items()]
    lines.append("TB_TRAIN_ARGS=(" + " ".join(q(arg) for arg in spec.train_args()) + ")")
    return lines


def template_text() -> str:
    return resources.files("terrabyte.launch").joinpath("slurm").joinpath(TEMPLATE).read_text()


def render(spec: JobSpec, template: str | None = None) -> str:
    validate(spec)
    values = {
        "sbatch_lines": "\n".join(sbatch_lines(spec)),
        "settings": "\n".join(settings(spec)),
        "signal_seconds": str(spec.signal_seconds),
    }
    text = template_text() if template is None else template

    def substitute(match: re.Match) -> str:
        name = match.group(1)
        if name not in values:
            raise ConfigError(f"SLURM template has an unknown placeholder {{{{{name}}}}}")
        return values[name]

    return _PLACEHOLDER.sub(substitute, text)


def write_script(text: str, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(text)
        tmp.chmod(0o755)
    return path


def submit(script: str | Path, env: dict[str, str] | None = None) -> str:
    """``sbatch --parsable``; returns the job id."""
    if shutil.which("sbatch") is None:
        raise FileNotFoundError("sbatch not found on PATH: run `terrabyte slurm --submit` on a SLURM login node")
    result = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True, env=env)
    if result.returncode != 0:
        reason = (result.stderr.strip().splitlines() or ["no message"])[-1]
        raise ConfigError(f"sbatch {script} failed: {reason}")
    return result.stdout.strip().split(";")[0]


# --------------------------------------------------------------------------- CLI


def _active_venv() -> str | None:
    if os.environ.get("VIRTUAL_ENV"):
        return os.environ["VIRTUAL_ENV"]
    if sys.prefix != sys.base_prefix:
        return sys.prefix
    return None


def _config_arg(config: str) -> str:
    """A config file path becomes absolute (the job may start elsewhere); a name stays a name."""
    path = Path(config)
    if path.suffix in (".yaml", ".yml") or os.sep in config:
        if not path.is_file():
            raise FileNotFoundError(f"--config {config}: no such file")
        return str(path.resolve())
    return config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = __doc__
    parser.add_argument("--nodes", type=int, required=True, help="nodes to allocate")
    parser.add_argument("--gpus-per-node", type=int, required=True,
                        help="GPUs per node, one rank each; 0 for CPU ranks (then give --tasks-per-node)")
    parser.add_argument("--tasks-per-node", type=int, help="CPU ranks per node (with --gpus-per-node 0)")
    parser.add_argument("--time", required=True, help="time limit per job, e.g. 04:00:00 or 1-00:00:00")
    parser.add_argument("--partition", required=True, help="SLURM partition")
    parser.add_argument("--config", required=True, help="config name in configs/ or a YAML path")
    parser.add_argument("--run-dir", help="run directory (default: runs/<config name>, made absolute)")
    parser.add_argument("--venv", help="virtual environment to activate on every node (default: the active one)")
    parser.add_argument("--launcher", choices=LAUNCHERS, default="torchrun", help="per-node launcher (default: torchrun)")
    parser.add_argument("--requeue-signal-seconds", type=int, default=DEFAULT_SIGNAL_SECONDS,
                        help=f"send USR1 this long before the time limit (default: {DEFAULT_SIGNAL_SECONDS}; "
                             "more than one step plus one checkpoint)")
    parser.add_argument("--array", type=int, metavar="K",
                        help="K chained jobs (--array=1-K%%1), each resuming from the last checkpoint, instead of self-requeue")
    parser.add_argument("--cpus-per-task", type=int, help="CPUs per node task (default: --tasks-per-node on CPU)")
    parser.add_argument("--job-name", default="terrabyte", help="job name, also the log file prefix")
    parser.add_argument("--account", help="SLURM account")
    parser.add_argument("--sbatch-option", action="append", default=[], metavar="OPTION",
                        help="extra #SBATCH line, e.g. --sbatch-option=--qos=high (repeatable)")
    parser.add_argument("--rdzv-timeout", type=int, default=DEFAULT_RDZV_TIMEOUT,
                        help=f"seconds nodes wait for each other (default: {DEFAULT_RDZV_TIMEOUT})")
    parser.add_argument("--output", "-o", help="job script path (default: <run dir>/slurm/<job name>.sh)")
    parser.add_argument("--log-dir", help="per-job logs (default: <run dir>/slurm)")
    parser.add_argument("--submit", action="store_true", help="submit with sbatch and print the job id")
    parser.add_argument("overrides", nargs="*", metavar="-- OVERRIDES",
                        help="trainer overrides (--section.key VALUE), after `--`")


def spec_from_args(args: argparse.Namespace) -> JobSpec:
    venv = args.venv or _active_venv()
    if venv is None:
        raise ConfigError("no virtual environment is active: pass --venv PATH (it must exist on every node)")
    venv = str(Path(venv).absolute())
    if not (Path(venv) / "bin" / "activate").is_file():
        log.warning("virtual environment %s has no bin/activate here; the job checks again on each node", venv)
    config = _config_arg(args.config)
    run_dir = Path(args.run_dir or Path("runs") / Path(config).stem).absolute()
    log_dir = Path(args.log_dir).absolute() if args.log_dir else run_dir / "slurm"
    return JobSpec(
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        tasks_per_node=args.tasks_per_node,
        time=args.time,
        partition=args.partition,
        config=config,
        run_dir=str(run_dir),
        venv=venv,
        workdir=str(Path.cwd()),
        log_dir=str(log_dir),
        launcher=args.launcher,
        cpus_per_task=args.cpus_per_task,
        job_name=args.job_name,
        account=args.account,
        signal_seconds=args.requeue_signal_seconds,
        array=args.array,
        rdzv_timeout=args.rdzv_timeout,
        sbatch_options=list(args.sbatch_option),
        overrides=list(args.overrides),
    )


def check_config(spec: JobSpec) -> None:
    """Load the config with the overrides here, so a typo stops before the job waits in the queue."""
    from terrabyte.pretrain.train.config import load_config

    load_config(spec.config, ["--run.dir", spec.run_dir] + spec.overrides)


def run(args: argparse.Namespace) -> int:
    spec = spec_from_args(args)
    text = render(spec)
    check_config(spec)
    path = write_script(text, args.output or Path(spec.run_dir) / "slurm" / f"{spec.job_name}.sh")
    if not args.submit:
        sys.stdout.write(f"{path}\n")
        return 0
    job_id = submit(path)
    log.info("submitted %s as job %s; logs in %s", path, job_id, spec.log_dir)
    sys.stdout.write(f"{job_id}\n")
    return 0
