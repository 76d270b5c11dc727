"""Hostile corpora, output folders and manifests (issue 21): corpus readers stay inside what they
were given (links, devices, FIFOs, archives people ship, JSON Lines values that are not text,
MediaWiki entities, names that are not UTF-8), the builder removes only what it wrote, no shard name
reaches a shell, and manifest sizes are range-checked before any arithmetic or allocation."""
import functools
import http.server
import io
import json
import os
import subprocess
import sys
import tarfile
import textwrap
import threading

import pytest

from terrabyte.data_pipeline.basics.errors import ConfigError, DataError
from terrabyte.data_pipeline.cli import main
from terrabyte.data_pipeline.read.loader import ByteLoader, split_documents
from terrabyte.data_pipeline.read.manifest import load_manifest
from terrabyte.data_pipeline.verify import format_stats
from terrabyte.data_pipeline.write import documents, sources
from terrabyte.data_pipeline.write.builder import build_shards
from terrabyte.data_pipeline.write.config import BuildConfig

hypothesis = pytest.importorskip("hypothesis", reason="in the dev extra: pip install -e .[dev]")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

KW = dict(val_fraction=0.0)
SECRET = b"TOKEN=hf_secret_that_must_not_reach_the_shards"


def _docs(out) -> dict:
    return dict(split_documents(str(out), "all"))


def _corpus(path, files=None):
    path.mkdir(parents=True, exist_ok=True)
    for name, data in (files or {"a.py": b"print('a')\n"}).items():
        (path / name).write_bytes(data)
    return path


# ---------------------------------------------------------------------------------------------
# Directory walks: links, devices, FIFOs
# ---------------------------------------------------------------------------------------------


def test_a_secret_behind_a_link_never_reaches_the_shards(tmp_path):
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "secret.env").write_bytes(SECRET)
    repo = _corpus(tmp_path / "repo")
    os.symlink(tmp_path / "home" / "secret.env", repo / "link.py")
    os.symlink(tmp_path / "home", repo / "dirlink")
    for inputs in ([str(repo)], [str(repo / "*")]):  # a folder, and a glob over it
        out = tmp_path / f"out{len(inputs[0])}"
        man = build_shards(BuildConfig(inputs=inputs, **KW), str(out), progress=False)
        assert not any(SECRET in d for d in _docs(out).values())
        assert not any(SECRET in p.read_bytes() for p in out.iterdir() if p.is_file())
        assert man["stats"]["skipped_links"] == 2 and man["totals"]["all"]["documents"] == 1
        assert "not read: 2 symbolic links in input folders" in format_stats(man)
    # opting in reads what the links point to, and the CLI flag reaches the builder
    assert main(["shards", "build", str(repo), "--out", str(tmp_path / "followed"), "--follow-symlinks",
                 "--val-fraction", "0", "--no-progress"]) == 0
    assert _docs(tmp_path / "followed")["link.py"] == SECRET
    assert _docs(tmp_path / "followed")["dirlink/secret.env"] == SECRET


def test_a_link_swapped_in_after_discovery_is_not_opened(tmp_path):
    (tmp_path / "secret").write_bytes(SECRET)
    os.symlink(tmp_path / "secret", tmp_path / "a.txt")
    src = sources.Source("file", str(tmp_path / "a.txt"), "a.txt", 10)
    with pytest.raises(OSError, match="a.txt' is a symbolic link; not followed"):
        list(documents.read_source(src, documents.ReadOptions()))


HOSTILE_WALK = textwrap.dedent("""
    import resource, sys
    resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))  # an unbounded read fails, never swaps
    from terrabyte.data_pipeline.write.builder import build_shards
    from terrabyte.data_pipeline.write.config import BuildConfig
    man = build_shards(BuildConfig(inputs=[sys.argv[1]], val_fraction=0.0, follow_symlinks=sys.argv[3] == "1"),
                       sys.argv[2], progress=False)
    print(man["stats"]["skipped_links"], man["stats"]["skipped_special"], man["totals"]["all"]["documents"])
""")


@pytest.mark.parametrize("follow", [False, True])
def test_a_dev_zero_link_and_a_fifo_neither_hang_nor_exhaust_memory(tmp_path, follow):
    repo = _corpus(tmp_path / "repo")
    os.symlink("/dev/zero", repo / "zero.bin")
    os.mkfifo(repo / "fifo.txt")
    # a subprocess with a memory cap and a timeout: today's code reads /dev/zero without end and
    # blocks opening the FIFO, and neither may take the test run down with it
    proc = subprocess.run([sys.executable, "-c", HOSTILE_WALK, str(repo), str(tmp_path / "out"), str(int(follow))],
                          capture_output=True, text=True, timeout=60, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr[-2000:]
    links, special, docs = map(int, proc.stdout.split())
    # without following, the link is a skipped link; followed, it leads to a device, never read
    assert (links, special, docs) == ((0, 2, 1) if follow else (1, 1, 1))


def test_a_fifo_or_device_is_refused_when_opened():
    # a source whose file became a FIFO or device after discovery: the open neither blocks nor reads
    for path in ("/dev/zero", "/dev/null"):
        with pytest.raises(DataError, match="is not a regular file"):
            documents.read_file_bytes(path, link_ok=True)


# ---------------------------------------------------------------------------------------------
# Archives people ship, names that are not UTF-8, stdin
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix,mode", [(".tar.xz", "w:xz"), (".txz", "w:xz"), (".tar.bz2", "w:bz2"),
                                         (".tbz2", "w:bz2")])
def test_xz_and_bz2_tarballs_are_read_member_by_member(tmp_path, suffix, mode):
    (tmp_path / "in").mkdir()
    with tarfile.open(tmp_path / "in" / f"src{suffix}", mode) as tf:
        for name, data in (("pkg/a.py", b"import os\n"), ("pkg/b.c", b"int main;\n")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    build_shards(BuildConfig(inputs=[str(tmp_path / "in")], **KW), str(tmp_path / "out"), progress=False)
    assert _docs(tmp_path / "out") == {f"src{suffix}/pkg/a.py": b"import os\n", f"src{suffix}/pkg/b.c": b"int main;\n"}


def test_names_that_are_not_utf8_are_kept_as_escapes(tmp_path):
    src = _corpus(tmp_path / "in")
    with open(os.path.join(os.fsencode(src), b"caf\xe9.txt"), "wb") as f:
        f.write(b"latin-1 name")
    with tarfile.open(src / "t.tar", "w") as tf:
        info = tarfile.TarInfo("\udcffx.txt")  # the byte 0xff, as tarfile reads it back
        info.size = 3
        tf.addfile(info, io.BytesIO(b"abc"))
    build_shards(BuildConfig(inputs=[str(src)], **KW), str(tmp_path / "out"), progress=False)
    docs = _docs(tmp_path / "out")
    assert docs["caf\\xe9.txt"] == b"latin-1 name" and docs["t.tar/\\xffx.txt"] == b"abc"


def test_stdin_is_spooled_not_read_whole(monkeypatch):
    data = os.urandom(3 << 20)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))
    src = sources.discover_sources(["-"])[0]
    docs = documents.read_source(src, documents.ReadOptions(stream_bytes=1 << 20))
    doc = next(docs)
    assert doc.data is None and doc.size == len(data) and doc.read() == data
    assert next(docs, None) is None


# ---------------------------------------------------------------------------------------------
# JSON Lines and MediaWiki
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value,kind", [(50_000_000, "a number"), (None, "null"), (1.5, "a number"),
                                        ({"a": 1}, "an object"), (["x"], "an array"), (True, "a boolean")])
def test_a_json_text_field_that_is_not_a_string_is_a_counted_error(tmp_path, value, kind):
    data = tmp_path / "in" / "d.jsonl"
    data.parent.mkdir()
    data.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"text": value}) + "\n")
    with pytest.raises(DataError, match=rf"d.jsonl:2: field 'text' is {kind}, not a string; refused$"):
        build_shards(BuildConfig(inputs=[str(data)], **KW), str(tmp_path / "out"), progress=False)
    (data.parent / "ok.jsonl").write_text(json.dumps({"text": "kept"}) + "\n")
    man = build_shards(BuildConfig(inputs=[str(data.parent)], on_error="skip", **KW),
                       str(tmp_path / "skip"), progress=False)
    assert man["stats"]["skipped_names"] == ["d.jsonl"] and man["stats"]["skipped_sources"] == 1
    assert b"kept" in _docs(tmp_path / "skip").values()


def test_deep_nesting_and_lone_surrogates_are_one_line_errors(tmp_path):
    for line, message in ((b'{"text": "a", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
                          (b'{"text": "a\\ud800b"}', r"lone surrogate \('\\ud800' at character 1\)"),
                          (b'{"text": "\xff\xfe"}', "not valid JSON in UTF-8")):
        (tmp_path / "d.jsonl").write_bytes(line + b"\n")
        src = sources.discover_sources([str(tmp_path / "d.jsonl")])[0]
        with pytest.raises(DataError, match=f"d.jsonl:1: .*{message}") as err:
            list(documents.read_source(src, documents.ReadOptions()))
        assert "\n" not in str(err.value)


def _json_values():
    scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=20),
                        st.sampled_from(["\ud800", "a\udfffb", "\udc80"]))
    return st.recursive(scalars, lambda kids: st.one_of(st.lists(kids, max_size=4),
                                                        st.dictionaries(st.text(max_size=5), kids, max_size=4)),
                        max_leaves=12)


def _line(kind, value, depth, junk) -> bytes:
    if kind == "record":
        return json.dumps({"text": value}).encode()
    if kind == "nested":
        return b'{"text": ' + b"[" * depth + b"]" * depth + b"}"
    if kind == "other":
        return json.dumps(value).encode()  # not an object, or an object without the field
    return junk  # arbitrary bytes: bad UTF-8, bad JSON


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(["record", "nested", "other", "bytes"]), value=_json_values(),
       depth=st.sampled_from([1, 50, 3000, 100_000]),
       junk=st.binary(max_size=40).filter(lambda b: b"\n" not in b and b"\r" not in b))
def test_any_json_line_is_a_document_or_a_one_line_error(tmp_path, kind, value, depth, junk):
    line = _line(kind, value, depth, junk)
    path = tmp_path / "h.jsonl"
    path.write_bytes(line + b"\n")
    src = sources.discover_sources([str(path)])[0]
    try:
        docs = list(documents.read_source(src, documents.ReadOptions()))
    except DataError as e:
        assert str(e).startswith(f"{path}:1: ") and "\n" not in str(e)
        return
    if not line.strip():
        assert docs == []
        return
    (doc,) = docs
    text = json.loads(line)["text"]
    assert isinstance(text, str) and doc.data == text.encode("utf-8") and doc.path == "h.jsonl:1"


def _page(title, text):
    return f"<page><title>{title}</title><revision><text>{text}</text></revision></page>\n"


def test_mediawiki_entities_cannot_expand_a_page_past_the_bound(tmp_path):
    entity = "x" * 1000
    dump = (f'<?xml version="1.0"?>\n<!DOCTYPE mediawiki [<!ENTITY e "{entity}">]>\n<mediawiki>\n'
            + _page("A", "short") + _page("Bomb", "&e;" * 2000) + "</mediawiki>\n")  # 6 KB in, 2 MB out
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "wiki.xml").write_text(dump)
    with pytest.raises(DataError, match=r"wiki.xml: the XML declares an entity \('e'\)"):
        build_shards(BuildConfig(inputs=[str(tmp_path / "in")], input_format="mediawiki", max_member_bytes=64 << 10,
                                 **KW),
                     str(tmp_path / "out"), progress=False)


def test_mediawiki_memory_is_flat_in_the_number_of_pages(tmp_path):
    import tracemalloc

    peaks = {}
    for n in (2_000, 40_000):
        path = tmp_path / f"wiki{n}.xml"
        with open(path, "w") as f:
            f.write("<mediawiki>\n")
            for i in range(n):
                f.write(_page(f"P{i}", "w" * 50))
            f.write("</mediawiki>\n")
        src = sources.Source("mediawiki", str(path), path.name, path.stat().st_size)
        tracemalloc.start()
        try:
            count = sum(1 for _ in documents.read_source(src, documents.ReadOptions()))
            peaks[n] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert count == n
    assert peaks[40_000] < 2 * peaks[2_000] + (1 << 20), peaks  # 20x the pages, about the same memory


def test_members_close_on_document_count(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "e.jsonl").write_text('{"text": ""}\n' * 20_000)
    man = build_shards(BuildConfig(inputs=[str(tmp_path / "in")], member_bytes=64 << 10, **KW),
                       str(tmp_path / "out"), progress=False)
    sizes = [n for s in man["shards"] for n in s["index"]["json_size"]]
    assert man["totals"]["all"]["documents"] == 20_000 and len(sizes) >= 5 and max(sizes) < 1 << 20, sizes


# ---------------------------------------------------------------------------------------------
# --out: never removes what the build did not write
# ---------------------------------------------------------------------------------------------


def test_a_foreign_out_folder_survives(tmp_path, capsys):
    src = _corpus(tmp_path / "in")
    out = tmp_path / "thesis"
    out.mkdir()
    mine = {"notes.txt": b"two years of work", "manifest.json": b'{"mine": true}',
            "train-00000-000000.tar": b"not a shard of ours", ".task-00000.json": b"{}"}
    for name, data in mine.items():
        (out / name).write_bytes(data)
    with pytest.raises(ConfigError, match=r"is not empty and holds no Terrabyte shard build \('\.task-00000\.json' "
                                          r"and 3 more\)"):
        build_shards(BuildConfig(inputs=[str(src)], **KW), str(out), progress=False)
    assert main(["shards", "build", str(src), "--out", str(out), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("terrabyte: error: --out ") and err.count("\n") == 1
    assert {p.name: p.read_bytes() for p in out.iterdir()} == mine
    # nor is a folder of someone else's called .build inside a build of ours written into or removed
    build_shards(BuildConfig(inputs=[str(src)], **KW), str(tmp_path / "ours"), progress=False)
    (tmp_path / "ours" / ".build").mkdir()
    (tmp_path / "ours" / ".build" / "keep.txt").write_bytes(b"not the builder's")
    with pytest.raises(ConfigError, match="'.build' in it is not a staging folder of the builder"):
        build_shards(BuildConfig(inputs=[str(src)], **KW), str(tmp_path / "ours"), progress=False)
    assert (tmp_path / "ours" / ".build" / "keep.txt").read_bytes() == b"not the builder's"


def test_a_failed_rebuild_leaves_the_previous_build_intact(tmp_path):
    src = _corpus(tmp_path / "in", {f"f{i}.txt": os.urandom(3000) for i in range(8)})
    out = tmp_path / "out"
    first = build_shards(BuildConfig(inputs=[str(src)], member_bytes=4096, **KW), str(out), progress=False)
    (out / "README").write_bytes(b"a file of the user's beside the shards")
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    docs = _docs(out)
    (src / "zz.jsonl").write_text('{"no_text": 7}\n')  # fails the rebuild after the other files are written
    with pytest.raises(DataError, match="zz.jsonl:1"):
        build_shards(BuildConfig(inputs=[str(src)], member_bytes=1024, **KW), str(out), progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert load_manifest(str(out))["shards"] == first["shards"] and _docs(out) == docs
    # a rebuild that succeeds replaces the previous build's shards, and only those
    (src / "zz.jsonl").unlink()
    second = build_shards(BuildConfig(inputs=[str(src)], member_bytes=1024, **KW), str(out), progress=False)
    names = {s["path"] for s in second["shards"]}
    assert {p.name for p in out.iterdir()} == names | {"manifest.json", "README", ".task-00000.json"}
    assert (out / "README").read_bytes() == b"a file of the user's beside the shards" and _docs(out) == docs


def test_a_failed_build_resumes_from_its_staging_folder(tmp_path, monkeypatch):
    from terrabyte.data_pipeline.write import builder

    src = _corpus(tmp_path / "in", {f"f{i}.txt": os.urandom(300) for i in range(5)})
    (src / "zz.jsonl").write_text('{"no_text": 1}\n')
    out, kw = tmp_path / "out", dict(task_bytes=400, member_bytes=1024, **KW)
    with pytest.raises(DataError, match="zz.jsonl:1"):
        build_shards(BuildConfig(inputs=[str(src)], **kw), str(out), progress=False)
    assert os.listdir(out) == [".build"]  # finished tasks wait there, nothing else was written
    (src / "zz.jsonl").write_text('{"text": "fixed"}\n')
    ran, real = [], builder.run_task
    monkeypatch.setattr(builder, "run_task", lambda t, *a, **k: ran.append(t) or real(t, *a, **k))
    man = build_shards(BuildConfig(inputs=[str(src)], **kw), str(out), progress=False)
    assert ran == [man["tasks"] - 1] and man["totals"]["all"]["documents"] == 6
    assert not (out / ".build").exists() and _docs(out)["zz.jsonl:1"] == b"fixed"


# ---------------------------------------------------------------------------------------------
# Manifests: no shard name reaches a shell; sizes checked before arithmetic or allocation
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def built(tmp_path):
    src = _corpus(tmp_path / "in", {f"f{i}.txt": bytes([65 + i]) * 700 for i in range(6)})
    out = tmp_path / "shards"
    build_shards(BuildConfig(inputs=[str(src)], member_bytes=1024, **KW), str(out), progress=False)
    return out


def _rewrite(out, change):
    man = json.loads((out / "manifest.json").read_text())
    change(man)
    (out / "manifest.json").write_text(json.dumps(man))


@pytest.mark.parametrize("quote", ["", '"', "'"])
def test_a_shard_name_never_runs_in_a_pipe_template(built, tmp_path, quote):
    from terrabyte.data_pipeline.read.manifest import PIPE_FILE_VAR, pipe_command

    marker = tmp_path / "marker"
    template = f"pipe:cat {quote}{built}/{{}}{quote}"
    kw = dict(seq_len=32, global_batch=2, micro_batch=2, loop=False)
    local = list(ByteLoader(str(built), **kw))
    assert [b.tolist() for b in ByteLoader(template, allow_pipe=True, **kw)] == [b.tolist() for b in local]
    # a name with shell syntax is refused by the manifest check, whatever the template's quoting
    _rewrite(built, lambda m: m["shards"][0].update(path=f"x$(touch {marker})`touch {marker}`"))
    with pytest.raises(DataError, match=r"shard 0: 'path' .* is not a plain shard file name"):
        ByteLoader(template, allow_pipe=True, **kw)
    # and even a name that got past it reaches the command as data, never as shell text
    hostile = f"x$(touch {marker})`touch {marker}`'\"; touch {marker}; \""
    subprocess.run(pipe_command(f"pipe:printf %s {quote}{{}}{quote} >/dev/null"), shell=True,
                   env={**os.environ, PIPE_FILE_VAR: hostile}, check=True)
    assert not marker.exists()


def test_a_manifest_that_is_a_device_is_refused_unread(tmp_path):
    (tmp_path / "s").mkdir()
    os.symlink("/dev/zero", tmp_path / "s" / "manifest.json")
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30)); "
            "from terrabyte.data_pipeline.read.manifest import load_manifest; load_manifest(sys.argv[1])")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "s")], capture_output=True, text=True,
                          timeout=60, env=dict(os.environ))
    assert "manifest.json' is not a regular file; refused" in proc.stderr.splitlines()[-1]


@pytest.mark.parametrize("bad", ["../secret", "a/b.tar", "x\ny.tar", "-rf", "a b.tar", ""])
def test_shard_names_with_separators_or_control_characters_are_refused(built, bad):
    _rewrite(built, lambda m: m["shards"][0].update(path=bad))
    with pytest.raises(DataError, match=r"manifest.json' shard 0: 'path' .* is not a plain shard file name") as e:
        load_manifest(str(built))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("key,value,message", [
    ("raw", 2**63 + 5, r"index column 'raw' is not \d+ counts in \[0, 281474976710656\]"),
    ("zst_size", 10**12, r"member 0: 'zst_size' 1000000000000 is more than a zstd frame"),
    ("json_offset", 2**40, r"member 0: 'json_offset' \+ 'json_size' .* is past the shard's end"),
])
def test_manifest_sizes_are_range_checked(built, key, value, message):
    def change(m):
        m["shards"][0]["index"][key][0] = value
        if key == "raw":
            m["shards"][0]["raw_bytes"] = sum(m["shards"][0]["index"]["raw"])

    _rewrite(built, change)
    with pytest.raises(DataError, match=rf"manifest.json' shard 0 \(train-\S+\):? {message}"):
        ByteLoader(str(built), seq_len=32, global_batch=2, micro_batch=2)


def test_a_server_that_ignores_range_is_refused(built):
    class IgnoresRange(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(IgnoresRange, directory=str(built)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/"
        with pytest.raises(DataError, match="answered a Range request with HTTP 200, not 206"):
            list(ByteLoader(url, seq_len=32, global_batch=2, micro_batch=2, loop=False))
    finally:
        server.shutdown()
        server.server_close()
