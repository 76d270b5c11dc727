"""A real TensorBoard server on a free localhost port serves a training run's scalars over HTTP,
with the same steps and values as the event files read directly (EventAccumulator)."""
from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from terrabyte.data_pipeline.basics.system import free_port

from .common import child_env, tensorboard_scalars, tiny_args, wait_for

TAGS = ("train/loss", "train/bits_per_byte", "train/lr", "val/bits_per_byte")


def _get_json(port: int, path: str):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
        assert response.status == 200
        return json.loads(response.read())


def _start_tensorboard(log_dir: Path, log_file) -> tuple[subprocess.Popen, int]:
    binary = Path(sys.executable).with_name("tensorboard")
    port = free_port()
    proc = subprocess.Popen(
        [str(binary), "--logdir", str(log_dir), "--port", str(port), "--host", "127.0.0.1"],
        stdout=log_file, stderr=subprocess.STDOUT,
    )
    return proc, port


@pytest.mark.slow
def test_tensorboard_server_serves_the_run_scalars(tiny_shards, tmp_path):
    run_dir = tmp_path / "run"
    train = subprocess.run(
        [sys.executable, "-m", "terrabyte.pretrain", *tiny_args(tiny_shards, steps=6), "--run.dir", str(run_dir)],
        capture_output=True, text=True, env=child_env(), timeout=240,
    )
    assert train.returncode == 0, (train.stdout + train.stderr)[-3000:]
    log_dir = run_dir / "tensorboard"
    expected = {tag: tensorboard_scalars(log_dir, tag) for tag in TAGS}
    assert [step for step, _ in expected["train/loss"]] == [1, 2, 3, 4, 5, 6]
    assert [step for step, _ in expected["val/bits_per_byte"]] == [3, 6]

    server_log = tmp_path / "tensorboard.log"
    with open(server_log, "w") as out:
        proc, port = _start_tensorboard(log_dir, out)
        try:
            def loaded():
                try:
                    tags = _get_json(port, "/data/plugin/scalars/tags")
                except (urllib.error.URLError, ConnectionError, TimeoutError):
                    return None
                runs = [run for run, run_tags in tags.items() if set(TAGS) <= set(run_tags)]
                return (tags, runs) if runs else None

            tags, runs = wait_for(loaded, 90, f"tensorboard on port {port} to serve {TAGS}", poll=0.3, proc=proc)
            assert len(runs) == 1, tags
            run = runs[0]
            for tag in TAGS:
                query = urllib.parse.urlencode({"run": run, "tag": tag})
                served = _get_json(port, f"/data/plugin/scalars/scalars?{query}")  # [[wall time, step, value], ...]
                assert [step for _, step, _ in served] == [step for step, _ in expected[tag]], tag
                assert [value for _, _, value in served] == pytest.approx([v for _, v in expected[tag]], rel=1e-6), tag
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=20)
