"""Load a trained TerraByte for inference; the ``generate`` and ``export`` subcommands.

A model can come from an exported ``model.safetensors`` (its config travels in the file's metadata)
or straight from a run directory's newest DeepSpeed checkpoint, whose ZeRO shards are consolidated
on the fly. ``generate`` streams one prompt's bytes, or decodes a batch of prompts
(``--prompt-file``, ``generate_batch``) into one JSON line each, cut at ``--stop`` sequences.
"""
from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from terrabyte.data_pipeline.basics.errors import CheckpointError, ConfigError
from terrabyte.data_pipeline.basics.system import atomic_write

from ..checkpoint.universal import TRUST_FLAG
from ..checkpoint.weights import load_state, resolve_model_source, save_safetensors
from ..model.terrabyte import TerraByte

log = logging.getLogger(__name__)


TRUST_HELP = ("read a DeepSpeed checkpoint whose files hold pickled objects besides tensors and plain data: "
              "unpickling them runs whatever code they name, so only for checkpoints you trust")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_dtype(name: str, device: str | torch.device) -> str:
    """A key of DTYPES for ``--dtype name``: ``auto`` is bf16 on a GPU, fp32 elsewhere."""
    if name == "auto":
        return "bf16" if torch.device(device).type == "cuda" else "fp32"
    if name not in DTYPES:
        raise ConfigError(f"--dtype {name!r} must be auto or one of {sorted(DTYPES)}")
    return name


def load_model(source: str | Path, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32, trust: bool = False) -> TerraByte:
    """The model ``source`` holds; nothing is unpickled in full unless ``trust`` (``--trust-checkpoint``)."""
    config, state = load_state(source, trust)
    model = TerraByte(**config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{source} does not match the model it describes: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    return model.to(device=device, dtype=dtype).eval()


# --------------------------------------------------------------------------- CLI


@dataclass
class Completion:
    prompt: bytes
    completion: bytes  # without the stop sequence that ended it
    finish: str  # "stop" (a stop sequence), "eos", or "length" (max bytes or the context's end)
    stop: Optional[bytes] = None

    def as_json(self) -> dict:
        """Text fields as UTF-8 (invalid bytes replaced: a byte model may emit any byte)."""
        return {"prompt": _text(self.prompt), "completion": _text(self.completion), "finish": self.finish,
                "stop": _text(self.stop)}


def _text(data: Optional[bytes]) -> Optional[str]:
    return None if data is None else data.decode("utf-8", errors="replace")


def generate_batch(model: TerraByte, prompts: list[bytes], max_new_bytes: int, stop: Sequence[bytes] = (),
                   **sampling) -> list[Completion]:
    """All prompts decoded as one batch (``model.generate`` with ``prime_lengths``); one completion
    each, cut before the stop sequence that ended it."""
    if not prompts:
        raise ConfigError("no prompts to generate from")
    device = model.to_logits.weight.device
    width = max(len(p) for p in prompts)
    prime = torch.zeros((len(prompts), width), dtype=torch.long, device=device)
    for row, prompt in enumerate(prompts):
        prime[row, : len(prompt)] = torch.tensor(list(prompt), dtype=torch.long)
    out = model.generate(prime, prime_lengths=[len(p) for p in prompts], max_new_bytes=max_new_bytes,
                         stop_sequences=stop, **sampling).tolist()
    return [_completion(prompt, row[len(prompt):], model, stop) for prompt, row in zip(prompts, out)]


def _completion(prompt: bytes, ids: list[int], model: TerraByte, stop: Sequence[bytes]) -> Completion:
    if model.pad_id in ids:
        ids = ids[: ids.index(model.pad_id)]
    if ids and ids[-1] == model.eos_id:
        return Completion(prompt, model.vocab.data_bytes(ids[:-1]), "eos")
    data = model.vocab.data_bytes(ids)
    for seq in sorted(stop, key=len, reverse=True):
        if data.endswith(seq):
            return Completion(prompt, data[: -len(seq)], "stop", seq)
    return Completion(prompt, data, "length")


def read_prompts(path: str) -> list[bytes]:
    """A JSON list of strings, or one prompt per line (blank lines skipped)."""
    text = Path(path).read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            prompts = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"--prompt-file {path} starts like a JSON list but is not valid JSON: {exc}") from None
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise ConfigError(f"--prompt-file {path} must be a JSON list of strings")
    else:
        prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ConfigError(f"--prompt-file {path} holds no prompts")
    return [p.encode() for p in prompts]


def add_generate_arguments(parser) -> None:
    parser.add_argument("--checkpoint", required=True, help="run directory, checkpoint folder or .safetensors file")
    add_trust_argument(parser)
    parser.add_argument("--prompt", default="", help="prompt text (UTF-8)")
    parser.add_argument("--prompt-file", default=None, help="several prompts, one per line or a JSON list of "
                        "strings, decoded as one batch; one JSON line per prompt to --out (or stdout)")
    parser.add_argument("--stop", action="append", default=[], metavar="TEXT",
                        help="stop sequence (repeatable): a prompt's generation ends once it ends with one")
    parser.add_argument("--out", default=None, help="write one JSON line per prompt here (results.jsonl)")
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
    if args.prompt_file and args.prompt:
        raise ConfigError("give --prompt or --prompt-file, not both")
    stop = [s.encode() for s in args.stop]
    if any(not s for s in stop):
        raise ConfigError("--stop must not be empty")
    model = load_model(args.checkpoint, args.device, DTYPES[resolve_dtype(args.dtype, args.device)],
                       args.trust_checkpoint)
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    sampling = dict(temperature=args.temperature, filter_thres=args.filter_thres, top_p=args.top_p, generator=generator)
    if args.prompt_file or args.out:
        prompts = read_prompts(args.prompt_file) if args.prompt_file else [args.prompt.encode()]
        results = generate_batch(model, prompts, args.max_bytes, stop, **sampling)
        lines = "".join(json.dumps(r.as_json(), ensure_ascii=False) + "\n" for r in results)
        if args.out:
            atomic_write(args.out, lines)
            log.info("wrote %d completions to %s", len(results), args.out)
        else:
            sys.stdout.write(lines)
        return 0
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

    model.generate(prime=prime, batch_size=1, max_new_bytes=args.max_bytes, callback=stream, stop_sequences=stop,
                   **sampling)
    out.write(b"\n")
    out.flush()
    return 0


def add_export_arguments(parser) -> None:
    parser.add_argument("run", help="run directory (its newest checkpoint is consolidated)")
    parser.add_argument("--out", required=True, help="output .safetensors path")
    add_trust_argument(parser)


def add_trust_argument(parser) -> None:
    parser.add_argument(TRUST_FLAG, dest="trust_checkpoint", action="store_true", help=TRUST_HELP)


def run_export(args) -> int:
    where = resolve_model_source(args.run)
    config, state = load_state(where, args.trust_checkpoint)
    model = TerraByte(**config)
    model.load_state_dict(state)
    save_safetensors(model, config, args.out, where.step)
    log.info("wrote %s", args.out)
    return 0
