"""Shard builder: round trips through our loader, upstream webdataset and tar + zstd; determinism;
bad input."""
import hashlib
import json
import os
import random
import shutil
import subprocess

import numpy as np
import pytest
import zstandard

from terrabyte.data_pipeline.basics.errors import DataError
from terrabyte.data_pipeline.read import fetch, unpack
from terrabyte.data_pipeline.read.loader import ByteLoader
from terrabyte.data_pipeline.write import config, tasks
from terrabyte.data_pipeline.write import documents
from terrabyte.data_pipeline.write.builder import build_shards
from terrabyte.data_pipeline.write.config import BuildConfig

EOS, PAD = 257, 256
MEMBER = 4096


def make_corpus(root, n_text=12):
    """Text, binary (0x00 and random bytes), a large file that gets chunked, an empty file."""
    rng = random.Random(0)
    files = {}
    for i in range(n_text):
        files[f"src/pkg{i % 3}/mod{i}.py"] = (f"def f{i}(x):\n    return x * {i}\n" * rng.randint(1, 60)).encode()
    files["bin/zeros.bin"] = b"\x00" * 300 + b"\x01\x00\x02"
    files["bin/random.bin"] = rng.randbytes(3000)
    files["big/large.txt"] = rng.randbytes(3 * MEMBER + 123)  # > member_bytes: chunked
    files["empty.txt"] = b""
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return files


def ordered(files):
    """Documents in the builder's order: sorted directory traversal (files before subdirectories)."""
    def key(rel):
        parts = rel.split("/")
        return [(1, p) for p in parts[:-1]] + [(0, parts[-1])]
    return sorted(files, key=key)


def docs_from_wds(urls):
    import webdataset as wds

    docs, partial = {}, {}
    keys = []
    for sample in wds.WebDataset(urls, shardshuffle=False):
        assert set(sample) >= {"__key__", "zst", "json"}
        keys.append(sample["__key__"])
        for path, piece, entry in unpack.documents_from_wds(sample):
            partial.setdefault(path, []).append(piece)
            if entry["doc_offset"] + entry["length"] == entry["doc_size"]:
                docs[path] = b"".join(partial.pop(path))
    return docs, keys


def read_docs(urls):
    """(path, bytes) of every document, through the sequential stages."""
    return unpack.documents(unpack.decompress(fetch.tar_members(urls)))


@pytest.fixture
def corpus(tmp_path):
    src = tmp_path / "corpus"
    files = make_corpus(src)
    return src, files


def test_round_trip_webdataset_loader_and_member_json(corpus, tmp_path):
    src, files = corpus
    out = tmp_path / "shards"
    man = build_shards(BuildConfig(inputs=[str(src)], val_fraction=0.0, member_bytes=MEMBER), str(out), progress=False)
    assert man["totals"]["train"]["documents"] == len(files)
    assert man["totals"]["val"]["documents"] == 0
    urls = [str(out / s["path"]) for s in man["shards"]]
    assert [os.path.basename(u) for u in urls] == ["train-00000-000000.tar"]

    # upstream webdataset yields .zst/.json samples whose pieces rebuild every document exactly
    docs, keys = docs_from_wds(urls)
    assert docs == files
    assert all("." not in k for k in keys) and keys == [f"{i:06d}" for i in range(len(keys))]

    # members: bundles of >= member_bytes raw (except the last), the large file in equal chunks
    shard = man["shards"][0]
    raws = shard["index"]["raw"]
    assert shard["members"] == len(keys) == len(raws)
    large = [i for i in range(len(raws)) if shard["index"]["cont"][i]]
    assert len(large) == 3  # 4 chunks, 3 continue into the next
    assert all(r <= 2 * MEMBER for r in raws)

    # our loader: a non-looping pass is the documents in order, each followed by EOS, then PAD
    loader = ByteLoader(str(out), split="train", seq_len=64, global_batch=2, micro_batch=2, loop=False)
    flat = np.concatenate([b.numpy().reshape(-1) for b in loader])
    expect = np.concatenate([np.append(np.frombuffer(files[p], np.uint8).astype(np.int64), EOS) for p in ordered(files)])
    assert flat.dtype == np.int64
    np.testing.assert_array_equal(flat[:len(expect)], expect)
    assert (flat[len(expect):] == PAD).all() and len(flat) - len(expect) < 2 * 64


def test_tar_and_zstd_command_line_tools(corpus, tmp_path):
    if shutil.which("zstd") is None or shutil.which("tar") is None:
        pytest.skip("needs the `zstd` and `tar` binaries (Debian packages zstd, tar)")
    src, files = corpus
    out = tmp_path / "shards"
    man = build_shards(BuildConfig(inputs=[str(src)], val_fraction=0.0, member_bytes=MEMBER), str(out), progress=False)
    shard = str(out / man["shards"][0]["path"])
    names = subprocess.run(["tar", "tf", shard], check=True, capture_output=True, text=True).stdout.split()
    n = man["shards"][0]["members"]
    assert names == [f"{k:06d}.{e}" for k in range(n) for e in ("json", "zst")]
    partial, docs = {}, {}
    for k in range(n):
        meta = json.loads(subprocess.run(["tar", "xOf", shard, f"{k:06d}.json"], check=True, capture_output=True).stdout)
        zst = subprocess.run(["tar", "xOf", shard, f"{k:06d}.zst"], check=True, capture_output=True).stdout
        raw = subprocess.run(["zstd", "-dc"], input=zst, check=True, capture_output=True).stdout
        assert len(raw) == man["shards"][0]["index"]["raw"][k]
        for d in meta["docs"]:
            partial.setdefault(d["path"], []).append(raw[d["offset"]:d["offset"] + d["length"]])
            if d["doc_offset"] + d["length"] == d["doc_size"]:
                docs[d["path"]] = b"".join(partial.pop(d["path"]))
    assert docs == files


def test_manifest_fields_and_checksums(corpus, tmp_path):
    src, files = corpus
    out = tmp_path / "shards"
    man = build_shards(BuildConfig(inputs=[str(src)], val_fraction=0.3, member_bytes=MEMBER, zstd_level=5),
                       str(out), progress=False)
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk == json.loads(json.dumps({k: v for k, v in man.items() if k != "_dir"}))  # returned == written
    assert on_disk["builder"]["version"] == config.BUILDER_VERSION
    assert on_disk["builder"]["args"]["zstd_level"] == 5 and on_disk["builder"]["args"]["val_fraction"] == 0.3
    for s in on_disk["shards"]:
        data = (out / s["path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == s["sha256"] and len(data) == s["tar_bytes"]
        assert s["split"] in ("train", "val") and s["path"].startswith(s["split"] + "-")
        assert s["raw_bytes"] == sum(s["index"]["raw"]) and s["compressed_bytes"] == sum(s["index"]["zst_size"])
        # recorded offsets point at the payloads
        for jo, js, zo, zs in zip(*(s["index"][k] for k in ("json_offset", "json_size", "zst_offset", "zst_size"))):
            json.loads(data[jo:jo + js])
            zstandard.ZstdDecompressor().decompress(data[zo:zo + zs])
    total = on_disk["totals"]["all"]
    assert total["documents"] == len(files) == on_disk["totals"]["train"]["documents"] + on_disk["totals"]["val"]["documents"]
    assert total["raw_bytes"] == sum(len(v) for v in files.values())
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]


def test_byte_reproducible(corpus, tmp_path):
    src, _ = corpus
    a, b = tmp_path / "a", tmp_path / "b"
    build_shards(BuildConfig(inputs=[str(src)], val_fraction=0.3, member_bytes=MEMBER), str(a), progress=False)
    build_shards(BuildConfig(inputs=[str(src)], val_fraction=0.3, member_bytes=MEMBER), str(b), progress=False)
    names = sorted(p for p in os.listdir(a) if not p.startswith("."))
    assert names == sorted(p for p in os.listdir(b) if not p.startswith("."))
    for n in names:
        assert (a / n).read_bytes() == (b / n).read_bytes(), n


def test_split_is_a_stable_hash_of_the_group(corpus, tmp_path):
    src, files = corpus
    frac = 0.4
    expect_val = {p for p in files
                  if int.from_bytes(hashlib.sha256(p.encode()).digest()[:8], "big") < frac * 2**64}
    assert 0 < len(expect_val) < len(files)  # both splits populated for this corpus
    man = build_shards(BuildConfig(inputs=[str(src)], val_fraction=frac, member_bytes=MEMBER),
                       str(tmp_path / "s"), progress=False)
    got_val = {p for p, _ in read_docs((
        [str(tmp_path / "s" / s["path"]) for s in man["shards"] if s["split"] == "val"]))}
    assert got_val == expect_val

    # group by the first path component: every file of a top-level directory lands in one split
    man = build_shards(BuildConfig(inputs=[str(src)], val_fraction=0.5, group_depth=1, member_bytes=MEMBER),
                       str(tmp_path / "g"), progress=False)
    for split in ("train", "val"):
        paths = {p for p, _ in read_docs((
            [str(tmp_path / "g" / s["path"]) for s in man["shards"] if s["split"] == split]))}
        for p in paths:
            assert tasks.split_of(p.split("/")[0], 0.5) == split


def test_include_exclude_globs(corpus, tmp_path):
    src, files = corpus
    man = build_shards(BuildConfig(inputs=[str(src)], include=["*.py"], exclude=["src/pkg1/*"], val_fraction=0.0),
                       str(tmp_path / "s"), progress=False)
    got = dict(read_docs(([str(tmp_path / "s" / s["path"]) for s in man["shards"]])))
    assert got == {p: d for p, d in files.items() if p.endswith(".py") and not p.startswith("src/pkg1/")}


def test_missing_input_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        build_shards(BuildConfig(inputs=[str(tmp_path / "nope")]), str(tmp_path / "out"), progress=False)
    assert not (tmp_path / "out").exists()


def test_empty_corpus_is_an_error(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.txt").write_bytes(b"abc")
    with pytest.raises(ValueError, match="include/exclude"):
        build_shards(BuildConfig(inputs=[str(tmp_path / "c")], include=["*.py"]), str(tmp_path / "out"), progress=False)
    with pytest.raises(ValueError, match="empty corpus"):  # files exist, but every document filtered
        build_shards(BuildConfig(inputs=[str(tmp_path / "c")], min_bytes=10), str(tmp_path / "out"), progress=False)
    assert not [p for p in os.listdir(tmp_path / "out") if not p.startswith(".build")]


def test_unreadable_file_names_the_path(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "ok.txt").write_bytes(b"fine")
    os.symlink(tmp_path / "gone", tmp_path / "c" / "dangling.txt")
    with pytest.raises(OSError, match="dangling.txt"):  # links are read only with follow_symlinks
        build_shards(BuildConfig(inputs=[str(tmp_path / "c")], follow_symlinks=True),
                     str(tmp_path / "out"), progress=False)
    man = build_shards(BuildConfig(inputs=[str(tmp_path / "c")]), str(tmp_path / "out"), progress=False)
    assert man["stats"]["skipped_links"] == 1 and man["totals"]["all"]["documents"] == 1


def test_failure_mid_build_leaves_no_manifest(corpus, tmp_path, monkeypatch):
    src, _ = corpus
    out = tmp_path / "s"
    build_shards(BuildConfig(inputs=[str(src)], member_bytes=MEMBER), str(out), progress=False)
    assert (out / "manifest.json").exists()
    before = {p: (out / p).read_bytes() for p in os.listdir(out) if (out / p).is_file()}
    real = documents.read_file_bytes

    def flaky(path, *args):
        if path.endswith("random.bin"):
            raise OSError(f"cannot read input file {path!r}: Input/output error")
        return real(path, *args)

    monkeypatch.setattr(documents, "read_file_bytes", flaky)
    # a different member size forces a real rebuild (the completion marker no longer matches)
    with pytest.raises(OSError, match="random.bin"):
        build_shards(BuildConfig(inputs=[str(src)], member_bytes=2 * MEMBER), str(out), progress=False)
    # the previous build is left as it was: its manifest still vouches for its own shards
    assert {p: (out / p).read_bytes() for p in os.listdir(out) if (out / p).is_file()} == before
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]
    # on_error="skip" builds the rest and counts the skipped input
    man = build_shards(BuildConfig(inputs=[str(src)], member_bytes=2 * MEMBER, on_error="skip"),
                       str(out), progress=False)
    assert man["stats"]["skipped_sources"] == 1 and man["stats"]["skipped_names"] == ["bin/random.bin"]


# ---------------------------------------------------------------------------------------------
# Documents larger than a member: streamed, continued across members, in bounded memory
# ---------------------------------------------------------------------------------------------


def _big(n, seed=1):
    return random.Random(seed).randbytes(n)


def _tar_gz(path, members):
    import io
    import tarfile

    with tarfile.open(path, "w:gz", compresslevel=1) as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def test_a_document_larger_than_a_member_is_continued_across_members(tmp_path):
    from terrabyte.data_pipeline.read.loader import split_documents
    from terrabyte.data_pipeline.verify import format_stats, verify_shards

    big = _big(10 * MEMBER + 77)
    src = tmp_path / "c"
    src.mkdir()
    (src / "a.txt").write_bytes(b"small one")
    (src / "big.bin").write_bytes(big)
    _tar_gz(src / "z.tar.gz", {"inner/huge.bin": big[::-1], "inner/tiny.txt": b"x"})
    out = tmp_path / "s"
    man = build_shards(BuildConfig(inputs=[str(src)], member_bytes=MEMBER, shard_bytes=3 * MEMBER, val_fraction=0),
                       str(out), progress=False)
    spans = [sp for s in man["shards"] for sp in s["spans"]]
    assert [(sp["path"], sp["size"], sp["members"]) for sp in spans] == [
        ("big.bin", len(big), 11), ("z.tar.gz/inner/huge.bin", len(big), 11)]
    assert len(man["shards"]) > 2  # the chunks roll over into further shards: one document across shards
    docs = dict(split_documents(str(out), "train"))
    assert docs == {"a.txt": b"small one", "big.bin": big, "z.tar.gz/inner/huge.bin": big[::-1],
                    "z.tar.gz/inner/tiny.txt": b"x"}
    assert verify_shards(str(out)) == []
    assert "continued documents (cut into several members): 2 in 22 members" in format_stats(man)
    # a damaged chain is named: drop a middle member's piece of the continued document from the index
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["shards"][0]["spans"][0]["members"] = 12
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert any("spans record says 'big.bin'" in p for p in verify_shards(str(out)))


def test_streamed_document_memory_is_bounded(tmp_path):
    """The builder holds a block and a member, not the document: tracemalloc's peak (Python and
    numpy allocations) stays far below the 24 MB input, from a plain file and from a tar."""
    import tarfile
    import tracemalloc

    src = tmp_path / "c"
    src.mkdir()
    block = _big(1 << 16)
    with open(src / "big.bin", "wb") as f:
        for i in range(384):  # 24 MiB
            f.write(block[i:] + block[:i])
    with tarfile.open(src / "big.tar", "w") as tf:
        tf.add(src / "big.bin", arcname="big.bin")
    for name in ("big.bin", "big.tar"):
        tracemalloc.start()
        try:
            man = build_shards(BuildConfig(inputs=[str(src / name)], member_bytes=1 << 20, zstd_level=1,
                                           val_fraction=0),
                               str(tmp_path / name), progress=False)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert man["totals"]["all"]["raw_bytes"] == 24 << 20 and man["totals"]["all"]["members"] == 24
        assert peak < 6 << 20, f"{name}: peak {peak / 1e6:.1f} MB while building a 25 MB document"


def test_a_failure_inside_a_streamed_document_leaves_no_part_of_it(tmp_path):
    from terrabyte.data_pipeline.read.loader import split_documents
    from terrabyte.data_pipeline.verify import verify_shards

    src = tmp_path / "c"
    src.mkdir()
    (src / "a.txt").write_bytes(b"kept before")
    big = _big(20 * MEMBER)
    _tar_gz(src / "b.tar.gz", {"huge.bin": big})
    whole = (src / "b.tar.gz").read_bytes()
    (src / "b.tar.gz").write_bytes(whole[:len(whole) * 2 // 3])  # truncated inside huge.bin
    (src / "c.txt").write_bytes(b"kept after")
    out = tmp_path / "s"
    kw = dict(member_bytes=MEMBER, shard_bytes=3 * MEMBER, val_fraction=0)
    with pytest.raises(DataError, match="b.tar.gz"):
        build_shards(BuildConfig(inputs=[str(src)], **kw), str(out), progress=False)
    assert not (out / "manifest.json").exists() and not [p for p in os.listdir(out) if p.endswith(".tar") or p.endswith(".tmp")]
    # skip: the chunks written before the error (several shards of them) are taken out again
    man = build_shards(BuildConfig(inputs=[str(src)], on_error="skip", **kw), str(out), progress=False)
    assert man["stats"]["skipped_names"] == ["b.tar.gz"]
    assert dict(split_documents(str(out), "train")) == {"a.txt": b"kept before", "c.txt": b"kept after"}
    assert man["totals"]["all"]["members"] == 1 and all(not s["spans"] for s in man["shards"])
    assert sorted(os.listdir(out)) == sorted(["manifest.json", ".task-00000.json"] + [s["path"] for s in man["shards"]])
    assert verify_shards(str(out)) == []


@pytest.mark.parametrize("task_bytes", [1 << 30, 1])  # on the fly (one task), and by the pre-pass
def test_streamed_duplicates_are_dropped_without_a_trace(tmp_path, task_bytes):
    from terrabyte.data_pipeline.read.loader import split_documents

    src = tmp_path / "c"
    src.mkdir()
    big = _big(5 * MEMBER)
    for name, data in [("a.txt", b"one"), ("b.bin", big), ("c.txt", b"two"), ("d.bin", big), ("e.txt", b"three")]:
        (src / name).write_bytes(data)
    kw = dict(member_bytes=MEMBER, val_fraction=0, task_bytes=task_bytes)
    man = build_shards(BuildConfig(inputs=[str(src)], dedup=True, **kw), str(tmp_path / "s"), progress=False)
    assert man["stats"]["duplicates"] == 1
    assert dict(split_documents(str(tmp_path / "s"), "train")) == {"a.txt": b"one", "b.bin": big, "c.txt": b"two",
                                                                   "e.txt": b"three"}
    os.remove(src / "d.bin")  # the same shards as if the copy had never been there
    ref = build_shards(BuildConfig(inputs=[str(src)], **kw), str(tmp_path / "r"), progress=False)
    assert [s["index"] for s in man["shards"]] == [s["index"] for s in ref["shards"]]
