"""ByteLoader: packing, ordering, equal batch counts, exact and elastic resume, bad members."""
import json
import os
import random

import numpy as np
import pytest
import torch

from terrabyte.data_pipeline.basics.errors import DataError
from terrabyte.data_pipeline.read import epochs, fetch, unpack
from terrabyte.data_pipeline.read.loader import ByteLoader, count_sequences
from terrabyte.data_pipeline.read.manifest import load_manifest, shard_list
from terrabyte.data_pipeline.stdlib_corpus import ensure_default_shards, stdlib_corpus
from terrabyte.data_pipeline.write.builder import build_shards
from terrabyte.data_pipeline.write.config import BuildConfig

from .reference_stages import batch, member_tokens, pack, unbundle

EOS, PAD = 257, 256
SEQ = 32


def write_corpus(root, n=60, seed=0):
    rng = random.Random(seed)
    docs = {}
    for i in range(n):
        size = rng.choice([0, 5, 40, 200, 700, 2500])  # some larger than a 1 KiB member: chunked
        data = bytes(rng.randrange(256) for _ in range(size))
        rel = f"d{i % 4}/f{i:03d}.bin"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
        docs[rel] = data
    return docs


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    docs = write_corpus(root / "corpus")
    # tiny members and shards: many uneven shards and members
    build_shards(BuildConfig(inputs=[str(root / "corpus")], val_fraction=0.2, member_bytes=1024, shard_bytes=9000),
                 str(root / "shards"), progress=False)
    return str(root / "shards"), docs


def take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def stream_of_epoch(path, seed, epoch):
    """The epoch's token stream recomputed from the manifest with the sequential stages."""
    man = load_manifest(path)
    table = epochs.member_table(shard_list(man, "train"))
    order = epochs.epoch_order(table, seed, epoch)
    samples = {s.where: s for s in unpack.decompress(fetch.tar_members(table.urls))}
    out = []
    for i in order:
        s = unpack.parse_meta(samples[table.where(int(i))])
        out.append(member_tokens(s, EOS, (seed, epoch, int(i))))
    return np.concatenate(out).astype(np.int64)


def test_batches_are_lanes_of_the_epoch_stream(shards):
    path, _ = shards
    B, m = 4, 2
    loader = ByteLoader(path, seq_len=SEQ, global_batch=B, micro_batch=m, seed=3)
    stream = stream_of_epoch(path, 3, 0)
    lane_len = len(stream) // B
    steps = loader.steps_per_epoch
    assert steps == lane_len // SEQ and len(loader) == steps * 2
    batches = take(loader, 2 * steps)
    for g in range(steps):
        for k in range(2):
            b = batches[2 * g + k]
            assert b.shape == (m, SEQ) and b.dtype == torch.int64
            for r in range(m):
                lane = k * m + r
                start = lane * lane_len + g * SEQ
                np.testing.assert_array_equal(b[r].numpy(), stream[start:start + SEQ])
    assert loader.state_dict()["epoch"] == 1 and loader.state_dict()["step"] == 0
    # the next epoch is a different permutation of the same members
    nxt = next(iter(loader))
    stream1 = stream_of_epoch(path, 3, 1)
    np.testing.assert_array_equal(nxt[0].numpy(), stream1[:SEQ])
    assert not np.array_equal(stream[:200], stream1[:200])
    assert sorted(stream.tolist()) == sorted(stream1.tolist())


def test_stream_holds_every_document_once_with_eos(shards):
    path, docs = shards
    man = load_manifest(path)
    table = epochs.member_table(shard_list(man, "train"))
    samples = list(unpack.decompress(fetch.tar_members(table.urls)))
    train_docs = dict(unpack.documents(samples))
    stream = stream_of_epoch(path, 0, 0)
    # split at EOS: the multiset of pieces equals the train documents (order shuffled)
    pieces, cur = [], []
    for t in stream.tolist():
        if t == EOS:
            pieces.append(bytes(cur))
            cur = []
        else:
            cur.append(t)
    assert cur == [] and sorted(pieces) == sorted(train_docs.values())
    assert all(docs[p] == d for p, d in train_docs.items())


def test_validation_pass_is_documents_joined_with_eos(shards):
    path, _ = shards
    man = load_manifest(path)
    val_urls = [s["url"] for s in shard_list(man, "val")]
    val_docs = list(unpack.documents(unpack.decompress(fetch.tar_members(val_urls))))
    expect = np.concatenate([np.append(np.frombuffer(d, np.uint8).astype(np.int64), EOS) for _, d in val_docs])
    for world in (1, 2, 3):
        rows = []
        for rank in range(world):
            loader = ByteLoader(path, split="val", seq_len=SEQ, global_batch=2 * world, micro_batch=2,
                                dp_rank=rank, dp_world=world, loop=False)
            batches = list(loader)
            assert len(batches) == len(loader)  # equal on every rank
            rows.extend(r for b in batches for r in b.numpy())
        flat = np.concatenate(rows)
        np.testing.assert_array_equal(flat[:len(expect)], expect)
        assert (flat[len(expect):] == PAD).all()
    assert count_sequences(path, "val", SEQ) == -(-len(expect) // SEQ)
    # the same pass composed from the generic stages: tar -> decompress -> unbundle -> pack -> batch
    composed = list(batch(pack(unbundle(unpack.decompress(fetch.tar_members(val_urls)), EOS),
                               SEQ, EOS, pad_id=PAD), 1))
    loader = ByteLoader(path, split="val", seq_len=SEQ, global_batch=1, micro_batch=1, loop=False)
    assert len(composed) == len(loader) and all(torch.equal(a, b) for a, b in zip(composed, loader))
    # each iter() of a non-looping loader is a fresh pass
    loader = ByteLoader(path, split="val", seq_len=SEQ, global_batch=2, micro_batch=2, loop=False)
    first, second = list(loader), list(loader)
    assert len(first) == len(second) and all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize("workers", [0, 2])
def test_exact_resume_is_byte_identical(shards, workers):
    path, _ = shards
    kw = dict(seq_len=1024, global_batch=4, micro_batch=2, seed=7)
    ref = take(ByteLoader(path, **kw), 40)
    assert len(ByteLoader(path, **kw)) < 30  # crosses an epoch boundary
    for cut in (0, 1, 5, 17, 33):
        first = ByteLoader(path, num_workers=workers, **kw)
        got = take(first, cut)
        state = json.loads(json.dumps(first.state_dict()))  # JSON round trip, as in a checkpoint
        assert all(isinstance(v, int) for v in state.values())
        resumed = ByteLoader(path, num_workers=(2 - workers), **kw)
        resumed.load_state_dict(state)
        got += take(resumed, 40 - cut)
        for a, b in zip(ref, got):
            assert torch.equal(a, b)
        first.close()
        resumed.close()


def test_elastic_resume_two_ranks_to_one(shards):
    path, _ = shards
    B, m, L = 4, 1, 256
    ref = ByteLoader(path, seq_len=L, global_batch=B, micro_batch=m, seed=1)
    steps = 2 * ref.steps_per_epoch + 3
    ref_steps = [torch.cat(take_steps) for take_steps in _steps(ref, steps, B // m)]

    ranks = [ByteLoader(path, seq_len=L, global_batch=B, micro_batch=m, seed=1, dp_rank=r, dp_world=2)
             for r in range(2)]
    split_at = ref.steps_per_epoch + 2
    per_rank = [list(_steps(ld, split_at, B // (2 * m))) for ld in ranks]
    got = [torch.cat([torch.cat(per_rank[r][g]) for r in range(2)]) for g in range(split_at)]
    states = [ld.state_dict() for ld in ranks]
    assert states[0] == {**states[1]}  # identical on every rank at a step boundary
    single = ByteLoader(path, seq_len=L, global_batch=B, micro_batch=m, seed=1)
    single.load_state_dict(states[0])
    got += [torch.cat(s) for s in _steps(single, steps - split_at, B // m)]
    assert len(got) == len(ref_steps)
    for g, (a, b) in enumerate(zip(ref_steps, got)):
        assert torch.equal(a, b), f"global step {g} differs"
    # and none repeated within an epoch: all sequences of epoch 0 are distinct lane positions
    epoch0 = torch.cat(ref_steps[:ref.steps_per_epoch])
    assert len({tuple(r.tolist()) for r in epoch0}) == len(epoch0)


def _steps(loader, n_steps, accum):
    it = iter(loader)
    for _ in range(n_steps):
        yield [next(it) for _ in range(accum)]


def test_equal_batch_counts_on_uneven_shards(shards):
    path, _ = shards
    man = load_manifest(path)
    sizes = [s["raw_bytes"] for s in man["shards"] if s["split"] == "train"]
    assert len(sizes) > 2 and len(set(sizes)) > 1  # shards really are uneven
    counts = []
    for rank in range(3):
        ld = ByteLoader(path, seq_len=SEQ, global_batch=6, micro_batch=1, dp_rank=rank, dp_world=3)
        it = iter(ld)
        n = 0
        while ld.state_dict()["epoch"] == 0:
            next(it)
            n += 1
        counts.append(n)
    assert counts[0] == counts[1] == counts[2] == len(ld)


def test_values_and_settings_errors(shards):
    path, _ = shards
    b = next(iter(ByteLoader(path, seq_len=SEQ, global_batch=2, micro_batch=2)))
    assert int(b.min()) >= 0 and int(b.max()) <= EOS and (b == EOS).any()
    with pytest.raises(ValueError, match="global_batch=6"):
        ByteLoader(path, seq_len=SEQ, global_batch=6, micro_batch=4)
    with pytest.raises(ValueError, match="fewer than global_batch"):
        ByteLoader(path, seq_len=4096, global_batch=64, micro_batch=64)
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        ByteLoader(os.path.dirname(path), seq_len=SEQ)
    ld = ByteLoader(path, seq_len=SEQ, global_batch=2, micro_batch=2)
    state = ld.state_dict()
    other = ByteLoader(path, seq_len=SEQ, global_batch=2, micro_batch=2, seed=5)
    with pytest.raises(ValueError, match="seed"):
        other.load_state_dict(state)


def test_corrupt_member_raises_with_name_or_is_skipped(shards, tmp_path):
    path, _ = shards
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    man = load_manifest(str(bad))
    shard = next(s for s in man["shards"] if s["split"] == "train")
    zo, zs = shard["index"]["zst_offset"][1], shard["index"]["zst_size"][1]
    with open(bad / shard["path"], "r+b") as f:  # clobber the middle of member 000001's frame
        f.seek(zo + zs // 2)
        f.write(b"\xff" * 8)
    kw = dict(seq_len=SEQ, global_batch=2, micro_batch=2, loop=False, split="train")
    with pytest.raises(DataError, match=rf"{shard['path']} member 000001"):
        list(ByteLoader(str(bad), **kw))
    ld = ByteLoader(str(bad), on_error="skip", **kw)
    n_rows = sum(len(b) for b in ld)
    assert ld.errors.skipped == ld.skipped == 1 and "member 000001" in ld.errors.last
    assert n_rows == len(ld) * 2


def test_default_corpus_builds_once(tmp_path):
    out = tmp_path / "default"
    assert os.path.isdir(stdlib_corpus())
    path = ensure_default_shards(str(out))
    man = load_manifest(path)
    assert man["totals"]["all"]["documents"] > 500 and man["totals"]["val"]["documents"] > 0
    stamp = os.path.getmtime(out / "manifest.json")
    assert ensure_default_shards(str(out)) == path and os.path.getmtime(out / "manifest.json") == stamp
    row = next(iter(ByteLoader(path, seq_len=256, global_batch=1, micro_batch=1)))[0].tolist()
    piece = bytes(max((p for p in _split(row, EOS)), key=len))  # longest run without EOS
    assert len(piece) > 20
    corpus = [os.path.join(d, f) for d, _, fs in os.walk(stdlib_corpus()) if "site-packages" not in d
              for f in fs if f.endswith(".py")]
    assert any(piece in open(f, "rb").read() for f in corpus)


def _split(row, sep):
    cur = []
    for t in row:
        if t == sep:
            yield cur
            cur = []
        else:
            cur.append(t)
    yield cur


def test_missing_shard_is_named_or_skipped(shards, tmp_path):
    import shutil

    path, _ = shards
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    man = load_manifest(str(bad))
    victim = [s for s in man["shards"] if s["split"] == "val"][0]
    (bad / victim["path"]).unlink()
    kw = dict(seq_len=SEQ, global_batch=2, micro_batch=2, loop=False, split="val")
    with pytest.raises(DataError, match=victim["path"]):
        list(ByteLoader(str(bad), **kw))
    ld = ByteLoader(str(bad), on_error="skip", **kw)
    batches = list(ld)
    assert ld.errors.skipped == victim["members"] and len(batches) == len(ld)
    # what was read is exactly the surviving shards' documents, then padding
    rest = [s["url"] for s in shard_list(man, "val") if s["path"] != victim["path"]]
    expect = [t for _, d in unpack.documents(unpack.decompress(fetch.tar_members(rest))) for t in list(d) + [EOS]]
    flat = np.concatenate([b.numpy().reshape(-1) for b in batches])
    assert flat[:len(expect)].tolist() == expect and (flat[len(expect):] == PAD).all()


def test_int32_batches_equal_int64(tmp_path):
    import torch

    from terrabyte.data_pipeline.read.loader import ByteLoader
    from terrabyte.data_pipeline.write.builder import build_shards
    from terrabyte.data_pipeline.write.config import BuildConfig

    src = tmp_path / "c"
    src.mkdir()
    for i in range(12):
        (src / f"f{i}.bin").write_bytes(bytes(range(256)) * (i + 1))
    build_shards(BuildConfig(inputs=[str(src)]), str(tmp_path / "s"), progress=False)
    kw = dict(seq_len=64, global_batch=4, micro_batch=2)
    wide = ByteLoader(str(tmp_path / "s"), **kw)
    narrow = ByteLoader(str(tmp_path / "s"), dtype=torch.int32, **kw)
    import itertools

    assert len(wide) == len(narrow) > 0
    for a, b in zip(itertools.islice(wide, len(wide)), itertools.islice(narrow, len(narrow))):
        assert a.dtype == torch.int64 and b.dtype == torch.int32
        assert torch.equal(a, b.long())
    try:
        ByteLoader(str(tmp_path / "s"), dtype=torch.int16, **kw)
    except ValueError as exc:
        assert "dtype" in str(exc)
    else:
        raise AssertionError("int16 accepted")


def test_special_ids_come_from_the_vocab(shards):
    from terrabyte.data_pipeline.basics.vocab import BYTES, Vocab

    path, _ = shards
    kw = dict(seq_len=SEQ, global_batch=2, micro_batch=2, split="val", loop=False)
    default = list(ByteLoader(path, **kw))
    assert all(torch.equal(a, b) for a, b in zip(default, ByteLoader(path, vocab=BYTES, **kw)))
    wide = list(ByteLoader(path, vocab=Vocab(300), **kw))  # pad 300, EOS 301
    flat, wflat = torch.cat(default).reshape(-1), torch.cat(wide).reshape(-1)
    assert (flat == EOS).any() and (flat == PAD).any()
    assert torch.equal(wflat == 301, flat == EOS) and torch.equal(wflat == 300, flat == PAD)
    assert torch.equal(wflat[flat < 256], flat[flat < 256])
    explicit = ByteLoader(path, eos_id=EOS, pad_id=PAD, vocab=Vocab(300), **kw)  # explicit ids win
    assert (explicit.eos_id, explicit.pad_id) == (EOS, PAD)


# ---------------------------------------------------------------------------------------------
# One byte per byte: ByteBatch, and documents continued across many members
# ---------------------------------------------------------------------------------------------

BIG = random.Random(7).randbytes(40 * 1024)  # 10 members of 4 KiB: a continued document


@pytest.fixture(scope="module")
def long_shards(tmp_path_factory):
    """Tiny JSON Lines documents (the vectorised member path), mid-sized files and one document
    that spans ten members."""
    root = tmp_path_factory.mktemp("long")
    src = root / "corpus"
    docs = write_corpus(src, n=30, seed=4)
    (src / "big.bin").write_bytes(BIG)
    rng = random.Random(5)
    with open(src / "tiny.jsonl", "w") as f:
        for _ in range(400):
            f.write(json.dumps({"text": "ab\x00"[:rng.randrange(4)] * rng.randrange(3)}) + "\n")
    build_shards(BuildConfig(inputs=[str(src)], val_fraction=0, member_bytes=4096, shard_bytes=20000),
                 str(root / "shards"), progress=False)
    return str(root / "shards"), docs


def stream_ids(path, seed, epoch, eos, shuffle=True):
    """The epoch's id stream from the sequential stages (the reference the loader must match)."""
    table = epochs.member_table(shard_list(load_manifest(path), "train"))
    order = epochs.epoch_order(table, seed, epoch, shuffle)
    samples = {s.where: s for s in unpack.decompress(fetch.tar_members(table.urls))}
    return np.concatenate([member_tokens(unpack.parse_meta(samples[table.where(int(i))]), eos,
                                         (seed, epoch, int(i)) if shuffle else None) for i in order]).astype(np.int64)


@pytest.mark.parametrize("L,B,m,workers,num_tokens", [(128, 4, 2, 0, 256), (250, 2, 1, 1, 256), (96, 6, 3, 0, 300),
                                                       (512, 2, 2, 2, 256)])
def test_byte_batches_widen_to_the_reference_ids(long_shards, L, B, m, workers, num_tokens, monkeypatch):
    from terrabyte.data_pipeline.basics.vocab import Vocab
    from terrabyte.data_pipeline.read import loader as loader_module
    from terrabyte.data_pipeline.read.batch import ByteBatch

    path, _ = long_shards
    if L == 512:  # a step larger than the lane block (long sequences): fresh buffers, batches are views
        monkeypatch.setattr(loader_module, "BLOCK_BYTES", 256)
    vocab = Vocab(num_tokens)
    kw = dict(seq_len=L, global_batch=B, micro_batch=m, seed=2, num_workers=workers, vocab=vocab)
    loader = ByteLoader(path, dtype=torch.uint8, **kw)
    wide = iter(ByteLoader(path, **kw))
    A, steps = B // m, loader.steps_per_epoch
    it = iter(loader)
    for epoch in range(2):
        stream = stream_ids(path, 2, epoch, vocab.eos_id)
        lane_len = len(stream) // B
        for g in range(steps):
            for k in range(A):
                b = next(it)
                assert isinstance(b, ByteBatch) and b.data.dtype == torch.uint8 and b.shape == (m, L)
                ids = b.to_ids("cpu")
                assert ids.dtype == torch.int64 and torch.equal(ids, next(wide))
                for r in range(m):
                    start = (k * m + r) * lane_len + g * L
                    np.testing.assert_array_equal(ids[r].numpy(), stream[start:start + L])
    # eval: stored order, last rows padded; rows and stacking keep the ids
    ev = list(ByteLoader(path, dtype=torch.uint8, loop=False, **kw))
    flat = torch.cat([b.to_ids() for b in ev]).reshape(-1).numpy()
    stream = stream_ids(path, 0, 0, vocab.eos_id, shuffle=False)
    np.testing.assert_array_equal(flat[:len(stream)], stream)
    assert (flat[len(stream):] == vocab.pad_id).all() and len(flat) > len(stream)
    rows = [r for b in ev for r in b]
    again = ByteBatch.stack(rows + [rows[0].padding(2)]).to_ids()
    assert torch.equal(again[:-2].reshape(-1), torch.from_numpy(flat)) and (again[-2:] == vocab.pad_id).all()


def test_a_continued_document_is_one_run_of_the_stream(long_shards):
    path, _ = long_shards
    table = epochs.member_table(shard_list(load_manifest(path), "train"))
    assert table.cols["cont"].sum() == 9  # ten members, nine of which continue
    for seed in (0, 1):
        ids = torch.cat([b.to_ids() for b in ByteLoader(path, seq_len=64, global_batch=1, micro_batch=1, seed=seed,
                                                          dtype=torch.uint8, loop=False)]).reshape(-1).numpy()
        docs, cur = [], []
        for t in ids.tolist():
            if t == EOS:
                docs.append(bytes(cur))
                cur = []
            elif t != PAD:
                cur.append(t)
        assert docs.count(BIG) == 1  # whole, in order, no EOS between its parts


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_inside_a_continued_document_is_exact(long_shards, workers):
    path, _ = long_shards
    kw = dict(seq_len=256, global_batch=2, micro_batch=1, seed=3, dtype=torch.uint8)
    ref = [b.to_ids() for b in take(ByteLoader(path, **kw), 60)]
    inside = 0
    for k in range(1, 60, 3):
        first = ByteLoader(path, **kw)
        it = iter(first)
        for _ in range(k):
            next(it)
        state = first.state_dict()
        resumed = ByteLoader(path, num_workers=workers, **kw)
        resumed.load_state_dict(state)
        got = [b.to_ids() for b in take(resumed, 4)]
        assert all(torch.equal(a, b) for a, b in zip(got, ref[k:k + 4]))
        row = bytes(ref[k][0].tolist()) if (ref[k][0] < 256).all() else b""
        inside += bool(row) and BIG.find(row) > 0  # this batch starts in the middle of the big document
    assert inside >= 2


def _corrupt_member(path, tmp_path, member=1):
    """A copy of the build with one train member's zstd frame clobbered; returns (copy, its table index)."""
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    man = load_manifest(str(bad))
    shard = next(s for s in man["shards"] if s["split"] == "train")
    zo, zs = shard["index"]["zst_offset"][member], shard["index"]["zst_size"][member]
    with open(bad / shard["path"], "r+b") as f:
        f.seek(zo + zs // 2)
        f.write(b"\xff" * 8)
    table = epochs.member_table(shard_list(man, "train"))
    index = next(i for i in range(len(table)) if table.where(i).endswith(f"member {member:06d}")
                 and shard["path"] in table.where(i))
    return str(bad), index


@pytest.mark.parametrize("workers", [0, 2])
def test_skip_with_looping_epochs_resumes_exactly(shards, tmp_path, workers):
    """data.on_error skip, endless epochs: a lane that skipped a corrupt member ends in padding (it
    never reads another lane's members), and a resume anywhere, before or after the skip, yields the
    uninterrupted run's batches exactly."""
    path, _ = shards
    bad, index = _corrupt_member(path, tmp_path)
    kw = dict(seq_len=SEQ, global_batch=4, micro_batch=2, on_error="skip", num_workers=workers, dtype=torch.uint8)
    straight = ByteLoader(bad, **kw)
    per_epoch = len(straight)
    n = 2 * per_epoch + 3  # into the third epoch
    it = iter(straight)
    batches, states = [], []
    for _ in range(n):
        batches.append(next(it))
        states.append(straight.state_dict())
    assert straight.skipped == 1 and states[-1]["bad_members"] == [index]
    # the corrupt member's tokens come back as padding, once per epoch, and nothing else is lost
    good = ByteLoader(path, **{**kw, "on_error": "raise"})
    table_tokens = int(good.table.tokens[index])
    epoch_pad = sum(int((b.to_ids() == PAD).sum()) for b in batches[per_epoch:2 * per_epoch])
    lanes, steps = epochs.lanes(good.total_tokens, 4, SEQ)
    order, cum = good._epoch_stream(1)
    at = int(np.flatnonzero(order == index)[0])
    inside = sum(max(0, min(cum[at + 1], ln.stop) - max(cum[at], ln.start)) for ln in lanes)
    assert 0 < table_tokens and epoch_pad == inside > 0
    # resume just after the lane met the corrupt member (epochs 0 and 1), and elsewhere
    after = []
    for epoch in (0, 1):
        order, cum = good._epoch_stream(epoch)
        at = int(np.flatnonzero(order == index)[0])
        for lane in lanes:  # each lane the member overlaps: a step after it
            if cum[at] < lane.stop and cum[at + 1] > lane.start:
                step = min(steps - 1, (min(int(cum[at + 1]), lane.stop) - lane.start) // SEQ + 1)
                after.append(epoch * per_epoch + step * straight.grad_accum + 1)
    assert after
    for k in (0, per_epoch // 2, per_epoch + 1, n - 2, *after):
        resumed = ByteLoader(bad, **kw)
        resumed.load_state_dict(states[k])
        rit = iter(resumed)
        for j in range(k + 1, n):
            b = next(rit)
            assert torch.equal(b.to_ids(), batches[j].to_ids()), (workers, k, j)
        assert resumed.skipped == 1
