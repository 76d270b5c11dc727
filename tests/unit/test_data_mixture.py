"""data.sources mixtures in the loader: each sequence is its source's own next lane sequence, the
proportions follow the weights, small sources loop, exact and elastic resume, schedules, bad input."""
import json
import math
import random

import numpy as np
import pytest
import torch

from terrabyte.data_pipeline.basics.errors import CheckpointError, ConfigError
from terrabyte.data_pipeline.read.loader import ByteLoader
from terrabyte.data_pipeline.read.mixture import MixtureLoader, draw_sources, parse_mixture
from terrabyte.data_pipeline.write.builder import build_shards
from terrabyte.data_pipeline.write.config import BuildConfig

SEQ, B, M = 32, 4, 2
# disjoint byte ranges: a sequence's bytes say which source it came from
RANGES = {"code": (0, 80), "wiki": (80, 160), "books": (160, 240), "held": (240, 256)}
SIZES = {"code": 60, "wiki": 30, "books": 12, "held": 8}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    paths = {}
    for k, (name, (lo, hi)) in enumerate(RANGES.items()):
        rng = random.Random(k)
        src = root / name
        src.mkdir()
        for i in range(SIZES[name]):
            size = rng.choice([5, 40, 200, 700, 2500])  # some larger than a 1 KiB member: chunked
            (src / f"f{i:03d}.bin").write_bytes(bytes(rng.randrange(lo, hi) for _ in range(size)))
        build_shards(BuildConfig(inputs=[str(src)], val_fraction=0.2, member_bytes=1024, shard_bytes=9000),
                     str(root / f"{name}-shards"), progress=False)
        paths[name] = str(root / f"{name}-shards")
    return paths


def mixture(paths, weights, schedule=None):
    return parse_mixture([{"name": n, "path": paths[n], "weight": w} for n, w in weights.items()], schedule)


def rows(loader, n_batches, skip=0):
    """The first n_batches micro-batches (int64 ids) as rows, after `skip` taken and dropped."""
    it = iter(loader)
    out = [next(it) for _ in range(skip + n_batches)][skip:]
    return [b.to_ids() if hasattr(b, "to_ids") else b for b in out]


def source_of(row: torch.Tensor) -> str:
    data = row[row < 256]
    found = {n for n, (lo, hi) in RANGES.items() if ((data >= lo) & (data < hi)).any()}
    assert len(found) == 1, found
    return found.pop()


def test_each_sequence_is_its_sources_next_lane_sequence(sources):
    weights = {"code": 0.5, "wiki": 0.3, "books": 0.2}
    mix = mixture(sources, weights)
    loader = MixtureLoader(mix, seq_len=SEQ, global_batch=B, micro_batch=M, seed=5, dtype=torch.uint8)
    books = ByteLoader(sources["books"], seq_len=SEQ, global_batch=B, micro_batch=M).steps_per_epoch
    steps = 7 * books  # books (weight 0.2, a fifth of code's size) loops; code (0.5) is in its first pass
    got = rows(loader, steps * 2)
    # each source alone (its lanes, its epochs), one step = B lanes
    alone = {}
    for n in weights:
        one = ByteLoader(sources[n], seq_len=SEQ, global_batch=B, micro_batch=B, seed=5)
        alone[n] = rows(one, steps)
    drawn = draw_sources(mix, 5, np.arange(steps), np.arange(B), B)
    taken = {n: [0] * B for n in weights}
    for g in range(steps):
        for lane in range(B):
            n = list(weights)[drawn[g, lane]]
            row = got[2 * g + lane // M][lane % M]
            assert source_of(row) == n
            torch.testing.assert_close(row, alone[n][taken[n][lane]][lane], rtol=0, atol=0)
            taken[n][lane] += 1
    assert taken["books"][0] > books and loader.source_epochs["books"] >= 1 and loader.source_epochs["code"] == 0


def test_one_source_of_weight_one_is_the_plain_loader(sources):
    plain = ByteLoader(sources["books"], seq_len=SEQ, global_batch=B, micro_batch=M, seed=2)
    mixed = MixtureLoader(mixture(sources, {"books": 1.0}), seq_len=SEQ, global_batch=B, micro_batch=M, seed=2)
    n = len(plain) * 2 + 3  # into the third epoch
    for a, b in zip(rows(plain, n), rows(mixed, n)):
        assert torch.equal(a, b)


def test_proportions_over_1000_sequences_match_the_weights(sources):
    weights = {"code": 0.6, "wiki": 0.3, "books": 0.1, "held": 0.0}
    loader = MixtureLoader(mixture(sources, weights), seq_len=SEQ, global_batch=8, micro_batch=4, seed=11)
    seen = [source_of(r) for batch in rows(loader, 250) for r in batch]  # 1,000 sequences
    assert len(seen) == 1000
    for name, w in weights.items():
        n = seen.count(name)
        # 4 binomial standard deviations: a false alarm about once in 16,000 runs (of any seed)
        assert abs(n - 1000 * w) <= 4 * math.sqrt(1000 * w * (1 - w)), (name, n, w)
    assert seen.count("held") == 0


@pytest.mark.parametrize("workers", [0, 1])
def test_exact_resume_mid_step_with_a_schedule(sources, workers):
    weights = {"code": 0.7, "wiki": 0.2, "books": 0.1}
    schedule = [{"step": 30, "weights": {"code": 0.2, "books": 0.6}}]
    kw = dict(seq_len=SEQ, global_batch=B, micro_batch=M, seed=1, num_workers=workers, dtype=torch.uint8)
    straight = rows(MixtureLoader(mixture(sources, weights, schedule), **kw), 120)
    first = MixtureLoader(mixture(sources, weights, schedule), **kw)
    it = iter(first)
    for _ in range(47):  # step 23, half-way through it
        next(it)
    state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint stores it
    again = MixtureLoader(mixture(sources, weights, schedule), **kw)
    again.load_state_dict(state)
    for a, b in zip(straight[47:], rows(again, 120 - 47)):
        assert torch.equal(a, b)
    after = [source_of(r) for b in straight[60:] for r in b]  # from step 30 on: books 0.6
    assert after.count("books") > after.count("code")
    changed = MixtureLoader(mixture(sources, {**weights, "code": 0.6}, schedule), **kw)
    with pytest.raises(ConfigError, match="data.sources or data.schedule changed"):
        changed.load_state_dict(state)


def test_elastic_resume_two_ranks_to_one_and_back(sources):
    weights = {"code": 0.5, "wiki": 0.3, "books": 0.2}
    kw = dict(seq_len=SEQ, global_batch=B, seed=4)
    one = rows(MixtureLoader(mixture(sources, weights), micro_batch=M, **kw), 60)  # 30 steps, 1 rank
    per_step = {g: torch.cat(one[2 * g:2 * g + 2]) for g in range(30)}
    # two ranks (1 micro-batch of 2 each per step) for 12 steps, then one rank
    ranks = [MixtureLoader(mixture(sources, weights), micro_batch=M, dp_rank=r, dp_world=2, **kw) for r in (0, 1)]
    its = [iter(r) for r in ranks]
    for g in range(12):
        assert torch.equal(torch.cat([next(i) for i in its]), per_step[g])
    single = MixtureLoader(mixture(sources, weights), micro_batch=M, **kw)
    single.load_state_dict(ranks[0].state_dict())
    it = iter(single)
    for g in range(12, 20):
        assert torch.equal(torch.cat([next(it), next(it)]), per_step[g])
    # and back to two ranks
    ranks = [MixtureLoader(mixture(sources, weights), micro_batch=M, dp_rank=r, dp_world=2, **kw) for r in (0, 1)]
    for r in ranks:
        r.load_state_dict(single.state_dict())
    its = [iter(r) for r in ranks]
    for g in range(20, 30):
        assert torch.equal(torch.cat([next(i) for i in its]), per_step[g])


def test_bad_sources_are_named(sources, tmp_path):
    good = [{"name": "code", "path": sources["code"], "weight": 1}]
    cases = [
        ([{"name": "code", "path": sources["code"], "weight": -0.5}], None, r"data.sources\[0\] \(code\): weight"),
        ([{"name": "code", "path": sources["code"], "weight": 0}], None, "every weight is 0"),
        (good + [{"name": "code", "path": sources["wiki"]}], None, r"'code' is used twice"),
        (good + [{"name": "a/b", "path": sources["wiki"]}], None, r"'a/b' must be a non-empty word"),
        (good, [{"step": 5, "weights": {"wiki": 1}}], r"data.schedule\[0\]: no source named 'wiki'"),
        (good, [{"step": 5, "weights": {"code": 0}}], "every weight is 0 from step 5"),
        (good, [{"step": 5, "weights": {"code": 1}}, {"step": 5, "weights": {"code": 2}}], r"schedule\[1\]: step 5"),
    ]
    for srcs, schedule, message in cases:
        with pytest.raises(ConfigError, match=message):
            parse_mixture(srcs, schedule)
    missing = parse_mixture(good + [{"name": "wiki", "path": str(tmp_path / "nowhere"), "weight": 1}])
    with pytest.raises(FileNotFoundError, match=r"data source 'wiki' \(.*nowhere\)"):
        MixtureLoader(missing, seq_len=SEQ, global_batch=B, micro_batch=M)
    # a build of another (major) shard format
    other = tmp_path / "other"
    import shutil

    shutil.copytree(sources["wiki"], other)
    man = json.loads((other / "manifest.json").read_text())
    man["builder"]["version"] = "2.0"
    (other / "manifest.json").write_text(json.dumps(man))
    mixed = parse_mixture(good + [{"name": "wiki", "path": str(other), "weight": 1}])
    with pytest.raises(ConfigError, match=r"data source 'wiki' was built by shard format 2.x"):
        MixtureLoader(mixed, seq_len=SEQ, global_batch=B, micro_batch=M)
    # a validation-only source needs no train data of its own; a drawn one must hold a global step
    held = parse_mixture(good + [{"name": "held", "path": str(tmp_path / "nowhere"), "weight": 0}])
    MixtureLoader(held, seq_len=SEQ, global_batch=B, micro_batch=M).close()
    tiny = parse_mixture(good + [{"name": "held", "path": sources["held"], "weight": 1}])
    with pytest.raises(ConfigError, match="data source 'held'.*fewer than global_batch"):
        MixtureLoader(tiny, seq_len=4096, global_batch=B, micro_batch=M)
    with pytest.raises(CheckpointError, match="one-source"):
        MixtureLoader(parse_mixture(good), seq_len=SEQ, global_batch=B, micro_batch=M).load_state_dict(
            ByteLoader(sources["code"], seq_len=SEQ, global_batch=B, micro_batch=M).state_dict())


def test_a_corrupt_member_of_one_source_is_named_or_skipped_and_resumes(sources, tmp_path):
    import shutil

    from terrabyte.data_pipeline.basics.errors import DataError
    from terrabyte.data_pipeline.read.manifest import load_manifest

    bad = tmp_path / "wiki"
    shutil.copytree(sources["wiki"], bad)
    shard = next(s for s in load_manifest(str(bad))["shards"] if s["split"] == "train")
    zo, zs = shard["index"]["zst_offset"][1], shard["index"]["zst_size"][1]
    with open(bad / shard["path"], "r+b") as f:  # clobber the middle of member 000001's frame
        f.seek(zo + zs // 2)
        f.write(b"\xff" * 8)
    mix = mixture({**sources, "wiki": str(bad)}, {"code": 0.5, "wiki": 0.5})
    kw = dict(seq_len=SEQ, global_batch=B, micro_batch=M, seed=2)
    with pytest.raises(DataError, match=rf"{shard['path']} member 000001"):
        rows(MixtureLoader(mix, **kw), 200)
    straight = rows(MixtureLoader(mix, on_error="skip", **kw), 200)
    first = MixtureLoader(mix, on_error="skip", **kw)
    it = iter(first)
    for _ in range(101):
        next(it)
    state = json.loads(json.dumps(first.state_dict()))
    assert first.skipped == 1 and state["bad_members"] == ["wiki:1"]
    again = MixtureLoader(mix, on_error="skip", **kw)
    again.load_state_dict(state)
    for a, b in zip(straight[101:], rows(again, 99)):
        assert torch.equal(a, b)
