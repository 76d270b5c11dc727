"""Checkpoints on disk: written under a temporary name and renamed whole, checked by sha256 on load,
the newest intact one on request, a full disk that loses nothing, random states, the one place that
picks a run directory's weights (newest checkpoint or export), safetensors without pickle.

The DeepSpeed engine's part (its files) is the ``write`` callable here; tests/unit/test_kill_resume.py
runs the real engine through kills."""
import json
import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from terrabyte.data_pipeline.basics.errors import CheckpointError
from terrabyte.pretrain.checkpoint import store as ckpt
from terrabyte.pretrain.checkpoint import universal as ckpt_universal, weights as ckpt_weights


def tensors_writer(seed: int, size: int = 1000):
    def write(folder):
        folder.mkdir(parents=True, exist_ok=True)
        g = torch.Generator().manual_seed(seed)
        torch.save({"w": torch.randn(size, generator=g)}, folder / "mp_rank_00_model_states.pt")
        torch.save({"m": torch.randn(size, generator=g)}, folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    return write


META = {"model_config.json": {"dim": [8]}, ckpt.LAYOUT_FILE: {"world": 1}}


def save(root, step, seed=None, keep=3):
    return ckpt.write_checkpoint(root, step, tensors_writer(step if seed is None else seed), META, keep)


def test_save_renames_a_whole_checksummed_folder_then_moves_latest(tmp_path):
    root = tmp_path / "checkpoints"
    path = save(root, 2)
    assert (root / "latest").read_text() == "step2" and path == root / "step2"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step2"]  # no temporary folder left
    files = json.loads((path / ckpt.FILES_MANIFEST).read_text())
    assert files["format"] == ckpt.FILES_FORMAT and sorted(files["files"]) == [
        "mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"]
    for name, entry in files["files"].items():
        assert entry["size"] == (path / name).stat().st_size and entry["sha256"] == ckpt.file_digest(path / name)
    ckpt.verify_files(path)
    # a save of the step `latest` points to never writes into that folder
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in path.iterdir()}
    with pytest.raises(CheckpointError, match="live checkpoint"):
        save(root, 2, seed=99)
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in path.iterdir()} == before
    # a stepN folder that latest does not point to (a save killed between rename and latest) is
    # replaced whole, and a killed save's temporary folder is cleared
    save(root, 4)
    (root / "latest").write_text("step2")
    (root / ".saving-step6").mkdir()
    (root / ".saving-step6" / "junk.pt").write_bytes(b"half")
    save(root, 4, seed=7)
    assert (root / "latest").read_text() == "step4"
    ckpt.verify_files(root / "step4")
    assert torch.equal(torch.load(root / "step4" / "mp_rank_00_model_states.pt")["w"],
                       torch.randn(1000, generator=torch.Generator().manual_seed(7)))
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step2", "step4"]


def test_damaged_checkpoint_names_the_file_or_falls_back(tmp_path, caplog):
    root = tmp_path / "checkpoints"
    save(root, 2)
    save(root, 4)
    victim = root / "step4" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit, same size: only the checksum sees it
    victim.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"step4 is damaged: zero_pp_rank_0_mp_rank_00_optim_states.pt "
                                              r"does not match its sha256"):
        ckpt.choose_checkpoint(root, fallback=False)
    with caplog.at_level(logging.WARNING, logger="terrabyte.pretrain.checkpoint"):
        assert ckpt.choose_checkpoint(root, fallback=True) == "step2"
    assert "resuming from" in caplog.text and "step2" in caplog.text and "optim_states.pt" in caplog.text
    # the damaged one is set aside (kept, never pruned) and latest moved to the one resumed, so the
    # run saves that step again
    assert (root / "latest").read_text() == "step2"
    aside = [p.name for p in root.iterdir() if p.name.startswith("step4.damaged-")]
    assert len(aside) == 1 and (root / aside[0] / victim.name).read_bytes() == bytes(data)
    assert "set the damaged checkpoint aside" in caplog.text and aside[0] in caplog.text
    save(root, 4)
    for step in (6, 8):
        save(root, step, keep=2)
    assert sorted(p.name for p in root.iterdir()) == sorted(["latest", "step6", "step8", aside[0]])
    # latest pointing nowhere: one line, or the newest intact one
    (root / "latest").write_text("step9")
    with pytest.raises(CheckpointError, match="points to 'step9', which does not exist"):
        ckpt.choose_checkpoint(root, fallback=False)
    assert ckpt.choose_checkpoint(root, fallback=True) == "step8"
    assert (root / "latest").read_text() == "step8"
    for step in (6, 8):
        (root / f"step{step}" / "mp_rank_00_model_states.pt").unlink()
    with pytest.raises(CheckpointError, match="no intact earlier checkpoint"):
        ckpt.choose_checkpoint(root, fallback=True)


FULL_DISK = textwrap.dedent("""
    import resource, signal, sys
    from pathlib import Path
    from test_checkpoint_safety import save, save_big
    from terrabyte.data_pipeline.basics.errors import CheckpointError
    root = Path(sys.argv[1])
    save(root, 2)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))
    try:
        save_big(root)
    except CheckpointError as exc:
        print(exc)
        sys.exit(2)
""")


def save_big(root):
    return ckpt.write_checkpoint(root, 4, tensors_writer(4, size=100_000), META, 3)


def test_full_disk_is_one_line_and_keeps_the_previous_checkpoint(tmp_path):
    """A file-size limit (RLIMIT_FSIZE: what a full disk or quota looks like to the writer) during a save."""
    root = tmp_path / "checkpoints"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", FULL_DISK, str(root)], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stdout.strip().splitlines() if "[WARNING]" not in line]  # DeepSpeed's import
    assert len(lines) == 1 and "checkpoint" in lines[0] and "step4 could not be written" in lines[0], lines
    assert "step2" in lines[0] and "intact" in lines[0]
    assert (root / "latest").read_text() == "step2"
    ckpt.verify_files(root / "step2")
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step2"]


def test_random_states_round_trip():
    state = ckpt.rng_state()
    expected = torch.rand(5)
    torch.rand(7)
    ckpt.restore_rng(state)
    assert torch.equal(torch.rand(5), expected)
    ckpt.restore_rng(state["cpu"])  # checkpoints from before CUDA states were saved: a bare CPU state
    assert torch.equal(torch.rand(5), expected)
    if torch.cuda.is_available():
        assert "cuda" in state
        cuda = torch.rand(5, device="cuda")
        ckpt.restore_rng(state)
        assert torch.equal(torch.rand(5, device="cuda"), cuda)
    else:
        assert set(state) == {"cpu"}


def _export(path, step=None):
    ckpt_weights.write_safetensors({"w": torch.zeros(2)}, {"dim": [8]}, path, step)


def test_run_directory_resolves_to_the_newest_weights(tmp_path, caplog):
    run = tmp_path / "run"
    root = run / "checkpoints"
    save(root, 4)
    _export(run / ckpt_weights.WEIGHTS_FILE, step=2)  # a stale export: the run was extended
    with caplog.at_level(logging.INFO, logger="terrabyte.pretrain.checkpoint"):
        src = ckpt_weights.resolve_model_source(run)
    assert (src.kind, src.path, src.step) == ("checkpoint", root / "step4", 4)
    assert "newer than the exported" in caplog.text and "step4" in caplog.text
    _export(run / ckpt_weights.WEIGHTS_FILE, step=4)
    src = ckpt_weights.resolve_model_source(run)
    assert (src.kind, src.path, src.step) == ("safetensors", run / ckpt_weights.WEIGHTS_FILE, 4)
    # an export without a recorded step: modification times decide
    _export(run / ckpt_weights.WEIGHTS_FILE)
    os.utime(run / ckpt_weights.WEIGHTS_FILE, (1, 1))
    assert ckpt_weights.resolve_model_source(run).kind == "checkpoint"
    os.utime(run / ckpt_weights.WEIGHTS_FILE, None)
    os.utime(root / "step4", (2, 2))
    assert ckpt_weights.resolve_model_source(run).kind == "safetensors"
    # explicit sources stay what they are
    assert ckpt_weights.resolve_model_source(root).path == root / "step4"
    assert ckpt_weights.resolve_model_source(run / ckpt_weights.WEIGHTS_FILE).kind == "safetensors"


def test_safetensors_load_never_unpickles(tmp_path, monkeypatch):
    import pickle

    path = tmp_path / "model.safetensors"
    ckpt_weights.write_safetensors({"w": torch.arange(4.0)}, {"dim": [8]}, path, step=3)

    def refuse(*args, **kwargs):
        raise AssertionError("unpickling while loading a .safetensors file")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(torch, "load", refuse)
    config, state = ckpt_weights.load_state(path)
    assert config["dim"] == [8] and torch.equal(state["w"], torch.arange(4.0))


def test_tensors_only_loads_forces_weights_only(tmp_path, monkeypatch):
    """What DeepSpeed's zero_to_fp32 runs inside: its torch.load(weights_only=False) becomes
    weights_only=True, which refuses an arbitrary pickled object."""
    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))

    path = tmp_path / "evil.pt"
    torch.save({"x": Evil()}, path)
    with ckpt_universal.tensors_only_loads():
        with pytest.raises(CheckpointError, match=f"checkpoint file {path} holds pickled objects besides tensors.*"
                                                  f"--trust-checkpoint"):
            torch.load(path, weights_only=False)
    torch.save({"w": torch.ones(2)}, path)
    with ckpt_universal.tensors_only_loads():
        assert torch.equal(torch.load(path, weights_only=False)["w"], torch.ones(2))
