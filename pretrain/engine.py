"""The DeepSpeed engine around a plain ``TerraByte``.

It turns the config tree into a DeepSpeed config (ZeRO-3 by default; pipeline, AutoTP or Ulysses
when asked), starts the process group (gloo on CPU, nccl on GPU), wraps the model, runs one
optimizer step or one scoring pass in whatever form the model took, guards against non-finite
losses, and owns checkpoints: save with an atomic ``latest`` and the parallel layout beside it, keep
the newest K, resume (through DeepSpeed's universal format when the layout changed), consolidate any
checkpoint into one plain state dict. ``parallel.py`` holds the model-side parallel forms.
"""
from __future__ import annotations

import atexit
import contextlib
import json
import logging
import math
import os
import pickle
import re
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F

from .args import Config
from .parallel import (Layout, SequenceParallel, autotp_config, pipeline_key, pipeline_module,
                       sequence_parallel_group, shard_attention_heads)

log = logging.getLogger(__name__)

# Environment variables that mean a launcher already set up the ranks.
_LAUNCHER_ENV = ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "MV2_COMM_WORLD_RANK")
CHECKPOINT_DIRNAME = "checkpoints"
TAG_PATTERN = re.compile(r"^step(\d+)$")
LAYOUT_FILE = "layout.json"
UNIVERSAL_DIRNAME = "universal"  # inside a checkpoint's folder, so pruning removes both
FILES_MANIFEST = "files.json"  # every file of a checkpoint with its size: missing/truncated files show
# Model keys that may change between a checkpoint and its resumption.
RESUMABLE_MODEL_KEYS = ("checkpoint_activations", "attn_dropout", "ff_dropout", "flash_attn")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> tuple[int, int]:
    """Start the process group; returns (rank, world size).

    Under deepspeed/torchrun the env vars are set; under mpirun DeepSpeed reads ranks from mpi4py;
    a bare ``python -m terrabyte.pretrain`` becomes a world of one on a free local port.
    """
    import deepspeed
    import deepspeed.comm as dist

    if not any(name in os.environ for name in _LAUNCHER_ENV):
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
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
            (decay if param.dim() >= 2 else no_decay).append(param)
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


# --------------------------------------------------------------------------- wrapping


@dataclass
class Extras:
    """What we keep beside a DeepSpeed engine (attached as ``engine.terrabyte``)."""

    layout: Layout
    guard: "NonFiniteGuard"


def wrap(model: torch.nn.Module, cfg: Config, layout: Layout, resume: Optional["ResumePlan"] = None):
    """deepspeed.initialize on the model in the form the layout needs; returns the engine."""
    import deepspeed
    from deepspeed.checkpoint.constants import (UNIVERSAL_CHECKPOINT_INFO, UNIVERSAL_CHECKPOINT_VERSION_KEY,
                                                UNIVERSAL_CHECKPOINT_VERSION_VALUE)

    if layout.pipeline > 1:
        model = pipeline_module(model, cfg)
    elif layout.sequence > 1:
        model = SequenceParallel(model, sequence_parallel_group(layout), layout.sp_rank, layout.sequence)
    if not hasattr(model, UNIVERSAL_CHECKPOINT_INFO):
        # lets ds_to_universal convert our checkpoints (AutoTP replaces it with its own metadata)
        setattr(model, UNIVERSAL_CHECKPOINT_INFO, {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE})
    mpu = None
    if layout.tensor > 1:
        from deepspeed.utils import groups

        # AutoTP's (data, tensor) mesh must exist before DeepSpeed checks the batch against the
        # data-parallel size; the groups module then serves as the model-parallel unit
        groups._init_tp_mesh_device(tensor_model_parallel_size=layout.tensor)
        mpu = groups
    ds_config = deepspeed_config(cfg, layout, universal=bool(resume and resume.universal))
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=param_groups(model, cfg.optim.weight_decay),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg)),
        config=ds_config,
        mpu=mpu,
    )
    if layout.tensor > 1:
        shard_attention_heads(engine.module, layout.tensor)
    if cfg.train.compile:
        engine.compile()  # after DeepSpeed's hooks are in place (compiling first breaks ZeRO-3's)
    if is_pipeline(engine) and engine.grid.data_parallel_id != layout.dp_rank:
        raise RuntimeError(f"pipeline topology puts rank {layout.rank} at data-parallel rank "
                           f"{engine.grid.data_parallel_id}, not {layout.dp_rank}")
    engine.terrabyte = Extras(layout, NonFiniteGuard(engine))
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
        self.engine = engine
        self.pending = False  # this rank saw a non-finite loss since the last optimizer step
        self.skip_now = False
        self.last_skipped = False
        self.skipped = 0
        optimizer = engine.basic_optimizer
        inner_step, take_model_step = optimizer.step, engine._take_model_step

        def step(*args, **kwargs):
            if self.skip_now:
                optimizer._opt_called = True  # what torch's LR-scheduler wrapper records for a step
                return None
            return inner_step(*args, **kwargs)

        if hasattr(inner_step, "_wrapped_by_lr_sched"):
            step._wrapped_by_lr_sched = True  # still the scheduler-tracked step underneath

        def guarded_model_step(*args, **kwargs):
            self.skip_now = bool(all_reduce_max(int(self.pending or self._pipeline_loss_bad())))
            self.pending = False
            try:
                return take_model_step(*args, **kwargs)
            finally:
                self.last_skipped, self.skipped = self.skip_now, self.skipped + int(self.skip_now)
                self.skip_now = False

        optimizer.step = step
        engine._take_model_step = guarded_model_step

    def note(self, loss: torch.Tensor) -> None:
        if not bool(torch.isfinite(loss.detach()).all()):
            self.pending = True

    def _pipeline_loss_bad(self) -> bool:
        # a pipeline's last stage sums its micro-batch losses in total_loss before the optimizer step
        total = getattr(self.engine, "total_loss", None) if is_pipeline(self.engine) else None
        return isinstance(total, torch.Tensor) and not bool(torch.isfinite(total).all())


def last_step_skipped(engine) -> bool:
    return engine.terrabyte.guard.last_skipped


def skipped_steps(engine) -> int:
    return engine.terrabyte.guard.skipped


# --------------------------------------------------------------------------- steps


def train_batch(engine, micro_batches: list[torch.Tensor]) -> float:
    """One optimizer step over this rank's micro-batches; returns the sum of their mean losses."""
    guard = engine.terrabyte.guard
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
        loss_fn = engine.module.loss_fn
        loss_fn.reduction = "sum"
        try:
            # the mean over data-parallel replicas, on every stage: summed over all pipeline x dp
            # ranks that is `pipeline` times the total, like the counts
            mean_nats = engine.eval_batch(iter([(x, x)]), num_micro_batches=1)
        finally:
            loss_fn.reduction = "mean"
        return float(mean_nats), count
    logits = engine(x)
    nats = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), x.reshape(-1), ignore_index=pad_id,
                           reduction="sum")
    return nats.item(), count


def full_state_dict(engine) -> Optional[dict[str, torch.Tensor]]:
    """The plain model's whole state dict on rank 0 (None elsewhere), whatever the engine sharded.
    Every rank must call it."""
    import torch.distributed as tdist

    if is_pipeline(engine):
        local = {}
        if engine.grid.data_parallel_id == 0:
            local = {pipeline_key(k): v.detach().cpu().clone() for k, v in engine.module.state_dict().items()}
        parts = [None] * tdist.get_world_size() if engine.global_rank == 0 else None
        tdist.gather_object(local, parts, dst=0)
        return {k: v for part in parts for k, v in part.items()} if engine.global_rank == 0 else None
    if engine.zero_optimization_partition_weights() or engine.autotp_size() > 1:
        state = engine._consolidated_16bit_state_dict()  # gathers ZeRO-3 and AutoTP shards to rank 0
    else:
        state = engine.module.state_dict() if engine.global_rank == 0 else None
    if state is None:
        return None
    # clone: tied weights share storage, which safetensors refuses
    return {k: v.detach().cpu().clone().contiguous() for k, v in state.items()}


def all_reduce_sum(values: list[float]) -> list[float]:
    import deepspeed.comm as dist

    tensor = torch.tensor(values, dtype=torch.float64, device=_comm_device())
    dist.all_reduce(tensor)
    return tensor.tolist()


def all_reduce_max(value: int) -> int:
    import deepspeed.comm as dist

    tensor = torch.tensor([value], dtype=torch.int64, device=_comm_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


def barrier() -> None:
    import deepspeed.comm as dist

    dist.barrier()


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


# --------------------------------------------------------------------------- checkpoints


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINT_DIRNAME


def latest_tag(run_dir: str | Path) -> str | None:
    latest = checkpoint_dir(run_dir) / "latest"
    if not latest.is_file():
        return None
    tag = latest.read_text().strip()
    if not (checkpoint_dir(run_dir) / tag).is_dir():
        raise ValueError(f"checkpoint {latest} points to {tag!r}, which does not exist")
    return tag


def save(engine, run_dir: str | Path, step: int, client_state: dict, keep: int, model_config: dict) -> Path:
    """Save on all ranks; only after every rank finished does ``latest`` point at it (atomically)."""
    root = checkpoint_dir(run_dir)
    tag = f"step{step}"
    layout = engine.terrabyte.layout
    client_state = {**client_state, "layout": layout.as_dict()}
    engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
    barrier()
    if engine.global_rank == 0:
        _write_json(root / tag / "model_config.json", model_config)
        _write_json(root / tag / LAYOUT_FILE, {**layout.as_dict(), "zero_stage": engine.zero_optimization_stage()})
        _write_json(root / tag / FILES_MANIFEST, _file_sizes(root / tag))
        tmp = root / "latest.tmp"
        tmp.write_text(tag)
        os.replace(tmp, root / "latest")
        _prune(root, keep)
    barrier()
    log.info("saved checkpoint %s", root / tag)
    return root / tag


def _prune(root: Path, keep: int) -> None:
    steps = sorted(
        (int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := TAG_PATTERN.match(p.name))
    )
    for _, path in steps[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


def _file_sizes(ckpt: Path) -> dict[str, int]:
    return {
        str(p.relative_to(ckpt)): p.stat().st_size
        for p in sorted(ckpt.rglob("*"))
        if p.is_file() and p.suffix != ".json" and UNIVERSAL_DIRNAME not in p.relative_to(ckpt).parts[:1]
    }


def verify_files(ckpt: Path) -> None:
    """Every file the checkpoint was saved with is there, whole (checked against files.json)."""
    manifest = ckpt / FILES_MANIFEST
    if not manifest.is_file():
        return  # written before manifests existed: DeepSpeed's own errors will have to do
    for name, size in json.loads(manifest.read_text()).items():
        path = ckpt / name
        if not path.is_file():
            raise ValueError(f"checkpoint {ckpt} is incomplete: {name} is missing; point "
                             f"{ckpt.parent / 'latest'} at an earlier step or remove the checkpoints to start over")
        if path.stat().st_size != size:
            raise ValueError(f"checkpoint {ckpt} is damaged: {name} has {path.stat().st_size} of {size} bytes "
                             f"(truncated?); point {ckpt.parent / 'latest'} at an earlier step or remove the "
                             f"checkpoints to start over")


@dataclass
class ResumePlan:
    root: Path
    tag: str
    universal: bool
    """Load from ``<tag>/universal`` (converted) with DeepSpeed's ``load_universal``."""

    @property
    def load_tag(self) -> str:
        return f"{self.tag}/{UNIVERSAL_DIRNAME}" if self.universal else self.tag


def saved_layout(ckpt: Path) -> Optional[dict]:
    """The layout a checkpoint was written with (None if it predates layout.json)."""
    path = ckpt / LAYOUT_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def plan_resume(cfg: Config, run_dir: str | Path, layout: Layout) -> Optional[ResumePlan]:
    """Check the newest checkpoint against this run before any engine exists, and decide how to load
    it. A different parallel layout goes through DeepSpeed's universal format (converted once, by rank
    0); ``checkpoint.universal`` false makes that an error instead. Every rank must call it."""
    tag = latest_tag(run_dir)
    if tag is None:
        return None
    root = checkpoint_dir(run_dir)
    ckpt = root / tag
    stored = ckpt / "model_config.json"
    if stored.is_file():
        check_same_model(json.loads(stored.read_text()), cfg.model.kwargs(), str(ckpt))
    verify_files(ckpt)  # on every rank, no collective: all ranks stop together on a bad checkpoint
    saved = saved_layout(ckpt)
    current = layout.as_dict()
    moved = saved is not None and {k: saved.get(k) for k in current} != current
    if moved and saved.get("pipeline", 1) != layout.pipeline:
        # pipeline checkpoints name parameters by layer index ("3.stages.0..."), plain ones by module
        raise ValueError(
            f"checkpoint {ckpt} was written with parallel.pipeline_stages={saved.get('pipeline', 1)}; resuming "
            f"with {layout.pipeline} is not supported: resume with --parallel.pipeline_stages "
            f"{saved.get('pipeline', 1)} (data-parallel, tensor- and sequence-parallel sizes may change)"
        )
    universal = cfg.checkpoint.universal
    if universal is None:
        universal = moved
    elif not universal and moved:
        raise ValueError(
            f"checkpoint {ckpt} was written by {_layout_text(saved)}, this run is {_layout_text(current)}: "
            f"sharded ZeRO/pipeline/tensor-parallel states load only in their own layout; drop "
            f"--checkpoint.universal false to convert it (DeepSpeed universal checkpoint), or relaunch as before"
        )
    if universal:
        _on_rank0(layout.rank, convert_to_universal, ckpt)
        log.info("resuming %s through a universal checkpoint (%s -> %s)", ckpt,
                 _layout_text(saved) if saved else "unknown layout", _layout_text(current))
    return ResumePlan(root, tag, bool(universal))


def _on_rank0(rank: int, fn, *args) -> None:
    """Run ``fn`` on rank 0 while the others wait; a ValueError there is raised on every rank."""
    import torch.distributed as tdist

    message = [None]
    if rank == 0:
        try:
            fn(*args)
        except ValueError as exc:
            message = [str(exc)]
    tdist.broadcast_object_list(message, src=0)
    if message[0] is not None:
        raise ValueError(message[0])


def _layout_text(layout: dict) -> str:
    return (f"{layout['world']} rank(s) (data {layout['dp']} x pipeline {layout['pipeline']} x tensor "
            f"{layout['tensor']} x sequence {layout['sequence']})")


def convert_to_universal(ckpt: Path) -> Path:
    """``python -m deepspeed.checkpoint.ds_to_universal`` into ``<ckpt>/universal`` (once; atomic)."""
    out = ckpt / UNIVERSAL_DIRNAME
    if (out / "latest_universal").is_file() or (out / ".complete").is_file():
        return out
    tmp = ckpt / f"{UNIVERSAL_DIRNAME}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(ckpt),
           "--output_folder", str(tmp), "--num_extract_workers", "1", "--num_merge_workers", "1"]
    log.info("converting %s to a universal checkpoint", ckpt)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise ValueError(f"checkpoint {ckpt} could not be converted to a universal checkpoint: {last}")
    (tmp / ".complete").write_text("")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def _unreadable(exc: BaseException) -> bool:
    """Is this what torch.load/DeepSpeed raise for a missing, truncated or garbled checkpoint file?"""
    if isinstance(exc, (FileNotFoundError, EOFError, pickle.UnpicklingError)):
        return True
    return isinstance(exc, RuntimeError) and any(
        s in str(exc) for s in ("PytorchStreamReader", "zip archive", "unexpected EOF"))


def load(engine, plan: Optional[ResumePlan]) -> dict | None:
    """Resume from the planned checkpoint; returns the client state or None for a fresh run."""
    if plan is None:
        return None
    where = plan.root / plan.load_tag
    # DeepSpeed's universal loader copies param group 0's hyperparameters to every group, which would
    # give norms and start tokens weight decay: keep ours (they come from the config anyway)
    groups = engine.basic_optimizer.param_groups
    hyper = [{k: v for k, v in g.items() if k not in ("params", "lr", "initial_lr")} for g in groups]
    try:
        path, client_state = engine.load_checkpoint(str(plan.root), tag=plan.load_tag)
    except Exception as exc:
        if not _unreadable(exc):
            raise
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(
            f"checkpoint {where} is incomplete or unreadable ({detail}); point {plan.root / 'latest'} at an "
            f"earlier step or remove the checkpoints to start over"
        ) from None
    if path is None:
        raise ValueError(f"checkpoint {where} could not be loaded (files missing or truncated)")
    if plan.universal:
        for group, saved in zip(groups, hyper):
            group.update(saved)
        # ... and hands every parameter the same `step` tensor, which Adam increments in place once
        # per parameter group: give each its own
        for state in engine.basic_optimizer.state.values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].clone()
    return client_state


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def check_same_model(stored: dict, current: dict, where: str) -> None:
    for key in sorted(set(stored) | set(current)):
        a, b = stored.get(key), current.get(key)
        if isinstance(a, list):
            a = tuple(a)
        if isinstance(b, list):
            b = tuple(b)
        if a != b and key not in RESUMABLE_MODEL_KEYS:
            raise ValueError(
                f"checkpoint {where} was written for a different model: model.{key} is {a!r} there "
                f"but {b!r} now (use another run.dir or the same model config)"
            )


def export_safetensors(engine, path: str | Path, model_config: dict) -> None:
    """Consolidate the (possibly sharded) parameters into one safetensors file on rank 0."""
    from .inference import write_safetensors

    tensors = full_state_dict(engine)
    if engine.global_rank == 0:
        write_safetensors(tensors, model_config, path)
    barrier()


def consolidate_checkpoint(root: str | Path, tag: str) -> dict[str, torch.Tensor]:
    """fp32 state dict from a DeepSpeed checkpoint of any layout, in one process, no ranks needed.

    Data-parallel ZeRO checkpoints go through ``zero_to_fp32``; pipeline and tensor-parallel ones
    through the universal conversion, which merges stages and tensor slices.
    """
    ckpt = Path(root) / tag
    verify_files(ckpt)
    layout = saved_layout(ckpt) or {}
    if layout.get("pipeline", 1) > 1 or layout.get("tensor", 1) > 1:
        return _consolidate_universal(ckpt)
    # DeepSpeed logs to stdout, which `terrabyte generate` keeps for the generated bytes
    with contextlib.redirect_stdout(sys.stderr):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    try:
        with contextlib.redirect_stdout(sys.stderr):
            state = get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)
    except (FileNotFoundError, ValueError, RuntimeError, EOFError) as exc:
        raise ValueError(f"checkpoint {ckpt} is incomplete or unreadable: {exc}") from None
    return {k: v.float() for k, v in state.items()}


def _consolidate_universal(ckpt: Path) -> dict[str, torch.Tensor]:
    out = convert_to_universal(ckpt)
    state = {}
    for fp32 in sorted((out / "zero").glob("*/fp32.pt")):
        name = fp32.parent.name
        obj = torch.load(fp32, map_location="cpu", weights_only=False)
        tensor = obj["param"] if isinstance(obj, dict) else obj  # ZeRO-1/2 wrap it, ZeRO-3 does not
        # pipeline parameter names start with the layer index
        key = pipeline_key(name) if name.split(".", 1)[0].isdigit() else name
        state[key] = tensor.float()
    if not state:
        raise ValueError(f"checkpoint {ckpt}: the universal conversion produced no parameters")
    return state
