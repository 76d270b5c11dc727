"""Helpers shared by the cluster tests: tiny shards and model flags, polling, TensorBoard scalars."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# Standard-library files as the corpus: always on the machine, nothing downloaded.
CORPUS_FILES = ["abc.py", "bisect.py", "heapq.py", "copy.py", "string.py", "textwrap.py", "colorsys.py", "fnmatch.py"]
EXIT_PREEMPTED = 75


def tiny_args(shards: Path, steps: int = 6, checkpoint_interval: int = 3, eval_interval: int = 3,
              config: bool = True) -> list[str]:
    """Trainer flags for a model that trains a step in ~0.1 s on 2 CPU ranks."""
    return (["--config", "tiny"] if config else []) + [
        "--data.path", str(shards),
        "--model.dim", "32,32", "--model.depth", "1,1", "--model.max_seq_len", "16,4",
        "--model.dim_head", "16", "--model.heads", "2",
        "--train.steps", str(steps), "--train.micro_batch", "2", "--train.global_batch", "4",
        "--train.eval_interval", str(eval_interval), "--train.log_interval", "1",
        "--checkpoint.interval", str(checkpoint_interval), "--checkpoint.keep", "3",
        "--train.sample_bytes", "8", "--data.val_sequences", "4",
    ]


def build_tiny_shards(out_dir: Path) -> Path:
    """Shards of a few standard-library files through the data engineer's builder (its CLI)."""
    src = out_dir / "corpus"
    src.mkdir(parents=True)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in CORPUS_FILES:
        (src / name).write_bytes((stdlib / name).read_bytes())
    shards = out_dir / "shards"
    subprocess.run(
        [sys.executable, "-m", "terrabyte.launch.cli", "shards", "build", str(src), "--out", str(shards),
         "--val-fraction", "0.3", "--no-progress"],
        check=True, capture_output=True, text=True,
    )
    assert (shards / "manifest.json").is_file()
    return shards


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    # One thread per rank: two ranks share the box with other test processes.
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    env.update(extra)
    return env


def wait_for(predicate, timeout: float, what: str, poll: float = 0.05, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited with {proc.returncode} while waiting for {what}")
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def latest_step(run_dir: Path) -> int | None:
    latest = run_dir / "checkpoints" / "latest"
    if not latest.is_file():
        return None
    match = re.fullmatch(r"step(\d+)", latest.read_text().strip())
    return int(match.group(1)) if match else None


def checkpoint_complete(run_dir: Path, step: int, world: int) -> bool:
    """Every rank's ZeRO shard of ``step<step>`` is there, with our model config, and nothing half-written."""
    names = {p.name for p in (run_dir / "checkpoints" / f"step{step}").iterdir()}
    required = {"model_config.json"}
    for rank in range(world):
        required |= {f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt", f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"}
    missing = required - names
    partial = {name for name in names if name.endswith(".tmp")}
    assert not missing and not partial, f"step{step}: missing {sorted(missing)}, partial {sorted(partial)}"
    return True


def tensorboard_scalars(log_dir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    if tag not in acc.Tags()["scalars"]:
        return []
    return [(event.step, event.value) for event in acc.Scalars(tag)]


def stopped_step(log_text: str) -> int:
    """The step the trainer reports stopping at after a signal."""
    match = re.search(r"stopped at step (\d+) after a signal", log_text)
    assert match, "trainer did not report a checkpointed stop:\n" + log_text[-3000:]
    return int(match.group(1))


def resumed_step(log_text: str) -> int:
    match = re.search(r"resumed from step (\d+)", log_text)
    assert match, "trainer did not report resuming:\n" + log_text[-3000:]
    return int(match.group(1))
