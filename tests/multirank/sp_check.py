"""Run on every rank of a sequence-parallel group (``torchrun --nproc_per_node N sp_check.py``).

Each rank builds the same model and batch, keeps an untouched copy as the reference, and compares
``SequenceParallel`` (Ulysses for the global stage, patches split over the ranks) with it: the loss
shares average to the plain loss, the averaged gradients equal the plain gradients, the gathered
logits equal the plain logits, and this rank's activations cover only its share of the patches.
Prints ``SP_CHECK_OK`` and the largest differences; exits non-zero on a mismatch.
"""
import copy
import sys

import torch
import torch.distributed as dist

from terrabyte.pretrain import engine as eng
from terrabyte.pretrain.model import TerraByte
from terrabyte.pretrain.parallel import Layout, SequenceParallel, sequence_parallel_group

ATOL = 2e-5  # fp32; the sharded run sums the same terms in another order


def check(name: str, got: torch.Tensor, want: torch.Tensor, errors: dict) -> None:
    err = (got - want).abs().max().item()
    errors[name] = err
    if not err <= ATOL:
        raise AssertionError(f"{name}: max difference {err} > {ATOL}")


def run(rank: int, world: int, group, checkpoint: bool) -> dict:
    torch.manual_seed(0)
    model = TerraByte(num_tokens=256, dim=(64, 32), depth=(2, 1), max_seq_len=(16, 4), dim_head=8, heads=4,
                      checkpoint_activations=checkpoint)
    ref = copy.deepcopy(model)
    x = torch.randint(0, 258, (2, model.context_length))
    x[1, -7:] = model.pad_id
    sp = SequenceParallel(model, group, rank, world)
    errors: dict = {}

    ref_loss = ref(x, return_loss=True)
    ref_loss.backward()

    shapes = {}
    hooks = [model.stages[s].layers["0"].register_forward_hook(
        lambda _m, _i, out, s=s: shapes.__setitem__(s, tuple(out.shape))) for s in (0, 1)]
    loss = sp(x, return_loss=True)
    for h in hooks:
        h.remove()
    loss.backward()
    # activations shrink with the group: this rank's patches only, in the global and the local stage
    patches = model.max_seq_len[0]
    assert shapes[0] == (2, patches // world, 64), shapes
    assert shapes[1] == (2 * patches // world, 4, 32), shapes

    mean = loss.detach().clone()
    dist.all_reduce(mean, group=group)
    check("loss", mean / world, ref_loss.detach(), errors)
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        grad = p.grad.clone()
        dist.all_reduce(grad, group=group)
        check(f"grad {name}", grad / world, q.grad, errors)
    with torch.no_grad():
        check("logits", sp(x), ref(x), errors)
    return errors


def main() -> int:
    rank, world = eng.init_distributed()
    group = sequence_parallel_group(Layout(world, rank, 1, 1, world, 1, 0, 1))
    for checkpoint in (False, True):
        errors = run(rank, world, group, checkpoint)
        worst = max(errors, key=errors.get)
        sys.stdout.write(f"SP_CHECK_OK rank {rank} checkpoint={checkpoint} compared {len(errors)} "
                         f"worst {worst} {errors[worst]:.2e}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
