"""`terrabyte bench engine`: a real one-rank run prints its table and JSON; the tables put every rank
against one rank; bad layouts and --gpu without a GPU stop with one line."""
import argparse
import json
import subprocess
import sys

import pytest

from terrabyte.data_pipeline.basics.errors import ConfigError
from terrabyte.pretrain.bench import engine as be

SIZES = ["--model.dim", "32,16", "--model.depth", "1,1", "--model.max_seq_len", "16,4", "--model.dim_head", "8",
         "--model.heads", "2", "--train.micro_batch", "2", "--train.global_batch", "2"]


@pytest.mark.slow
def test_one_rank_runs_and_prints_its_table(tmp_path):
    out = tmp_path / "engine.json"
    proc = subprocess.run(
        [sys.executable, "-m", "terrabyte.launch.cli", "bench", "engine", "--layouts", "one", "--steps", "2",
         "--warmup", "0", "--build", "none", "--out", str(out), "--", *SIZES],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| rank | step (s) | bytes/s | peak RSS (GB) | above start-up (GB) | step vs 1 rank |" in proc.stdout
    row = next(line for line in proc.stdout.splitlines() if line.startswith("| 0 |"))
    assert row.endswith("| 1.00x | 1.00x | 1.00x |")
    (one,) = json.loads(out.read_text())["layouts"]["one"]
    assert len(one["times"]) == 2 and all(t > 0 for t in one["times"]) and one["bytes_per_step"] == 2 * 64
    assert one["peak_rss"] >= one["build_peak_rss"] >= one["rss_before_build"] > 0


def test_tables_put_every_rank_against_one():
    one = {"rank": 0, "layout": "1 rank(s)", "step_s": 2.0, "peak_rss": 1e9, "rss_before_build": 0.2e9,
           "bytes_per_step": 4096}
    two = [dict(one, rank=r, layout="2 rank(s)", step_s=1.0, peak_rss=0.5e9) for r in (0, 1)]
    table = be.layout_table("zero3", two, one)
    assert table.count("| 1.000 | 4,096 | 0.50 | 0.300 | 0.50x | 2.00x | 0.50x |") == 2
    plain = {"rank": 0, "parameters": 1000, "local_parameters": 1000, "seconds": 1.0,
             "rss_before_build": 1e9, "build_peak_rss": 1e9 + 4000}
    sharded = [dict(plain, rank=r, local_parameters=500, build_peak_rss=1e9 + 2200) for r in (0, 1)]
    table = be.build_table("1b", plain, sharded)
    assert "| 1 rank, unsharded | 0 |" in table and "| 100% |" in table
    assert table.count("| ZeRO-3, 2 ranks, zero.Init |") == 2 and table.count("| 55% |") == 2


def test_bad_options_stop_with_one_line():
    with pytest.raises(ConfigError, match="--layouts: unknown \\['pipe'\\]"):
        be.parse_layouts("one,pipe")
    assert be.parse_layouts("sequence,zero3") == ["one", "zero3", "sequence"]
    if not be.torch.cuda.is_available():
        args = argparse.Namespace(gpu=True, device="cuda", ceiling_tflops=None, steps=1, warmup=0, out="unused")
        with pytest.raises(ConfigError, match="--gpu needs a CUDA device"):
            be.run(args)
