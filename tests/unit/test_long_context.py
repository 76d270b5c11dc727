"""Chunked execution below the global stage (issue #12): the loss and every gradient equal the
unchunked computation; no lower-stage tensor, logits or saved activation spans more than a chunk;
chunk sizes are checked; upper-stage embeddings do not grow with the unit."""
import pytest
import torch

from terrabyte.data_pipeline.basics.errors import ConfigError
from terrabyte.pretrain.model.stage import chunk_plan, cross_entropy
from terrabyte.pretrain.model.terrabyte import MAX_KERNEL_BATCH, TerraByte

SPARSE = {"kind": "sparse", "pattern": {"local": 32, "dilated": [[64, 2]], "global_tokens": 2, "block": 16}}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def build(seq, chunk_bytes=None, sparse=False, **kw):
    torch.manual_seed(0)
    attention = [SPARSE] + [None] * (len(seq) - 1) if sparse else None
    model = TerraByte(num_tokens=256, dim=tuple(24 for _ in seq), depth=1, max_seq_len=seq, dim_head=8, heads=2,
                      attention=attention, chunk_bytes=chunk_bytes, **kw)
    return model.double()


def loss_and_grads(model, x):
    model.zero_grad()
    loss = model(x, return_loss=True)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("seq, chunk, n, rows, sparse", [
    ((8, 4), 4, 30, 2, False),           # 2 stages, one patch per chunk, a PAD tail
    ((8, 4, 4), 16, 100, 2, False),      # 3 stages, chunks that divide the row
    ((8, 4, 4), 48, 128, 3, False),      # chunks that do not divide the row
    ((4, 2, 2, 2), 8, 29, 2, False),     # 4 stages
    ((64, 4, 2), 24, 512, 2, True),      # a sparse global stage, chunks across a row's end
    ((64, 4, 2), 8, 300, 3, True),
])
def test_chunked_loss_and_gradients_equal_the_unchunked(seq, chunk, n, rows, sparse):
    whole, chunked = build(seq, sparse=sparse, chunk_bytes=None), build(seq, chunk_bytes=chunk, sparse=sparse)
    whole.chunk_bytes = whole.context_length * rows  # one chunk for the whole batch
    assert chunked.chunk_bytes == chunk
    x = torch.randint(0, 256, (rows, n))
    x[0, -3:] = whole.pad_id
    ref_loss, ref_grads = loss_and_grads(whole, x)
    loss, grads = loss_and_grads(chunked, x)
    # the loss accumulates in fp32 (cross_entropy), summed chunk by chunk
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-6)
    for name, g in grads.items():
        assert torch.allclose(g, ref_grads[name], rtol=1e-9, atol=1e-12), name


def test_every_reduction_is_the_logits_cross_entropy():
    model = build((8, 4, 4), chunk_bytes=16)
    x = torch.randint(0, 256, (2, 120))
    x[1, 100:] = model.pad_id
    with torch.no_grad():
        logits = model(x)
        per_byte = cross_entropy(logits, x, model.pad_id, reduction="none").view(x.shape)
        assert logits.shape == (2, 120, model.vocab_size)
        assert torch.allclose(model(x, return_loss="none"), per_byte, atol=1e-6)
        assert model(x, return_loss="sum").item() == pytest.approx(per_byte.sum().item(), rel=1e-6)
        assert model(x, return_loss=True).item() == pytest.approx(
            cross_entropy(logits, x, model.pad_id).item(), rel=1e-6)
    with pytest.raises(ConfigError, match="return_loss='max'"):
        model(x, return_loss="max")


def test_lower_stages_logits_and_saved_activations_stay_within_a_chunk():
    chunk, n = 32, 1024
    model = build((64, 4, 4), chunk_bytes=chunk).float()
    seen = {"rows": 0, "logit_rows": 0}

    def lower_hook(module, args, out):  # the byte stage's blocks: (sequences, positions, dim)
        seen["rows"] = max(seen["rows"], out.shape[0] * out.shape[1])

    def logits_hook(module, args, out):
        seen["logit_rows"] = max(seen["logit_rows"], out.numel() // out.shape[-1])

    model.stages[-1].layers["0"].register_forward_hook(lower_hook)
    model.to_logits.register_forward_hook(logits_hook)
    x = torch.randint(0, 256, (1, n))

    def saved_bytes(m):
        total = [0]

        def pack(t):
            total[0] += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            m(x, return_loss=True).backward()
        return total[0]

    chunked = saved_bytes(model)
    assert seen["rows"] == chunk and seen["logit_rows"] == chunk
    model.chunk_bytes = n
    whole = saved_bytes(model)
    # what backward keeps: the global stage plus the last chunk, not every byte's lower activations
    assert chunked < whole / 4, (chunked, whole)


def test_chunk_bytes_are_checked():
    with pytest.raises(ConfigError, match=r"model.chunk_bytes=10 must be a positive multiple of the global patch \(16 bytes\)"):
        build((8, 4, 4), chunk_bytes=10)
    with pytest.raises(ConfigError, match="model.chunk_bytes=0"):
        build((8, 4, 4), chunk_bytes=0)
    assert build((8, 4, 4), chunk_bytes=16 * 100).chunk_bytes == 128  # at most the context
    auto = build((8, 4, 4))
    assert auto.chunk_bytes % 16 == 0 and 16 <= auto.chunk_bytes <= auto.context_length


def test_automatic_chunks_keep_kernel_batches_below_the_grid_limit():
    with torch.device("meta"):
        model = TerraByte(num_tokens=256, dim=(64, 32, 16), depth=1, max_seq_len=(65536, 64, 8), dim_head=8,
                          heads=(2, 4, 2))
    for s in range(1, 3):
        sequences = model.chunk_bytes // model.unit_sizes[s - 1]
        assert sequences * model.stages[s].heads <= MAX_KERNEL_BATCH
    assert model.chunk_bytes % model.unit_sizes[0] == 0


def test_chunk_plan_covers_every_patch_once_in_row_major_order():
    for rows, patches, per in [(3, 10, 4), (5, 3, 7), (1, 8, 8), (4, 2, 1)]:
        cells = [(r, q) for r0, r1, q0, q1 in chunk_plan(rows, patches, per)
                 for r in range(r0, r1) for q in range(q0, q1)]
        assert cells == [(r, q) for r in range(rows) for q in range(patches)]
        assert all((r1 - r0) * (q1 - q0) <= max(per, patches) for r0, r1, q0, q1 in chunk_plan(rows, patches, per))


def test_grouped_unit_embedding_does_not_grow_with_unit_times_dim():
    with torch.device("meta"):
        grouped = TerraByte(num_tokens=256, dim=(512, 256, 128), depth=1, max_seq_len=(64, 64, 64))
        concat = TerraByte(num_tokens=256, dim=(512, 256, 128), depth=1, max_seq_len=(64, 64, 64),
                           unit_embedding="concat")
    top = sum(p.numel() for p in grouped.stages[0].embed.parameters())
    assert sum(p.numel() for p in concat.stages[0].embed.parameters()) > 4096 * 128 * 512  # unit x byte_dim x dim
    assert top < 64 * 128 * 512 + 64 * 128 * 128 + 259 * 128 + 1  # groups of 64, never the 4096-byte unit
    # the stage just above the bytes keeps MEGABYTE's embedding: two-stage models are unchanged
    assert grouped.stages[1].embed.levels is None
    assert grouped.stages[1].embed.proj.weight.shape == concat.stages[1].embed.proj.weight.shape == (256, 64 * 128)
    with pytest.raises(ConfigError, match="unit_embedding='sum'"):
        build((8, 4), unit_embedding="sum")
