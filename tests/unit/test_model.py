"""Unit tests for the TerraByte model (tiny shapes, CPU, fp32)."""
import math

import pytest
import torch

from terrabyte.pretrain.model.terrabyte import TerraByte

NUM_TOKENS = 256


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny shapes gain nothing from intra-op threads, and on a shared 2-core machine OpenMP
    threads waiting for a descheduled sibling make them up to 40x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny(max_seq_len=(4, 4), **kw):
    """A tiny model; 2 or 3 stages depending on max_seq_len."""
    stages = len(max_seq_len)
    cfg = dict(num_tokens=NUM_TOKENS, dim=(32, 24, 16)[-stages:], depth=(2,) * stages,
               max_seq_len=max_seq_len, dim_head=8, heads=2)
    cfg.update(kw)
    torch.manual_seed(0)
    return TerraByte(**cfg).eval()


STAGE_SHAPES = [(6, 4), (4, 3, 2)]


def next_logits(model, seq):
    """Uncached logits for the byte after seq (logits at j predict byte j: append a dummy)."""
    logits = model(torch.nn.functional.pad(seq, (0, 1)))[:, -1]
    logits[:, [model.pad_id, model.bos_id]] = float("-inf")
    return logits


def random_bytes(b, n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, NUM_TOKENS, (b, n), generator=g)


# ---------------------------------------------------------------- shapes and ids

@pytest.mark.parametrize("msl", STAGE_SHAPES)
def test_shapes_flat_and_hierarchical(msl):
    model = tiny(msl)
    T = math.prod(msl)
    assert model.vocab_size == NUM_TOKENS + 3
    assert (model.pad_id, model.eos_id, model.bos_id) == (256, 257, 258)
    # (b, n) with n not a multiple of the patch size: padded inside, stripped on output
    x = random_bytes(2, T - 3)
    assert model(x).shape == (2, T - 3, model.vocab_size)
    # (b, *max_seq_len)
    xh = random_bytes(2, T).view(2, *msl)
    logits_h = model(xh)
    assert logits_h.shape == (2, *msl, model.vocab_size)
    # both layouts give the same numbers
    torch.testing.assert_close(logits_h.reshape(2, T, -1), model(xh.reshape(2, T)))
    # padding at the end does not change earlier logits (causal) and the loss ignores PAD
    full = model(x)
    padded = torch.cat((x, torch.full((2, 3), model.pad_id)), dim=1)
    torch.testing.assert_close(model(padded)[:, : T - 3], full)
    torch.testing.assert_close(model(padded, return_loss=True), model(x, return_loss=True))


# ---------------------------------------------------------------- causality

@pytest.mark.parametrize("msl", STAGE_SHAPES)
def test_strictly_causal_by_perturbation(msl):
    """Changing byte i never changes logits at positions <= i, and does change a later one."""
    model = tiny(msl)
    T = math.prod(msl)
    x = random_bytes(1, T)
    base = model(x)
    for i in range(T):
        x2 = x.clone()
        x2[0, i] = (x2[0, i] + 101) % NUM_TOKENS
        out = model(x2)
        assert torch.equal(out[:, : i + 1], base[:, : i + 1]), f"logits <= {i} changed"
        if i + 1 < T:
            assert not torch.equal(out[:, i + 1], base[:, i + 1]), f"byte {i} does not reach position {i + 1}"


# ---------------------------------------------------------------- loss

def test_zero_byte_is_data_not_padding():
    model = tiny().train()
    zeros = torch.zeros(2, 16, dtype=torch.long)
    loss = model(zeros, return_loss=True)
    logits = model(zeros)
    manual = torch.nn.functional.cross_entropy(logits.reshape(-1, model.vocab_size), zeros.reshape(-1))
    assert torch.isfinite(loss) and loss.item() > 0
    torch.testing.assert_close(loss, manual)  # every zero target counted
    loss.backward()
    grad = model.to_logits.weight.grad
    assert grad is not None and grad[0].abs().sum() > 0  # the row of byte 0 is trained


def test_loss_decreases_when_overfitting():
    model = tiny((4, 4)).train()
    x = random_bytes(2, 16)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = model(x, return_loss=True)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_checkpoint_activations_same_loss_and_grads():
    x = random_bytes(2, 16)
    grads = []
    for ckpt in (False, True):
        model = tiny((4, 4), checkpoint_activations=ckpt).train()
        loss = model(x, return_loss=True)
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=0, atol=0)
    assert grads[0][1].keys() == grads[1][1].keys()
    for name in grads[0][1]:
        torch.testing.assert_close(grads[0][1][name], grads[1][1][name], rtol=0, atol=0, msg=name)


def test_tied_embeddings_share_storage():
    model = tiny(tie_embeddings=True)
    emb = model.stages[-1].embed.token_emb.weight
    assert model.to_logits.weight is emb
    assert model.to_logits.weight.data_ptr() == emb.data_ptr()
    untied = tiny(tie_embeddings=False)
    n_tied = sum(p.numel() for p in model.parameters())
    n_untied = sum(p.numel() for p in untied.parameters())
    assert n_untied - n_tied == emb.numel()


def test_meta_build_then_init_weights():
    with torch.device("meta"):
        model = TerraByte(num_tokens=256, dim=(32, 16), depth=(1, 1), max_seq_len=(4, 4), dim_head=8, heads=2)
    model.to_empty(device="cpu")
    model.init_weights()
    ref = tiny((4, 4), dim=(32, 16), depth=(1, 1))
    torch.testing.assert_close(model.stages[0].rotary.freqs, ref.stages[0].rotary.freqs)
    loss = model(random_bytes(1, 16), return_loss=True)
    assert torch.isfinite(loss)
    # scaled init: residual output projections are smaller than input projections
    block = model.stages[0].layers["0"]
    assert block.attn.to_out.weight.std() < block.attn.to_q.weight.std()


def test_from_config_dict():
    cfg = dict(num_tokens=256, dim=[32, 16], depth=[1, 1], max_seq_len=[4, 4], dim_head=8, heads=2)
    model = TerraByte.from_config(cfg)
    assert model.max_seq_len == (4, 4) and model.context_length == 16
    with pytest.raises(ValueError, match="unknown key"):
        TerraByte.from_config({**cfg, "dimm": 3})


# ---------------------------------------------------------------- bad input

def test_bad_input_value_errors():
    with pytest.raises(ValueError, match="depth"):
        TerraByte(num_tokens=256, dim=(32, 16), depth=(1, 1, 1), max_seq_len=(4, 4))
    with pytest.raises(ValueError, match="dim"):
        TerraByte(num_tokens=256, dim=(32, 16, 8), depth=1, max_seq_len=(4, 4))
    with pytest.raises(ValueError, match="max_seq_len"):
        TerraByte(num_tokens=256, dim=32, depth=1, max_seq_len=(16,))
    model = tiny((4, 4))
    with pytest.raises(ValueError, match="exceeds"):
        model(random_bytes(1, 17))
    with pytest.raises(ValueError, match="259"):
        model(torch.tensor([[1, 2, 259]]))
    with pytest.raises(ValueError, match="-1"):
        model(torch.tensor([[1, -1]]))
    # specials are fine; values >= num_tokens that are not specials are not (non-byte vocab)
    small = TerraByte(num_tokens=10, dim=(16, 8), depth=1, max_seq_len=(4, 4), dim_head=4, heads=2)
    assert small(torch.tensor([[0, 9, 10, 11, 12]])).shape == (1, 5, 13)
    with pytest.raises(ValueError, match="13"):
        small(torch.tensor([[0, 13]]))
    with pytest.raises(ValueError, match="integer"):
        model(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="dims"):
        model(torch.zeros(1, 2, 3, 4, dtype=torch.long))


# ---------------------------------------------------------------- cached decoding

@pytest.mark.parametrize("msl", STAGE_SHAPES)
@pytest.mark.parametrize("prompt_len", [0, 1, 5, 9])
def test_cached_logits_equal_uncached(msl, prompt_len):
    """Prime with a prompt (possibly ending mid-patch), then feed byte by byte: the logits for
    every next byte equal the full forward's logits at that position."""
    model = tiny(msl)
    T = math.prod(msl)
    x = random_bytes(3, T, seed=prompt_len)
    full = model(x)
    cache = model.init_cache(3)
    logits = model.forward_cached(x[:, :prompt_len], cache)
    torch.testing.assert_close(logits, full[:, prompt_len], rtol=0, atol=1e-5)
    for j in range(prompt_len + 1, T):
        logits = model.forward_cached(x[:, j - 1:j], cache)
        torch.testing.assert_close(logits, full[:, j], rtol=0, atol=1e-5, msg=f"position {j}")
    with pytest.raises(ValueError, match="context"):
        model.forward_cached(x[:, -1:], cache)


def test_cached_multi_byte_chunks_equal_uncached():
    """Appending several bytes at once while upper stages already hold state."""
    model = tiny((4, 3, 2))
    x = random_bytes(2, 23)
    full = model(x)
    cache = model.init_cache(2)
    pos = 0
    for chunk in (3, 4, 1, 7, 2, 5):
        logits = model.forward_cached(x[:, pos:pos + chunk], cache)
        pos += chunk
        torch.testing.assert_close(logits, full[:, pos], rtol=0, atol=1e-5)


@pytest.mark.parametrize("msl", STAGE_SHAPES)
def test_prefill_in_pieces_equals_one_shot(msl):
    """A prompt prefilled a few patches at a time (dense stages) gives the one-shot logits and
    the same greedy continuation; bad piece sizes are named."""
    from terrabyte.data_pipeline.basics.errors import ConfigError

    model = tiny(msl)
    T, patch = math.prod(msl), model.unit_sizes[0]
    x = random_bytes(2, T - patch - 1, seed=3)  # not a whole number of patches
    ref = model.forward_cached(x, model.init_cache(2))
    for chunk in (1, patch + 1, 3 * patch):
        torch.testing.assert_close(model.forward_cached(x, model.init_cache(2, prefill_chunk_bytes=chunk)), ref,
                                   rtol=0, atol=1e-5)
    greedy = model.generate(x[:, :9], max_new_bytes=5, temperature=0.0, ignore_eos=True)
    assert torch.equal(model.generate(x[:, :9], max_new_bytes=5, temperature=0.0, ignore_eos=True,
                                      prefill_chunk_bytes=1), greedy)
    for bad in (0, -patch, True, 2.5):
        with pytest.raises(ConfigError, match=f"prefill_chunk_bytes={bad!r}"):
            model.generate(x, max_new_bytes=1, prefill_chunk_bytes=bad)


def test_decode_weights_follow_parameter_updates():
    """Eval-mode caches share fused decode weights until a parameter changes: an optimizer step,
    load_state_dict or a train() call all make the next cache see the new weights."""
    model = tiny((4, 4))
    x = random_bytes(2, 9)

    def check():
        # logits for byte 9 after 9 bytes; the full forward needs a 10th byte to return them
        full = model(torch.cat((x, x[:, :1]), dim=1))[:, 9]
        torch.testing.assert_close(model.forward_cached(x, model.init_cache(2)), full, rtol=0, atol=1e-5)

    check()
    assert model.init_cache(1).stages[0].plan is model.init_cache(1).stages[0].plan  # reused
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model.train()
    model(x, return_loss=True).backward()
    opt.step()
    model.eval()
    check()
    with torch.no_grad():  # in place, in eval mode: only the version counter tells
        model.stages[1].layers["0"].ff.down_proj.weight.mul_(3.0)
    check()
    other = tiny((4, 4))
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.1)
    model.load_state_dict(other.state_dict())
    check()


# ---------------------------------------------------------------- generation

def test_generate_lengths_and_greedy_determinism():
    model = tiny((6, 4))
    prime = random_bytes(2, 5)
    a = model.generate(prime, max_new_bytes=7, temperature=0.0, ignore_eos=True)
    b = model.generate(prime, max_new_bytes=7, temperature=0.0, ignore_eos=True)
    assert a.shape == (2, 12) and torch.equal(a, b) and torch.equal(a[:, :5], prime)
    # greedy equals argmax of the full forward, byte after byte
    seq = prime
    for _ in range(7):
        seq = torch.cat((seq, next_logits(model, seq).argmax(-1, keepdim=True)), dim=1)
    assert torch.equal(a, seq)
    # no prime: batch_size sequences from nothing; context full ends generation
    out = model.generate(None, batch_size=3, temperature=0.0, ignore_eos=True)
    assert out.shape == (3, model.context_length)
    streamed = []
    g = torch.Generator().manual_seed(0)
    sampled = model.generate(prime, max_new_bytes=4, temperature=1.0, filter_thres=0.5, top_p=0.9,
                             generator=g, callback=streamed.append)
    assert torch.equal(torch.stack(streamed, dim=1), sampled[:, 5:])
    assert ((sampled != model.pad_id) & (sampled != model.bos_id)).all()


def test_generate_stop_bytes_and_eos():
    model = tiny((6, 4))
    prime = random_bytes(2, 4)
    greedy = model.generate(prime, max_new_bytes=10, temperature=0.0, ignore_eos=True)
    stop = int(greedy[0, 6])  # the third generated byte of sequence 0
    out = model.generate(prime, max_new_bytes=10, temperature=0.0, stop_bytes=[stop], ignore_eos=True)
    hits = [(row[4:] == stop).nonzero().flatten().tolist() for row in greedy]
    assert hits[0] and hits[0][0] <= 2
    end = max(h[0] if h else 9 for h in hits) + 1  # generation ends once every row stopped
    assert out.shape == (2, 4 + end)
    for row, h in enumerate(hits):
        stop_at = h[0] + 1 if h else end
        assert torch.equal(out[row, :4 + stop_at], greedy[row, :4 + stop_at])
        assert (out[row, 4 + stop_at:] == model.pad_id).all()

    # EOS always stops a row: force EOS for row 0 at its 2nd new byte, for row 1 at its 5th
    advance, calls = model._advance, []

    def forced(tokens, cache):
        logits = advance(tokens, cache).clone()
        step = len(calls)
        calls.append(step)
        for row, at in ((0, 1), (1, 4)):
            if step == at:
                logits[row, model.eos_id] = 1e4
        return logits

    model._advance = forced
    out = model.generate(prime, max_new_bytes=10, temperature=0.0)
    del model._advance
    assert out.shape == (2, 4 + 5)
    assert out[0, 5] == model.eos_id and (out[0, 6:] == model.pad_id).all()
    assert out[1, 8] == model.eos_id and torch.equal(out[1, :8], greedy[1, :8])
    assert len(calls) == 5  # no model step after the last row ended


def test_generate_prompt_too_long_and_sliding_window():
    model = tiny((4, 4))
    long_prompt = random_bytes(1, 20)
    with pytest.raises(ValueError, match="sliding_window"):
        model.generate(long_prompt, max_new_bytes=2)
    out = model.generate(long_prompt, max_new_bytes=10, temperature=0.0, sliding_window=True, ignore_eos=True)
    assert out.shape == (1, 30) and torch.equal(out[:, :20], long_prompt)
    # the first new byte is predicted from the last whole patches that fit (window starts at 8)
    assert out[0, 20] == next_logits(model, long_prompt[:, 8:20]).argmax(-1)[0]
    # once the context (16) is full, half of it (two patches) is dropped and re-primed
    window = out[:, 16:27]  # bytes 27 is predicted after the window moved from 8 to 16
    assert out[0, 27] == next_logits(model, window).argmax(-1)[0]


# ---------------------------------------------------------------- attention paths and sampling

@pytest.mark.parametrize("n", [1, 4, 16, 40])
def test_dense_attention_paths_match_sdpa(n):
    """Short CPU sequences take the math path, longer ones SDPA: both equal SDPA causal."""
    from terrabyte.pretrain.model.layers import DenseAttention, math_attention

    g = torch.Generator().manual_seed(n)
    q, k, v = (torch.randn(3, 2, n, 8, generator=g) for _ in range(3))
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(DenseAttention()(q, k, v), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(math_attention(q, k, v), ref, rtol=1e-5, atol=1e-6)


def test_flash_attn_flag_falls_back_silently_on_cpu():
    x = random_bytes(2, 16)
    torch.testing.assert_close(tiny(flash_attn=True)(x), tiny(flash_attn=False)(x), rtol=0, atol=0)


# Reference filters for the sampler, which draws among topk's candidates instead of masking the
# vocabulary: masking to -inf is the textbook form its distribution must equal.

def top_k_filter(logits, filter_thres):
    """Keep the top (1 - filter_thres) fraction of logits by count (MEGABYTE-pytorch semantics)."""
    from terrabyte.pretrain.decode.sample import top_k_count

    kth = torch.topk(logits, top_k_count(logits.shape[-1], filter_thres), dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits, top_p):
    """Nucleus filter: keep the smallest set of logits whose probability mass reaches top_p."""
    sorted_logits, idx = torch.sort(logits, descending=True, dim=-1)
    probs = sorted_logits.softmax(dim=-1)
    # drop a token when the mass before it already reaches top_p (the top token always stays)
    sorted_logits = sorted_logits.masked_fill((probs.cumsum(dim=-1) - probs) >= top_p, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, idx, sorted_logits)


def test_top_k_and_top_p_filters():
    logits = torch.arange(20.0).view(1, 20)
    kept = torch.isfinite(top_k_filter(logits, 0.9))  # keeps int(0.1 * 20) = 2 by count
    assert kept.sum() == 2 and kept[0, 18:].all()
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    assert torch.isfinite(top_p_filter(probs, 0.75)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(top_p_filter(probs, 0.5)).tolist() == [[True, False, False, False]]


def test_sampling_follows_the_distribution():
    """The exponential-race sampler draws from softmax(logits / temperature)."""
    logits = torch.tensor([[0.0, 1.0, 2.0, -30.0]]).expand(20000, 4)
    g = torch.Generator().manual_seed(0)
    draws = TerraByte._sample(logits, 1.0, None, None, g)
    freq = torch.bincount(draws, minlength=4).float() / draws.numel()
    torch.testing.assert_close(freq, logits[0].softmax(-1), rtol=0, atol=0.015)
    assert torch.equal(TerraByte._sample(logits[:2], 0.0, None, None, g), torch.tensor([2, 2]))


def test_sparse_attention_stage_cached_equals_uncached():
    pytest.importorskip("terrabyte.kernels")
    attention = ({"kind": "sparse", "pattern": {"local": 3, "global_tokens": 1, "block": 16}}, None)
    model = tiny((12, 4), attention=attention)
    dense = tiny((12, 4))
    dense.load_state_dict(model.state_dict())
    x = random_bytes(2, 48)
    full = model(x)
    assert not torch.allclose(full, dense(x), atol=1e-4)  # the pattern changes the result
    cache = model.init_cache(2)
    torch.testing.assert_close(model.forward_cached(x[:, :7], cache), full[:, 7], rtol=0, atol=1e-5)
    for j in range(8, 48):
        torch.testing.assert_close(model.forward_cached(x[:, j - 1:j], cache), full[:, j], rtol=0, atol=1e-5)


@pytest.mark.slow
def test_bench_quick_writes_table(tmp_path, capsys):
    """`terrabyte bench model --quick`: every row measured (positive numbers), table also in --out."""
    import argparse

    from terrabyte.pretrain.bench import model as bench_model

    parser = argparse.ArgumentParser()
    bench_model.add_arguments(parser)
    out = tmp_path / "bench.md"
    args = parser.parse_args(["--quick", "--no-baseline", "--threads", "1", "--out", str(out)])
    assert bench_model.run(args) == 0
    table = out.read_text()
    assert table == capsys.readouterr().out
    rows = [line for line in table.splitlines() if line.startswith("| ") and "metric" not in line]
    # 2 rows per training shape, 3 per generation shape, and the decode bound
    assert len(rows) == 2 * len(bench_model.QUICK.train) + 3 * len(bench_model.QUICK.generate) + 1
    for row in rows:
        value = row.split("|")[2].strip().split()[0].replace(",", "")
        assert float(value) > 0, row


def test_rotary_scores_depend_on_relative_position_only():
    from terrabyte.pretrain.model.layers import Rotary, apply_rotary

    rot = Rotary(8, 32)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(8, generator=g), torch.randn(8, generator=g)

    def score(i, j):
        qi = apply_rotary(q.expand(32, 8), rot.freqs)[i]
        kj = apply_rotary(k.expand(32, 8), rot.freqs)[j]
        return (qi * kj).sum()

    torch.testing.assert_close(score(5, 2), score(20, 17))
    torch.testing.assert_close(score(0, 0), (q * k).sum())  # position 0 is the identity
    assert not torch.allclose(score(5, 2), score(5, 3))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_cast_model_keeps_its_rotary_table(dtype):
    """model.to(dtype) casts complex buffers to real ones; the rotary table must survive it, so a
    cast model still computes the fp32 model's logits (to its precision), cached and uncached."""
    model = tiny((4, 4))
    x = random_bytes(2, 13)
    ref = model(x)
    cast = tiny((4, 4)).to(dtype)
    for stage, fp32_stage in zip(cast.stages, model.stages):
        assert stage.rotary.freqs.dtype == torch.complex64
        torch.testing.assert_close(stage.rotary.freqs, fp32_stage.rotary.freqs, rtol=0, atol=0)
    # fp64 against fp32: the fp32 reference's own rounding, a few ulps of its largest logit
    tol = 8 * torch.finfo(torch.float32).eps * float(ref.detach().abs().max()) if dtype == torch.float64 else 0.05
    torch.testing.assert_close(cast(x).float(), ref, rtol=0, atol=tol)
    cached = cast.forward_cached(x[:, :12], cast.init_cache(2)).float()
    torch.testing.assert_close(cached, ref[:, 12], rtol=0, atol=tol)


def test_swiglu_function_matches_autograd():
    from terrabyte.pretrain.model.layers import SwiGLU

    g = torch.Generator().manual_seed(0)
    gate = torch.randn(5, 7, dtype=torch.float64, generator=g, requires_grad=True)
    up = torch.randn(5, 7, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(SwiGLU.apply, (gate, up))
    out = SwiGLU.apply(gate, up)
    torch.testing.assert_close(out, torch.nn.functional.silu(gate) * up)


@pytest.mark.parametrize("temperature,filter_thres,top_p", [(1.0, 0.9, None), (0.7, 0.5, 0.8), (1.3, None, 0.6)])
def test_sampling_among_top_candidates_matches_masked_softmax(temperature, filter_thres, top_p):
    """_sample draws among topk's candidates only; its distribution equals softmax over the
    logits that the reference filters (top_k_filter, then top_p_filter) leave finite."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(1, 12, generator=g) * 2
    ref = logits / temperature
    if filter_thres:
        ref = top_k_filter(ref, filter_thres)
    if top_p:
        ref = top_p_filter(ref, top_p)
    draws = TerraByte._sample(logits.expand(40000, 12), temperature, filter_thres, top_p, g)
    freq = torch.bincount(draws, minlength=12).float() / draws.numel()
    torch.testing.assert_close(freq, ref[0].softmax(-1), rtol=0, atol=0.01)
