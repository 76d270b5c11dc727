"""Load a trained TerraByte for inference; the ``generate`` and ``export`` subcommands.

A model can come from an exported ``model.safetensors`` (its config travels in the file's metadata)
or straight from a run directory's newest DeepSpeed checkpoint, whose ZeRO shards are consolidated
on the fly.
"""
from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import torch

from .model import TerraByte

log = logging.getLogger(__name__)


def load_state(source: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(model config, state dict) from a safetensors file, a run directory or a checkpoint folder."""
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.is_dir() and (path / "model.safetensors").is_file():
        path = path / "model.safetensors"
    if path.is_file():
        return _load_safetensors(path)
    from . import engine

    root = path if (path / "latest").is_file() else engine.checkpoint_dir(path)
    tag = (root / "latest").read_text().strip() if (root / "latest").is_file() else None
    if tag is None:
        raise FileNotFoundError(f"{source} holds neither model.safetensors nor a checkpoint (no 'latest' file)")
    config_path = root / tag / "model_config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"checkpoint {root / tag} has no model_config.json")
    return json.loads(config_path.read_text()), engine.consolidate_checkpoint(root, tag)


def _load_safetensors(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        state = load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for truncated/garbled files
        raise ValueError(f"{path} is not a readable safetensors file: {exc}") from None
    if "model_config" not in metadata:
        raise ValueError(f"{path} carries no model_config metadata (was it written by `terrabyte export`?)")
    return json.loads(metadata["model_config"]), state


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_dtype(name: str, device: str | torch.device) -> str:
    """A key of DTYPES for ``--dtype name``: ``auto`` is bf16 on a GPU, fp32 elsewhere."""
    if name == "auto":
        return "bf16" if torch.device(device).type == "cuda" else "fp32"
    if name not in DTYPES:
        raise ValueError(f"--dtype {name!r} must be auto or one of {sorted(DTYPES)}")
    return name


def load_model(source: str | Path, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32) -> TerraByte:
    config, state = load_state(source)
    model = TerraByte(**config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{source} does not match the model it describes: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    return model.to(device=device, dtype=dtype).eval()


def write_safetensors(tensors: dict[str, torch.Tensor], config: dict, path: str | Path) -> None:
    """One safetensors file with the model config in its metadata, written to a temporary name first."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"model_config": json.dumps(config), "format": "pt"})
    os.replace(tmp, path)


def save_safetensors(model: TerraByte, config: dict, path: str | Path) -> None:
    # clone: tied weights share storage, which safetensors refuses
    write_safetensors({k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}, config, path)


# --------------------------------------------------------------------------- CLI


def add_generate_arguments(parser) -> None:
    parser.add_argument("--checkpoint", required=True, help="run directory, checkpoint folder or .safetensors file")
    parser.add_argument("--prompt", default="", help="prompt text (UTF-8)")
    parser.add_argument("--max-bytes", type=int, default=256, help="bytes to generate")
    parser.add_argument("--temperature", type=float, default=0.9, help="0 samples greedily")
    parser.add_argument("--filter-thres", type=float, default=0.9, help="top-k: keep the top (1 - thres) of logits")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="auto", help="weights for decoding: auto (bf16 on GPU, fp32 on CPU), "
                        "fp32, bf16 or fp16")


def run_generate(args) -> int:
    if args.max_bytes <= 0:
        raise ValueError(f"--max-bytes must be positive, got {args.max_bytes}")
    model = load_model(args.checkpoint, args.device, DTYPES[resolve_dtype(args.dtype, args.device)])
    prompt = args.prompt.encode()
    prime = torch.tensor([list(prompt)], device=args.device) if prompt else None
    out = sys.stdout.buffer
    out.write(prompt)
    out.flush()

    def stream(new: torch.Tensor) -> None:
        value = int(new.reshape(-1)[0])
        if value < 256:
            out.write(bytes([value]))
            out.flush()

    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    model.generate(
        prime=prime,
        batch_size=1,
        max_new_bytes=args.max_bytes,
        temperature=args.temperature,
        filter_thres=args.filter_thres,
        top_p=args.top_p,
        callback=stream,
        generator=generator,
    )
    out.write(b"\n")
    out.flush()
    return 0


def add_export_arguments(parser) -> None:
    parser.add_argument("run", help="run directory (its newest checkpoint is consolidated)")
    parser.add_argument("--out", required=True, help="output .safetensors path")


def run_export(args) -> int:
    config, state = load_state(args.run)
    model = TerraByte(**config)
    model.load_state_dict(state)
    save_safetensors(model, config, args.out)
    log.info("wrote %s", args.out)
    return 0
