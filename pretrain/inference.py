"""Load a trained TerraByte for inference; the ``generate`` and ``export`` subcommands.

A model can come from an exported ``model.safetensors`` (its config travels in the file's metadata)
or straight from a run directory's newest DeepSpeed checkpoint, whose ZeRO shards are consolidated
on the fly.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import torch

from terrabyte.data_pipeline.errors import CheckpointError, ConfigError

from .checkpoint import load_state, resolve_model_source, save_safetensors
from .model import TerraByte

log = logging.getLogger(__name__)


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_dtype(name: str, device: str | torch.device) -> str:
    """A key of DTYPES for ``--dtype name``: ``auto`` is bf16 on a GPU, fp32 elsewhere."""
    if name == "auto":
        return "bf16" if torch.device(device).type == "cuda" else "fp32"
    if name not in DTYPES:
        raise ConfigError(f"--dtype {name!r} must be auto or one of {sorted(DTYPES)}")
    return name


def load_model(source: str | Path, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32) -> TerraByte:
    config, state = load_state(source)
    model = TerraByte(**config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{source} does not match the model it describes: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    return model.to(device=device, dtype=dtype).eval()


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
        raise ConfigError(f"--max-bytes must be positive, got {args.max_bytes}")
    model = load_model(args.checkpoint, args.device, DTYPES[resolve_dtype(args.dtype, args.device)])
    prompt = args.prompt.encode()
    prime = torch.tensor([list(prompt)], device=args.device) if prompt else None
    out = sys.stdout.buffer
    out.write(prompt)
    out.flush()

    def stream(new: torch.Tensor) -> None:
        value = int(new.reshape(-1)[0])
        if model.vocab.is_data(value):
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
    where = resolve_model_source(args.run)
    config, state = load_state(where)
    model = TerraByte(**config)
    model.load_state_dict(state)
    save_safetensors(model, config, args.out, where.step)
    log.info("wrote %s", args.out)
    return 0
