"""Each loading stage alone, on hand-made inputs."""
import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
import zstandard

from terrabyte.data_pipeline.basics.errors import DataError
from terrabyte.data_pipeline.format import INDEX_KEYS
from terrabyte.data_pipeline.read import epochs, fetch, segments, unpack
from terrabyte.data_pipeline.write.bundle import Bundler
from terrabyte.data_pipeline.write.tasks import split_of

from .reference_stages import batch, document_ids, member_tokens, pack

EOS, PAD = 257, 256


def sample(docs, order_seed=None):
    """A decompressed member Sample holding `docs` (list of (path, bytes)) back to back."""
    b = Bundler(1 << 20)
    members = list(b.add(*docs[0])) + [m for d in docs[1:] for m in b.add(*d)] + list(b.flush())
    assert len(members) == 1
    m = members[0]
    return fetch.Sample("test member", json.dumps({"docs": m.pieces}).encode(), m.raw)


def test_member_tokens_insert_eos_after_each_document():
    s = unpack.parse_meta(sample([("a", b"ab"), ("b", b""), ("c", b"\x00\xff")]))
    toks = member_tokens(s, EOS)
    assert toks.dtype == np.uint16
    assert toks.tolist() == [97, 98, EOS, EOS, 0, 255, EOS]


def test_member_tokens_seeded_document_order():
    docs = [(f"d{i}", bytes([i]) * (i + 1)) for i in range(6)]
    a = member_tokens(unpack.parse_meta(sample(docs)), EOS, (1, 0, 5)).tolist()
    b = member_tokens(unpack.parse_meta(sample(docs)), EOS, (1, 0, 5)).tolist()
    c = member_tokens(unpack.parse_meta(sample(docs)), EOS, (2, 0, 5)).tolist()
    assert a == b and a != c
    perm = np.random.default_rng([1, 0, 5]).permutation(6)
    assert a == [t for i in perm for t in [i] * (i + 1) + [EOS]]


def test_chunks_of_a_large_document_have_eos_only_at_the_end():
    b = Bundler(10)
    members = list(b.add("big", bytes(range(25)))) + list(b.flush())
    assert [len(m.raw) for m in members] == [9, 9, 7]  # equal chunks, not 10 + 10 + 5
    assert [m.cont for m in members] == [1, 1, 0]
    toks = [member_tokens(fetch.Sample("x", {"docs": m.pieces}, m.raw), EOS).tolist() for m in members]
    assert sum(toks, []) == list(range(25)) + [EOS]


def test_bundler_sizes():
    b = Bundler(100)
    out = []
    for i in range(30):
        out += list(b.add(f"f{i}", b"x" * 30))
    out += list(b.flush())
    assert [len(m.raw) for m in out[:-1]] == [120] * 7  # flushed once at or past member_bytes
    assert sum(len(m.raw) for m in out) == 900 and all(m.cont == 0 for m in out)


def segs(*docs, ends=None):
    """Segments of one member from byte strings; `ends` marks which ones end their document."""
    raw = b"".join(docs)
    offsets = [sum(len(d) for d in docs[:i]) for i in range(len(docs))]
    return segments.Segments.build(np.frombuffer(raw, np.uint8), offsets, [len(d) for d in docs],
                                 ends or [True] * len(docs))


def test_token_reader_fill_skip_limit():
    members = [segs(b"abc", b""), segs(b"defg", ends=[False]), segs(b"hi")]
    full = [97, 98, 99, EOS, EOS, 100, 101, 102, 103, 104, 105, EOS]
    for size in (1, 2, 3, 5, 64):  # any buffer size gives the same stream
        r = segments.TokenReader(members, EOS)
        got = []
        while True:
            buf = np.zeros(size, np.int64)
            n = r.fill(buf)
            got += buf[:n].tolist()
            if n < size:
                break
        assert got == full
    for skip in range(len(full) + 2):
        for limit in (0, 3, 100):
            out = np.zeros(100, np.int64)
            n = segments.TokenReader(members, EOS, skip=skip, limit=limit).fill(out)
            assert out[:n].tolist() == full[skip:skip + limit]
    assert segs(b"abc", b"").tokens(EOS).tolist() == [97, 98, 99, EOS, EOS]


def test_pack_pads_or_drops_the_tail():
    members = [segs(bytes(range(5)), bytes(range(5, 7)), ends=[False, False]), segs(bytes(range(7, 20)), ends=[False])]
    packed = list(pack(members, 6, EOS))
    assert [p.tolist() for p in packed] == [list(range(0, 6)), list(range(6, 12)), list(range(12, 18))]
    assert packed[0].dtype == np.int64
    padded = list(pack(members, 6, EOS, pad_id=PAD))
    assert padded[-1].tolist() == [18, 19, PAD, PAD, PAD, PAD]
    assert [p.tolist() for p in pack(members, 4, EOS, skip=3, limit=6)] == [[3, 4, 5, 6]]


def test_tiny_documents_take_the_vectorised_path():
    docs = [bytes([i % 256]) * (i % 7) for i in range(300)]  # mean < 256 bytes
    s = sample([(f"d{i}", d) for i, d in enumerate(docs)])
    seg = segments.member_segments(unpack.parse_meta(s), EOS)
    assert len(seg.lengths) == 1 and seg.raw.dtype == np.uint8 and len(seg.marks) == len(docs)  # materialised
    assert seg.tokens(EOS).tolist() == [t for d in docs for t in list(d) + [EOS]]
    # read one byte per byte in odd-sized pieces: EOS slots hold 0, their positions on the side
    reader, out, eos, pos = segments.TokenReader([seg], EOS), np.empty(seg.ntokens, np.uint8), [], 0
    while pos < seg.ntokens:
        got: list = []
        n = reader.fill(out[pos:pos + 37], got)
        eos += [pos + p for p in got]
        pos += n
    ids = out.astype(np.int64)
    ids[eos] = EOS
    assert ids.tolist() == seg.tokens(EOS).tolist() and out[eos].tolist() == [0] * len(eos)
    shuffled = member_tokens(unpack.parse_meta(sample([(f"d{i}", d) for i, d in enumerate(docs)])), EOS, (4, 2))
    perm = np.random.default_rng([4, 2]).permutation(len(docs))
    assert shuffled.tolist() == [t for i in perm for t in list(docs[i]) + [EOS]]


def test_batch_and_stack():
    seqs = [np.full(4, i, dtype=np.uint16) for i in range(5)]
    out = list(batch(iter(seqs), 2))
    assert len(out) == 2 and out[1].dtype == torch.int64 and out[1].tolist() == [[2] * 4, [3] * 4]


def test_lanes_and_locate():
    lanes, steps = epochs.lanes(total_tokens=103, global_batch=4, seq_len=8)
    assert steps == 3  # lanes of 25 tokens hold 3 sequences of 8
    assert [(l.start, l.stop) for l in lanes] == [(0, 24), (25, 49), (50, 74), (75, 99)]
    cum = np.array([0, 10, 10, 30])  # member 1 is empty
    assert epochs.locate(cum, 0) == (0, 0) and epochs.locate(cum, 9) == (0, 9)
    assert epochs.locate(cum, 10) == (2, 0) and epochs.locate(cum, 29) == (2, 19)


def test_epoch_order_keeps_chunk_chains_together():
    cont = np.array([0, 1, 1, 0, 0, 1, 0, 0])  # units: [0] [1 2 3] [4] [5 6] [7]
    n = len(cont)
    table = epochs.MemberTable(urls=["u"], shard=np.zeros(n, np.int64), key=np.arange(n),
                               cols={k: np.zeros(n, np.int64) for k in INDEX_KEYS} | {"cont": cont})
    assert table.units().tolist() == [0, 1, 4, 5, 7]
    orders = {tuple(epochs.epoch_order(table, seed, 0).tolist()) for seed in range(20)}
    assert len(orders) > 5
    for o in orders:
        o = list(o)
        assert sorted(o) == list(range(n))
        i = o.index(1)
        assert o[i:i + 3] == [1, 2, 3] and o[o.index(5) + 1] == 6
    assert epochs.epoch_order(table, 0, 0, shuffle=False).tolist() == list(range(n))
    assert epochs.epoch_order(table, 0, 0).tolist() == epochs.epoch_order(table, 0, 0).tolist()
    assert epochs.epoch_order(table, 0, 0).tolist() != epochs.epoch_order(table, 0, 1).tolist()


def test_decompress_checks_size_and_frame():
    raw = b"hello world" * 50
    zst = zstandard.ZstdCompressor(write_checksum=True).compress(raw)
    ok = unpack.decompress_sample(fetch.Sample("s m", b"{}", zst, raw_size=len(raw)))
    assert ok.data == raw
    with pytest.raises(DataError, match="s m"):
        unpack.decompress_sample(fetch.Sample("s m", b"{}", zst[:-3], raw_size=len(raw)))
    with pytest.raises(DataError, match="declares 550 bytes, more than the limit of 5"):
        unpack.decompress_sample(fetch.Sample("s m", b"{}", zst, raw_size=5))
    with pytest.raises(DataError, match="malformed member JSON"):
        unpack.parse_meta(fetch.Sample("s m", b"{not json", raw))
    counter = fetch.ErrorCounter()
    good = fetch.Sample("a", b"{}", zst, len(raw))
    bad = fetch.Sample("b", b"{}", b"garbage", 3)
    out = list(unpack.decompress([bad, good], on_error="skip", counter=counter))
    assert [s.where for s in out] == ["a"] and counter.skipped == 1 and counter.last.startswith("b")


def test_document_ids():
    t = torch.tensor([[1, 2, EOS, 3, EOS, EOS, 4]])
    assert document_ids(t, EOS).tolist() == [[0, 0, 0, 1, 1, 2, 3]]


def test_prefetch_map_keeps_order():
    import time

    def slow(i):
        time.sleep(0.002 * (5 - i % 5))
        return i * i

    with ThreadPoolExecutor(3) as ex:
        assert list(fetch.prefetch_map(slow, range(20), ex, depth=4)) == [i * i for i in range(20)]
    assert list(fetch.prefetch_map(slow, range(5), None)) == [0, 1, 4, 9, 16]


def test_split_of_is_stable():
    # fixed values: the split of a path never changes between runs, machines or Python versions
    assert [split_of(f"file{i}.py", 0.5) for i in range(8)] == [
        split_of(f"file{i}.py", 0.5) for i in range(8)]
    import hashlib
    for i in range(50):
        h = int.from_bytes(hashlib.sha256(f"file{i}.py".encode()).digest()[:8], "big")
        assert split_of(f"file{i}.py", 0.1) == ("val" if h < 0.1 * 2**64 else "train")
    assert split_of("anything", 0.0) == "train"


def test_fresh_buffer_is_whole_writable_and_huge_page_aligned():
    import mmap

    small, big = unpack.fresh_buffer(1000), unpack.fresh_buffer((3 << 20) + 5)
    assert small.dtype == big.dtype == np.uint8 and len(small) == 1000 and len(big) == (3 << 20) + 5
    big[:] = 7
    big[-1] = 9
    assert int(big.sum()) == 7 * (len(big) - 1) + 9
    if hasattr(mmap, "MADV_HUGEPAGE"):
        assert big.ctypes.data % (1 << 21) == 0  # huge pages back only 2 MiB-aligned ranges


def test_buffer_pool_rounds_to_mib_and_reuses_the_best_fit():
    pool = unpack.BufferPool()
    a, b = pool.take((2 << 20) + 1), pool.take(100)
    assert len(a) == 3 << 20 and len(b) == 1 << 20
    pool.give(a)
    pool.give(b)
    assert pool.take(5000) is b  # the smallest that fits, not the first
    assert pool.take(2 << 20) is a
    assert len(pool.take(2 << 20)) == 2 << 20  # pool empty: a new one


def test_buffer_pool_keeps_up_to_its_peak_live_bytes_beyond_keep():
    # lanes crossing an epoch boundary free many members at once and want as many back a step later
    pool = unpack.BufferPool(keep=2)
    bufs = [pool.take(1 << 20) for _ in range(5)]
    for b in bufs:
        pool.give(b)
    again = [pool.take(1 << 20) for _ in range(5)]
    assert {id(b) for b in again} == {id(b) for b in bufs}  # no fresh (page-faulting) buffer
    for b in again:
        pool.give(b)
    pool.give(unpack.fresh_buffer(1 << 20))  # never lent: past the peak, dropped
    assert sum(len(b) for b in pool._free) == 5 << 20


def test_segments_window_is_the_slice_of_the_token_stream():
    rng = np.random.default_rng(3)
    raw = rng.integers(0, 256, 400, dtype=np.uint8)
    for _ in range(200):
        k = int(rng.integers(1, 9))
        lengths = rng.choice([0, 1, 2, 5, 9], k).tolist()
        segs = segments.Segments.build(raw, rng.integers(0, 300, k).tolist(), lengths, (rng.random(k) < 0.6).tolist())
        whole = segs.tokens(300)
        for _ in range(6):
            a = int(rng.integers(0, segs.ntokens + 1))
            b = int(rng.integers(a + 1, segs.ntokens + 3))
            assert segs.window(a, b).tokens(300).tolist() == whole[a:b].tolist(), (lengths, a, b)


def test_one_decompressor_per_dictionary_is_kept():
    d1, d2 = b"first dictionary " * 8, b"second dictionary " * 8
    first = unpack._decompressor(d1)
    assert unpack._decompressor(d2) is not first
    assert unpack._decompressor(d1) is first  # sources alternating dictionaries reload none


def test_decompress_into_a_pooled_multi_mib_buffer():
    raw = (b"terrabyte pools buffers " * 200_000)[:(5 << 19) + 3]  # 2.5 MiB: the huge-page path
    zst = zstandard.ZstdCompressor(write_checksum=True).compress(raw)
    pool = unpack.BufferPool()
    s = unpack.decompress_sample(fetch.Sample("s m", b"{}", zst, raw_size=len(raw)), pool=pool)
    assert s.data.tobytes() == raw and len(s.buffer) == 3 << 20
    buf = s.buffer
    owner = segments.Segments.build(s.data, [0], [len(raw)], [True])
    pool.own(owner, buf)
    del owner, s
    assert pool.take(len(raw)) is buf  # came back when its owner was collected


def test_prefetch_map_skips_the_executor_for_ready_items():
    calls = []

    def f(i):
        calls.append(i)
        return i * 10

    def ready(i):  # every third item is a cache hit (0 included: a value, not a miss)
        return i * 10 if i % 3 == 0 else None

    with ThreadPoolExecutor(2) as ex:
        assert list(fetch.prefetch_map(f, range(12), ex, depth=3, ready=ready)) == [i * 10 for i in range(12)]
    assert sorted(calls) == [i for i in range(12) if i % 3]
