"""A real one-process DeepSpeed ZeRO-3 run of a tiny model: loss falls, checkpoints resume exactly,
the exported model and the raw checkpoint generate the same bytes, bad input gives one line."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

TINY = [
    "--model.dim", "64,32", "--model.depth", "2,1", "--model.max_seq_len", "32,4",
    "--model.dim_head", "16", "--model.heads", "2",
    "--train.micro_batch", "4", "--train.global_batch", "4", "--train.log_interval", "1",
    "--train.sample_bytes", "16", "--data.val_sequences", "8",
    "--optim.warmup_steps", "3", "--optim.lr", "3e-3", "--optim.schedule", "constant",
]


def run_cli(args, check=True, timeout=300):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        [sys.executable, "-m", "terrabyte.pretrain", *args], capture_output=True, text=True, env=env, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def generate_greedy(source: Path, prompt: str, max_bytes: int = 24, *extra: str) -> bytes:
    """What `terrabyte generate` prints for ``source`` at temperature 0."""
    proc = subprocess.run(
        [sys.executable, "-m", "terrabyte.launch.cli", "generate", "--checkpoint", str(source),
         "--prompt", prompt, "--max-bytes", str(max_bytes), "--temperature", "0", *extra],
        capture_output=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    return proc.stdout


def scalars(run_dir: Path, tag: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from terrabyte.data_pipeline.write.builder import build_shards
    from terrabyte.data_pipeline.write.config import BuildConfig

    root = tmp_path_factory.mktemp("corpus")
    src = root / "src"
    src.mkdir()
    # a small, learnable corpus: repetitive code-like text
    for i in range(40):
        body = "".join(f"def f{j}(x):\n    return x * {j} + {i}\n\n" for j in range(30))
        (src / f"mod{i}.py").write_text(body)
    out = root / "shards"
    build_shards(BuildConfig(inputs=[str(src)], val_fraction=0.2), str(out), progress=False)
    return out


@pytest.fixture(scope="module")
def straight(tmp_path_factory, shards):
    """24 steps of the tiny run on the code corpus (also the model the fine-tuning test starts from)."""
    run = tmp_path_factory.mktemp("straight")
    run_cli(["--config", "tiny", "--data.path", str(shards), *TINY, "--run.dir", str(run), "--train.steps", "24",
             "--train.eval_interval", "12", "--checkpoint.interval", "12"])
    return run


def test_zero3_run_trains_checkpoints_and_resumes_exactly(tmp_path, shards, straight):
    common = ["--config", "tiny", "--data.path", str(shards), *TINY]
    loss = scalars(straight, "train/loss")
    assert sorted(loss) == list(range(1, 25))
    first, last = sum(loss[s] for s in (1, 2, 3)) / 3, sum(loss[s] for s in (22, 23, 24)) / 3
    assert last < 0.7 * first, (first, last)
    assert (straight / "checkpoints" / "latest").read_text() == "step24"
    assert sorted(p.name for p in (straight / "checkpoints").iterdir() if p.is_dir()) == ["step12", "step24"]
    val = scalars(straight, "val/bits_per_byte")
    assert set(val) == {12, 24} and val[24] < val[12]
    assert (straight / "model.safetensors").is_file()

    # the same 24 steps in two runs of 12: identical losses after the restart
    split = tmp_path / "split"
    run_cli([*common, "--run.dir", str(split), "--train.steps", "12", "--train.eval_interval", "12",
             "--checkpoint.interval", "12"])
    second = run_cli([*common, "--run.dir", str(split), "--train.steps", "24", "--train.eval_interval", "12",
                      "--checkpoint.interval", "12"])
    assert "resumed from step 12" in second.stderr
    resumed = scalars(split, "train/loss")
    for step in range(13, 25):
        assert resumed[step] == pytest.approx(loss[step], rel=1e-6, abs=1e-7), step

    # a different model in the same run directory is refused with one line naming the key
    bad = run_cli([*common, "--run.dir", str(split), "--train.steps", "30", "--model.depth", "1,1"], check=False)
    assert bad.returncode == 2
    assert "model.depth" in bad.stderr and "Traceback" not in bad.stderr

    # generation: the exported file and the ZeRO checkpoint consolidated on the fly agree (greedy)
    outs = [generate_greedy(source, "def ") for source in (straight / "model.safetensors", straight / "checkpoints")]
    assert outs[0] == outs[1]
    assert outs[0].startswith(b"def ") and len(outs[0]) > len(b"def \n")
    # --dtype bf16 decodes a bf16 copy of the weights: the same bytes as doing so in process
    from terrabyte.pretrain.eval.generate_cli import load_model

    bf16 = load_model(straight / "model.safetensors", dtype=torch.bfloat16)
    prime = torch.tensor([list(b"def ")])
    ids = bf16.generate(prime, max_new_bytes=24, temperature=0.0)[0, 4:].tolist()
    expected = b"def " + bytes(i for i in ids if i < 256) + b"\n"
    assert generate_greedy(straight / "model.safetensors", "def ", 24, "--dtype", "bf16") == expected


def test_export_matches_checkpoint(tmp_path, shards):
    from safetensors.torch import load_file

    run = tmp_path / "run"
    run_cli(["--config", "tiny", "--data.path", str(shards), *TINY, "--run.dir", str(run), "--train.steps", "3",
             "--train.eval_interval", "3", "--checkpoint.interval", "3", "--checkpoint.export", "false"])
    assert not (run / "model.safetensors").exists()
    out = tmp_path / "exported.safetensors"
    proc = subprocess.run(
        [sys.executable, "-m", "terrabyte.launch.cli", "export", str(run), "--out", str(out)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    from terrabyte.pretrain.checkpoint.weights import load_state

    config, state = load_state(run)
    exported = load_file(str(out))
    assert config["dim"] == [64, 32]
    assert set(exported) == set(state)
    for name, tensor in state.items():
        assert torch.equal(exported[name], tensor), name


def test_bad_input_is_one_line(tmp_path):
    proc = run_cli(["--config", "tiny", "--train.stepz", "3"], check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        proc.stderr.strip().splitlines()[0]
    ] and "unknown config key 'train.stepz'" in proc.stderr
    proc = run_cli(["--config", "tiny", "--data.path", str(tmp_path / "missing"), "--run.dir", str(tmp_path / "r")],
                   check=False)
    assert proc.returncode == 2 and "has no manifest.json" in proc.stderr and "Traceback" not in proc.stderr
    missing = subprocess.run(
        [sys.executable, "-m", "terrabyte.launch.cli", "generate", "--checkpoint", str(tmp_path / "nope")],
        capture_output=True, text=True,
    )
    assert missing.returncode == 2 and "does not exist" in missing.stderr and "Traceback" not in missing.stderr


def validation_bpb(model, shards: Path, seq_len: int, sequences: int) -> float:
    """The trainer's validation number for a plain model: its first ``sequences`` val sequences."""
    from terrabyte.data_pipeline.read.loader import ByteLoader
    from terrabyte.pretrain.train.metrics import bits_per_byte

    loader = ByteLoader(str(shards), split="val", seq_len=seq_len, global_batch=4, micro_batch=4, dp_rank=0,
                        dp_world=1, seed=0, vocab=model.vocab, loop=False, dtype=torch.uint8)
    rows = [row for batch in loader for row in batch][:sequences]
    nats = count = 0
    with torch.no_grad():
        for row in rows:
            x = row.to_ids(torch.device("cpu"))
            nats += model(x, return_loss="sum").item()
            count += int((x != model.pad_id).sum())
    return bits_per_byte(nats / count)


def test_init_from_fine_tunes_a_trained_model_on_another_corpus(tmp_path, straight):
    """--init-from under ZeRO-3: the run starts from the trained weights (its step-0 validation is the
    trained model's own number, below a fresh model's) with a fresh optimizer and schedule, and the
    loss on the new corpus falls."""
    from terrabyte.data_pipeline.write.builder import build_shards
    from terrabyte.data_pipeline.write.config import BuildConfig
    from terrabyte.pretrain import TerraByte

    src = tmp_path / "prose"
    src.mkdir()
    words = "the model reads bytes and learns what comes next in every line of text".split()
    for i in range(24):
        (src / f"doc{i}.txt").write_text("".join(
            " ".join(words[(i + j + k) % len(words)] for k in range(9)) + ".\n" for j in range(40)))
    prose = tmp_path / "prose_shards"
    build_shards(BuildConfig(inputs=[str(src)], val_fraction=0.25), str(prose), progress=False)

    run = tmp_path / "finetune"
    run_cli(["--config", "tiny", "--data.path", str(prose), *TINY, "--run.dir", str(run), "--train.steps", "8",
             "--train.eval_interval", "4", "--checkpoint.interval", "8", "--train.sample_bytes", "0",
             "--init-from", str(straight), "--optim.lr", "1e-3"])
    val = scalars(run, "val/bits_per_byte")
    assert sorted(val) == [0, 4, 8]
    trained = TerraByte.from_pretrained(straight)
    torch.manual_seed(0)
    fresh = TerraByte.from_config(trained.config).eval()
    seq_len = 32 * 4
    assert val[0] == pytest.approx(validation_bpb(trained, prose, seq_len, 8), rel=1e-4)
    assert val[0] < validation_bpb(fresh, prose, seq_len, 8) - 0.5  # measured: 7.83 vs 8.83
    assert val[8] < val[4] < val[0], val
    lr = scalars(run, "train/lr")
    assert lr[1] < lr[4]  # a new warm-up: the schedule starts over
