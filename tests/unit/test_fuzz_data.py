"""Property-based tests (hypothesis) of the read side against damaged input: byte flips in a shard,
truncations at every member boundary, garbage and mutated manifests, wrong offsets. Every case ends
in one of: a DataError naming the shard and member (ConfigError for a manifest setting), a counted
skip, or exactly the clean bytes: never different bytes delivered silently, never a hang (each case
runs under a timer), never another exception. Fixed, derandomized example budgets."""
import contextlib
import copy
import json
import shutil
import signal

import numpy as np
import pytest
import torch

hypothesis = pytest.importorskip("hypothesis", reason="in the dev extra: pip install -e .[dev]")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from terrabyte.data_pipeline.basics.errors import ConfigError, DataError  # noqa: E402
from terrabyte.data_pipeline.format import INDEX_KEYS, MANIFEST  # noqa: E402
from terrabyte.data_pipeline.read import epochs, fetch, unpack  # noqa: E402
from terrabyte.data_pipeline.read.loader import ByteLoader  # noqa: E402
from terrabyte.data_pipeline.read.manifest import load_manifest, shard_list  # noqa: E402
from terrabyte.data_pipeline.write.builder import build_shards  # noqa: E402
from terrabyte.data_pipeline.write.config import BuildConfig  # noqa: E402

SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                        HealthCheck.too_slow])
LOADER = dict(split="train", seq_len=64, global_batch=2, micro_batch=2, loop=False)


@contextlib.contextmanager
def time_limit(seconds: float = 10.0):
    """A hang is a failure: SIGALRM interrupts the case."""
    def expire(*_):
        raise TimeoutError(f"no result within {seconds} s: a hang")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    src = root / "src"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        (src / f"f{i}.txt").write_bytes(rng.integers(97, 123, size=int(rng.integers(50, 1500))).astype(np.uint8).tobytes())
    # small members: bundles of several documents and chunks of one (continued documents)
    build_shards(BuildConfig(inputs=[str(src)], val_fraction=0.0, member_bytes=512),
                 str(root / "shards"), progress=False)
    man = load_manifest(str(root / "shards"))
    (shard,) = [s for s in man["shards"] if s["split"] == "train"]
    tar = (root / "shards" / shard["path"]).read_bytes()
    return dict(dir=root / "shards", shard=shard, tar=tar, members=member_docs(root / "shards"),
                batches=loader_ids(root / "shards"), manifest=json.loads((root / "shards" / MANIFEST).read_text()))


def member_docs(path, on_error="raise"):
    """Each member's documents through the shard reader, or the DataError it raised."""
    man = load_manifest(str(path))
    table = epochs.member_table(shard_list(man, "train"))
    files = fetch.ShardFiles()
    out = []
    for i in range(len(table)):
        try:
            s = unpack.parse_meta(unpack.decompress_sample(fetch.read_member(table, files, i)))
            out.append([(d["path"], bytes(s.data[d["offset"]:d["offset"] + d["length"]])) for d in s.meta["docs"]])
        except DataError as e:
            out.append(e)
    files.close()
    return out


def loader_ids(path, **kw):
    loader = ByteLoader(str(path), **{**LOADER, **kw})
    return [b for b in loader], loader.skipped


def open_loader(path, **kw):
    """A ByteLoader, or None when the manifest itself is refused: one line naming it, its split, or
    the file it names that is missing (FileNotFoundError, printed as one line by the CLI too)."""
    try:
        return ByteLoader(str(path), **{**LOADER, **kw})
    except (DataError, ConfigError, FileNotFoundError) as e:
        text = str(e).strip()
        assert text and "\n" not in text and any(w in text for w in ("manifest", "split", "dictionary")), text
        return None


def workdir(clean):
    """A scratch copy of the build, rewritten by each example."""
    work = clean["dir"].parent / "work"
    if not work.exists():
        shutil.copytree(clean["dir"], work)
    return work


def check_members(clean, work):
    """Each member read alone: its clean documents or a DataError naming it; returns how many failed."""
    where = clean["shard"]["path"]
    got_all = member_docs(work)
    for i, (got, want) in enumerate(zip(got_all, clean["members"])):
        if isinstance(got, DataError):
            assert where in str(got) and f"member {i:06d}" in str(got), str(got)
        else:
            assert got == want, f"member {i}: different bytes delivered silently"
    return sum(isinstance(m, DataError) for m in got_all)


def check_loader(clean, work):
    """Reading the whole split: the clean batches, or a DataError naming the shard and member; with
    on_error skip, the clean batches unless something was counted."""
    want = clean["batches"][0]
    loader = open_loader(work)
    if loader is None:
        return
    try:
        batches = list(loader)
    except DataError as e:
        assert clean["shard"]["path"] in str(e) and "member" in str(e), str(e)
    else:
        assert len(batches) == len(want) and all(torch.equal(g, w) for g, w in zip(batches, want)), \
            "different batches delivered silently"
    loader = open_loader(work, on_error="skip")
    batches = list(loader)
    if not loader.skipped:
        assert len(batches) == len(want) and all(torch.equal(g, w) for g, w in zip(batches, want)), \
            "different batches delivered silently (nothing skipped)"
    return loader.skipped


@settings(max_examples=60, **SETTINGS)
@given(flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255)), min_size=1, max_size=4))
def test_byte_flips_in_a_shard(clean, flips):
    work = workdir(clean)
    data = bytearray(clean["tar"])
    for where, xor in flips:
        data[int(where * len(data))] ^= xor
    (work / clean["shard"]["path"]).write_bytes(bytes(data))
    with time_limit():
        check_members(clean, work)
        check_loader(clean, work)


def test_truncation_at_every_member_boundary(clean):
    work = workdir(clean)
    index = clean["shard"]["index"]
    cuts = set()
    for jo, js, zo, zs in zip(*(index[k] for k in ("json_offset", "json_size", "zst_offset", "zst_size"))):
        # a member's tar header, its JSON, its zstd frame (inside and at its last byte)
        cuts.update((jo - 512, jo - 1, jo + js // 2, zo - 1, zo + zs // 2, zo + zs - 1, zo + zs))
    cuts = sorted(c for c in cuts if 0 <= c < len(clean["tar"]))
    assert len(cuts) > 20
    for cut in cuts:
        (work / clean["shard"]["path"]).write_bytes(clean["tar"][:cut])
        with time_limit():
            damaged = check_members(clean, work)
            skipped = check_loader(clean, work)
        assert skipped == damaged, (cut, skipped, damaged)  # every damaged member counted, once


JSON = st.recursive(st.none() | st.booleans() | st.integers(-2, 1 << 40) | st.floats(allow_nan=False)
                    | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=12)


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, (*prefix, i))


def _set(obj, path, value):
    for key in path[:-1]:
        obj = obj[key]
    obj[path[-1]] = value


def _read_all(work, clean):
    """A mutated manifest: refused with one line naming it, or read; what is read is either the
    clean batches or stops with a DataError naming a member."""
    with time_limit():
        check_loader(clean, work)


@settings(max_examples=100, **SETTINGS)
@given(choice=st.floats(0, 1, exclude_max=True), value=JSON)
def test_mutated_manifest(clean, choice, value):
    work = workdir(clean)
    man = copy.deepcopy(clean["manifest"])
    paths = [p for p in _paths(man) if p and p[0] in ("shards", "zstd_dict", "format")]
    _set(man, paths[int(choice * len(paths))], value)
    (work / MANIFEST).write_text(json.dumps(man))
    (work / clean["shard"]["path"]).write_bytes(clean["tar"])
    _read_all(work, clean)


@settings(max_examples=60, **SETTINGS)
@given(key=st.sampled_from(INDEX_KEYS), member=st.integers(0, 63), value=st.integers(0, 1 << 20))
def test_wrong_offsets_and_sizes(clean, key, member, value):
    work = workdir(clean)
    man = copy.deepcopy(clean["manifest"])
    (shard,) = [s for s in man["shards"] if s["split"] == "train"]
    column = shard["index"][key]
    column[member % len(column)] = value
    (work / MANIFEST).write_text(json.dumps(man))
    (work / clean["shard"]["path"]).write_bytes(clean["tar"])
    with time_limit():
        check_members(clean, work) if _valid(work) else None
    _read_all(work, clean)


def _valid(work) -> bool:
    try:
        load_manifest(str(work))
        return True
    except DataError:
        return False


@settings(max_examples=60, **SETTINGS)
@given(text=st.binary(max_size=200) | JSON.map(lambda v: json.dumps(v).encode()))
def test_garbage_manifest_is_one_data_error(tmp_path, text):
    (tmp_path / MANIFEST).write_bytes(text)
    with time_limit():
        with pytest.raises(DataError, match="manifest.json"):
            load_manifest(str(tmp_path))
