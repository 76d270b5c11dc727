"""Patching schemes (pretrain/model/patching.py): causal boundary rules, the layout, the entropy model."""
import pytest
import torch

from terrabyte.pretrain.model import TerraByte
from terrabyte.pretrain.model.stage import units_before
from terrabyte.pretrain.model.patching import (SCHEMES, EntropyModel, Patcher, cap_length, layout, patch_stats,
                                               space_candidates, space_like)
from terrabyte.data_pipeline.basics.errors import ConfigError
from tests.unit.test_model import one_thread  # noqa: F401  (autouse: tiny shapes on one thread)
from tests.unit.test_train import shards  # noqa: F401  (the fixture: a small learnable corpus)

PAD, EOS = 256, 257
VOCAB = 259


def text_ids(*rows: bytes) -> torch.Tensor:
    n = max(len(r) for r in rows)
    out = torch.full((len(rows), n), PAD, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.tensor(list(r))
    return out


def patcher(scheme, max_len=8, before_len=4, threshold=None):
    torch.manual_seed(0)
    p = Patcher(scheme, max_len, before_len, VOCAB, PAD, EOS, threshold=threshold)
    if p.entropy_model is not None:
        p.entropy_model.init_weights()
    return p


def code_row(n: int, text: bytes = b"for i in range(10):\n    print(i, 'x')  # ok\n") -> torch.Tensor:
    """(1, n) ids: ``text`` repeated to n bytes."""
    return text_ids((text * (n // len(text) + 1))[:n])


def random_bytes(b, n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, n), generator=g)


def patches_of(ids: torch.Tensor, starts: torch.Tensor) -> list[list[bytes]]:
    out = []
    for row, st in zip(ids.tolist(), starts.tolist()):
        cuts = [j for j, s in enumerate(st) if s] + [len(row)]
        out.append([bytes(row[a:b]) for a, b in zip(cuts, cuts[1:])])
    return out


# ---------------------------------------------------------------- the rules

def test_space_like_bytes():
    like = space_like(torch.arange(259))
    expected = [not (chr(v).isascii() and chr(v).isalnum()) and not 0x80 <= v <= 0xBF for v in range(256)]
    assert like[:256].tolist() == expected
    assert like[256:].all()  # PAD, EOS, BOS


def test_space_rule_on_examples():
    ids = text_ids(b"def foo(x):  return x.y", " ab".encode())
    starts = cap_length(space_candidates(ids, EOS), 64)
    assert patches_of(ids[:1], starts[:1])[0] == [b"def ", b"foo(", b"x)", b":  return ", b"x.", b"y"]
    # the position before the row is not space-like: a leading space starts the next patch
    assert patches_of(ids[1:, :3], starts[1:, :3])[0] == [b" ", b"ab"]
    # SpaceByte's rule as written: a UTF-8 lead byte is space-like, its continuation bytes are not,
    # so a multi-byte letter ends a patch after its lead byte and its continuation never starts one
    word = text_ids("na\u00efve caf\u00e9s".encode())
    assert patches_of(word, cap_length(space_candidates(word, EOS), 64))[0] == [
        b"na\xc3", b"\xafve ", b"caf\xc3", b"\xa9s"]


def test_eos_ends_a_patch():
    ids = text_ids(b"abc")
    ids = torch.cat((ids, torch.tensor([[EOS]]), text_ids(b"def")), dim=1)
    starts = cap_length(space_candidates(ids, EOS), 64)
    assert starts[0].tolist() == [True, False, False, False, True, False, False]


@pytest.mark.parametrize("scheme", SCHEMES)
def test_max_length_respected_and_first_byte_starts(scheme):
    p = patcher(scheme, max_len=5, threshold=0.0)
    ids = torch.cat((random_bytes(2, 90), text_ids(b"a" * 90, b"x = 1  " * 13)[:, :90]), dim=0)
    starts = p.starts(ids)
    assert starts[:, 0].all()
    for row in starts.tolist():
        cuts = [j for j, s in enumerate(row) if s] + [len(row)]
        assert max(b - a for a, b in zip(cuts, cuts[1:])) <= 5
    # a run of letters is cut at the cap exactly
    if scheme == "space":
        assert patches_of(ids[2:3], starts[2:3])[0] == [b"aaaaa"] * 18


@pytest.mark.parametrize("scheme", SCHEMES)
def test_every_scheme_is_causal(scheme):
    """Changing byte j leaves starts[:, :j + 1] as they were (the start of byte j reads bytes < j)."""
    p = patcher(scheme, max_len=6, threshold=0.0)
    base_ids = torch.cat((random_bytes(1, 48), code_row(48)))
    base = p.starts(base_ids)
    assert 1 < int(base.sum()) < base.numel()  # the rule does cut, and not everywhere
    g = torch.Generator().manual_seed(3)
    for j in range(base_ids.shape[1]):
        ids = base_ids.clone()
        ids[:, j] = torch.randint(0, 256, (2,), generator=g)
        assert torch.equal(p.starts(ids)[:, :j + 1], base[:, :j + 1]), j


@pytest.mark.parametrize("scheme", SCHEMES)
def test_rows_are_independent(scheme):
    """A row's boundaries, entropies and layout do not depend on the other rows (BLT issue #123)."""
    p = patcher(scheme, max_len=6, threshold=0.0)
    ids = random_bytes(3, 40)
    alone = p.layout(ids[1:2])
    other = ids.clone()
    other[0] = random_bytes(1, 40, seed=9)[0]
    other[2] = 32  # all spaces: a different patch count
    together = p.layout(other)
    assert torch.equal(p.starts(other)[1], p.starts(ids[1:2])[0])
    k = alone.patches
    assert torch.equal(together.units[1, :k], alone.units[0])
    assert (together.units[1, k:] == PAD).all()
    assert torch.equal(together.before[1, :k], alone.before[0])
    assert torch.equal(together.index[1], alone.index[0])
    if p.entropy_model is not None:
        torch.testing.assert_close(p.entropy_model.entropy(other)[1], p.entropy_model.entropy(ids[1:2])[0])


@pytest.mark.parametrize("msl", [(6, 4), (4, 3, 2), (5, 8)])
@pytest.mark.parametrize("n", [None, -3])
def test_fixed_layout_is_todays_patches(msl, n):
    """Fixed starts reproduce TerraByte.patches and units_before exactly."""
    torch.manual_seed(0)
    model = TerraByte(num_tokens=256, dim=(16,) * len(msl), depth=(1,) * len(msl), max_seq_len=msl, dim_head=8,
                      heads=2)
    T = model.context_length if n is None else model.context_length + n
    ids = random_bytes(3, T)
    L, u1 = model.unit_sizes[0], model.unit_sizes[1]
    p = Patcher("fixed", L, u1, VOCAB, PAD, EOS)
    lay = layout(ids, p.starts(ids), L, u1, PAD)
    units = model.patches(ids).units
    assert torch.equal(lay.units, units)
    before, first = units_before(units, u1)
    before = before.view(3, -1, u1)
    assert torch.equal(lay.before[:, 1:], before[:, 1:])  # patch 0 reads the start token instead
    assert first.view(3, -1)[:, 0].all() and not first.view(3, -1)[:, 1:].any()
    assert torch.equal(lay.index, torch.arange(T).expand(3, T))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_round_trip_bytes_units_bytes(scheme):
    p = patcher(scheme, max_len=7, before_len=3, threshold=0.0)
    ids = torch.cat((random_bytes(1, 50), code_row(50, b"while x:\n\tx -= 1  # down ")))
    lay = p.layout(ids, multiple=4)
    b, P, L = lay.units.shape
    assert L == 7 and P % 4 == 0
    flat = lay.units.reshape(b, P * L)
    assert torch.equal(lay.scatter_back(flat, 50), ids)
    # per-slot values of any trailing shape come back per byte
    vals = torch.randn(b, P * L, 5)
    torch.testing.assert_close(lay.scatter_back(vals, 50), vals.gather(1, lay.index[..., None].expand(-1, -1, 5)))
    # bytes are left-aligned in their patch, PAD after them, and each patch holds its bytes in order
    starts = p.starts(ids)
    for r, pieces in enumerate(patches_of(ids, starts)):
        for k, piece in enumerate(pieces):
            row = lay.units[r, k].tolist()
            assert bytes(row[:len(piece)]) == piece and all(v == PAD for v in row[len(piece):])
            start = sum(len(q) for q in pieces[:k])
            want = [PAD] * max(0, 3 - start) + ids[r, max(0, start - 3):start].tolist()
            assert lay.before[r, k].tolist() == want
        assert (lay.units[r, len(pieces):] == PAD).all()


@pytest.mark.parametrize("scheme", ["space", "entropy"])
def test_budget_bounds_patches_and_stays_causal(scheme):
    """A row that would need more than the budget gets at most the budget, the rule stays causal
    (a prefix is grouped as the start of the whole row) and rows that fit are left as they were."""
    p = patcher(scheme, max_len=4, threshold=-100.0)  # entropy: every byte a candidate
    p.budget, p.row_bytes = 10, 32
    dense = torch.cat((code_row(32, b"a.b,c;d(e)"), random_bytes(1, 32)))
    starts = p.starts(dense)
    free = patcher(scheme, max_len=4, threshold=-100.0).starts(dense)
    assert (free.sum(1) > 10).all() and (starts.sum(1) <= 10).all() and (starts.sum(1) >= 8).all()
    for row in starts.tolist():
        cuts = [j for j, s in enumerate(row) if s] + [32]
        assert max(b - a for a, b in zip(cuts, cuts[1:])) <= 4
    for n in range(1, 32):
        assert torch.equal(p.starts(dense[:, :n]), starts[:, :n]), n
    # the decode step's rule gives the same starts, byte by byte
    count, last, walked = torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long), []
    for t in range(32):
        start = p.start_next(dense[:, :t], count, last)
        count, last = count + start, torch.where(start, t, last)
        walked.append(start)
    assert torch.equal(torch.stack(walked, 1), starts)
    roomy = patcher(scheme, max_len=4, threshold=-100.0)
    roomy.budget, roomy.row_bytes = 32, 32
    assert torch.equal(roomy.starts(dense), free)


def test_patch_stats_and_the_collapse_it_shows():
    ids = text_ids(b"ab cd ef gh")
    stats = patch_stats(space_candidates(ids, EOS), ids, PAD)
    assert stats == {"mean_patch_bytes": 11 / 4, "boundary_rate": 4 / 11}
    # a threshold below every rise collapses patches to one byte: the stats say so
    p = patcher("entropy", max_len=8, threshold=-100.0)
    assert patch_stats(p.starts(random_bytes(2, 64)))["mean_patch_bytes"] == 1.0
    # from initialisation the entropy is flat: no rise crosses the default threshold, patches stay at the cap
    fresh = patcher("entropy", max_len=8)
    assert patch_stats(fresh.starts(random_bytes(2, 64)))["mean_patch_bytes"] == 8.0


def test_bad_scheme_is_one_line():
    with pytest.raises(ConfigError, match="model.patching='bpe' must be one of fixed, space, entropy"):
        Patcher("bpe", 8, 4, VOCAB, PAD, EOS)


# ---------------------------------------------------------------- the entropy model

def test_entropy_model_is_causal_and_chunking_is_exact():
    torch.manual_seed(0)
    em = EntropyModel(VOCAB)
    em.init_weights()
    ids = random_bytes(2, 40)
    h = em.entropy(ids)
    assert h.shape == (2, 40) and (h > 0).all() and (h <= 259 ** 0.5 * 8).all()
    torch.testing.assert_close(em.entropy(ids, chunk=6), h)
    for j in range(40):
        x = ids.clone()
        x[:, j] = (x[:, j] + 1) % 256
        torch.testing.assert_close(em.entropy(x)[:, :j + 1], h[:, :j + 1])
    # the auxiliary loss: the same sum chunked or not, and its gradient reaches only the entropy model
    whole = em.nats(ids, 0, 40, PAD)
    torch.testing.assert_close(em.nats(ids, 0, 17, PAD, chunk=8) + em.nats(ids, 17, 40, PAD, chunk=8), whole)
    padded = ids.clone()
    padded[:, 30:] = PAD
    torch.testing.assert_close(em.nats(padded, 0, 40, PAD), em.nats(ids, 0, 30, PAD))
    whole.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in em.parameters())


def test_candidate_next_matches_the_row_rule():
    """The decode step's question (from the last bytes only) agrees with the whole-row rule."""
    for scheme in ("space", "entropy"):
        p = patcher(scheme, threshold=0.0)
        ids = torch.cat((random_bytes(1, 30), code_row(30, b"if a.b(c):  d = e[f]  # g h i j k")))
        cand = p.candidates(ids)
        for t in range(30):
            assert torch.equal(p.candidate_next(ids[:, :t]), cand[:, t]), (scheme, t)


# ---------------------------------------------------------------- the model with each scheme

MODEL_SHAPES = {(8, 4): 20, (6, 2, 2): 16}  # max_seq_len -> context_bytes for the dynamic schemes


def scheme_model(scheme, msl=(8, 4), **kw):
    stages = len(msl)
    cfg = dict(num_tokens=256, dim=(32, 24, 16)[-stages:], depth=(2,) * stages, max_seq_len=msl, dim_head=8, heads=2,
               patching=scheme)
    if scheme != "fixed":
        cfg["context_bytes"] = MODEL_SHAPES[msl]
    if scheme == "entropy":
        cfg["patch_threshold"] = 0.0  # a fresh entropy model's rises are small: cut at most of them
    cfg.update(kw)
    torch.manual_seed(0)
    return TerraByte(**cfg).eval()


def model_rows(model, b=2, seed=1):
    n = model.context_length
    return torch.cat((code_row(n, b"x = f(a, b)  # y\n")[:, :n], random_bytes(b - 1, n, seed)))


@pytest.mark.parametrize("msl", list(MODEL_SHAPES))
@pytest.mark.parametrize("scheme", SCHEMES)
def test_model_is_causal_for_every_scheme(scheme, msl):
    """Changing byte j changes no logit at positions <= j and no loss before j (the grouping, the
    before-bytes and the scatter back never let a byte see a later one)."""
    model = scheme_model(scheme, msl)
    x = model_rows(model)
    n = x.shape[1]
    logits, nats = model(x), model(x, return_loss="none")
    if scheme != "fixed":
        starts = model.patcher.starts(x)
        assert 1 < int(starts[0].sum()) < n and not torch.equal(starts[0], starts[1])  # varied patches
    g = torch.Generator().manual_seed(5)
    changed_later = 0
    for j in range(n):
        y = x.clone()
        y[:, j] = torch.randint(0, 256, (2,), generator=g)
        torch.testing.assert_close(model(y)[:, :j + 1], logits[:, :j + 1])
        torch.testing.assert_close(model(y, return_loss="none")[:, :j], nats[:, :j])
        changed_later += j + 1 < n and not torch.allclose(model(y)[:, j + 1:], logits[:, j + 1:])
    assert changed_later == n - 1


@pytest.mark.parametrize("scheme", SCHEMES)
def test_model_losses_agree_and_rows_are_independent(scheme):
    model = scheme_model(scheme)
    x = model_rows(model, b=3)
    x[2, -5:] = model.pad_id
    nats, logits = model(x, return_loss="none"), model(x)
    assert (nats[2, -5:] == 0).all()
    want = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x.flatten(), ignore_index=model.pad_id,
                                             reduction="none").view_as(nats)
    torch.testing.assert_close(nats, want)
    torch.testing.assert_close(model(x, return_loss="sum"), nats.sum())
    torch.testing.assert_close(model(x, return_loss=True), nats.sum() / (x != model.pad_id).sum())
    # a row's losses do not depend on the rows beside it (nor on how many patches they need)
    for r in range(3):
        torch.testing.assert_close(model(x[r:r + 1], return_loss="none")[0], nats[r])
    # a prefix is scored as the start of the whole row
    torch.testing.assert_close(model(x[:, :11], return_loss="none"), nats[:, :11])


def test_entropy_auxiliary_loss_trains_only_the_entropy_model():
    model = scheme_model("entropy")
    x = model_rows(model)
    with torch.no_grad():
        plain = model(x, return_loss=True)
    model.train()
    loss = model(x, return_loss=True)
    torch.testing.assert_close(loss, plain, rtol=0, atol=0)  # the value is the main loss
    assert 1 < model.patcher.last_bits_per_byte < 10
    loss.backward()
    train_grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    assert all(train_grads[k].abs().sum() > 0 for k in train_grads if k.startswith("patcher."))
    model.zero_grad(set_to_none=True)
    model.eval()
    model(x, return_loss=True).backward()  # no auxiliary loss outside training
    for k, p in model.named_parameters():
        if k.startswith("patcher."):
            assert p.grad is None, k
        else:
            torch.testing.assert_close(p.grad, train_grads[k])


@pytest.mark.parametrize("scheme", SCHEMES)
def test_save_load_round_trip(scheme, tmp_path):
    model = scheme_model(scheme)
    if scheme == "entropy":
        with torch.no_grad():
            model.patcher.entropy_model.out.bias.add_(torch.linspace(-2, 2, model.vocab_size))
    x = model_rows(model)
    model.save_pretrained(tmp_path / "m")
    loaded = TerraByte.from_pretrained(tmp_path / "m")
    assert loaded.config["patching"] == scheme and loaded.patcher.scheme == scheme
    assert loaded.context_length == model.context_length
    assert torch.equal(loaded.patcher.starts(x), model.patcher.starts(x))
    torch.testing.assert_close(loaded(x, return_loss="none"), model(x, return_loss="none"))
    assert set(loaded.state_dict()) == set(model.state_dict())


def test_patching_config_errors_are_one_line():
    with pytest.raises(ConfigError, match=r"model.patching=space needs model.context_bytes .* below "
                                          r"prod\(model.max_seq_len\)=32"):
        TerraByte(max_seq_len=(8, 4), patching="space")
    with pytest.raises(ConfigError, match="model.patching='words' must be one of fixed, space, entropy"):
        TerraByte(max_seq_len=(8, 4), patching="words")
    with pytest.raises(ConfigError, match="model.patch_threshold=1.0 applies to model.patching=entropy only"):
        TerraByte(max_seq_len=(8, 4), patching="space", context_bytes=16, patch_threshold=1.0)
    with pytest.raises(ConfigError, match="model.context_bytes=40 exceeds prod"):
        TerraByte(max_seq_len=(8, 4), context_bytes=40)
    model = scheme_model("space")
    with pytest.raises(ConfigError, match="sequence length 21 exceeds the model context of 20 bytes"):
        model(torch.zeros(1, 21, dtype=torch.long))


# ---------------------------------------------------------------- cached decoding

@pytest.mark.parametrize("msl", list(MODEL_SHAPES))
@pytest.mark.parametrize("scheme", ["space", "entropy"])
def test_cached_logits_equal_uncached(scheme, msl):
    """Rows reaching patch boundaries at different bytes: every step's cached logits equal the
    forward's, byte by byte from an empty cache and after a prompt prefilled in one go or in pieces."""
    model = scheme_model(scheme, msl)
    x = model_rows(model, b=3)
    n = x.shape[1]
    want = model(x)  # want[:, j] predicts byte j
    cache = model.init_cache(3)
    torch.testing.assert_close(model.forward_cached(x[:, :0], cache), want[:, 0], atol=1e-5, rtol=1e-5)
    for j in range(n - 1):
        got = model.forward_cached(x[:, j:j + 1], cache)
        torch.testing.assert_close(got, want[:, j + 1], atol=1e-5, rtol=1e-5)
    for prompt, piece in ((7, None), (12, 4)):
        cache = model.init_cache(3, prefill_chunk_bytes=piece)
        torch.testing.assert_close(model.forward_cached(x[:, :prompt], cache), want[:, prompt], atol=1e-5, rtol=1e-5)
        for j in range(prompt, n - 1):
            torch.testing.assert_close(model.forward_cached(x[:, j:j + 1], cache), want[:, j + 1], atol=1e-5,
                                       rtol=1e-5)
        # a second prompt piece after decoding continues the same stream
        cache.reset()
        model.forward_cached(x[:, :3], cache)
        torch.testing.assert_close(model.forward_cached(x[:, 3:9], cache), want[:, 9], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scheme", ["space", "entropy"])
def test_generate_greedy_follows_the_uncached_model(scheme):
    model = scheme_model(scheme)
    prime = model_rows(model, b=2)[:, :6]
    out = model.generate(prime, max_new_bytes=10, temperature=0.0, ignore_eos=True)
    assert out.shape == (2, 16) and torch.equal(out[:, :6], prime)
    for j in range(6, 16):
        logits = model(torch.nn.functional.pad(out[:, :j], (0, 1)))[:, -1]
        logits[:, [model.pad_id, model.bos_id]] = float("-inf")
        assert torch.equal(out[:, j], logits.argmax(-1)), j
    # the context fills up: generation stops at the model's context in bytes
    full = model.generate(prime, temperature=0.0, ignore_eos=True)
    assert full.shape[1] == model.context_length
    assert model.generate(prime, max_new_bytes=40, temperature=0.0, ignore_eos=True,
                          sliding_window=True).shape == (2, 46)


# ---------------------------------------------------------------- trained and saved by Terrabyte's commands

def test_entropy_run_trains_its_entropy_model_resumes_and_generates(tmp_path, shards):  # noqa: F811
    """`terrabyte pretrain` with entropy patches: the entropy model learns (its auxiliary loss falls),
    patch statistics are logged, a resumed run repeats the straight run's losses, and the exported
    model (entropy model included) generates as the checkpoint does."""
    from tests.unit.test_train import TINY, generate_greedy, run_cli, scalars

    common = ["--config", "tiny", "--data.path", str(shards), *TINY, "--model.max_seq_len", "64,4",
              "--model.context_bytes", "128", "--model.patching", "entropy", "--train.eval_interval", "4",
              "--checkpoint.interval", "4"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    run_cli([*common, "--run.dir", str(straight), "--train.steps", "8"])
    aux = scalars(straight, "patch/entropy_model_bits_per_byte")
    assert sorted(aux) == list(range(1, 9)) and aux[8] < aux[1] - 0.5
    # a fresh entropy model cuts at the cap (4 bytes); once it learns, patches follow the data without
    # collapsing towards one byte
    mean = scalars(straight, "patch/mean_patch_bytes")
    assert mean[1] == 4.0 and mean[8] < 3.7 and min(mean.values()) > 2
    rate = scalars(straight, "patch/boundary_rate")
    assert rate[8] == pytest.approx(1 / mean[8], rel=1e-5)
    run_cli([*common, "--run.dir", str(split), "--train.steps", "4"])
    run_cli([*common, "--run.dir", str(split), "--train.steps", "8"])
    loss, resumed = scalars(straight, "train/loss"), scalars(split, "train/loss")
    for step in range(5, 9):
        assert resumed[step] == pytest.approx(loss[step], rel=1e-6, abs=1e-7), step
    outs = [generate_greedy(source, "def ") for source in (straight / "model.safetensors", straight / "checkpoints")]
    assert outs[0] == outs[1] and outs[0].startswith(b"def ")
