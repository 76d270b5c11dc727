"""Real one-process DeepSpeed runs killed with SIGKILL, inside a save and at random moments, then
restarted until done: the weights and the last loss equal an uninterrupted run's exactly (dropout on,
so the random state matters). A stop signal right after a resume leaves the live checkpoint untouched.
On a run directory whose export is stale, the newest checkpoint is used, read with weights_only loads.

Kill moments are drawn from a seeded generator; the seed is in every failure message
(TERRABYTE_KILL_SEED=N repeats a run, TERRABYTE_KILL_ROUNDS=N kills more often)."""
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from .test_train import shards  # noqa: F401  (the same small corpus)

pytestmark = pytest.mark.slow

STEPS = 8
ARGS = [
    "--config", "tiny", "--model.dim", "32,32", "--model.depth", "1,1", "--model.max_seq_len", "16,4",
    "--model.dim_head", "16", "--model.heads", "2", "--model.ff_dropout", "0.1",
    "--train.steps", str(STEPS), "--train.micro_batch", "2", "--train.global_batch", "4",
    "--train.eval_interval", "100", "--train.log_interval", "1", "--train.sample_bytes", "0",
    "--checkpoint.interval", "2", "--checkpoint.keep", "10", "--data.val_sequences", "4",
]
SEED = int(os.environ.get("TERRABYTE_KILL_SEED", random.randrange(1 << 30)))
ROUNDS = int(os.environ.get("TERRABYTE_KILL_ROUNDS", "1"))  # random kills after the one inside a save
PAUSE_RUNNER = Path(__file__).with_name("pause_in_save_runner.py")


def env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def start(run: Path, shards: Path, log: Path, pause_in_save: int | None = None) -> subprocess.Popen:
    """The trainer in a subprocess; ``pause_in_save``: that step's save stops before its rename
    (``pause_in_save_runner``)."""
    entry = ["-m", "terrabyte.pretrain"] if pause_in_save is None else [str(PAUSE_RUNNER), str(pause_in_save)]
    return subprocess.Popen([sys.executable, *entry, *ARGS, "--data.path", str(shards), "--run.dir", str(run)],
                            stdout=subprocess.DEVNULL, stderr=open(log, "ab"), env=env())


def wait_for(predicate, proc: subprocess.Popen, what: str, timeout: float = 180):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.02)
    proc.kill()
    raise AssertionError(f"seed {SEED}: timed out waiting for {what}")


def catches(pid: int, sig: int) -> bool:
    """Has process ``pid`` installed a handler for ``sig`` (SigCgt in /proc/PID/status)?"""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    caught = int(re.search(r"^SigCgt:\s*([0-9a-f]+)", status, re.M).group(1), 16)
    return bool(caught >> (sig - 1) & 1)


def latest(run: Path) -> str | None:
    path = run / "checkpoints" / "latest"
    return path.read_text().strip() if path.is_file() else None


def progress(log: bytes) -> int:
    """The last step the progress bar showed ("| 5/8 [")."""
    found = re.findall(rb"\| (\d+)/%d \[" % STEPS, log)
    return int(found[-1]) if found else 0


def last_loss(run: Path) -> float:
    """train/loss at the last step, as the run that got there last wrote it."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    found = {}
    for events in sorted((run / "tensorboard").glob("events.*"), key=lambda p: p.stat().st_mtime_ns):
        acc = EventAccumulator(str(events))
        acc.Reload()
        if "train/loss" in acc.Tags()["scalars"]:
            found.update({e.step: e.value for e in acc.Scalars("train/loss")})
    return found[STEPS]


def weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.fixture(scope="module")
def straight(tmp_path_factory, shards):
    run = tmp_path_factory.mktemp("straight") / "run"
    proc = start(run, shards, run.parent / "log.txt")
    assert proc.wait(timeout=300) == 0, (run.parent / "log.txt").read_text()[-3000:]
    return run


def test_killed_runs_end_with_the_uninterrupted_result(tmp_path, shards, straight):
    rng = random.Random(SEED)
    run, log = tmp_path / "run", tmp_path / "log.txt"
    note = f"seed {SEED} (TERRABYTE_KILL_SEED={SEED} repeats it); log {log}"
    print(f"kill test seed {SEED}")  # shown by pytest on failure

    # 1. SIGKILL inside the save of a random step, after its files are written, before any rename
    paused = rng.choice([4, 6])
    proc = start(run, shards, log, pause_in_save=paused)
    marker = run / "checkpoints" / f".paused-in-save-step{paused}"
    assert wait_for(marker.exists, proc, "the paused save"), note
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    live_tag = f"step{paused - 2}"
    assert latest(run) == live_tag, note
    live = run / "checkpoints" / live_tag
    before = {p.name: p.stat().st_mtime_ns for p in live.iterdir()}

    # 2. a stop signal right after the resume (sent once the trainer catches it, so it is seen
    #    before the first step): the live checkpoint is not written again
    proc = start(run, shards, log)
    seen = log.stat().st_size
    assert wait_for(lambda: catches(proc.pid, signal.SIGUSR1), proc, "the signal handler"), note
    proc.send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=120) == 75, note
    assert f"resumed from step {paused - 2}".encode() in log.read_bytes()[seen:], note
    assert b"already holds this state" in log.read_bytes()[seen:], note
    assert {p.name: p.stat().st_mtime_ns for p in live.iterdir()} == before, note
    assert latest(run) == live_tag, note

    # 3. SIGKILL at random moments of training (a random step, then a random fraction of a step:
    #    inside a step, a save or the export), then restart until done
    kills = []
    for _ in range(ROUNDS):
        resumed = int(latest(run)[len("step"):])
        if resumed == STEPS:
            break  # an earlier round's kill came too late: the run is done
        proc = start(run, shards, log)
        seen = log.stat().st_size
        target = rng.randint(resumed + 1, STEPS)
        wait_for(lambda: progress(log.read_bytes()[seen:]) >= target, proc, f"step {target}")
        time.sleep(rng.uniform(0.0, 0.5))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills.append((target, latest(run)))
    note += f"; kills after steps (target, latest then): {kills}"
    for attempt in range(3):  # a restart after the last kill finishes the run
        proc = start(run, shards, log)
        if proc.wait(timeout=300) == 0:
            break
    else:
        raise AssertionError(f"{note}: the run does not finish after the kills:\n{log.read_text()[-3000:]}")
    assert latest(run) == f"step{STEPS}", note
    assert not list((run / "checkpoints").glob(".saving-*")), note
    a, b = weights(straight / "model.safetensors"), weights(run / "model.safetensors")
    assert set(a) == set(b), note
    for name in a:
        assert torch.equal(a[name], b[name]), f"{note}: {name} differs"
    assert last_loss(run) == last_loss(straight), note


def test_stale_export_is_not_used_and_checkpoints_load_weights_only(straight, tmp_path, monkeypatch, caplog):
    import logging
    import shutil

    from terrabyte.pretrain.checkpoint import weights as ckpt_weights

    run = tmp_path / "run"
    shutil.copytree(straight, run)
    final = weights(run / "model.safetensors")
    # an export from step 6, as after `terrabyte export` before the run was extended to 8 steps
    _, at_step6 = ckpt_weights.load_state(ckpt_weights.ModelSource("checkpoint", run / "checkpoints" / "step6", 6,
                                                   run / "checkpoints", "step6"))
    config, _ = ckpt_weights.load_state(run / "model.safetensors")
    ckpt_weights.write_safetensors(at_step6, config, run / "model.safetensors", step=6)

    loads = []
    original = torch.load

    def recording_load(*args, **kwargs):
        loads.append(kwargs.get("weights_only"))
        return original(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    with caplog.at_level(logging.INFO, logger="terrabyte.pretrain.checkpoint"):
        _, state = ckpt_weights.load_state(run)
    assert "using checkpoint" in caplog.text and "step8" in caplog.text
    assert loads and all(w is True for w in loads), loads
    assert set(state) == set(final)
    for name in final:
        assert torch.equal(state[name], final[name]), name
    assert any(not torch.equal(at_step6[n], final[n]) for n in final)


def test_fallback_sets_a_damaged_checkpoint_aside_and_finishes_the_run(straight, tmp_path, shards):
    """4 bytes flipped in the newest checkpoint's optimizer state: --checkpoint.fallback true resumes
    from the one before, saves the damaged step's number again and ends where the uninterrupted run did."""
    import shutil

    run, log = tmp_path / "run", tmp_path / "log.txt"
    shutil.copytree(straight, run)
    (run / "model.safetensors").unlink()  # only the checkpoints are left to resume from
    victim = next((run / "checkpoints" / f"step{STEPS}").glob("*optim_states.pt"))
    data = bytearray(victim.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 4] = bytes(b ^ 0xFF for b in data[middle:middle + 4])
    victim.write_bytes(bytes(data))
    proc = subprocess.run([sys.executable, "-m", "terrabyte.pretrain", *ARGS, "--data.path", str(shards),
                           "--run.dir", str(run), "--checkpoint.fallback", "true"],
                          stdout=subprocess.DEVNULL, stderr=open(log, "wb"), env=env(), timeout=300)
    text = log.read_text()
    assert proc.returncode == 0, text[-3000:]
    assert f"resumed from step {STEPS - 2}" in text and "set the damaged checkpoint aside" in text
    assert latest(run) == f"step{STEPS}"
    aside = list((run / "checkpoints").glob(f"step{STEPS}.damaged-*"))
    assert len(aside) == 1 and (aside[0] / victim.name).read_bytes() == bytes(data)
    a, b = weights(straight / "model.safetensors"), weights(run / "model.safetensors")
    assert set(a) == set(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert last_loss(run) == last_loss(straight)
