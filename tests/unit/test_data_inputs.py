"""Builder input kinds and options: archives, JSON Lines, MediaWiki, stdin, globs, dedup, size
filters, worker processes, completion markers, zstd dictionaries; the loader over http."""
import functools
import gzip
import http.server
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import threading
import zipfile

import pytest
import torch
import zstandard

from terrabyte.data_pipeline.basics.errors import DataError
from terrabyte.data_pipeline.read import fetch, unpack
from terrabyte.data_pipeline.read.loader import ByteLoader
from terrabyte.data_pipeline.read.manifest import load_manifest
from terrabyte.data_pipeline.verify import verify_shards
from terrabyte.data_pipeline.write import builder, tasks
from terrabyte.data_pipeline.write.builder import build_shards
from terrabyte.data_pipeline.write.config import BuildConfig


def all_docs(out, split=None):
    man = load_manifest(str(out))
    zdict = None
    if man.get("zstd_dict"):
        zdict = (out / man["zstd_dict"]["path"]).read_bytes()
    urls = [str(out / s["path"]) for s in man["shards"] if split in (None, s["split"])]
    return dict(unpack.documents(unpack.decompress(fetch.tar_members(urls), zdict)))


def write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_archives_member_by_member_one_group(tmp_path):
    files = {"repo/a.py": b"print('a')\n", "repo/sub/b.py": b"\x00\x01binary", "repo/README": b"readme"}
    src = tmp_path / "in"
    src.mkdir()
    with tarfile.open(src / "one.tar", "w") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    with tarfile.open(src / "two.tar.gz", "w:gz") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    with zipfile.ZipFile(src / "three.zip", "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    out = tmp_path / "s"
    build_shards(BuildConfig(inputs=[str(src)], val_fraction=0.5), str(out), progress=False)
    got = {**all_docs(out, "train"), **all_docs(out, "val")}
    assert got == {f"{a}/{n}": d for a in ("one.tar", "three.zip", "two.tar.gz") for n, d in files.items()}
    for split in ("train", "val"):  # each archive's members all sit in one split
        for archive in {p.split("/")[0] for p in all_docs(out, split)}:
            assert tasks.split_of(archive, 0.5) == split
    # globs apply to the archive and to its members
    build_shards(BuildConfig(inputs=[str(src)], include=["*.tar", "*.py"], val_fraction=0.0),
                 str(tmp_path / "py"), progress=False)
    assert set(all_docs(tmp_path / "py")) == {"one.tar/repo/a.py", "one.tar/repo/sub/b.py"}


def test_corrupt_archive_names_the_file(tmp_path):
    write(tmp_path / "in" / "bad.tar.gz", b"this is not gzip at all")
    with pytest.raises(ValueError, match="bad.tar.gz"):
        build_shards(BuildConfig(inputs=[str(tmp_path / "in")]), str(tmp_path / "s"), progress=False)
    assert not (tmp_path / "s" / "manifest.json").exists()


def test_json_lines_plain_gz_zst(tmp_path):
    records = [{"text": "first doc", "id": 1}, {"text": "second\nwith newline"}, {"text": "ünïcode"}]
    body = "".join(json.dumps(r) + "\n" for r in records).encode()
    write(tmp_path / "in" / "a.jsonl", body + b"\n")  # a blank line is ignored
    write(tmp_path / "in" / "b.jsonl.gz", gzip.compress(body))
    write(tmp_path / "in" / "c.jsonl.zst", zstandard.ZstdCompressor().compress(body))
    out = tmp_path / "s"
    build_shards(BuildConfig(inputs=[str(tmp_path / "in")], val_fraction=0.0), str(out), progress=False)
    expect = {f"{f}:{i + 1}": r["text"].encode() for f in ("a.jsonl", "b.jsonl.gz", "c.jsonl.zst")
              for i, r in enumerate(records)}
    assert all_docs(out) == expect
    write(tmp_path / "bad" / "x.jsonl", b'{"text": "ok"}\n{"body": "no text field"}\n')
    with pytest.raises(ValueError, match=r"x.jsonl:2.*'text'"):
        build_shards(BuildConfig(inputs=[str(tmp_path / "bad")]), str(tmp_path / "s2"), progress=False)
    write(tmp_path / "bad" / "y.txt", b"plain")
    man = build_shards(BuildConfig(inputs=[str(tmp_path / "bad")], val_fraction=0.0, on_error="skip"),
                       str(tmp_path / "s3"), progress=False)
    assert man["stats"]["skipped_sources"] == 1 and man["stats"]["skipped_names"] == ["x.jsonl"]
    assert all_docs(tmp_path / "s3") == {"x.jsonl:1": b"ok", "y.txt": b"plain"}  # lines before the error kept


WIKI = b"""<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.3/" version="0.3">
  <siteinfo><sitename>Wikipedia</sitename></siteinfo>
  <page><title>AaA</title><id>1</id><revision><id>3</id><text xml:space="preserve">#REDIRECT [[AAA]] &amp; x</text></revision></page>
  <page><title>Anarchism</title><id>12</id><revision><id>4</id><text xml:space="preserve">'''Anarchism''' is...
line two</text></revision></page>
  <page><title>Cut</title><id>13</id><revision><id>5</id><text xml:space="preserve">truncated in the mi"""


def test_mediawiki_pages_and_whole_file(tmp_path):
    write(tmp_path / "in" / "enwik_small", WIKI)
    out = tmp_path / "pages"
    build_shards(BuildConfig(inputs=[str(tmp_path / "in")], input_format="mediawiki", val_fraction=0.0),
                 str(out), progress=False)
    assert all_docs(out) == {"enwik_small/AaA": b"#REDIRECT [[AAA]] & x",
                             "enwik_small/Anarchism": b"'''Anarchism''' is...\nline two"}
    whole = tmp_path / "whole"  # default: the dump is one document, bytes as they are
    build_shards(BuildConfig(inputs=[str(tmp_path / "in")], val_fraction=0.0), str(whole), progress=False)
    assert all_docs(whole) == {"enwik_small": WIKI}


def test_stdin_and_globs(tmp_path):
    out = tmp_path / "s"
    data = bytes(range(256)) * 3
    r = subprocess.run([sys.executable, "-m", "terrabyte.data_pipeline.cli", "shards", "build", "-", "--out",
                        str(out), "--val-fraction", "0", "--no-progress"], input=data, capture_output=True)
    assert r.returncode == 0, r.stderr
    assert all_docs(out) == {"stdin": data}
    for name in ("a.txt", "b.txt", "c.md"):
        write(tmp_path / "g" / name, name.encode())
    build_shards(BuildConfig(inputs=[str(tmp_path / "g" / "*.txt")], val_fraction=0.0),
                 str(tmp_path / "gs"), progress=False)
    assert all_docs(tmp_path / "gs") == {"a.txt": b"a.txt", "b.txt": b"b.txt"}
    with pytest.raises(FileNotFoundError, match=r"\*.rst"):
        build_shards(BuildConfig(inputs=[str(tmp_path / "g" / "*.rst")]), str(tmp_path / "x"), progress=False)


def make_tree(root, n=40):
    for i in range(n):
        write(root / f"d{i % 5}" / f"f{i:02d}.txt", (f"document {i % 13}\n" * (3 + i % 13)).encode())


def test_dedup_and_size_filters_across_tasks(tmp_path):
    make_tree(tmp_path / "in")  # 40 files, only 13 distinct contents
    one = build_shards(BuildConfig(inputs=[str(tmp_path / "in")], dedup=True, val_fraction=0.0),
                       str(tmp_path / "one"), progress=False)
    many = build_shards(BuildConfig(inputs=[str(tmp_path / "in")], dedup=True, val_fraction=0.0, task_bytes=300),
                        str(tmp_path / "many"), progress=False)
    assert many["tasks"] > 3
    assert one["stats"]["duplicates"] == many["stats"]["duplicates"] == 40 - 13
    d1, d2 = all_docs(tmp_path / "one"), all_docs(tmp_path / "many")
    assert d1 == d2 and len(set(d1.values())) == len(d1) == 13
    first = {}
    order = sorted((f"d{i % 5}/f{i:02d}.txt" for i in range(40)))
    for path in order:
        first.setdefault((tmp_path / "in" / path).read_bytes(), path)
    assert sorted(d1) == sorted(first.values())  # the first copy in reading order is kept
    sized = build_shards(BuildConfig(inputs=[str(tmp_path / "in")], min_bytes=100, max_bytes=150, val_fraction=0.0),
                         str(tmp_path / "sz"), progress=False)
    assert all(100 <= len(v) <= 150 for v in all_docs(tmp_path / "sz").values())
    assert sized["stats"]["filtered_size"] == 40 - len(all_docs(tmp_path / "sz")) > 0


def test_workers_give_identical_shards_and_rerun_skips_done_tasks(tmp_path, monkeypatch):
    make_tree(tmp_path / "in")
    kw = dict(task_bytes=400, val_fraction=0.25, member_bytes=256)
    a = build_shards(BuildConfig(inputs=[str(tmp_path / "in")], **kw), str(tmp_path / "a"), workers=1, progress=False)
    b = build_shards(BuildConfig(inputs=[str(tmp_path / "in")], **kw), str(tmp_path / "b"), workers=2, progress=False)
    assert a["tasks"] >= 4 and a == b  # the manifest does not depend on --workers either
    for s in a["shards"]:
        assert (tmp_path / "a" / s["path"]).read_bytes() == (tmp_path / "b" / s["path"]).read_bytes()
    assert {s["task"] for s in a["shards"]} == set(range(a["tasks"]))

    # a killed build: manifest never written, one task's shards and marker missing
    (tmp_path / "a" / "manifest.json").unlink()
    lost = [s["path"] for s in a["shards"] if s["task"] == 2]
    for p in lost:
        (tmp_path / "a" / p).unlink()
    (tmp_path / "a" / ".task-00002.json").unlink()
    ran = []
    real = builder.run_task
    monkeypatch.setattr(builder, "run_task", lambda t, *args, **kw2: ran.append(t) or real(t, *args, **kw2))
    c = build_shards(BuildConfig(inputs=[str(tmp_path / "in")], **kw), str(tmp_path / "a"), workers=1, progress=False)
    assert ran == [2] and c == a
    for p in lost:
        assert (tmp_path / "a" / p).read_bytes() == (tmp_path / "b" / p).read_bytes()


def test_trained_dictionary(tmp_path):
    make_tree(tmp_path / "in", n=200)
    out = tmp_path / "s"
    man = build_shards(BuildConfig(inputs=[str(tmp_path / "in")], dict_bytes=2048, member_bytes=512, val_fraction=0.1),
                       str(out), progress=False)
    dict_id = man["zstd_dict"]["id"]
    zdict = (out / "zstd.dict").read_bytes()
    assert dict_id == zstandard.ZstdCompressionDict(zdict).dict_id() != 0
    shard = out / man["shards"][0]["path"]
    with tarfile.open(shard) as tf:
        frame = tf.extractfile("000000.zst").read()
    assert zstandard.get_frame_parameters(frame).dict_id == dict_id
    assert verify_shards(str(out)) == []
    assert len(all_docs(out)) == 200
    batch = next(iter(ByteLoader(str(out), seq_len=64, global_batch=2, micro_batch=2)))
    assert batch.shape == (2, 64) and int(batch.max()) <= 257
    if shutil.which("zstd"):
        raw = subprocess.run(["zstd", "-dc", "-D", str(out / "zstd.dict")], input=frame, capture_output=True,
                             check=True).stdout
        assert len(raw) == man["shards"][0]["index"]["raw"][0]


def test_loader_reads_over_http(tmp_path):
    make_tree(tmp_path / "in")
    out = tmp_path / "s"
    build_shards(BuildConfig(inputs=[str(tmp_path / "in")], member_bytes=256, val_fraction=0.0),
                 str(out), progress=False)
    handler = functools.partial(QuietHandler, directory=str(out))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/"
        kw = dict(seq_len=32, global_batch=2, micro_batch=2, seed=4)
        local = ByteLoader(str(out), **kw)
        remote = ByteLoader(url, **kw)
        for a, b, _ in zip(local, remote, range(len(local) + 3)):
            assert torch.equal(a, b)
    finally:
        server.shutdown()
        server.server_close()
    with pytest.raises(ValueError, match="pipe:"):
        ByteLoader("pipe:cat shards", **kw)


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    """Serves files with Range support (SimpleHTTPRequestHandler ignores Range: we add it)."""

    def log_message(self, *args):
        pass

    def send_head(self):
        rng = self.headers.get("Range")
        if not rng:
            return super().send_head()
        path = self.translate_path(self.path)
        start, end = (int(x) for x in rng.split("=")[1].split("-"))
        with open(path, "rb") as f:
            f.seek(start)
            data = f.read(end - start + 1)
        self.send_response(206)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        return io.BytesIO(data)


def test_loader_reads_pipe_only_when_allowed(tmp_path):
    make_tree(tmp_path / "in", n=100)
    out = tmp_path / "s"
    build_shards(BuildConfig(inputs=[str(tmp_path / "in")], member_bytes=256, dict_bytes=1024, val_fraction=0.0),
                 str(out), progress=False)
    kw = dict(seq_len=32, global_batch=2, micro_batch=2, seed=1)
    template = f"pipe:cat {out}/{{}}"
    with pytest.raises(ValueError, match="runs a shell command"):
        ByteLoader(template, **kw)
    piped = ByteLoader(template, allow_pipe=True, **kw)
    local = ByteLoader(str(out), **kw)
    for a, b, _ in zip(local, piped, range(len(local) + 2)):
        assert torch.equal(a, b)
    cache = piped._files._cache_dir
    assert cache and os.listdir(cache)  # shards fetched once into a private cache...
    piped.close()
    assert not os.path.exists(cache)  # ...removed on close
    with pytest.raises(FileNotFoundError, match="pipe command"):
        ByteLoader(f"pipe:cat {tmp_path}/nowhere/{{}}", allow_pipe=True, **kw)


def test_split_documents_of_a_dictionary_build(tmp_path):
    from terrabyte.data_pipeline.read.loader import split_documents

    make_tree(tmp_path / "in", n=60)
    out = tmp_path / "s"
    build_shards(BuildConfig(inputs=[str(tmp_path / "in")], dict_bytes=1024, member_bytes=512, val_fraction=0.2),
                 str(out), progress=False)
    for split in ("train", "val"):
        assert dict(split_documents(str(out), split)) == all_docs(out, split)
    assert dict(split_documents(str(out), "all")) == all_docs(out)
    with pytest.raises(DataError, match="no 'test' shards"):
        list(split_documents(str(out), "test"))
