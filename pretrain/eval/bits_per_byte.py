"""Bits-per-byte evaluation with the MEGABYTE paper's inference modes (Yu et al. 2023, Table 11).

Each document is scored on its own, byte by byte (no EOS), so the number is the same whether the
documents come from shards or from the raw files they were built from. Modes:

- ``basic``: consecutive windows of the model's context; each byte sees only its own window.
- ``sliding``: windows advance by ``stride`` (default half the context); each byte is scored in
  the window that gives it the most context.
- ``strided``: two passes whose patch boundaries are offset by half a patch; each byte takes the
  prediction of the pass where it sits in the first half of its patch (the paper found the loss
  rises towards the end of a patch). Patches that follow the data (``model.patching`` space or
  entropy) have no fixed offset to move: one pass, as ``basic``.
- ``sliding_strided``: both.

``--context`` sets the window: ``full`` (default) the model's whole context, so a document up to that
length is scored as ONE context; or a smaller number of bytes. A batch is padded only to its longest
window, and the model scores it with ``return_loss="none"``: lower stages in chunks, no logits
tensor, so memory follows the window, not the model's context. The report splits bits-per-byte by
the byte's position inside its window (first 8 KiB, 8-64 KiB, 64-512 KiB, ...): does the far
context help?
"""
from __future__ import annotations

import json
import logging
import math
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch

from terrabyte.data_pipeline.basics.errors import ConfigError, DataError
from terrabyte.data_pipeline.basics.system import atomic_path, atomic_write

from ..model.terrabyte import TerraByte

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


# bits-per-byte by position inside the window: [0, 8 KiB), [8, 64 KiB), ... growing 8x
FIRST_BUCKET = 8192
BUCKET_GROWTH = 8


def resolve_context(value: str | int | None, model: TerraByte) -> int:
    """``--context``: ``full`` (or None) is the model's context; a number of bytes at most that."""
    if value is None or value == "full":
        return model.context_length
    try:
        context = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"--context {value!r} must be 'full' or a number of bytes") from None
    if not 0 < context <= model.context_length:
        raise ConfigError(f"--context {context} must be in 1..{model.context_length} (the model's context)")
    return context


def byte_log_probs(model: TerraByte, doc: torch.Tensor, mode: str, stride: int | None, batch: int,
                   context: int | None = None) -> torch.Tensor:
    """Natural-log probability of each byte of ``doc`` (1-D ids) under the chosen mode."""
    return score_document(model, doc, mode, stride, batch, context)[0]


def score_document(model: TerraByte, doc: torch.Tensor, mode: str, stride: int | None, batch: int,
                   context: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``byte_log_probs`` and each byte's position inside the window it was scored in."""
    context = model.context_length if context is None else context
    stride = context if mode in ("basic", "strided") else (stride or context // 2)
    if not 0 < stride <= context:
        raise ConfigError(f"--stride must be in 1..{context} (the evaluation context), got {stride}")
    plans = windows(len(doc), context, stride)
    first, first_pos = _score(model, doc, plans, shift=0, batch=batch, context=context)
    patch = model.unit_sizes[0]  # bytes per top-level patch
    # patches that follow the data have no fixed offset in the window to move: one pass
    half = 0 if model.patcher.dynamic else patch // 2
    if mode in ("basic", "sliding") or half == 0:
        return first, first_pos
    # the second pass sees every window moved back by half a patch (never before the document start)
    second, second_pos = _score(model, doc, plans, shift=half, batch=batch, context=context)
    use_second = (first_pos % patch >= half) & (second_pos % patch < half) & (second_pos >= 0)
    return torch.where(use_second, second, first), torch.where(use_second, second_pos, first_pos)


def _score(model: TerraByte, doc: torch.Tensor, plans: list[Window], shift: int, batch: int, context: int):
    """Per-byte log-probs, and each byte's position inside its window, when every window starts
    ``shift`` bytes earlier (clamped at 0)."""
    device = model.to_logits.weight.device
    patch = model.unit_sizes[0]
    logps = torch.zeros(len(doc), dtype=torch.float64)
    # a shifted window ends before its last bytes: they keep position -1, so never chosen
    positions = torch.full((len(doc),), -1, dtype=torch.int32)
    for i in range(0, len(plans), batch):
        chunk = plans[i : i + batch]
        starts = [max(0, w.start - shift) for w in chunk]
        longest = max(len(doc[s : s + context]) for s in starts)
        width = min(patch * math.ceil(longest / patch), model.context_length)  # whole patches, where fixed
        x = torch.full((len(chunk), width), model.pad_id, dtype=torch.long)
        for row, (w, s) in enumerate(zip(chunk, starts)):
            piece = doc[s : s + context]
            x[row, : len(piece)] = piece
        x = x.to(device)
        with torch.no_grad():
            # the training loss, unreduced and chunked: PAD positions (past a document's end) are 0
            logp = -model(x, return_loss="none").cpu().double()
        for row, (w, s) in enumerate(zip(chunk, starts)):
            lo, hi = w.score_from, min(w.score_to, s + context)
            logps[lo:hi] = logp[row, lo - s : hi - s]
            positions[lo:hi] = torch.arange(lo - s, hi - s, dtype=torch.int32)
    return logps, positions


def bucket_edges(context: int) -> list[int]:
    edges = [0, FIRST_BUCKET]
    while edges[-1] < context:
        edges.append(edges[-1] * BUCKET_GROWTH)
    return [min(e, context) for e in edges]


class PositionBuckets:
    """Nats and bytes by position inside the window, summed over documents."""

    def __init__(self, context: int):
        self.edges = bucket_edges(context)
        self.nats = [0.0] * (len(self.edges) - 1)
        self.bytes = [0] * (len(self.edges) - 1)

    def add(self, logps: torch.Tensor, positions: torch.Tensor) -> None:
        index = torch.bucketize(positions.long(), torch.tensor(self.edges[1:-1]), right=True)
        self.nats = [a - b for a, b in zip(self.nats, torch.zeros(len(self.nats), dtype=torch.float64)
                                           .index_add_(0, index, logps).tolist())]
        self.bytes = [a + b for a, b in zip(self.bytes, torch.bincount(index, minlength=len(self.bytes)).tolist())]

    def report(self) -> list[dict]:
        return [{"from": lo, "to": hi, "bytes": n, "bits_per_byte": nats / n / math.log(2) if n else None}
                for lo, hi, n, nats in zip(self.edges, self.edges[1:], self.bytes, self.nats)]


# --------------------------------------------------------------------------- documents


def documents(sources: list[str], split: str) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) from shard directories (with manifest.json) and raw files or directories."""
    for source in sources:
        path = Path(source)
        if (path / "manifest.json").is_file():
            from terrabyte.data_pipeline.read.loader import split_documents

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
    from .generate_cli import add_trust_argument

    parser.add_argument("--checkpoint", required=True, help="run directory, checkpoint folder or .safetensors file")
    add_trust_argument(parser)
    parser.add_argument("--data", nargs="+", action="extend", default=None, metavar="[NAME=]PATH",
                        help="shard directories and/or raw files or directories (repeatable); several, or any "
                             "NAME=PATH, are scored one source each: one row per source and their total")
    parser.add_argument("--tasks", default=None, help="lm-evaluation-harness tasks instead of --data, comma "
                        "separated (needs the `eval` extra: pip install 'terrabyte[eval]')")
    parser.add_argument("--include-path", default=None, help="with --tasks: a directory of extra task YAMLs")
    parser.add_argument("--no-default-tasks", action="store_true",
                        help="with --tasks: index only --include-path, not lm-eval's built-in tasks (faster start)")
    parser.add_argument("--num-fewshot", type=int, default=None, help="with --tasks: few-shot examples per task")
    parser.add_argument("--limit", type=float, default=None, help="with --tasks: documents per task (or a fraction)")
    parser.add_argument("--seed", type=int, default=0, help="with --tasks: lm-eval's and sampling's seed")
    parser.add_argument("--split", default="val", help="shard split to score: train, val, test or all (default: val)")
    parser.add_argument("--mode", choices=MODES, default="basic", help="inference mode (default: basic)")
    parser.add_argument("--stride", type=int, default=None, help="sliding-window stride in bytes (default: context/2)")
    parser.add_argument("--batch", type=int, default=8, help="windows per forward pass")
    parser.add_argument("--max-bytes", type=int, default=None, help="stop after scoring this many bytes")
    parser.add_argument("--context", default="full",
                        help="window in bytes, or 'full' (default): the model's whole context, so each document "
                             "up to that length is scored as one context")
    parser.add_argument("--out", default=None, help="also write the JSON report here (and its plot beside it)")
    parser.add_argument("--plot", default=None, help="PNG of bits-per-byte by position (default: --out with .png)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="fp32", help="weights: fp32 (default: reproducible numbers), bf16, "
                        "fp16, or auto (bf16 on GPU); log-probs are always taken in fp32")


def evaluate(model: TerraByte, docs: Iterable[tuple[str, bytes]], mode: str = "basic", stride: int | None = None,
             batch: int = 8, max_bytes: int | None = None, context: str | int | None = None) -> dict:
    from tqdm.auto import tqdm

    context = resolve_context(context, model)
    buckets = PositionBuckets(context)
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
        logps, positions = score_document(model, ids, mode, stride, batch, context)
        nats -= float(logps.sum())
        buckets.add(logps, positions)
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
        "context_bytes": context,
        "model_context_bytes": model.context_length,
        "by_position": buckets.report(),
        "seconds": round(time.perf_counter() - started, 3),
    }


def plot_positions(report: dict, path: Path) -> bool:
    """Bits-per-byte against position inside the window (log x); False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [r for r in report["by_position"] if r["bytes"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.step([max(r["from"], 1) for r in rows] + [rows[-1]["to"]], [r["bits_per_byte"] for r in rows]
            + [rows[-1]["bits_per_byte"]], where="post")
    ax.set_xscale("log")
    ax.set_xlabel("position inside the context (bytes)")
    ax.set_ylabel("bits per byte")
    ax.set_title(f"{report['documents']} documents, {report['bytes']:,} bytes, context {report['context_bytes']:,}")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return True


def named_sources(data: list[str]) -> dict[str, str] | None:
    """``--data`` as {name: path} when it asks for one score per source (several entries, or any
    ``NAME=PATH``), else None. An unnamed entry is named by its path."""
    named = {}
    for entry in data:
        name, sep, path = entry.partition("=")
        if not (sep and re.fullmatch(r"[\w.-]+", name) and not Path(entry).exists()):
            name, path = entry, entry
        if name in named:
            raise ConfigError(f"--data names source {name!r} twice: give each NAME=PATH a different name")
        named[name] = path
    return named if len(named) > 1 or any(k != v for k, v in named.items()) else None


def merge_reports(reports: dict[str, dict]) -> dict:
    """The sources' reports as one: every byte counted once (bits per byte of all of them together)."""
    parts = list(reports.values())
    total = sum(r["bytes"] for r in parts)
    out = dict(parts[0], documents=sum(r["documents"] for r in parts), bytes=total,
               bits_per_byte=sum(r["bits_per_byte"] * r["bytes"] for r in parts) / total,
               seconds=round(sum(r["seconds"] for r in parts), 3))
    rows = []
    for i, row in enumerate(parts[0]["by_position"]):
        n = sum(r["by_position"][i]["bytes"] for r in parts)
        bits = sum((r["by_position"][i]["bits_per_byte"] or 0) * r["by_position"][i]["bytes"] for r in parts)
        rows.append(dict(row, bytes=n, bits_per_byte=bits / n if n else None))
    out["by_position"] = rows
    return out


def source_table(reports: dict[str, dict], total: dict) -> str:
    width = max(len("source"), *map(len, reports))
    lines = [f"{'source':<{width}}  {'documents':>9}  {'bytes':>13}  bits_per_byte"]
    for name, r in [*reports.items(), ("total", total)]:
        lines.append(f"{name:<{width}}  {r['documents']:>9,}  {r['bytes']:>13,}  {r['bits_per_byte']:.4f}")
    return "\n".join(lines) + "\n"


def run(args) -> int:
    from .generate_cli import DTYPES, load_model, resolve_dtype

    if not args.data or getattr(args, "tasks", None):
        raise ConfigError("give --data (bits per byte of shards or files) or --tasks (lm-evaluation-harness), one of them")
    sources = named_sources(args.data)
    dtype = resolve_dtype(args.dtype, args.device)
    model = load_model(args.checkpoint, args.device, DTYPES[dtype], args.trust_checkpoint)
    if sources is None:
        report = evaluate(model, documents(args.data, args.split), args.mode, args.stride, args.batch, args.max_bytes,
                          args.context)
    else:  # one score per source (--max-bytes applies to each), then all of them together
        per = {}
        for name, path in sources.items():
            try:
                per[name] = evaluate(model, documents([path], args.split), args.mode, args.stride, args.batch,
                                     args.max_bytes, args.context)
            except (DataError, ConfigError) as exc:
                raise type(exc)(f"--data {name}={path}: {exc}") from None
        report = merge_reports(per)
        report["sources"] = {name: dict(r, data=sources[name]) for name, r in per.items()}
    report.update(checkpoint=str(args.checkpoint), data=[str(d) for d in args.data], split=args.split,
                  dtype=dtype)
    text = json.dumps(report, indent=2)
    sys.stdout.write(text + "\n" if sources is None else source_table(per, report))
    if args.out:
        atomic_write(args.out, text + "\n")
    plot = args.plot or (str(Path(args.out).with_suffix(".png")) if args.out else None)
    if plot and not plot_positions(report, Path(plot)):
        log.warning("no plot: matplotlib is not installed (`pip install matplotlib`)")
    return 0

