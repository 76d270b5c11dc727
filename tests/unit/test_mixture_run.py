"""A real training run over three weighted sources (data.sources): it trains, scores each source's
validation split (val/<name>/bpb in TensorBoard, one log line each, val/bits_per_byte their
weighted total), SIGKILLed after a checkpoint it resumes to the uninterrupted run's batches (same
losses, same weights), and `terrabyte eval` prints one row per source."""
import json
import math
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from .test_kill_resume import ARGS, env, latest, wait_for, weights
from .test_train import scalars

pytestmark = pytest.mark.slow

STEPS = 6
WEIGHTS = {"code": 0.6, "wiki": 0.3, "books": 0.1}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    from terrabyte.data_pipeline.write.builder import build_shards
    from terrabyte.data_pipeline.write.config import BuildConfig

    root = tmp_path_factory.mktemp("three")
    texts = {
        "code": lambda i: "".join(f"def f{j}(x):\n    return x * {j} + {i}\n\n" for j in range(30)),
        "wiki": lambda i: "".join(f"'''Town {i}-{j}''' is a town in the [[Region {j % 7}]]. " for j in range(40)),
        "books": lambda i: "".join(f"CHAPTER {j}. It was a dark night, said {i}. " for j in range(40)),
    }
    paths = {}
    for name, text in texts.items():
        src = root / name
        src.mkdir()
        for i in range(12):
            (src / f"{name}{i}.txt").write_text(text(i))
        build_shards(BuildConfig(inputs=[str(src)], val_fraction=0.25), str(root / f"{name}-shards"), progress=False)
        paths[name] = str(root / f"{name}-shards")
    return paths


def start(run: Path, sources: dict, log: Path) -> subprocess.Popen:
    mix = yaml.safe_dump([{"name": n, "path": p, "weight": WEIGHTS[n]} for n, p in sources.items()],
                         default_flow_style=True, width=10**6).strip()
    args = [a for a in ARGS if a not in ("--train.steps", "8")] + [
        "--train.steps", str(STEPS), "--train.eval_interval", "3", "--data.sources", mix, "--run.dir", str(run)]
    return subprocess.Popen([sys.executable, "-m", "terrabyte.pretrain", *args], stdout=subprocess.DEVNULL,
                            stderr=open(log, "ab"), env=env())


def test_three_sources_train_evaluate_per_source_and_resume_after_sigkill(tmp_path, sources):
    straight, log = tmp_path / "straight", tmp_path / "straight.txt"
    assert start(straight, sources, log).wait(timeout=300) == 0, log.read_text()[-3000:]
    text = log.read_text()
    total = scalars(straight, "val/bits_per_byte")
    assert sorted(total) == [3, STEPS]
    for step in (3, STEPS):
        per = {n: scalars(straight, f"val/{n}/bpb")[step] for n in WEIGHTS}
        assert all(0 < v < 9 for v in per.values()), per
        assert math.isclose(total[step], sum(WEIGHTS[n] * per[n] for n in WEIGHTS), rel_tol=1e-5)
        for n in WEIGHTS:
            assert f"step {step}: validation bits-per-byte {per[n]:.4f} on data source '{n}'" in text

    # SIGKILL once the step-4 checkpoint is in place, then resume to the end
    run, log = tmp_path / "killed", tmp_path / "killed.txt"
    proc = start(run, sources, log)
    assert wait_for(lambda: latest(run) == "step4", proc, "the step-4 checkpoint"), log.read_text()[-3000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert start(run, sources, log).wait(timeout=300) == 0, log.read_text()[-3000:]
    assert "resumed from step" in log.read_text()
    # the same batches after the resume: the same losses step by step, the same final weights
    assert scalars(run, "train/loss") == scalars(straight, "train/loss")
    a, b = weights(straight / "model.safetensors"), weights(run / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)

    # terrabyte eval: one row per source, and their total
    out = subprocess.run([sys.executable, "-m", "terrabyte.launch.cli", "eval", "--checkpoint", str(straight),
                          "--data", *(f"{n}={p}" for n, p in sources.items()), "--max-bytes", "1000",
                          "--out", str(tmp_path / "eval.json")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = {line.split()[0]: line.split() for line in out.stdout.strip().splitlines()[1:]}
    assert set(rows) == {*WEIGHTS, "total"}
    report = json.loads((tmp_path / "eval.json").read_text())
    for n in WEIGHTS:
        assert float(rows[n][-1]) == pytest.approx(report["sources"][n]["bits_per_byte"], abs=1e-4)
        assert report["sources"][n]["bytes"] == 1000
    assert report["bytes"] == 3000
