"""Run on every rank of a sequence-parallel group (``torchrun --nproc_per_node N sp_check.py``).

Each rank builds the same model and batch, keeps an untouched copy as the reference, and compares
``SequenceParallel`` (Ulysses for the global stage, patches split over the ranks, lower stages in
chunks of the rank's own patches) with it: the loss shares average to the plain loss, the averaged
gradients equal the plain gradients, the scored sum (one all-reduced scalar, no logits) equals the
plain sum, and this rank's activations cover only its share of the patches. Models: dense
attention (with and without activation checkpointing), a global stage with a sparse pattern given
per head whose LongNet offsets differ per head (rank r's heads must keep their global index), and a
3-stage model with a dilated global pattern, and patches that follow the data (``space``, and
``entropy`` with its auxiliary loss: the batch's data-dependent patch count split over the ranks).
Prints ``SP_CHECK_OK`` and the largest differences;
exits non-zero on a mismatch.
"""
import copy
import math
import sys

import torch
import torch.distributed as dist

from terrabyte.data_pipeline.basics.errors import ConfigError
from terrabyte.pretrain.engine import engine as eng
from terrabyte.pretrain.model.terrabyte import TerraByte
from terrabyte.pretrain.parallel.layout import Layout
from terrabyte.pretrain.parallel.sequence import SequenceParallel, sequence_parallel_group

ATOL = 2e-5  # fp32; the sharded run sums the same terms in another order


def check(name: str, got: torch.Tensor, want: torch.Tensor, errors: dict) -> None:
    err = (got - want).abs().max().item()
    errors[name] = err
    if not err <= ATOL:
        raise AssertionError(f"{name}: max difference {err} > {ATOL}")


# Offsets follow the global head (head % dilation): with 4 heads on 2 ranks, heads 2 and 3 must not
# attend as heads 0 and 1 do. Per head: LongNet dilation 4, a window, a stride, dilation 2 (offset 1).
PER_HEAD = [{"local": 2, "dilated": [[16, 4]], "block": 16}, {"local": 5, "block": 16},
            {"local": 1, "stride": 3, "dilated": [[16, 4]], "block": 16}, {"local": 2, "dilated": [[8, 2]], "block": 16}]
LONGNET = {"local": 2, "dilated": [[8, 4], [16, 8]], "block": 16}
MODELS = {
    "dense": dict(dim=(64, 32), depth=(2, 1), max_seq_len=(16, 4)),
    "per-head sparse": dict(dim=(64, 32), depth=(2, 1), max_seq_len=(16, 4),
                            attention=[{"kind": "sparse", "pattern": PER_HEAD}, None]),
    "3-stage dilated": dict(dim=(64, 32, 16), depth=(2, 1, 1), max_seq_len=(16, 2, 2),
                            attention=[{"kind": "sparse", "pattern": LONGNET}, None, None]),
    "space patches": dict(dim=(64, 32), depth=(2, 1), max_seq_len=(16, 4), patching="space", context_bytes=40),
    "entropy patches": dict(dim=(64, 32), depth=(2, 1), max_seq_len=(16, 4), patching="entropy", context_bytes=40,
                            patch_threshold=0.0),
}


def run(rank: int, world: int, group, name: str, checkpoint: bool) -> dict:
    torch.manual_seed(0)
    shape = MODELS[name]
    patch = math.prod(shape["max_seq_len"][1:])
    # chunks of 2 patches: every rank runs its lower stages in several recomputed chunks
    model = TerraByte(num_tokens=256, dim_head=8, heads=4, checkpoint_activations=checkpoint, chunk_bytes=2 * patch,
                      **shape)
    ref = copy.deepcopy(model)
    x = torch.randint(0, 258, (2, model.context_length))
    x[1, -7:] = model.pad_id
    sp = SequenceParallel(model, group, rank, world)
    errors: dict = {}

    ref_loss = ref(x, return_loss=True)
    ref_loss.backward()

    layout = model.patches(x, multiple=world)
    if model.patcher.dynamic:  # patches of several lengths, at most the most a row may have
        every = torch.arange(x.shape[1]) % patch == 0
        assert layout.patches <= model.max_seq_len[0] and not torch.equal(model.patcher.starts(x)[0], every)
    shapes = {}
    hooks = [model.stages[s].layers["0"].register_forward_hook(
        lambda _m, _i, out, s=s: shapes.__setitem__(s, tuple(out.shape))) for s in (0, 1)]
    loss = sp(x, return_loss=True)
    for h in hooks:
        h.remove()
    loss.backward()
    # activations shrink with the group: this rank's patches only, in the global and the local stage
    patches = layout.patches
    assert shapes[0] == (2, patches // world, 64), shapes
    # the last chunk: 2 patches of one row (1 where a rank's patches are odd in number)
    assert shapes[1] == ((patches // world - 1) % 2 + 1, model.max_seq_len[1], 32), shapes

    mean = loss.detach().clone()
    dist.all_reduce(mean, group=group)
    check("loss", mean / world, ref_loss.detach(), errors)
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        grad = p.grad.clone()
        dist.all_reduce(grad, group=group)
        check(f"grad {name}", grad / world, q.grad, errors)
    with torch.no_grad():
        scored = (x != model.pad_id).sum()  # per byte: the sum of ~500 nats is exact to fp32 rounding only
        check("scored sum", sp(x, return_loss="sum") / scored, ref(x, return_loss="sum") / scored, errors)
    try:
        sp(x)
    except ConfigError as exc:
        assert "no rank holds the whole sequence's logits" in str(exc), exc
    else:
        raise AssertionError("sequence parallelism returned logits")
    return errors


def main() -> int:
    rank, world = eng.init_distributed()
    group = sequence_parallel_group(Layout(world, rank, 1, 1, world, 1, 0, 1))
    for name, checkpoint in (("dense", False), ("dense", True), ("per-head sparse", False), ("3-stage dilated", False),
                             ("space patches", False), ("entropy patches", False)):
        errors = run(rank, world, group, name, checkpoint)
        worst = max(errors, key=errors.get)
        sys.stdout.write(f"SP_CHECK_OK rank {rank} {name} checkpoint={checkpoint} compared {len(errors)} "
                         f"worst {worst} {errors[worst]:.2e}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
