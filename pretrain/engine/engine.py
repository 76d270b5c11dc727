"""The DeepSpeed engine around a plain ``TerraByte``.

It turns the config tree into a DeepSpeed config (ZeRO-3 by default; pipeline, AutoTP or Ulysses
when asked), starts the process group (gloo on CPU, nccl on GPU), wraps the model, runs one
optimizer step or one scoring pass in whatever form the model took, guards against non-finite
losses and offers the few collectives the trainer needs. The ``parallel`` package holds the
model-side parallel forms (it imports DeepSpeed's pipeline and Ulysses modules too); the
``checkpoint`` package saves, resumes and consolidates.
"""
from __future__ import annotations

import atexit
import contextlib
import logging
import math
import os
import weakref
from dataclasses import dataclass
from typing import Any

import torch

from terrabyte.data_pipeline.basics.errors import TerrabyteError
from terrabyte.data_pipeline.basics.system import free_port

from . import ds_seams
from ..train.config import Config
from ..model.terrabyte import TerraByte
from ..parallel.layout import Layout
from ..parallel.pipeline import pipeline_module
from ..parallel.sequence import SequenceParallel, sequence_parallel_group
from ..parallel.tensor import autotp_config, shard_attention_heads

log = logging.getLogger(__name__)

# Environment variables that mean a launcher already set up the ranks.
_LAUNCHER_ENV = ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "MV2_COMM_WORLD_RANK")


def init_distributed() -> tuple[int, int]:
    """Start the process group; returns (rank, world size).

    Under deepspeed/torchrun the env vars are set; under mpirun DeepSpeed reads ranks from mpi4py;
    a bare ``python -m terrabyte.pretrain`` becomes a world of one on a free local port.
    """
    import deepspeed
    import deepspeed.comm as dist

    if not any(name in os.environ for name in _LAUNCHER_ENV):
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        # Under mpirun DeepSpeed's MPI discovery sets MASTER_PORT to distributed_port (29500 unless
        # given): honour a MASTER_PORT the launcher chose, so two jobs on one node do not collide.
        port = int(os.environ.get("MASTER_PORT", 29500))
        deepspeed.init_distributed(dist_backend=backend, verbose=False, distributed_port=port)
        atexit.register(_quiesce_process_groups)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return dist.get_rank(), dist.get_world_size()


# How long the main thread lets go of the GIL at exit (see _quiesce_process_groups).
EXIT_GRACE_S = 0.2


def _quiesce_process_groups() -> None:
    """At exit, before the interpreter shuts down.

    After a collective returns, gloo's worker thread still releases the finished work objects, and
    with them tensors owned by Python, which needs the GIL. If that happens while the interpreter is
    finalizing, the thread is killed mid-destructor and the process aborts ("terminate called without
    an active exception", seen about one run in four on 2 CPU ranks). Sleeping releases the GIL so a
    waiting worker finishes first; then the groups are torn down.
    """
    import time

    import torch.distributed as tdist

    if tdist.is_initialized():
        time.sleep(EXIT_GRACE_S)
        tdist.destroy_process_group()


def use_bf16(cfg: Config) -> bool:
    if cfg.train.precision == "auto":
        return torch.cuda.is_available()
    return cfg.train.precision == "bf16"


# --------------------------------------------------------------------------- DeepSpeed config


def zero_config(cfg: Config) -> dict:
    p = cfg.parallel
    zero: dict[str, Any] = {"stage": p.zero_stage}
    if p.zero_stage == 3:
        zero.update(
            overlap_comm=torch.cuda.is_available(),
            contiguous_gradients=True,
            stage3_gather_16bit_weights_on_model_save=False,
        )
        if p.zero_quantized_weights:
            zero["zero_quantized_weights"] = True
        if p.zero_quantized_gradients:
            zero["zero_quantized_gradients"] = True
        if p.zero_hpz_partition_size > 1:
            zero["zero_hpz_partition_size"] = p.zero_hpz_partition_size
    pin = torch.cuda.is_available()  # pinned host memory needs a GPU driver
    if p.offload == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin}
        if p.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": pin}
    elif p.offload == "nvme":
        zero["offload_optimizer"] = {"device": "nvme", "nvme_path": p.nvme_path, "pin_memory": pin}
        zero["offload_param"] = {"device": "nvme", "nvme_path": p.nvme_path, "pin_memory": pin}
    return zero


def deepspeed_config(cfg: Config, layout: Layout, universal: bool = False) -> dict:
    o = cfg.optim
    # DeepSpeed counts every rank outside a pipeline/AutoTP group as data-parallel, sequence-parallel
    # peers included (we run Ulysses ourselves): its batch is ours times the sequence-parallel degree.
    ds_batch = cfg.train.global_batch * layout.sequence
    config: dict[str, Any] = {
        "train_batch_size": ds_batch,
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch,
        "gradient_accumulation_steps": layout.accumulation,
        "gradient_clipping": cfg.train.grad_clip,
        "zero_optimization": zero_config(cfg),
        "bf16": {"enabled": use_bf16(cfg)},
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": o.lr,
                "betas": [o.beta1, o.beta2],
                "eps": o.eps,
                "weight_decay": o.weight_decay,
                # torch's AdamW (fused on GPU) instead of the JIT-built FusedAdam, which needs a compiler
                # on every node; with offload, DeepSpeed's CPU Adam is the point of offloading.
                "torch_adam": cfg.parallel.offload == "none",
            },
        },
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if layout.tensor > 1:
        config["tensor_parallel"] = autotp_config(layout.tensor)
    if universal:
        config["checkpoint"] = {"load_universal": True}
    return config


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only: norms, biases and start tokens keep their scale."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if len(ds_seams.full_shape(param)) >= 2 else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def lr_lambda(cfg: Config):
    o, total = cfg.optim, cfg.train.steps

    def factor(step: int) -> float:
        if step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        if o.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - o.warmup_steps) / max(1, total - o.warmup_steps))
        if o.schedule == "linear":
            shape = 1.0 - progress
        else:
            shape = 0.5 * (1.0 + math.cos(math.pi * progress))
        return o.min_lr_ratio + (1.0 - o.min_lr_ratio) * shape

    return factor


# --------------------------------------------------------------------------- building


def builds_partitioned(cfg: Config, layout: Layout) -> bool:
    """ZeRO-3 over several ranks, without pipeline or AutoTP (both split whole modules first): the
    model is built partitioned, no rank ever holding all of it."""
    return cfg.parallel.zero_stage == 3 and layout.world > 1 and layout.pipeline == 1 and layout.tensor == 1


def build_model(cfg: Config, layout: Layout) -> TerraByte:
    """The plain model for ``wrap``. Under ZeRO-3 over several ranks each parameter is partitioned
    over the ranks as soon as its module is built (``deepspeed.zero.Init``, in the training dtype),
    then initialised one module at a time with that module gathered: a rank's host memory never
    holds the whole model, and the same seed gives the same weights as a one-rank build
    (``init_weights`` draws the same numbers in the same order, into fp32 CPU tensors, and rounds
    them to bf16 as DeepSpeed rounds a plain model when it wraps it)."""
    if not builds_partitioned(cfg, layout):
        return TerraByte(**cfg.model.kwargs())
    import deepspeed

    # on a GPU the submodules' own initialisers draw from its generator: a plain build's do not
    cuda_rng = torch.cuda.get_rng_state() if torch.cuda.is_available() else None
    # the dtype comes from the config (zero.Init reads its dtype argument as bf16 on a CPU without
    # fp16); mem_efficient_linear off: it would replace torch's F.linear for the whole process
    with deepspeed.zero.Init(config_dict_or_path=deepspeed_config(cfg, layout), mem_efficient_linear=False):
        model = TerraByte(**cfg.model.kwargs(), whole=_gathered)
    if cuda_rng is not None:
        torch.cuda.set_rng_state(cuda_rng)
    return model


@contextlib.contextmanager
def _gathered(module: torch.nn.Module):
    """``module``'s own parameters whole on every rank, as fp32 CPU tensors while the model draws
    into them (the generator and precision of a plain build, whatever device zero.Init allocated
    on); rank 0's values are the ones kept (every rank draws the same, from the same seed)."""
    import deepspeed

    params = list(module.parameters(recurse=False))
    with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
        gathered = [p.data for p in params]
        for p in params:
            p.data = p.data.to("cpu", torch.float32)  # no copy when it already is
        try:
            yield
        finally:
            for p, data in zip(params, gathered):
                data.copy_(p.data)
                p.data = data


def parameter_count(model: torch.nn.Module) -> int:
    """Parameters of the whole model, partitioned (ZeRO-3 ``ds_numel``) or not."""
    return sum(ds_seams.full_numel(p) for p in model.parameters())


# --------------------------------------------------------------------------- wrapping


@dataclass
class Extras:
    """What we keep beside a DeepSpeed engine."""

    layout: Layout
    guard: "NonFiniteGuard"


# Our state for each engine ``wrap`` built, beside it rather than on it: DeepSpeed's object keeps
# only its own attributes, and an engine that is dropped takes its entry with it.
_EXTRAS: "weakref.WeakKeyDictionary[Any, Extras]" = weakref.WeakKeyDictionary()


def extras(engine) -> Extras:
    try:
        return _EXTRAS[engine]
    except KeyError:
        raise RuntimeError("this DeepSpeed engine was not built by terrabyte.pretrain.engine.engine.wrap") from None


def layout_of(engine) -> Layout:
    """The parallel layout ``engine`` was built for."""
    return extras(engine).layout


def wrap(model: torch.nn.Module, cfg: Config, layout: Layout, universal: bool = False):
    """deepspeed.initialize on the model in the form the layout needs; returns the engine.
    ``universal``: the checkpoint it will resume from is in DeepSpeed's universal format."""
    import deepspeed

    if layout.pipeline > 1:
        model = pipeline_module(model, cfg)
    elif layout.sequence > 1:
        model = SequenceParallel(model, sequence_parallel_group(layout), layout.sp_rank, layout.sequence)
    ds_seams.mark_universal_convertible(model)  # lets ds_to_universal convert our checkpoints
    mpu = ds_seams.init_tensor_parallel_groups(layout.tensor) if layout.tensor > 1 else None
    ds_config = deepspeed_config(cfg, layout, universal=universal)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=param_groups(model, cfg.optim.weight_decay),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg)),
        config=ds_config,
        mpu=mpu,
    )
    if layout.tensor > 1:
        shard_attention_heads(engine.module, layout.tensor, layout.tp_rank)
    if cfg.train.compile:
        engine.compile()  # after DeepSpeed's hooks are in place (compiling first breaks ZeRO-3's)
    if is_pipeline(engine) and ds_seams.pipeline_data_parallel_rank(engine) != layout.dp_rank:
        raise RuntimeError(f"pipeline topology puts rank {layout.rank} at data-parallel rank "
                           f"{ds_seams.pipeline_data_parallel_rank(engine)}, not {layout.dp_rank}")
    _EXTRAS[engine] = Extras(layout, NonFiniteGuard(engine))
    log.info("DeepSpeed engine: %s, ZeRO-%d", layout.describe(), cfg.parallel.zero_stage)
    return engine


def is_pipeline(engine) -> bool:
    from deepspeed.runtime.pipe.engine import PipelineEngine

    return isinstance(engine, PipelineEngine)


class NonFiniteGuard:
    """Skips the optimizer update of any step in which some rank saw a NaN/inf loss.

    DeepSpeed applies an update at every step in bf16/fp32. We decide once per optimizer step, on all
    ranks together (one all-reduce just before DeepSpeed's model step), and make the inner optimizer's
    ``step`` a no-op for that step; DeepSpeed's own bookkeeping (zeroing the gradients, the learning
    rate schedule, step counters) runs as usual, so the weights and optimizer state stay those of the
    last good step.
    """

    def __init__(self, engine):
        # held weakly: the guard lives in _EXTRAS, whose entry goes when the engine does
        self._engine = weakref.ref(engine)
        self.pending = False  # this rank saw a non-finite loss since the last optimizer step
        self.skip_now = False
        self.last_skipped = False
        self.skipped = 0
        ds_seams.skippable_step(ds_seams.inner_optimizer(engine), lambda: self.skip_now)
        ds_seams.wrap_model_step(engine, self._model_step)

    def _model_step(self, step):
        self.skip_now = bool(all_reduce_max(int(self.pending or self._pipeline_loss_bad())))
        self.pending = False
        try:
            return step()
        finally:
            self.last_skipped, self.skipped = self.skip_now, self.skipped + int(self.skip_now)
            self.skip_now = False

    def note(self, loss: torch.Tensor) -> None:
        if not bool(torch.isfinite(loss.detach()).all()):
            self.pending = True

    def _pipeline_loss_bad(self) -> bool:
        # a pipeline's last stage sums its micro-batch losses before the optimizer step
        engine = self._engine()
        total = ds_seams.pipeline_total_loss(engine) if is_pipeline(engine) else None
        return isinstance(total, torch.Tensor) and not bool(torch.isfinite(total).all())


def last_step_skipped(engine) -> bool:
    return extras(engine).guard.last_skipped


def skipped_steps(engine) -> int:
    return extras(engine).guard.skipped


# --------------------------------------------------------------------------- steps


def train_batch(engine, micro_batches: list[torch.Tensor]) -> float:
    """One optimizer step over this rank's micro-batches; returns the sum of their mean losses."""
    guard = extras(engine).guard
    if is_pipeline(engine):
        # inputs feed the first stage, the same ids are the last stage's labels
        loss = engine.train_batch(iter([(x, x) for x in micro_batches]))
        return float(loss) * len(micro_batches)
    total = 0.0
    for x in micro_batches:
        loss = engine(x, return_loss=True)
        guard.note(loss)
        engine.backward(loss)
        engine.step()
        total += loss.item()
    return total


@torch.no_grad()
def score(engine, x: torch.Tensor, pad_id: int) -> tuple[float, int]:
    """(nats, scored bytes) of one validation micro-batch. Summed over all ranks, both come out as the
    same multiple (ranks per replica) of the true totals, so their ratio is the true mean."""
    count = int((x != pad_id).sum())
    if is_pipeline(engine):
        loss_fn = ds_seams.pipeline_loss_fn(engine)
        loss_fn.reduction = "sum"
        try:
            # the mean over data-parallel replicas, on every stage: summed over all pipeline x dp
            # ranks that is `pipeline` times the total, like the counts
            mean_nats = engine.eval_batch(iter([(x, x)]), num_micro_batches=1)
        finally:
            loss_fn.reduction = "mean"
        return float(mean_nats), count
    return engine(x, return_loss="sum").item(), count


def all_reduce_sum(values: list[float]) -> list[float]:
    import deepspeed.comm as dist

    tensor = torch.tensor(values, dtype=torch.float64, device=compute_device())
    dist.all_reduce(tensor)
    return tensor.tolist()


def all_reduce_max(value: int) -> int:
    import deepspeed.comm as dist

    tensor = torch.tensor([value], dtype=torch.int64, device=compute_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


def all_gather_objects(obj) -> list:
    """Every rank's ``obj`` (picklable), in rank order, on every rank."""
    import torch.distributed as tdist

    if not tdist.is_initialized() or tdist.get_world_size() == 1:
        return [obj]
    out = [None] * tdist.get_world_size()
    tdist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    import deepspeed.comm as dist
    import torch.distributed as tdist

    if tdist.is_initialized():  # one process without a group (offline tools, tests): nothing to wait for
        dist.barrier()


def compute_device() -> torch.device:
    """This rank's accelerator (set by ``init_distributed``), or the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def on_rank0(rank: int, fn, *args) -> None:
    """Run ``fn`` on rank 0 while the others wait; a user error there is raised on every rank."""
    import torch.distributed as tdist

    if not tdist.is_initialized():
        fn(*args)
        return
    failure = [None]
    if rank == 0:
        try:
            fn(*args)
        except TerrabyteError as exc:
            failure = [exc]
    tdist.broadcast_object_list(failure, src=0)
    if failure[0] is not None:
        raise failure[0]
