"""Hostile inputs: members that expand past their bound (loader and builder), archive members that
are links, devices or FIFOs or whose names leave the archive, a small .tar.gz holding a large file,
and `pipe:` data paths, which run a shell command only when allowed."""
import io
import json
import os
import subprocess
import sys
import tarfile
import textwrap
import zipfile

import pytest
import zstandard

from terrabyte.data_pipeline.basics.errors import ConfigError, DataError
from terrabyte.data_pipeline.read import fetch, unpack
from terrabyte.data_pipeline.read.loader import ByteLoader, split_documents
from terrabyte.data_pipeline.read.manifest import load_manifest
from terrabyte.data_pipeline.write.builder import build_shards
from terrabyte.data_pipeline.write.config import BuildConfig


def test_loader_refuses_a_member_past_max_member_bytes(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "big.txt").write_bytes(b"x" * 3000)
    (src / "small.txt").write_bytes(b"y" * 100)
    build_shards(BuildConfig(inputs=[str(src)], val_fraction=0.0, member_bytes=4096),
                 str(tmp_path / "shards"), progress=False)
    kw = dict(split="train", seq_len=16, global_batch=2, micro_batch=2, loop=False)
    with pytest.raises(DataError, match=r"train-\S+ member 000000: the manifest gives it 3100 raw bytes, more "
                                        r"than max_member_bytes=1000"):
        list(ByteLoader(str(tmp_path / "shards"), max_member_bytes=1000, **kw))
    assert sum(len(b) for b in ByteLoader(str(tmp_path / "shards"), max_member_bytes=4000, **kw)) > 0


def test_a_decompression_bomb_is_refused_before_it_expands():
    bomb = zstandard.ZstdCompressor().compress(b"\0" * (64 << 20))  # 64 MiB in a few KiB
    assert len(bomb) < 64 << 10
    with pytest.raises(DataError, match="s m: its zstd frame declares 67108864 bytes, more than the limit"):
        unpack.decompress_sample(fetch.Sample("s m", b"{}", bomb), max_bytes=1 << 20)
    # a frame header without a content size: the output buffer is capped at the limit instead
    hidden = zstandard.ZstdCompressor(write_content_size=False).compress(b"\0" * (64 << 20))
    with pytest.raises(DataError, match="s m: bad zstd frame, or one expanding past 1048576 bytes"):
        unpack.decompress_sample(fetch.Sample("s m", b"{}", hidden), max_bytes=1 << 20)
    # a header that lies about the size the manifest records: refused from the header
    with pytest.raises(DataError, match="declares 67108864 bytes, more than the limit of 5000"):
        unpack.decompress_sample(fetch.Sample("s m", b"{}", bomb, raw_size=5000))


def test_builder_refuses_a_json_line_past_max_member_bytes(tmp_path):
    data = tmp_path / "docs.jsonl"
    data.write_text(json.dumps({"text": "a" * 50}) + "\n" + json.dumps({"text": "b" * 5000}) + "\n")
    with pytest.raises(DataError, match=r"docs.jsonl:2: a line longer than --max-member-bytes=1000 bytes"):
        build_shards(BuildConfig(inputs=[str(data)], max_member_bytes=1000), str(tmp_path / "out"), progress=False)
    man = build_shards(BuildConfig(inputs=[str(data)], max_member_bytes=1000, on_error="skip"),
                       str(tmp_path / "out2"), progress=False)
    assert man["stats"]["skipped_sources"] == 1
    assert build_shards(BuildConfig(inputs=[str(data)]),
                        str(tmp_path / "out3"), progress=False)["totals"]["all"]["documents"] == 2


def _tar_with_specials(path):
    with tarfile.open(path, "w") as tf:
        def add(name, data=None, kind=tarfile.REGTYPE, link=""):
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, link
            info.size = len(data) if data is not None else 0
            tf.addfile(info, io.BytesIO(data) if data is not None else None)

        add("ok.txt", b"regular member")
        add("../evil.txt", b"dot-dot name, read as data")
        add("/abs.txt", b"absolute name, read as data")
        add("passwd", kind=tarfile.SYMTYPE, link="/etc/passwd")
        add("hard", kind=tarfile.LNKTYPE, link="ok.txt")
        add("fifo", kind=tarfile.FIFOTYPE)
        add("tty", kind=tarfile.CHRTYPE)


def test_archive_links_devices_and_fifos_are_counted_never_followed(tmp_path):
    _tar_with_specials(tmp_path / "a.tar")
    with zipfile.ZipFile(tmp_path / "z.zip", "w") as zf:
        zf.writestr("fine.txt", b"zip member")
        link = zipfile.ZipInfo("passwd")
        link.external_attr = 0o120777 << 16  # a symlink: its data is the target's name
        zf.writestr(link, b"/etc/passwd")
    man = build_shards(BuildConfig(inputs=[str(tmp_path / "a.tar"), str(tmp_path / "z.zip")], val_fraction=0.0),
                       str(tmp_path / "out"), progress=False)
    assert man["stats"]["skipped_special"] == 5
    docs = dict(split_documents(str(tmp_path / "out"), "train"))
    assert docs == {"a.tar/ok.txt": b"regular member", "a.tar/evil.txt": b"dot-dot name, read as data",
                    "a.tar/abs.txt": b"absolute name, read as data", "z.zip/fine.txt": b"zip member"}


# VmHWM, not ru_maxrss: the latter keeps the forking parent's (pytest's) resident size across exec
BUILD_AND_MEASURE = textwrap.dedent("""
    import re, sys
    from terrabyte.data_pipeline.write.builder import build_shards
    from terrabyte.data_pipeline.write.config import BuildConfig
    build_shards(BuildConfig(inputs=[sys.argv[1]], val_fraction=0.0), sys.argv[2], progress=False)
    print(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1))
""")


def test_a_small_tar_gz_holding_a_large_file_builds_in_bounded_memory(tmp_path):
    """A 256 MiB file of zeros in a .tar.gz of a few hundred KiB: the builder streams it (peak RSS
    far below the file's size); BENCHMARKS.md has the 2 GiB measurement."""
    size = 256 << 20
    archive = tmp_path / "bomb.tar.gz"

    class Zeros(io.RawIOBase):
        def __init__(self):
            self.left = size

        def readable(self):
            return True

        def readinto(self, b):
            n = min(len(b), self.left)
            b[:n] = bytes(n)
            self.left -= n
            return n

    with tarfile.open(archive, "w:gz", compresslevel=1) as tf:
        info = tarfile.TarInfo("zeros.bin")
        info.size = size
        tf.addfile(info, io.BufferedReader(Zeros(), 1 << 20))
    assert archive.stat().st_size < 2 << 20
    proc = subprocess.run([sys.executable, "-c", BUILD_AND_MEASURE, str(archive), str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr[-2000:]
    peak_mib = int(proc.stdout.strip().splitlines()[-1]) / 1024
    assert peak_mib < 128, peak_mib  # half the file; measured about 45 MiB
    man = load_manifest(str(tmp_path / "out"))
    assert sum(s["raw_bytes"] for s in man["shards"]) == size


def test_pipe_data_paths_need_allow_pipe(tmp_path):
    from terrabyte.pretrain.train.config import load_config
    from terrabyte.pretrain.train.trainer import resolve_data

    path = f"pipe:cat {tmp_path}/{{}}"
    with pytest.raises(ConfigError, match="runs a shell command: set --data.allow_pipe true"):
        resolve_data(load_config("tiny", ["--data.path", path]), 0)
    assert resolve_data(load_config("tiny", ["--data.path", path, "--data.allow_pipe", "true"]), 0) == path
    with pytest.raises(ConfigError, match="runs a shell command"):
        ByteLoader(path)


def test_a_mediawiki_page_past_max_member_bytes_is_refused_before_it_is_held(tmp_path):
    """ElementTree holds a page's text whole until its closing tag: the bound sits on the bytes read."""
    def page(title, text):
        return f"<page><title>{title}</title><revision><text>{text}</text></revision></page>\n"

    ok = "<mediawiki>\n" + page("A", "short") + page("B", "y" * 300_000) + "</mediawiki>\n"
    hostile = "<mediawiki>\n" + page("A", "short") + page("Huge", "x" * 3_000_000) + page("C", "z") + "</mediawiki>\n"
    (tmp_path / "ok").mkdir()
    (tmp_path / "ok" / "wiki.xml").write_text(ok)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "wiki.xml").write_text(hostile)
    kw = dict(input_format="mediawiki", val_fraction=0.0, max_member_bytes=1 << 20)
    manifest = build_shards(BuildConfig(inputs=[str(tmp_path / "ok")], **kw),
                            str(tmp_path / "ok-shards"), progress=False)
    assert manifest["totals"]["train"]["documents"] == 2
    with pytest.raises(DataError, match=r"wiki.xml: page 2 \(after 1 complete pages\) is longer than "
                                        r"--max-member-bytes=1048576 bytes"):
        build_shards(BuildConfig(inputs=[str(tmp_path / "bad")], **kw), str(tmp_path / "bad-shards"), progress=False)
