"""`terrabyte shards build|stats|verify` through the data pipeline's own argparse entry."""
import argparse
import json

import pytest

from terrabyte.data_pipeline import cli
from terrabyte.data_pipeline.read.manifest import load_manifest


def corpus(root):
    for i in range(20):
        p = root / f"pkg{i % 2}" / f"m{i}.py"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(f"x = {i}\n".encode() * (50 + i))
    (root / "notes.txt").write_bytes(b"not python")


def test_build_stats_verify(tmp_path, capsys):
    corpus(tmp_path / "c")
    out = tmp_path / "s"
    rc = cli.main(["shards", "build", str(tmp_path / "c"), "--out", str(out), "--include", "*.py",
                   "--exclude", "pkg1/m1.py", "--val-fraction", "0.2", "--zstd-level", "7", "--member-bytes", "1K",
                   "--no-progress"])
    assert rc == 0
    man = load_manifest(str(out))
    assert man["builder"]["args"]["zstd_level"] == 7 and man["builder"]["args"]["member_bytes"] == 1024
    assert man["totals"]["all"]["documents"] == 19
    printed = capsys.readouterr().out
    assert "documents" in printed and "19" in printed

    assert cli.main(["shards", "stats", str(out)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["split", "shards", "documents"]
    row = {l.split()[0]: l.split() for l in table[1:4]}
    assert int(row["all"][2]) == 19
    assert int(row["train"][2]) + int(row["val"][2]) == 19
    assert cli.main(["shards", "stats", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["totals"]["all"]["documents"] == 19

    assert cli.main(["shards", "verify", str(out), "--no-progress"]) == 0
    assert capsys.readouterr().out.startswith("OK: ")


def test_verify_names_bad_shard_and_member(tmp_path, capsys):
    corpus(tmp_path / "c")
    out = tmp_path / "s"
    assert cli.main(["shards", "build", str(tmp_path / "c"), "--out", str(out), "--member-bytes", "512",
                     "--val-fraction", "0", "--no-progress"]) == 0
    man = load_manifest(str(out))
    shard = man["shards"][0]
    zo, zs = shard["index"]["zst_offset"][2], shard["index"]["zst_size"][2]
    with open(out / shard["path"], "r+b") as f:
        f.seek(zo + zs - 6)
        f.write(b"\x00\x01\x02\x03")
    capsys.readouterr()
    assert cli.main(["shards", "verify", str(out), "--no-progress"]) == 1
    lines = capsys.readouterr().out.splitlines()
    bad = [l for l in lines if l.startswith("BAD")]
    assert any("sha256 mismatch" in l and shard["path"] in l for l in bad)
    assert any(f"{shard['path']} member 000002" in l for l in bad)
    assert not any("member 000001" in l for l in bad)
    assert lines[-1].startswith("FAILED")


def test_bad_input_is_one_line(tmp_path, capsys):
    rc = cli.main(["shards", "build", str(tmp_path / "missing"), "--out", str(tmp_path / "o"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and "missing" in err and err.startswith("terrabyte: error:")
    assert cli.main(["shards", "stats", str(tmp_path)]) == 1
    assert "manifest.json" in capsys.readouterr().err


def test_every_command_has_help(capsys):
    parser = argparse.ArgumentParser(prog="terrabyte")
    cli.add_subcommands(parser.add_subparsers(dest="command"))
    for argv in (["shards"], ["shards", "build"], ["shards", "stats"], ["shards", "verify"]):
        with pytest.raises(SystemExit) as e:
            parser.parse_args(argv + ["--help"])
        assert e.value.code == 0
        assert len(capsys.readouterr().out) > 100
    assert cli.parse_size("2M") == 2 << 20 and cli.parse_size("1.5KiB") == 1536 and cli.parse_size("77") == 77
