"""The DeepSpeed engine around a plain ``TerraByte``: the only module that imports DeepSpeed.

It turns the config tree into a DeepSpeed config (ZeRO-3 by default), starts the process group
(gloo on CPU, nccl on GPU), wraps the model, and owns checkpoints: save with an atomic ``latest``,
keep the newest K, resume, consolidate ZeRO-3 shards into one safetensors file.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import socket
from pathlib import Path
from typing import Any

import torch

from .args import Config, validate_world

log = logging.getLogger(__name__)

# Environment variables that mean a launcher already set up the ranks.
_LAUNCHER_ENV = ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "MV2_COMM_WORLD_RANK")
CHECKPOINT_DIRNAME = "checkpoints"
TAG_PATTERN = re.compile(r"^step(\d+)$")


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
        deepspeed.init_distributed(dist_backend=backend, verbose=False)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return dist.get_rank(), dist.get_world_size()


def use_bf16(cfg: Config) -> bool:
    if cfg.train.precision == "auto":
        return torch.cuda.is_available()
    return cfg.train.precision == "bf16"


def deepspeed_config(cfg: Config, world_size: int) -> dict:
    accumulation = validate_world(cfg, world_size)
    zero: dict[str, Any] = {"stage": cfg.parallel.zero_stage}
    if cfg.parallel.zero_stage == 3:
        zero.update(
            overlap_comm=torch.cuda.is_available(),
            contiguous_gradients=True,
            stage3_gather_16bit_weights_on_model_save=False,
        )
    if cfg.parallel.offload == "cpu":
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    elif cfg.parallel.offload == "nvme":
        zero["offload_param"] = {"device": "nvme", "nvme_path": cfg.parallel.nvme_path}
        zero["offload_optimizer"] = {"device": "nvme", "nvme_path": cfg.parallel.nvme_path}
    o = cfg.optim
    return {
        "train_batch_size": cfg.train.global_batch,
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch,
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": cfg.train.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": use_bf16(cfg)},
        # torch_adam: the JIT-built FusedAdam needs a compiler toolchain on every node; torch's AdamW
        # (fused on GPU) is as fast and always there.
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": o.lr,
                "betas": [o.beta1, o.beta2],
                "eps": o.eps,
                "weight_decay": o.weight_decay,
                "torch_adam": True,
            },
        },
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


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
    import math

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


def wrap(model: torch.nn.Module, cfg: Config, world_size: int):
    """deepspeed.initialize with our config; returns the engine (a callable module)."""
    import deepspeed

    ds_config = deepspeed_config(cfg, world_size)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=param_groups(model, cfg.optim.weight_decay),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg)),
        config=ds_config,
    )
    return engine


@contextlib.contextmanager
def gathered_parameters(module: torch.nn.Module):
    """Full parameters on every rank inside the block (ZeRO-3 keeps only a shard otherwise)."""
    params = [p for p in module.parameters() if hasattr(p, "ds_id")]
    if not params:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield


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
    engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
    barrier()
    if engine.global_rank == 0:
        _write_json(root / tag / "model_config.json", model_config)
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


def load(engine, run_dir: str | Path, model_config: dict) -> dict | None:
    """Resume from ``latest`` if there is one; returns the client state or None for a fresh run."""
    tag = latest_tag(run_dir)
    if tag is None:
        return None
    root = checkpoint_dir(run_dir)
    stored = root / tag / "model_config.json"
    if stored.is_file():
        check_same_model(json.loads(stored.read_text()), model_config, str(root / tag))
    path, client_state = engine.load_checkpoint(str(root), tag=tag)
    if path is None:
        raise ValueError(f"checkpoint {root / tag} could not be loaded (files missing or truncated)")
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
        if a != b and key not in ("checkpoint_activations", "attn_dropout", "ff_dropout", "flash_attn"):
            raise ValueError(
                f"checkpoint {where} was written for a different model: model.{key} is {a!r} there "
                f"but {b!r} now (use another run.dir or the same model config)"
            )


def export_safetensors(engine, path: str | Path, model_config: dict) -> None:
    """Consolidate the (possibly ZeRO-3 sharded) parameters into one safetensors file on rank 0."""
    from safetensors.torch import save_file

    module = engine.module
    with gathered_parameters(module):
        if engine.global_rank == 0:
            # clone: tied weights share storage, which safetensors refuses
            tensors = {k: v.detach().cpu().clone().contiguous() for k, v in module.state_dict().items()}
            path = Path(path)
            tmp = path.with_name(path.name + ".tmp")
            save_file(tensors, str(tmp), metadata={"model_config": json.dumps(model_config), "format": "pt"})
            os.replace(tmp, path)
    barrier()


def consolidate_checkpoint(root: str | Path, tag: str) -> dict[str, torch.Tensor]:
    """fp32 state dict from a (ZeRO-sharded) DeepSpeed checkpoint, in one process, no ranks needed."""
    import sys

    # DeepSpeed logs to stdout, which `terrabyte generate` keeps for the generated bytes
    with contextlib.redirect_stdout(sys.stderr):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    try:
        with contextlib.redirect_stdout(sys.stderr):
            state = get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)
    except (FileNotFoundError, ValueError, RuntimeError, EOFError) as exc:
        raise ValueError(f"checkpoint {Path(root) / tag} is incomplete or unreadable: {exc}") from None
    return {k: v.float() for k, v in state.items()}
