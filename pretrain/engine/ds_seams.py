"""Every place Terrabyte reaches into DeepSpeed (and torch) below their documented API, one small
function each.

What DeepSpeed documents (``initialize``, ``init_distributed``, ``comm``, ``zero.Init``,
``zero.GatheredParameters``, ``pipe.LayerSpec``/``PipelineModule``, ``sequence.layer.
DistributedAttention``, ``zero_to_fp32``, ``ds_to_universal`` run as a script, the engine's public
methods) is called where it is needed. What it does not (private methods and attributes, helpers of
its runtime, a script's ``main`` called in process) is reached only through this module; each
function here has a test in tests/unit/test_ds_seams.py that fails when the internal it relies on
changes, and setup.py bounds deepspeed to the versions those tests passed on. DeepSpeed is imported
inside the functions: importing this module costs nothing.
"""
from __future__ import annotations

import contextlib
import functools
import sys
from typing import Any, Callable

import torch

# ``python -m`` name of DeepSpeed's universal-checkpoint converter (a documented script)
UNIVERSAL_SCRIPT = "deepspeed.checkpoint.ds_to_universal"


# --------------------------------------------------------------------------- the optimizer step


def inner_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer the engine built from its config (``basic_optimizer``), beneath ZeRO's
    wrapper: its ``param_groups`` and ``state`` are the real ones."""
    return engine.basic_optimizer


def wrap_model_step(engine, around: Callable[[Callable[[], Any]], Any]) -> None:
    """Call ``around(step)`` in place of each of the engine's optimizer steps; ``step()`` runs
    DeepSpeed's own. The plain and pipeline engines both call ``_take_model_step`` exactly once per
    optimizer step, after the gradients of the last micro-batch and before they are zeroed."""
    take = engine._take_model_step
    engine._take_model_step = lambda *args, **kwargs: around(lambda: take(*args, **kwargs))


def skippable_step(optimizer: torch.optim.Optimizer, skip: Callable[[], bool]) -> None:
    """Make ``optimizer.step`` do nothing while ``skip()``. torch's LR scheduler wraps ``step`` to
    record that it ran (``_opt_called``) and marks the wrapper (``_wrapped_by_lr_sched``); a
    skipped step records it too and the replacement keeps the mark, so the schedule advances
    without torch warning that the optimizer was not stepped or was replaced."""
    inner = optimizer.step

    def step(*args, **kwargs):
        if skip():
            optimizer._opt_called = True
            return None
        return inner(*args, **kwargs)

    if hasattr(inner, "_wrapped_by_lr_sched"):
        step._wrapped_by_lr_sched = True
    optimizer.step = step


# --------------------------------------------------------------------------- tensor parallelism


def init_tensor_parallel_groups(size: int):
    """AutoTP's (data, tensor) process groups, made before ``deepspeed.initialize`` checks the
    batch against the data-parallel size; returns DeepSpeed's ``groups`` module, which then serves
    as the model-parallel unit (``mpu``)."""
    from deepspeed.utils import groups

    groups._init_tp_mesh_device(tensor_model_parallel_size=size)
    return groups


# --------------------------------------------------------------------------- pipeline


def partition(method: str, weights: list[float], stages: int) -> list[int]:
    """Stage boundaries by DeepSpeed's own partitioners: ``uniform`` (layer counts) or ``parameters``
    (balances ``weights``); ``len(result) == stages + 1``."""
    from deepspeed.runtime import utils as ds_utils

    if method == "parameters":
        parts = ds_utils.partition_balanced(weights=weights, num_parts=stages)
    elif method == "uniform":
        parts = ds_utils.partition_uniform(num_items=len(weights), num_parts=stages)
    else:
        raise ValueError(f"DeepSpeed has no partitioner {method!r}")
    return [int(b) for b in parts]


@functools.cache
def _explicit_pipeline_class():
    from deepspeed.pipe import PipelineModule

    class ExplicitPipelineModule(PipelineModule):
        def __init__(self, *args, parts: list[int], **kwargs):
            self._given_parts = list(parts)
            super().__init__(*args, **kwargs)

        def _partition_layers(self, method="uniform"):
            stage_id = self._topo.get_coord(self.global_rank).pipe
            self.parts = list(self._given_parts)
            self._set_bounds(start=self.parts[stage_id], stop=self.parts[stage_id + 1])

    return ExplicitPipelineModule


def explicit_pipeline_module(parts: list[int], **kwargs) -> torch.nn.Module:
    """``deepspeed.pipe.PipelineModule(**kwargs)`` with the stage boundaries ``parts`` as given: its
    own ``partition_method`` knows only ``uniform``, ``parameters`` and ``type:<regex>``, all blind
    to FLOPs. ``PipelineModule.__init__`` calls ``_partition_layers``; ours takes ``parts`` and sets
    this stage's bounds as DeepSpeed's does."""
    return _explicit_pipeline_class()(parts=parts, **kwargs)


def pipeline_data_parallel_rank(engine) -> int:
    """A pipeline engine's data-parallel rank, from its topology grid."""
    return engine.grid.data_parallel_id


def pipeline_total_loss(engine) -> torch.Tensor | None:
    """The sum of this step's micro-batch losses on a pipeline's last stage (None elsewhere, or
    before the first micro-batch), as it stands just before the optimizer step."""
    return getattr(engine, "total_loss", None)


def pipeline_loss_fn(engine) -> torch.nn.Module:
    """The ``loss_fn`` a pipeline engine's ``PipelineModule`` was built with."""
    return engine.module.loss_fn


# --------------------------------------------------------------------------- ZeRO-3 parameters


def full_shape(tensor: torch.Tensor) -> torch.Size:
    """A tensor's shape, also for a ZeRO-3 partitioned parameter (whose local data is a shard)."""
    return getattr(tensor, "ds_shape", tensor.shape)


def full_numel(tensor: torch.Tensor) -> int:
    """A tensor's element count, also for a ZeRO-3 partitioned parameter."""
    return getattr(tensor, "ds_numel", tensor.numel())


def is_partitioned(tensor: torch.Tensor) -> bool:
    """Is this a parameter ZeRO-3 manages (built under ``zero.Init`` or wrapped by a ZeRO-3 engine)?"""
    return hasattr(tensor, "ds_id")


def held_numel(param: torch.Tensor) -> int:
    """Elements of ``param`` this rank holds: its shard under ZeRO-3, unless it is one of the small
    parameters ZeRO-3 keeps whole on every rank (``stage3_param_persistence_threshold``)."""
    if not hasattr(param, "ds_tensor"):
        return param.numel()
    return param.ds_numel if param.ds_persist else param.ds_tensor.numel()


def gathered_16bit_state_dict(engine) -> dict[str, torch.Tensor] | None:
    """The whole model's state dict on rank 0 (None elsewhere), its ZeRO-3 and AutoTP shards
    gathered, in the training dtype; every rank must call it. ``save_16bit_model`` does the same
    but only into a file."""
    return engine._consolidated_16bit_state_dict()


# --------------------------------------------------------------------------- checkpoint files


def mark_universal_convertible(model: torch.nn.Module) -> None:
    """Give ``model`` the metadata ``ds_to_universal`` looks for, unless it has some already (AutoTP
    sets its own)."""
    from deepspeed.checkpoint.constants import (UNIVERSAL_CHECKPOINT_INFO, UNIVERSAL_CHECKPOINT_VERSION_KEY,
                                                UNIVERSAL_CHECKPOINT_VERSION_VALUE)

    if not hasattr(model, UNIVERSAL_CHECKPOINT_INFO):
        setattr(model, UNIVERSAL_CHECKPOINT_INFO, {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE})


def universal_args(ckpt: str, out: str) -> list[str]:
    """The command line of ``python -m deepspeed.checkpoint.ds_to_universal`` converting ``ckpt``
    into ``out`` with one worker (no pool of processes)."""
    return ["--input_folder", ckpt, "--output_folder", out, "--num_extract_workers", "1", "--num_merge_workers", "1"]


def run_universal_here(args: list[str]) -> None:
    """``ds_to_universal`` with the command line ``args``, in this process: its own argument parser
    (so options it adds later keep their defaults), then its ``main``. It logs to stdout. Not
    thread-safe: it swaps ``sys.argv`` for the parse."""
    with contextlib.redirect_stdout(sys.stderr):
        from deepspeed.checkpoint import ds_to_universal

        argv, sys.argv = sys.argv, [UNIVERSAL_SCRIPT, *args]
        try:
            parsed = ds_to_universal.parse_arguments()
        finally:
            sys.argv = argv
        ds_to_universal.main(parsed)


def checkpoint_safe_globals() -> list[type]:
    """The plain-data DeepSpeed classes a checkpoint pickles besides tensors (an enum, the loss
    scaler's settings, ZeRO-1/2's (numel, start) slice records); none defines ``__setstate__`` or
    ``__reduce__``, so the weights-only unpickler rebuilds them without running their code."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]
