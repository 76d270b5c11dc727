"""`mpirun -n 2 ... shards build`: ranks split the tasks, one merged manifest, the same bytes as a
single-process build; a rerun skips the finished tasks."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from terrabyte.data_pipeline.read.manifest import load_manifest
from terrabyte.data_pipeline.write.builder import build_shards
from terrabyte.data_pipeline.write.config import BuildConfig

MPIRUN = shutil.which("mpirun") or str(Path(sys.executable).parent / "mpirun")


def run_mpi(args, n=2):
    cmd = [MPIRUN, "-n", str(n), sys.executable, "-m", "terrabyte.data_pipeline.cli", "shards", "build", *args,
           "--no-progress"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def make_corpus(root: Path):
    for i in range(30):
        p = root / f"d{i % 4}" / f"f{i:02d}.txt"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes((f"line {i}\n" * (5 + 3 * i)).encode() + bytes([i, 0, 255]))


def test_two_ranks_build_the_same_shards_as_one(tmp_path):
    if not os.path.exists(MPIRUN):
        pytest.fail("mpirun not found: install the mpich wheel (pip install 'terrabyte[mpi]')")
    make_corpus(tmp_path / "in")
    flags = ["--task-bytes", "400", "--val-fraction", "0.2", "--member-bytes", "512"]
    r = run_mpi([str(tmp_path / "in"), "--out", str(tmp_path / "mpi"), *flags])
    assert r.returncode == 0, r.stderr
    assert "rank 0 of 2: building" in r.stderr and "rank 1 of 2: building" in r.stderr

    single = build_shards(BuildConfig(inputs=[str(tmp_path / "in")], task_bytes=400, val_fraction=0.2,
                                      member_bytes=512),
                          str(tmp_path / "one"), progress=False)
    merged = json.loads((tmp_path / "mpi" / "manifest.json").read_text())
    single.pop("_dir", None)
    single["builder"]["args"]["inputs"] = merged["builder"]["args"]["inputs"]  # same path string either way
    assert merged == json.loads(json.dumps(single))
    assert merged["tasks"] > 4 and {s["task"] for s in merged["shards"]} == set(range(merged["tasks"]))
    for s in merged["shards"]:
        assert (tmp_path / "mpi" / s["path"]).read_bytes() == (tmp_path / "one" / s["path"]).read_bytes()

    # rerun after a "kill" that lost task 3: only that task is rebuilt, by whichever rank owns it
    (tmp_path / "mpi" / "manifest.json").unlink()
    (tmp_path / "mpi" / ".task-00003.json").unlink()
    r = run_mpi([str(tmp_path / "in"), "--out", str(tmp_path / "mpi"), *flags])
    assert r.returncode == 0, r.stderr
    assert "building 1 of" in r.stderr and "building 0 of" in r.stderr
    assert json.loads((tmp_path / "mpi" / "manifest.json").read_text()) == merged
    assert load_manifest(str(tmp_path / "mpi"))["totals"]["all"]["documents"] == 30


def test_an_error_on_one_rank_stops_both(tmp_path):
    make_corpus(tmp_path / "in")
    (tmp_path / "in" / "zz" ).mkdir()
    (tmp_path / "in" / "zz" / "bad.jsonl").write_bytes(b'{"no_text": 1}\n')  # sorted last: a later task
    r = run_mpi([str(tmp_path / "in"), "--out", str(tmp_path / "mpi"), "--task-bytes", "400"])
    assert r.returncode != 0
    assert "bad.jsonl:1" in r.stderr and "terrabyte: error:" in r.stderr
    assert not (tmp_path / "mpi" / "manifest.json").exists()


def test_two_ranks_drop_the_same_near_duplicates_as_one(tmp_path):
    make_corpus(tmp_path / "in")
    for i in (3, 17, 26):  # originals sorted first, near-copies last: other tasks, on the other rank too
        text = "".join(f"{i} squared {k * k} cubed {k ** 3}\n" for k in range(40)).encode()
        (tmp_path / "in" / "a").mkdir(exist_ok=True)
        (tmp_path / "in" / "z").mkdir(exist_ok=True)
        (tmp_path / "in" / "a" / f"orig{i}.txt").write_bytes(text)
        (tmp_path / "in" / "z" / f"copy{i}.txt").write_bytes(text[:100] + b"#" + text[101:])
    flags = ["--task-bytes", "400", "--val-fraction", "0", "--dedup", "near"]
    r = run_mpi([str(tmp_path / "in"), "--out", str(tmp_path / "mpi"), *flags])
    assert r.returncode == 0, r.stderr
    single = build_shards(BuildConfig(inputs=[str(tmp_path / "in")], task_bytes=400, val_fraction=0, dedup="near"),
                          str(tmp_path / "one"), progress=False)
    merged = json.loads((tmp_path / "mpi" / "manifest.json").read_text())
    assert merged["dedup"] == json.loads(json.dumps(single["dedup"]))
    assert {d["path"] for d in merged["dedup"]["dropped_docs"]} >= {"z/copy3.txt", "z/copy17.txt", "z/copy26.txt"}
    assert [s["sha256"] for s in merged["shards"]] == [s["sha256"] for s in single["shards"]]
