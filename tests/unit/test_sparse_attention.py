"""Triton sparse attention vs the PyTorch reference, on CPU through the Triton interpreter.

TRITON_INTERPRET=1 must be set before ``@triton.jit`` decorates the kernels, i.e. before
``terrabyte.kernels`` is first imported in this process (tests/conftest.py sets it for the whole
run; the line below covers running this file alone). The interpreter computes fp32 and fp16
correctly; bf16 arithmetic is wrong there, so bf16 runs only in kernels/tools/gpu_check.py on a GPU.
Shapes stay small: interpreter time grows with programs x visited tiles.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import random  # noqa: E402

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from terrabyte.kernels import SparsePattern, gathered_attention, reference_attention, sparse_attention  # noqa: E402
from terrabyte.kernels.cpu import gathered_attention as gathered_module  # noqa: E402
from terrabyte.kernels.cpu import part_attention as part_module  # noqa: E402
from terrabyte.kernels.cpu.gathered_attention import gather_plan  # noqa: E402
from terrabyte.kernels.triton import function as sparse_module  # noqa: E402
from terrabyte.kernels.triton.function import (  # noqa: E402
    _interpreting,
    _launch_meta,
    batch_slices,
    count_tiles,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(DEVICE == "cpu" and not _interpreting(),
                                reason="terrabyte.kernels was imported before TRITON_INTERPRET=1 was set")


@pytest.fixture(autouse=True)
def nan_outputs(monkeypatch):
    """Every kernel output starts as NaN, so an element a kernel never wrote shows."""
    monkeypatch.setattr(sparse_module, "_empty",
                        lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype, device=device))


TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float16: dict(atol=1e-2, rtol=1e-2)}


def random_layout_pattern(rng: random.Random, blocks: int, block: int, heads: int) -> SparsePattern:
    layout = torch.tensor([[[rng.random() < 0.4 for _ in range(blocks)] for _ in range(blocks)] for _ in range(heads)])
    return SparsePattern.from_block_layout(layout, block=block)


def run_and_compare(pattern, n, head_dim, dtype, causal, heads=2, batch=1, layout="bhnd"):
    """Kernel output and gradients (outputs NaN beforehand: ``nan_outputs``) against the reference on
    fp32 copies of the same fresh random inputs."""
    shape = (batch, heads, n, head_dim) if layout == "bhnd" else (batch, n, heads, head_dim)
    leaves = [torch.randn(shape, dtype=dtype, device=DEVICE, requires_grad=True) for _ in range(3)]
    q, k, v = leaves if layout == "bhnd" else [t.transpose(1, 2) for t in leaves]  # strided views
    grad_out = torch.randn(batch, heads, n, head_dim, dtype=dtype, device=DEVICE)
    out = sparse_attention(q, k, v, pattern, causal=causal, backend="triton")
    grads = torch.autograd.grad(out, leaves, grad_out)
    ref_leaves = [t.detach().float().requires_grad_() for t in leaves]
    rq, rk, rv = ref_leaves if layout == "bhnd" else [t.transpose(1, 2) for t in ref_leaves]
    ref = reference_attention(rq, rk, rv, pattern, causal=causal)
    ref_grads = torch.autograd.grad(ref, ref_leaves, grad_out.float())
    assert out.dtype == dtype and out.shape == q.shape
    for name, got, want in [("out", out, ref)] + list(zip(("dq", "dk", "dv"), grads, ref_grads)):
        assert torch.isfinite(got).all(), f"{name} has NaN/inf: a poisoned element was never written"
        torch.testing.assert_close(got.float(), want, **TOL[dtype], msg=lambda m: f"{name}: {m}")
    return out, grads


CASES = {
    # name: (pattern config, n, head_dim, dtype, causal, heads)
    "local": ({"local": 40, "block": 32}, 100, 32, torch.float32, True, 2),
    "stride_wide": ({"stride": 40, "block": 32}, 130, 64, torch.float32, True, 2),
    "stride_narrow_noncausal": ({"stride": 5, "block": 16}, 45, 32, torch.float16, False, 2),
    "dilated_per_head_offsets": ({"dilated": [[64, 4], [96, 1]], "block": 32}, 150, 32, torch.float16, True, 4),
    "global_noncausal": ({"global_tokens": 5, "local": 16, "block": 32}, 97, 64, torch.float32, False, 2),
    "mixed_heads": ([{"local": 20, "block": 32}, {"stride": 33, "global_tokens": 2, "block": 32},
                     {"dilated": [[40, 2, 1]], "block": 32}], 120, 32, torch.float32, True, 3),
    "union_noncausal": ({"local": 33, "stride": 48, "global_tokens": 3, "dilated": [[64, 2], [128, 1]], "block": 32},
                        150, 64, torch.float16, False, 2),
    "head_dim_48_short": ({"local": 8, "block": 16}, 37, 48, torch.float32, True, 1),
    "default_block_64": ({"local": 150, "global_tokens": 4, "block": 64}, 300, 64, torch.float16, True, 1),
}


@pytest.mark.parametrize("name", list(CASES))
def test_forward_and_gradients_match_reference(name):
    cfg, n, head_dim, dtype, causal, heads = CASES[name]
    run_and_compare(SparsePattern.from_config(cfg), n, head_dim, dtype, causal, heads=heads)


@pytest.mark.parametrize("causal", [True, False])
def test_explicit_csr_layout(causal):
    rng = random.Random()
    pattern = random_layout_pattern(rng, blocks=4, block=32, heads=2)
    run_and_compare(pattern, 4 * 32 - 7, 32, torch.float32, causal)


def test_batch_and_strided_inputs():
    pattern = SparsePattern.from_config({"local": 24, "global_tokens": 1, "block": 32})
    run_and_compare(pattern, 70, 32, torch.float32, True, heads=2, batch=2, layout="bnhd")


def test_single_position_sequence():
    run_and_compare(SparsePattern.from_config({"block": 16}), 1, 32, torch.float32, True, heads=1)


def test_covering_pattern_equals_dense_causal_attention():
    """Independent oracle: a window covering the whole sequence is plain causal attention."""
    q, k, v = (torch.randn(1, 2, 75, 32, device=DEVICE) for _ in range(3))
    pattern = SparsePattern.from_config({"local": 75, "block": 32})
    out = sparse_attention(q, k, v, pattern, causal=True, backend="triton")
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True), atol=1e-5, rtol=1e-5)


def test_backward_is_deterministic():
    pattern = SparsePattern.from_config({"local": 20, "stride": 33, "block": 16})
    q, k, v = (torch.randn(1, 1, 60, 32, device=DEVICE, requires_grad=True) for _ in range(3))
    grad_out = torch.randn(1, 1, 60, 32, device=DEVICE)
    runs = []
    for _ in range(2):
        out = sparse_attention(q, k, v, pattern, backend="triton")
        runs.append([out] + list(torch.autograd.grad(out, (q, k, v), grad_out)))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_kernel_walk_matches_python_layout():
    """The kernels' tile enumeration (run alone) visits exactly the tiles key_blocks/query_blocks
    list, each once, with the same full/masked split: forward and transposed."""
    rng = random.Random()
    patterns = [
        (SparsePattern.from_config({"local": 40, "stride": 20, "global_tokens": 20, "block": 16}), 150),
        (SparsePattern.from_config([{"dilated": [[48, 2], [32, 1], [100, 20]], "block": 16},
                                    {"stride": 36, "local": 33, "block": 16}]), 170),
        (random_layout_pattern(rng, blocks=6, block=16, heads=2), 90),
    ]
    for pattern, n in patterns:
        blocks = -(-n // pattern.block)
        for causal in (True, False):
            for transposed in (False, True):
                counts, visits = count_tiles(pattern, n, heads=2, causal=causal, transposed=transposed, with_map=True)
                expect = torch.zeros(2, blocks, blocks, dtype=torch.int32)
                for h in range(2):
                    for x in range(blocks):
                        walk = pattern.query_blocks if transposed else pattern.key_blocks
                        for b, full in walk(x, n, h, causal, with_full=True):
                            expect[h, x, b] += 1 if full else 16
                assert torch.equal(visits.cpu(), expect), (pattern, causal, transposed)
                assert torch.equal(counts[..., 0].cpu(), (expect == 1).sum(-1))
                assert torch.equal(counts[..., 1].cpu(), (expect == 16).sum(-1))


def test_kernel_metadata_does_not_grow_with_length():
    pattern = SparsePattern.from_config({"local": 256, "stride": 128, "dilated": [[512, 2], [2048, 8]],
                                         "global_tokens": 4})
    small = _launch_meta(pattern, 8, 1000, 64, torch.float16, torch.device("cpu"))[0]
    huge = _launch_meta(pattern, 8, 2**30, 64, torch.float16, torch.device("cpu"))[0]
    assert small[0].shape == huge[0].shape == (8, 9) and small[0].dtype == torch.int32
    assert huge[0][:, 0].tolist() == [256] * 8  # the table only holds the pattern's integers


# ---------------------------------------------------------------- reference and dispatch

def test_chunked_reference_matches_full_reference():
    pattern = SparsePattern.from_config([{"local": 7, "dilated": [[16, 2]], "block": 16}, {"stride": 5, "block": 16}])
    q, k, v = (torch.randn(2, 2, 50, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    full = reference_attention(q, k, v, pattern)
    chunked = reference_attention(q, k, v, pattern, chunk=16)
    torch.testing.assert_close(chunked, full)
    g = torch.randn_like(full)
    for a, b in zip(torch.autograd.grad(full, (q, k, v), g), torch.autograd.grad(chunked, (q, k, v), g)):
        torch.testing.assert_close(a, b)


def test_auto_backend_off_cuda_is_the_gathered_path():
    pattern = SparsePattern.from_config({"local": 5, "global_tokens": 2, "block": 16})
    q, k, v = (torch.randn(1, 2, 30, 8) for _ in range(3))  # head_dim 8: fine off the kernels
    auto = sparse_attention(q, k, v, pattern, causal=False)
    assert torch.equal(auto, sparse_attention(q, k, v, pattern, causal=False, backend="gather"))
    torch.testing.assert_close(auto, reference_attention(q, k, v, pattern, causal=False), atol=1e-6, rtol=1e-6)


def _qkv(shape=(1, 2, 40, 32), dtype=torch.float32):
    return [torch.randn(shape, dtype=dtype, device=DEVICE) for _ in range(3)]


@pytest.mark.parametrize("make, message", [
    (lambda p: (*_qkv((1, 2, 40, 16)), p), "head_dim 16 is not supported by the kernels"),
    (lambda p: (*_qkv((1, 2, 40, 256)), p), "head_dim 256 is not supported"),
    (lambda p: (_qkv()[0], _qkv((1, 2, 41, 32))[0], _qkv()[0], p), "shapes differ"),
    (lambda p: (_qkv()[0], _qkv()[1].half(), _qkv()[2], p), "dtypes differ"),
    (lambda p: (*_qkv(dtype=torch.float64), p), "float64 is not supported by the kernels"),
    (lambda p: (_qkv()[0][0], _qkv()[1][0], _qkv()[2][0], p), "must be a 4-D tensor"),
    (lambda p: (*_qkv(), SparsePattern.from_config([{"local": 3}] * 3)), "given for 3 heads but the input has 2"),
    (lambda p: (*_qkv(), {"local": 3}), "must be a SparsePattern"),
    (lambda p: (*_qkv(), SparsePattern.from_block_layout(torch.ones(2, 2, dtype=torch.bool), block=16)),
     "covers 2 blocks"),
])
def test_bad_inputs_fail_before_launch(make, message):
    args = make(SparsePattern.from_config({"local": 3, "block": 16}))
    with pytest.raises(ValueError, match=message):
        sparse_attention(*args, backend="triton")


def test_bad_call_arguments():
    q, k, v = _qkv()
    p = SparsePattern.from_config({"local": 3})
    with pytest.raises(ValueError, match="backend must be one of"):
        sparse_attention(q, k, v, p, backend="flash")
    with pytest.raises(ValueError, match="scale must be a positive finite number"):
        sparse_attention(q, k, v, p, scale=float("nan"))
    with pytest.raises(ValueError, match="chunk must be a positive integer"):
        reference_attention(q, k, v, p, chunk=0)
    with pytest.raises(ValueError, match="chunk=64 applies to backend='reference' only"):
        sparse_attention(q, k, v, p, chunk=64)
    with pytest.raises(ValueError, match="budget must be a positive number of bytes, got 0"):
        gathered_attention(q, k, v, p, budget=0)


def test_bench_command_runs_on_cpu(tmp_path, capsys):
    """`terrabyte bench attention` without a GPU: the reference path at small sizes, a full table."""
    import argparse
    import json

    from terrabyte.kernels.tools import bench

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    out = tmp_path / "bench.json"
    args = parser.parse_args(["--device", "cpu", "--lengths", "64,128", "--reps", "1", "--warmup", "0",
                              "--pattern", '{"local": 32, "global_tokens": 2, "block": 16}', "--json", str(out)])
    assert bench.run(args) == 0
    table = capsys.readouterr().out
    assert "| 128 | reference (cpu) |" in table and "| 128 | sdpa dense causal |" in table
    assert "| 128 | gather (cpu) |" in table and "| 128 | gather tiles (cpu) |" in table
    report = json.loads(out.read_text())
    rows = {(r["length"], r["impl"]): r for r in report["rows"]}
    ours = rows[(128, "reference (cpu)")]
    assert ours["fwd_ms"] > 0 and ours["fwd_bwd_ms"] > 0
    # 8 query blocks of 16 per head: the block, the 2 before it (window 32) and global block 0
    assert ours["tiles"] == 2 * (1 + 2 + 3 + 5 * 4)
    assert ours["metadata_bytes"] == rows[(64, "reference (cpu)")]["metadata_bytes"] == 2 * 3 * 4
    gathered = rows[(128, "gather (cpu)")]
    assert gathered["tiles"] == ours["tiles"] and gathered["us_per_position"] > 0
    with pytest.raises(ValueError, match="--lengths must be comma-separated integers"):
        bench.run(parser.parse_args(["--device", "cpu", "--lengths", "1k"]))


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")  # eager on purpose
def test_flex_attention_with_mask_mod_equals_reference():
    """The benchmark's FlexAttention baseline gets exactly this attended set (forward; FlexAttention
    has no CPU backward)."""
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    pattern = SparsePattern.from_config([{"local": 20, "stride": 33, "global_tokens": 2, "block": 16},
                                         {"dilated": [[64, 4], [128, 1]], "block": 16}])
    q, k, v = (torch.randn(1, 2, 200, 32) for _ in range(3))
    mask = flex.create_block_mask(pattern.mask_mod(2, causal=True), None, 2, 200, 200, device="cpu")
    with torch.no_grad():
        out = flex.flex_attention(q, k, v, block_mask=mask)
    torch.testing.assert_close(out, reference_attention(q, k, v, pattern), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- gathered PyTorch path

GATHER_CASES = {
    # name: (pattern config, n, heads, batch, causal)
    "local": ({"local": 40, "block": 32}, 100, 2, 1, True),
    "local_dilated_head_offsets": ({"local": 20, "dilated": [[64, 4], [96, 1], [48, 16], [200, 3]], "block": 16},
                                   230, 5, 1, True),
    "dilated_noncausal_fixed_offset": ({"dilated": [[40, 8, 3], [24, 2]], "block": 16}, 150, 3, 2, False),
    "stride_wide": ({"stride": 40, "block": 32}, 130, 2, 1, True),
    "stride_narrow_noncausal": ({"stride": 5, "block": 16}, 45, 2, 1, False),
    "global_causal": ({"global_tokens": 5, "local": 16, "block": 16}, 97, 2, 3, True),
    "global_noncausal": ({"global_tokens": 37, "local": 16, "block": 16}, 97, 2, 1, False),
    "per_head_list": ([{"local": 20, "block": 32}, {"stride": 33, "global_tokens": 2, "block": 32},
                       {"dilated": [[40, 2, 1]], "block": 32}], 120, 3, 2, True),
    "union_noncausal": ({"local": 33, "stride": 48, "global_tokens": 3, "dilated": [[64, 2], [128, 1]],
                         "block": 32}, 150, 2, 1, False),
    "shorter_than_a_block": ({"local": 3, "dilated": [[8, 2]], "block": 64}, 10, 2, 2, True),
    "single_position": ({"block": 16}, 1, 1, 1, True),
}


def gather_and_compare(pattern, n, heads, batch, causal, budget=gathered_module.DEFAULT_BUDGET, layout="bhnd",
                       dtype=torch.float64, tol=None):
    """Gathered output and gradients against the dense reference on the same fp64 inputs."""
    shape = (batch, heads, n, 8) if layout == "bhnd" else (batch, n, heads, 8)
    leaves = [torch.randn(shape, dtype=dtype, requires_grad=True) for _ in range(3)]
    q, k, v = leaves if layout == "bhnd" else [t.transpose(1, 2) for t in leaves]
    grad_out = torch.randn(batch, heads, n, 8, dtype=dtype)
    out = gathered_attention(q, k, v, pattern, causal=causal, budget=budget)
    grads = torch.autograd.grad(out, leaves, grad_out)
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    rq, rk, rv = ref_leaves if layout == "bhnd" else [t.transpose(1, 2) for t in ref_leaves]
    ref = reference_attention(rq, rk, rv, pattern, causal=causal)
    ref_grads = torch.autograd.grad(ref, ref_leaves, grad_out.double())
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    tol = tol or dict(atol=1e-10, rtol=1e-10)
    for name, got, want in [("out", out, ref)] + list(zip(("dq", "dk", "dv"), grads, ref_grads)):
        torch.testing.assert_close(got.double(), want, **tol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("name", list(GATHER_CASES))
def test_gathered_matches_reference(name):
    cfg, n, heads, batch, causal = GATHER_CASES[name]
    gather_and_compare(SparsePattern.from_config(cfg), n, heads, batch, causal)


@pytest.fixture
def one_thread():
    """Many small tensor ops: on a shared 2-core machine a second intra-op thread that is not
    scheduled makes each op wait (5-10x slower); these tests are about results and memory."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("budget", [1, 300_000])
def test_gathered_matches_reference_in_small_chunks(budget, one_thread):
    """A tiny budget splits batch x heads, the query blocks and (budget 1) each row's key blocks
    (online softmax across pieces); the result does not change."""
    pattern = SparsePattern.from_config({"local": 20, "stride": 40, "global_tokens": 3, "dilated": [[64, 4]],
                                         "block": 16})
    gather_and_compare(pattern, 90, 3, 2, True, budget=budget)
    gather_and_compare(pattern, 90, 3, 2, False, budget=budget, layout="bnhd")
    # batch 1 of a (b, n, h, d) transpose (the model's layout): the blocked views are not contiguous
    gather_and_compare(pattern, 90, 3, 1, True, budget=budget, layout="bnhd")


@pytest.mark.parametrize("causal", [True, False])
def test_gathered_csr_layout(causal):
    rng = random.Random()
    gather_and_compare(random_layout_pattern(rng, blocks=5, block=16, heads=2), 5 * 16 - 9, 2, 2, causal)
    gather_and_compare(random_layout_pattern(rng, blocks=4, block=16, heads=1), 4 * 16, 3, 1, causal)


def test_gathered_low_precision_computes_in_fp32():
    pattern = SparsePattern.from_config({"local": 24, "dilated": [[64, 4]], "block": 16})
    gather_and_compare(pattern, 70, 2, 1, True, dtype=torch.bfloat16, tol=dict(atol=2e-2, rtol=2e-2))


def _random_pattern(rng: random.Random) -> SparsePattern:
    cfg = {"block": rng.choice([16, 32])}
    if rng.random() < 0.6:
        cfg["local"] = rng.randint(0, 80)
    if rng.random() < 0.4:
        cfg["stride"] = rng.randint(1, 70)
    if rng.random() < 0.3:
        cfg["global_tokens"] = rng.randint(0, 40)
    if rng.random() < 0.7:
        segments = [rng.randint(1, 120) for _ in range(rng.randint(1, 3))]
        cfg["dilated"] = [[s, rng.randint(1, s)] for s in segments]
    return SparsePattern.from_config(cfg)


def test_gather_plan_covers_the_attended_set_exactly():
    """On random patterns: every tile holding an attended pair is in the plan, a tile flagged
    entirely attended is, and each partly attended tile's stored mask is its element-wise mask
    (the signature grouping loses nothing)."""
    rng = random.Random()
    for _ in range(25):
        pattern, n, causal, heads = _random_pattern(rng), rng.randint(1, 200), rng.random() < 0.5, 3
        B = pattern.block
        nb = -(-n // B)
        dense = torch.zeros(heads, nb * B, nb * B, dtype=torch.bool)
        dense[:, :n, :n] = pattern.dense_mask(n, heads=heads, causal=causal)
        tiles = dense.view(heads, nb, B, nb, B).permute(0, 1, 3, 2, 4)  # (heads, qb, kb, B, B)
        plan = gather_plan(pattern, n, heads, causal)
        where = f"{pattern} n={n} causal={causal}"
        for h in range(heads):
            hb = plan.per_head[plan.head_of[h]]
            rows = torch.repeat_interleave(torch.arange(nb), hb.ptr[1:] - hb.ptr[:-1])
            listed = torch.zeros(nb, nb, dtype=torch.bool)
            listed[rows, hb.blocks] = True
            assert not (tiles[h].any((-1, -2)) & ~listed).any(), where
            got = tiles[h][rows, hb.blocks]
            assert got[hb.full].all(), where
            if plan.bad_masks is not None:  # query rows past n are left unmasked on purpose
                inside = (torch.arange(nb * B) < n).view(nb, B)[rows[~hb.full], :, None]
                assert torch.equal(~plan.bad_masks[hb.mask_id[~hb.full]] & inside, got[~hb.full]), where


def test_gathered_path_is_linear_in_length(monkeypatch, one_thread):
    """n = 65536: the plan holds O(n) integers, no chunk's scores exceed the budget (n^2 scores
    would be 16 GiB), and forward + backward run in about a second."""
    n, budget = 65536, 4 << 20
    pattern = SparsePattern.from_config({"local": 20, "dilated": [[256, 64]], "global_tokens": 1, "block": 16})
    largest = []
    scores = gathered_module._Blocks.scores

    def recording(self, piece):
        out = scores(self, piece)
        largest.append(out[0].numel() * out[0].element_size())
        return out

    monkeypatch.setattr(gathered_module._Blocks, "scores", recording)
    q, k, v = (torch.randn(1, 2, n, 4, requires_grad=True) for _ in range(3))
    out = gathered_attention(q, k, v, pattern, budget=budget, fast=False)
    torch.autograd.grad(out.sum(), (q, k, v))
    plan = gather_plan(pattern, n, 2, True)
    blocks = n // 16
    assert plan.tiles <= 2 * blocks * 8  # a few key blocks per query block, not n / 16
    assert plan.index_bytes() < 200 * n
    assert max(largest) <= budget and len(largest) > 2


def test_batch_slices_respect_the_grid_limit():
    assert batch_slices(3, 8) == [(0, 3)]
    assert batch_slices(10_000, 8) == [(0, 8191), (8191, 10_000)]
    assert batch_slices(5, 2, limit=4) == [(0, 2), (2, 4), (4, 5)]
    assert all((b - a) * 12 <= 65535 for a, b in batch_slices(100_000, 12))
    with pytest.raises(ValueError, match="70000 heads exceed the grid limit 65535"):
        batch_slices(1, 70_000)
    with pytest.raises(ValueError, match="batch must be a positive integer, got 0"):
        batch_slices(0, 4)


def test_kernels_launch_per_batch_slice(monkeypatch):
    """With the grid limit lowered to 2 programs, a batch of 3 with 1 head runs as two launches,
    batch [0, 2) and [2, 3); outputs and gradients unchanged."""
    pattern = SparsePattern.from_config({"local": 8, "block": 16})
    leaves = [torch.randn(3, 1, 16, 32, device=DEVICE, requires_grad=True) for _ in range(3)]
    grad_out = torch.randn(3, 1, 16, 32, device=DEVICE)
    launches = []
    apply = sparse_module.SparseAttentionFunction.apply

    def counting(q, *args):
        launches.append(q.shape[0])
        return apply(q, *args)

    monkeypatch.setattr(sparse_module, "GRID_LIMIT", 2)
    monkeypatch.setattr(sparse_module.SparseAttentionFunction, "apply", counting)
    out = sparse_attention(*leaves, pattern, backend="triton")
    grads = torch.autograd.grad(out, leaves, grad_out)
    assert launches == [2, 1]
    ref_leaves = [t.detach().requires_grad_() for t in leaves]
    ref = reference_attention(*ref_leaves, pattern)
    for got, want in zip([out, *grads], [ref, *torch.autograd.grad(ref, ref_leaves, grad_out)]):
        torch.testing.assert_close(got, want, **TOL[torch.float32])


# ---------------------------------------------------------------- part-wise fast path (causal local + sinks + dilated)

PART_CASES = {
    # name: (pattern config, n, heads, batch, budget); every case must take the fast path
    "local_only": ({"local": 40, "block": 32}, 130, 2, 1, None),
    "local_wider_than_n": ({"local": 500, "block": 16}, 77, 1, 1, None),
    "long_cpu_shape": ({"local": 40, "dilated": [[128, 4]], "global_tokens": 5, "block": 64}, 300, 4, 1, None),
    "head_offsets_several_dilated": ({"local": 30, "dilated": [[64, 4], [128, 8], [32, 2, 1], [96, 1]],
                                      "global_tokens": 3, "block": 16}, 301, 5, 1, None),
    "dilated_only": ({"dilated": [[48, 4]], "block": 16}, 150, 4, 2, None),
    "sinks_beyond_the_window": ({"local": 8, "global_tokens": 70, "dilated": [[64, 2]], "block": 16}, 200, 2, 1, None),
    "segment_longer_than_n": ({"local": 5, "dilated": [[1000, 4]], "block": 64}, 37, 4, 1, None),
    "shorter_than_a_block": ({"local": 3, "dilated": [[8, 2]], "global_tokens": 2, "block": 64}, 10, 2, 2, None),
    "single_position": ({"local": 4, "block": 16}, 1, 1, 1, None),
    "small_chunks": ({"local": 30, "dilated": [[64, 4], [32, 2]], "global_tokens": 3, "block": 16},
                     260, 3, 2, 2_000_000),  # one band row per chunk
    "per_head_list_same_parts": ([{"local": 20, "dilated": [[40, 2, 1]], "block": 32},
                                  {"local": 20, "dilated": [[40, 2, 0]], "block": 32}], 120, 2, 1, None),
}


@pytest.mark.parametrize("name", list(PART_CASES))
def test_part_path_matches_reference(name, one_thread):
    cfg, n, heads, batch, budget = PART_CASES[name]
    pattern = SparsePattern.from_config(cfg)
    budget = budget or gathered_module.DEFAULT_BUDGET
    q = torch.empty(batch, heads, n, 8, dtype=torch.float64)
    assert part_module.applies(pattern, q, True, budget), f"{name} does not take the fast path"
    gather_and_compare(pattern, n, heads, batch, True, budget=budget)


def test_part_path_strided_inputs(one_thread):
    pattern = SparsePattern.from_config({"local": 16, "dilated": [[64, 4]], "global_tokens": 2, "block": 16})
    gather_and_compare(pattern, 150, 4, 2, True, layout="bnhd")


@pytest.mark.parametrize("cfg, causal", [
    ({"local": 16, "dilated": [[64, 4]], "block": 16}, False),  # non-causal
    ({"local": 16, "stride": 8, "block": 16}, True),  # stride part
    ({"local": 16, "dilated": [[50, 4]], "block": 16}, True),  # segment % dilation != 0
    ([{"local": 16, "block": 16}, {"local": 8, "block": 16}], True),  # heads with different parts
])
def test_part_path_routes_the_rest_to_the_gathered_tiles(cfg, causal):
    pattern = SparsePattern.from_config(cfg)
    q = torch.empty(1, 2, 150, 8, dtype=torch.float64)
    assert not part_module.applies(pattern, q, causal, gathered_module.DEFAULT_BUDGET)
    csr = random_layout_pattern(random.Random(0), blocks=4, block=16, heads=1)
    assert not part_module.applies(csr, torch.empty(1, 2, 64, 8), True, gathered_module.DEFAULT_BUDGET)


def test_part_path_memory_is_bounded(monkeypatch, one_thread):
    """n = 65536: no tile's scores exceed the budget, and forward + backward run in about a second."""
    n, budget = 65536, 4 << 20
    pattern = SparsePattern.from_config({"local": 20, "dilated": [[256, 4]], "global_tokens": 1, "block": 16})
    largest = []
    scores = part_module._scores

    def recording(q, k, bad):
        out = scores(q, k, bad)
        largest.append(out.numel() * out.element_size())
        return out

    monkeypatch.setattr(part_module, "_scores", recording)
    q, k, v = (torch.randn(1, 2, n, 4, requires_grad=True) for _ in range(3))
    assert part_module.applies(pattern, q, True, budget)
    out = gathered_attention(q, k, v, pattern, budget=budget)
    torch.autograd.grad(out.sum(), (q, k, v))
    assert max(largest) <= budget and len(largest) > 4
