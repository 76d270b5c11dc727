"""Bits-per-byte evaluation with the MEGABYTE paper's inference modes (Yu et al. 2023, Table 11).

Each document is scored on its own, byte by byte (no EOS), so the number is the same whether the
documents come from shards or from the raw files they were built from. Modes:

- ``basic``: consecutive windows of the model's context; each byte sees only its own window.
- ``sliding``: windows advance by ``stride`` (default half the context); each byte is scored in
  the window that gives it the most context.
- ``strided``: two passes whose patch boundaries are offset by half a patch; each byte takes the
  prediction of the pass where it sits in the first half of its patch (the paper found the loss
  rises towards the end of a patch).
- ``sliding_strided``: both.
"""
from __future__ import annotations

import json
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch

from terrabyte.data_pipeline.errors import ConfigError, DataError
from terrabyte.data_pipeline.system import atomic_write

from .model import TerraByte, cross_entropy

log = logging.getLogger(__name__)

MODES = ("basic", "sliding", "strided", "sliding_strided")


@dataclass(frozen=True)
class Window:
    start: int  # document position of the window's first byte (negative: left padding)
    score_from: int  # document positions [score_from, score_to) are scored from this window
    score_to: int


def windows(n: int, context: int, stride: int) -> list[Window]:
    """Windows over a document of n bytes so that every byte is scored exactly once."""
    if n == 0:
        return []
    out, scored, start = [], 0, 0
    while scored < n:
        end = min(start + context, n)
        out.append(Window(start, scored, end))
        scored = end
        start += stride
    return out


def byte_log_probs(model: TerraByte, doc: torch.Tensor, mode: str, stride: int | None, batch: int) -> torch.Tensor:
    """Natural-log probability of each byte of ``doc`` (1-D ids) under the chosen mode."""
    context = model.context_length
    stride = context if mode in ("basic", "strided") else (stride or context // 2)
    if not 0 < stride <= context:
        raise ConfigError(f"--stride must be in 1..{context} (the model's context), got {stride}")
    plans = windows(len(doc), context, stride)
    first, first_pos = _score(model, doc, plans, shift=0, batch=batch)
    patch = model.unit_sizes[0]  # bytes per top-level patch
    half = patch // 2
    if mode in ("basic", "sliding") or half == 0:
        return first
    # the second pass sees every window moved back by half a patch (never before the document start)
    second, second_pos = _score(model, doc, plans, shift=half, batch=batch)
    use_second = (first_pos >= half) & (second_pos < half)
    return torch.where(use_second, second, first)


def _score(model: TerraByte, doc: torch.Tensor, plans: list[Window], shift: int, batch: int):
    """Per-byte log-probs, and each byte's position inside its patch, when every window starts
    ``shift`` bytes earlier (clamped at 0)."""
    context, device = model.context_length, model.to_logits.weight.device
    patch = model.unit_sizes[0]
    logps = torch.zeros(len(doc), dtype=torch.float64)
    # a shifted window ends before its last bytes: they keep position `patch`, so never chosen
    positions = torch.full((len(doc),), patch, dtype=torch.long)
    for i in range(0, len(plans), batch):
        chunk = plans[i : i + batch]
        starts = [max(0, w.start - shift) for w in chunk]
        x = torch.full((len(chunk), context), model.pad_id, dtype=torch.long)
        for row, (w, s) in enumerate(zip(chunk, starts)):
            piece = doc[s : s + context]
            x[row, : len(piece)] = piece
        x = x.to(device)
        with torch.no_grad():
            # the training loss, unreduced: PAD positions (past a document's end) come out 0, unscored
            logp = -cross_entropy(model(x), x, model.pad_id, reduction="none").view(x.shape).cpu().double()
        for row, (w, s) in enumerate(zip(chunk, starts)):
            lo, hi = w.score_from, min(w.score_to, s + context)
            logps[lo:hi] = logp[row, lo - s : hi - s]
            positions[lo:hi] = torch.arange(lo - s, hi - s) % patch
    return logps, positions


# --------------------------------------------------------------------------- documents


def documents(sources: list[str], split: str) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) from shard directories (with manifest.json) and raw files or directories."""
    for source in sources:
        path = Path(source)
        if (path / "manifest.json").is_file():
            from terrabyte.data_pipeline.loader import split_documents

            yield from split_documents(str(path), split)
        elif path.is_dir():
            for file in sorted(p for p in path.rglob("*") if p.is_file()):
                yield str(file.relative_to(path)), _read(file)
        elif path.is_file():
            yield path.name, _read(path)
        else:
            raise FileNotFoundError(f"--data {source} does not exist")


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise OSError(f"cannot read {path}: {exc.strerror}") from None


# --------------------------------------------------------------------------- CLI


def add_arguments(parser) -> None:
    parser.add_argument("--checkpoint", required=True, help="run directory, checkpoint folder or .safetensors file")
    parser.add_argument("--data", nargs="+", required=True, help="shard directories and/or raw files or directories")
    parser.add_argument("--split", default="val", help="shard split to score: train, val or all (default: val)")
    parser.add_argument("--mode", choices=MODES, default="basic", help="inference mode (default: basic)")
    parser.add_argument("--stride", type=int, default=None, help="sliding-window stride in bytes (default: context/2)")
    parser.add_argument("--batch", type=int, default=8, help="windows per forward pass")
    parser.add_argument("--max-bytes", type=int, default=None, help="stop after scoring this many bytes")
    parser.add_argument("--out", default=None, help="also write the JSON report here")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="fp32", help="weights: fp32 (default: reproducible numbers), bf16, "
                        "fp16, or auto (bf16 on GPU); log-probs are always taken in fp32")


def evaluate(model: TerraByte, docs: Iterable[tuple[str, bytes]], mode: str = "basic", stride: int | None = None,
             batch: int = 8, max_bytes: int | None = None) -> dict:
    from tqdm.auto import tqdm

    nats, count, ndocs, started = 0.0, 0, 0, time.perf_counter()
    bar = tqdm(desc=f"eval ({mode})", unit="B", unit_scale=True, file=sys.stderr)
    for _, data in docs:
        if max_bytes is not None and count >= max_bytes:
            break
        if max_bytes is not None:
            data = data[: max_bytes - count]
        if not data:
            continue
        ids = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
        nats -= float(byte_log_probs(model, ids, mode, stride, batch).sum())
        count += len(data)
        ndocs += 1
        bar.update(len(data))
    bar.close()
    if count == 0:
        raise DataError("no bytes to evaluate: the data holds no non-empty documents")
    return {
        "mode": mode,
        "stride": stride if mode.startswith("sliding") else None,
        "documents": ndocs,
        "bytes": count,
        "bits_per_byte": nats / count / math.log(2),
        "context_bytes": model.context_length,
        "seconds": round(time.perf_counter() - started, 3),
    }


def run(args) -> int:
    from .inference import DTYPES, load_model, resolve_dtype

    dtype = resolve_dtype(args.dtype, args.device)
    model = load_model(args.checkpoint, args.device, DTYPES[dtype])
    report = evaluate(model, documents(args.data, args.split), args.mode, args.stride, args.batch, args.max_bytes)
    report.update(checkpoint=str(args.checkpoint), data=[str(d) for d in args.data], split=args.split,
                  dtype=dtype)
    text = json.dumps(report, indent=2)
    sys.stdout.write(text + "\n")
    if args.out:
        atomic_write(args.out, text + "\n")
    return 0
