"""Each seam of ``terrabyte.pretrain.engine.ds_seams`` against the DeepSpeed (and torch) installed: the
private method, attribute or helper it relies on is there with the signature it calls, and where
it is cheap, it does what the seam says on real engines (one subprocess, a world of one on CPU:
ds_seams_worker.py). A DeepSpeed release that changes one of them fails here, by name, before a run
does; setup.py's upper bound on deepspeed is the range these passed on."""
import inspect
import json
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from terrabyte.pretrain.engine import ds_seams

WORKER = Path(__file__).with_name("ds_seams_worker.py")


def calls(function, name: str) -> bool:
    """Does ``function``'s source call ``self.<name>(``?"""
    return re.search(rf"\bself\.{re.escape(name)}\(", inspect.getsource(function)) is not None


def assigns(cls, name: str) -> bool:
    return re.search(rf"\bself\.{re.escape(name)}\s*=", inspect.getsource(cls)) is not None


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    """What the seams returned on real ZeRO-3 and pipeline engines (ds_seams_worker.py)."""
    out = tmp_path_factory.mktemp("seams") / "out.json"
    proc = subprocess.run([sys.executable, str(WORKER), str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_model_step_and_inner_optimizer(engines):
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.runtime.pipe.engine import PipelineEngine

    assert list(inspect.signature(DeepSpeedEngine._take_model_step).parameters) == ["self", "lr_kwargs"]
    assert calls(DeepSpeedEngine.step, "_take_model_step") and calls(PipelineEngine._exec_optimizer_step, "_take_model_step")
    assert assigns(DeepSpeedEngine, "basic_optimizer")
    # wrap_model_step sees each optimizer step once; skippable_step on the inner optimizer holds the weights
    assert engines["model_steps"] == engines["global_steps"] == 2
    assert engines["inner_optimizer_is_torch"] and engines["skipped_unchanged"] and engines["stepped_changed"]


def test_skipped_step_counts_for_the_lr_scheduler():
    param = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([param], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (step + 1))
    ds_seams.skippable_step(optimizer, lambda: True)
    param.grad = torch.ones(3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns when it sees no step, or a step it did not wrap
        optimizer.step()
        scheduler.step()
    assert torch.equal(param.detach(), torch.ones(3)) and optimizer.param_groups[0]["lr"] == pytest.approx(0.05)


def test_tensor_parallel_groups():
    from deepspeed.utils import groups

    params = inspect.signature(groups._init_tp_mesh_device).parameters
    assert "tensor_model_parallel_size" in params
    # used as deepspeed.initialize's mpu: the model-parallel unit's queries
    for name in ("get_tensor_model_parallel_world_size", "get_tensor_model_parallel_rank", "get_data_parallel_group"):
        assert callable(getattr(groups, name, None)), name


def test_partition():
    from deepspeed.runtime import utils as ds_utils

    assert "num_parts" in inspect.signature(ds_utils.partition_balanced).parameters
    assert ds_seams.partition("uniform", [1.0] * 4, 2) == [0, 2, 4]
    assert ds_seams.partition("parameters", [3.0, 1.0, 1.0, 1.0], 2) == [0, 1, 4]
    with pytest.raises(ValueError, match="flops"):
        ds_seams.partition("flops", [1.0], 1)


def test_explicit_pipeline_module(engines):
    from deepspeed.pipe import PipelineModule
    from deepspeed.runtime.pipe.engine import PipelineEngine
    from deepspeed.runtime.pipe.topology import PipelineParallelGrid

    assert list(inspect.signature(PipelineModule._partition_layers).parameters) == ["self", "method"]
    assert list(inspect.signature(PipelineModule._set_bounds).parameters) == ["self", "start", "stop"]
    assert calls(PipelineModule.__init__, "_partition_layers")
    assert assigns(PipelineModule, "_topo") and assigns(PipelineModule, "global_rank")
    assert assigns(PipelineModule, "loss_fn") and assigns(PipelineParallelGrid, "data_parallel_id")
    assert assigns(PipelineEngine, "grid")
    # given boundaries [0, 2] of 3 layers: DeepSpeed's own partitioners would keep all 3 on one stage
    assert engines["pipeline_parts"] == [0, 2] and engines["pipeline_local_layers"] == 2
    assert engines["pipeline_dp_rank"] == 0 and engines["pipeline_loss_fn"] == "Loss"


def test_pipeline_total_loss(engines):
    from deepspeed.runtime.pipe.engine import PipelineEngine

    assert assigns(PipelineEngine, "total_loss")
    # at the model step, the sum of the step's micro-batch losses
    assert engines["pipeline_total_at_step"] == [pytest.approx(engines["pipeline_expected_total"], rel=1e-5)]


def test_zero3_parameter_attributes_and_gathered_state(engines):
    from deepspeed.runtime.engine import DeepSpeedEngine

    assert not [p for p in inspect.signature(DeepSpeedEngine._consolidated_16bit_state_dict).parameters.values()
                if p.name != "self" and p.default is inspect.Parameter.empty]
    zero3 = engines["zero3"]
    assert zero3["partitioned"] and not zero3["plain_partitioned"]
    assert zero3["full_shape"] == [16, 8] and zero3["full_numel"] == 128 and zero3["local_numel"] == 0
    assert zero3["held_numel"] == 128  # a small parameter ZeRO-3 keeps whole on every rank
    assert engines["gathered"] == {"keys": True, "equal": True}


def test_universal_conversion_entry():
    from deepspeed.checkpoint import ds_to_universal

    assert list(inspect.signature(ds_to_universal.main).parameters) == ["args"]
    argv, sys.argv = sys.argv, [ds_seams.UNIVERSAL_SCRIPT, *ds_seams.universal_args("in", "out")]
    try:
        args = ds_to_universal.parse_arguments()
    finally:
        sys.argv = argv
    assert (args.input_folder, args.output_folder, args.num_extract_workers, args.num_merge_workers) == ("in", "out", 1, 1)
    assert args.strict and not args.keep_temp_folder and not args.inject_missing_state


def test_universal_metadata():
    from deepspeed.checkpoint.constants import UNIVERSAL_CHECKPOINT_INFO, UNIVERSAL_CHECKPOINT_VERSION_KEY

    model = torch.nn.Linear(2, 2)
    ds_seams.mark_universal_convertible(model)
    assert UNIVERSAL_CHECKPOINT_VERSION_KEY in getattr(model, UNIVERSAL_CHECKPOINT_INFO)
    setattr(model, UNIVERSAL_CHECKPOINT_INFO, {"autotp": True})
    ds_seams.mark_universal_convertible(model)  # metadata already there (AutoTP's) is kept
    assert getattr(model, UNIVERSAL_CHECKPOINT_INFO) == {"autotp": True}


def test_checkpoint_safe_globals_run_no_code_when_unpickled():
    for cls in ds_seams.checkpoint_safe_globals():
        assert isinstance(cls, type)
        for base in cls.__mro__:
            if base.__module__.startswith("deepspeed"):
                hooks = {"__setstate__", "__reduce__", "__reduce_ex__", "__getstate__"} & set(vars(base))
                assert not hooks, f"{base.__qualname__} defines {hooks}"
