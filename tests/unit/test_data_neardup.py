"""`terrabyte shards build --dedup near`: near-copies dropped, unrelated documents kept, the same
shards whatever the worker count, the manifest and `shards stats` naming what was dropped."""
import inspect
import json
import random

import pytest

from terrabyte.data_pipeline import cli
from terrabyte.data_pipeline.read.loader import split_documents
from terrabyte.data_pipeline.read.manifest import load_manifest
from terrabyte.data_pipeline.write import dedup, neardup


def _source(module_name: str) -> bytes:
    import importlib

    return inspect.getsource(importlib.import_module(module_name)).encode()


def _edit(data: bytes, n: int, seed: int) -> bytes:
    """`n` single bytes changed at random places: a near-copy."""
    rng = random.Random(seed)
    b = bytearray(data)
    for _ in range(n):
        i = rng.randrange(len(b))
        b[i] = (b[i] + 1) % 256
    return bytes(b)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("near") / "c"
    root.mkdir()
    textwrap, heapq, big = _source("textwrap"), _source("heapq"), _source("argparse")
    files = {
        "a_textwrap.py": textwrap,
        "b_heapq.py": heapq,
        "c_bisect.py": _source("bisect"),
        "d_json_decoder.py": _source("json.decoder"),
        "e_big.py": big,  # larger than --member-bytes: sketched while streamed
        "f_textwrap_edited.py": _edit(textwrap, 15, 0),
        "g_heapq_copy.py": heapq,
        "h_big_edited.py": _edit(big, 60, 1),
        "i_half_textwrap.py": textwrap[: len(textwrap) // 2] + _source("shlex")[:len(textwrap) // 2],
        "j_tiny.txt": b"abc",
        "k_tiny_copy.txt": b"abc",
    }
    for name, data in files.items():
        (root / name).write_bytes(data)
    return root


def _build(corpus, out, *flags):
    assert cli.main(["shards", "build", str(corpus), "--out", str(out), "--dedup", "near", "--val-fraction", "0",
                     "--member-bytes", "16K", "--no-progress", *flags]) == 0
    return load_manifest(str(out))


def test_near_copies_dropped_unrelated_kept_same_output_with_1_and_2_workers(corpus, tmp_path, capsys, monkeypatch):
    one = _build(corpus, tmp_path / "one", "--task-bytes", "60K")
    kept = dict(split_documents(str(tmp_path / "one"), "train"))
    assert sorted(kept) == ["a_textwrap.py", "b_heapq.py", "c_bisect.py", "d_json_decoder.py", "e_big.py",
                            "i_half_textwrap.py", "j_tiny.txt"]
    assert kept["e_big.py"] == (corpus / "e_big.py").read_bytes()
    rep = one["dedup"]
    assert (rep["documents"], rep["kept"], rep["dropped"], rep["exact"], rep["near"]) == (11, 7, 4, 2, 2)
    pairs = {d["path"]: (d["kept"], d["exact"]) for d in rep["dropped_docs"]}
    assert pairs == {"f_textwrap_edited.py": ("a_textwrap.py", False), "g_heapq_copy.py": ("b_heapq.py", True),
                     "h_big_edited.py": ("e_big.py", False), "k_tiny_copy.txt": ("j_tiny.txt", True)}
    assert all(0.8 <= d["jaccard"] <= 1.0 for d in rep["dropped_docs"])
    assert one["stats"]["duplicates"] == 4 and one["tasks"] > 2

    # 2 workers, and the pre-pass cut into many more jobs than tasks: the same bytes
    monkeypatch.setattr(dedup, "HASH_UNIT_BYTES", 1)
    two = _build(corpus, tmp_path / "two", "--task-bytes", "60K", "--workers", "2")
    assert [s["sha256"] for s in two["shards"]] == [s["sha256"] for s in one["shards"]]
    assert two["dedup"] == rep

    # a rerun over finished tasks (a resumed build) decides again from fresh sketches: the same record
    again = _build(corpus, tmp_path / "one", "--task-bytes", "60K")
    assert again["dedup"] == rep and [s["sha256"] for s in again["shards"]] == [s["sha256"] for s in one["shards"]]

    capsys.readouterr()
    assert cli.main(["shards", "stats", str(tmp_path / "one")]) == 0
    out = capsys.readouterr().out
    assert "near-duplicates: 4 of 11 documents dropped (2 exact copies, 2 near)" in out
    assert "dropped h_big_edited.py  ~ kept e_big.py" in out
    assert cli.main(["shards", "stats", str(tmp_path / "one"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["dedup"]["dropped"] == 4


def test_a_lower_threshold_drops_the_half_copy_a_higher_one_keeps_the_edits(corpus, tmp_path):
    low = _build(corpus, tmp_path / "low", "--dedup-threshold", "0.3", "--dedup-ngram", "8")
    assert "i_half_textwrap.py" in {d["path"] for d in low["dedup"]["dropped_docs"]}
    assert low["builder"]["args"]["dedup_ngram"] == 8
    exact_only = _build(corpus, tmp_path / "high", "--dedup-threshold", "0.99", "--dedup-perm", "512")
    assert {d["path"] for d in exact_only["dedup"]["dropped_docs"]} == {"g_heapq_copy.py", "k_tiny_copy.txt"}


def test_a_sketch_does_not_depend_on_how_the_bytes_are_cut():
    data = _source("textwrap")
    whole = neardup.Sketch("x", 5, 64)
    whole.update(data)
    cut = neardup.Sketch("x", 5, 64)
    rng, i = random.Random(0), 0
    while i < len(data):
        n = rng.choice([1, 2, 3, 4, 7, 100])
        cut.update(data[i:i + n])
        i += n
    a, b = whole.digest(), cut.digest()
    assert a[0] == b[0] and (a[1] == b[1]).all()
    short = [neardup.Sketch("s", 5, 64) for _ in range(2)]
    short[0].update(b"ab")
    short[1].update(b"a")
    short[1].update(b"b")
    assert (short[0].digest()[1] == short[1].digest()[1]).all()


@pytest.mark.parametrize("flags, message", [
    (["--dedup", "near", "--dedup-threshold", "1.5"], "--dedup-threshold 1.5 must be in (0, 1]"),
    (["--dedup", "near", "--dedup-ngram", "0"], "--dedup-ngram 0 must be >= 1"),
    (["--dedup", "near", "--dedup-threshold", "0.99"], "needs more permutations"),
    (["--dedup", "--dedup-perm", "64"], "--dedup-perm applies to --dedup near only"),
])
def test_bad_dedup_flags_are_one_line(corpus, tmp_path, capsys, flags, message):
    assert cli.main(["shards", "build", str(corpus), "--out", str(tmp_path / "s"), "--no-progress", *flags]) == 1
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "s" / "manifest.json").exists()


def test_stdin_is_refused_before_it_is_read(tmp_path, capsys):
    assert cli.main(["shards", "build", "-", "--out", str(tmp_path / "s"), "--dedup", "near", "--no-progress"]) == 1
    assert "stdin input ('-') can be read only once" in capsys.readouterr().err


def test_an_input_after_a_bare_dedup_is_named(corpus, tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["shards", "build", "--dedup", str(corpus), "--out", str(tmp_path / "s")])
    assert "is not a dedup mode (exact or near)" in capsys.readouterr().err
