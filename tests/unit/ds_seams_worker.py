"""``python tests/unit/ds_seams_worker.py OUT.json``: real DeepSpeed engines in a world of one (gloo,
CPU), each seam of ``terrabyte.pretrain.engine.ds_seams`` used on them and what it returned written to
OUT.json for test_ds_seams.py. A process of its own: the test process never joins a process group."""
import json
import sys

import torch
from torch import nn


def config(stage: int) -> dict:
    return {"train_batch_size": 2, "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 2,
            "zero_optimization": {"stage": stage}, "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
            "steps_per_print": 10**9}


class Loss(nn.Module):
    def forward(self, out, target):
        return ((out - target) ** 2).mean()


def main(out_path: str) -> None:
    import deepspeed
    from deepspeed.pipe import LayerSpec

    from terrabyte.pretrain.engine import ds_seams
    from terrabyte.pretrain.engine.engine import init_distributed

    init_distributed()
    torch.manual_seed(0)
    out = {}

    # ZeRO-3: the partitioned parameters' attributes, the gathered state dict, the model step
    model = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 8))
    want = {k: v.detach().clone() for k, v in model.state_dict().items()}
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config(3))
    weight = engine.module[0].weight
    out["zero3"] = {"partitioned": ds_seams.is_partitioned(weight), "plain_partitioned": ds_seams.is_partitioned(torch.ones(2)),
                    "full_shape": list(ds_seams.full_shape(weight)), "local_numel": weight.numel(),
                    "full_numel": ds_seams.full_numel(weight), "held_numel": ds_seams.held_numel(weight)}
    state = ds_seams.gathered_16bit_state_dict(engine)
    out["gathered"] = {"keys": sorted(state) == sorted(want),
                       "equal": all(torch.equal(state[k].float(), want[k]) for k in want)}
    # the inner optimizer is the one DeepSpeed steps: while skipped, no weight moves
    optimizer = ds_seams.inner_optimizer(engine)
    out["inner_optimizer_is_torch"] = isinstance(optimizer, torch.optim.Optimizer)
    skip, calls = [True], []
    ds_seams.skippable_step(optimizer, lambda: skip[0])
    ds_seams.wrap_model_step(engine, lambda step: (calls.append(len(calls)), step())[1])
    x = torch.randn(1, 8)

    def optimizer_step():  # two micro-batches
        for _ in range(2):
            engine.backward(((engine(x) - x) ** 2).mean())
            engine.step()

    optimizer_step()
    out["skipped_unchanged"] = all(torch.equal(v.float(), want[k]) for k, v in ds_seams.gathered_16bit_state_dict(engine).items())
    skip[0] = False
    optimizer_step()
    out["stepped_changed"] = any(not torch.equal(v.float(), want[k]) for k, v in ds_seams.gathered_16bit_state_dict(engine).items())
    out["model_steps"] = len(calls)
    out["global_steps"] = engine.global_steps

    # a pipeline of one stage whose given boundaries keep 2 of its 3 layers (DeepSpeed's partitioners
    # would keep all 3), then its engine's loss, grid and model step
    specs = [LayerSpec(nn.Linear, 8, 8) for _ in range(3)]
    module = ds_seams.explicit_pipeline_module([0, 2], layers=specs, num_stages=1, loss_fn=Loss(),
                                               partition_method="uniform")
    out["pipeline_parts"] = list(module.parts)
    out["pipeline_local_layers"] = len(module.forward_funcs)
    pipe, _, _, _ = deepspeed.initialize(model=module, model_parameters=module.parameters(), config=config(0))
    seen = []

    def before_step(step):
        total = ds_seams.pipeline_total_loss(pipe)
        seen.append(None if total is None else float(total))
        return step()

    ds_seams.wrap_model_step(pipe, before_step)
    batches = [(torch.randn(1, 8), torch.randn(1, 8)) for _ in range(2)]
    with torch.no_grad():
        expect = sum(float(((module(x) - y) ** 2).mean()) for x, y in batches)
    pipe.train_batch(iter(batches))
    out["pipeline_total_at_step"] = seen
    out["pipeline_expected_total"] = expect
    out["pipeline_dp_rank"] = ds_seams.pipeline_data_parallel_rank(pipe)
    out["pipeline_loss_fn"] = type(ds_seams.pipeline_loss_fn(pipe)).__name__
    with open(out_path, "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main(sys.argv[1])
