"""How well the model learns: ``terrabyte bench quality``.

Trains TerraByte and its baselines on the same ``ByteLoader`` stream of the config's data (the
standard-library shards of the default run unless ``data.path`` is set), with the same optimizer
settings as ``terrabyte pretrain`` (AdamW, decay on matrices only, warm-up then the config's
schedule, gradient clipping), and scores every model on the same validation bytes: the first
``data.val_sequences`` packed validation sequences, exactly what the trainer scores. Baselines
(``--baselines``): MEGABYTE-pytorch (lucidrains' reference implementation, when installed), a flat
transformer over bytes and one over BPE tokens trained on the run's own training bytes
(``baselines.py``: how they are built, how BPE is scored per byte, how FLOPs are counted).
``--patching space,entropy`` adds TerraByte with patches that follow the data (``model.patching``)
beside them, on the same rows: the config's shapes, ``max_seq_len[0]`` raised so a row may hold
``--patch-budget`` times as many patches as fixed ones (``context_bytes`` = the config's row).

Method:
- Every model sees every batch: each step trains one, then the next, so load from other processes
  on the machine slows all alike and their seconds per step compare.
- "Equal steps": validation bits per byte after ``--steps`` steps.
- "Equal wall-clock": each baseline trained again, alone, for as many steps as fit in TerraByte's
  measured training time at the baseline's own measured speed; "equal FLOPs": as many steps as fit
  in TerraByte's training FLOPs at the baseline's FLOPs per step. Each run's learning-rate schedule
  spans its own steps, so every model gets a complete schedule within the same budget.
- One seed is not a result: ``--seeds 0,1`` repeats everything per seed (model init and data order)
  and reports the mean and the spread (max - min).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from terrabyte.data_pipeline.basics.errors import ConfigError
from terrabyte.data_pipeline.basics.system import atomic_write, describe_machine

from ..train.config import Config, load_config
from .baselines import BytePairTokens, TokenGPT, train_step_flops, training_documents
from .common import (PEER_INSTALL, PLOT_INSTALL, build_megabyte, emit, megabyte_class, pyplot, save_figure,
                     with_sections)
from ..engine.engine import lr_lambda, param_groups
from ..model.stage import cross_entropy
from ..model.terrabyte import TerraByte

logger = logging.getLogger(__name__)

BASELINES = ("megabyte", "bytes", "bpe")
PATCHINGS = ("fixed", "space", "entropy")  # model.patching, trained beside the config's own
NAMES = {"megabyte": "MEGABYTE-pytorch", "bytes": "byte GPT", "bpe": "BPE GPT",
         **{p: f"TerraByte {p}" for p in PATCHINGS}}
REFERENCE = "TerraByte"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="tiny", help="config name or YAML path (default: tiny)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per model (default: the config's train.steps)")
    parser.add_argument("--seeds", default="0,1", help="comma-separated seeds (default: 0,1)")
    parser.add_argument("--eval-interval", type=int, default=None,
                        help="steps between validation points on the curves (default: the config's train.eval_interval)")
    parser.add_argument("--baselines", default=",".join(BASELINES),
                        help=f"comma-separated baselines from {','.join(BASELINES)} (default: all; megabyte only "
                             "when MEGABYTE-pytorch is installed)")
    parser.add_argument("--patching", default="", help=f"comma-separated patching schemes from {','.join(PATCHINGS)} "
                        "trained beside TerraByte as extra models (e.g. space,entropy; default: none), with the "
                        "baselines' equal wall-clock and FLOPs runs")
    parser.add_argument("--patch-budget", type=float, default=2.0,
                        help="--patching models: the most patches a row may have, in multiples of its fixed patch "
                             "count (default: 2)")
    parser.add_argument("--no-baseline", action="store_true", help="train TerraByte only")
    parser.add_argument("--no-equal-time", action="store_true", help="skip the equal-wall-clock baseline runs")
    parser.add_argument("--no-equal-flops", action="store_true", help="skip the equal-FLOPs baseline runs")
    parser.add_argument("--calibrate-steps", type=int, default=0, metavar="N",
                        help="baselines train only N steps beside TerraByte, spread over the run, enough to time "
                             "them on the same load and text, then only their equal wall-clock and FLOPs runs (no "
                             "equal-steps column for them; default: 0, every step)")
    parser.add_argument("--bpe-vocab", type=int, default=4096, help="BPE baseline: tokenizer vocabulary (default: 4096)")
    parser.add_argument("--bpe-train-bytes", type=int, default=8 << 20,
                        help="BPE baseline: training bytes its tokenizer learns from (default: 8 MiB)")
    parser.add_argument("--baseline-dim", type=int, default=256, help="flat baselines' width (default: 256)")
    parser.add_argument("--baseline-depth", type=int, default=6, help="flat baselines' blocks (default: 6)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--dir", default="runs/bench_quality", help="where the default shards, the curves and the PNG go")
    parser.add_argument("--out", metavar="FILE", help="also write the markdown table to FILE")
    parser.add_argument("--merge", nargs="+", metavar="JSON", default=None,
                        help="train nothing: print one table from earlier runs' quality.json files "
                             "(e.g. one process per seed, run side by side)")
    parser.add_argument("overrides", nargs=argparse.REMAINDER,
                        help="config overrides after `--`, e.g. -- --model.heads 8,8 --optim.lr 3e-3")


# ---------------------------------------------------------------- models


# A model's ``nats(model, x, pad_id)`` gives (summed nats, predictions, bytes) over a batch of byte
# rows: training minimises nats per prediction, validation reports nats per byte (the two differ
# only for the BPE baseline, whose predictions are tokens).


def _megabyte_nats(model, x: torch.Tensor, pad_id: int) -> tuple[torch.Tensor, int, int]:
    # its loss is the mean over non-PAD targets of bytes 0..n-1, each from the bytes before it
    count = int((x != pad_id).sum())
    return model(x, return_loss=True) * count, count, count


def _terrabyte_nats(model, x: torch.Tensor, pad_id: int) -> tuple[torch.Tensor, int, int]:
    count = int((x != pad_id).sum())
    if isinstance(model, TerraByte):  # chunked, and in training with the entropy model's gradient
        return model(x, return_loss="sum"), count, count
    return cross_entropy(model(x), x, pad_id, reduction="sum"), count, count


def patched_model_args(cfg: Config, scheme: str, budget: float) -> dict:
    """TerraByte's arguments for ``scheme`` on the config's rows: its shapes, with ``max_seq_len[0]``
    the most patches a row may have (``budget`` times the fixed count for a scheme that follows
    the data) and ``context_bytes`` the row."""
    m = cfg.model
    patch, row = math.prod(m.max_seq_len[1:]), m.seq_len
    fixed = math.ceil(row / patch)
    most = fixed if scheme == "fixed" else max(fixed + 1, math.ceil(budget * fixed))
    return dict(m.kwargs(), patching=scheme, max_seq_len=(most, *m.max_seq_len[1:]),
                context_bytes=None if most * patch == row else row,
                patch_threshold=m.patch_threshold if scheme == "entropy" else None)


@dataclass
class Contender:
    """One model in training: its optimizer, schedule and what was measured."""

    name: str
    model: torch.nn.Module
    nats: callable
    cfg: Config
    optimizer: torch.optim.Optimizer = None
    scheduler: object = None
    seconds: float = 0.0  # training time, evaluation excluded
    flops_per_step: int = 0  # forward + backward of one training step (baselines.train_step_flops)
    curve: list = field(default_factory=list)  # (step, seconds so far, train loss, val bpb or None)
    only_steps: Optional[frozenset] = None  # train at these steps of the shared loop only (--calibrate-steps)

    def __post_init__(self):
        o = self.cfg.optim
        self.optimizer = torch.optim.AdamW(param_groups(self.model, o.weight_decay), lr=o.lr,
                                           betas=(o.beta1, o.beta2), eps=o.eps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(self.cfg))

    @property
    def params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def step(self, micro_batches: list[torch.Tensor], pad_id: int) -> float:
        """One optimizer step as the trainer takes it: the mean of the micro-batches' mean losses."""
        started = time.perf_counter()
        self.model.train()
        total = 0.0
        for x in micro_batches:
            nats, count, _ = self.nats(self.model, x, pad_id)
            loss = nats / max(count, 1)
            (loss / len(micro_batches)).backward()
            total += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.seconds += time.perf_counter() - started
        return total / len(micro_batches)

    @torch.no_grad()
    def bits_per_byte(self, val_batches: list[torch.Tensor], pad_id: int) -> float:
        self.model.eval()
        nats = count = 0
        for x in val_batches:
            n, _, c = self.nats(self.model, x, pad_id)
            nats, count = nats + float(n), count + c
        return nats / count / math.log(2)


# ---------------------------------------------------------------- data


def _shards(cfg: Config, work_dir: Path) -> str:
    if cfg.data.path:
        return cfg.data.path
    from terrabyte.data_pipeline.stdlib_corpus import ensure_default_shards

    return ensure_default_shards(str(work_dir / "data"))


def _loader(cfg: Config, shards: str, split: str, seed: int, loop: bool):
    from terrabyte.data_pipeline.read.loader import ByteLoader

    return ByteLoader(shards, split=split, seq_len=cfg.model.seq_len, global_batch=cfg.train.global_batch,
                      micro_batch=cfg.train.micro_batch, seed=seed, loop=loop, vocab=_vocab(cfg))


def _vocab(cfg: Config):
    from terrabyte.data_pipeline.basics.vocab import Vocab

    return Vocab(cfg.model.num_tokens)


def validation_batches(cfg: Config, shards: str) -> list[torch.Tensor]:
    """The trainer's validation set on one rank: the first ``data.val_sequences`` sequences."""
    rows = []
    for batch in _loader(cfg, shards, "val", seed=cfg.run.seed, loop=False):
        rows.extend(batch)
        if len(rows) >= cfg.data.val_sequences:
            break
    if not rows:
        raise ConfigError(f"data {shards} has no validation sequences")
    rows = rows[: cfg.data.val_sequences]
    mb = cfg.train.micro_batch
    return [torch.stack(rows[i : i + mb]) for i in range(0, len(rows), mb)]


# ---------------------------------------------------------------- runs


def train(contenders: list[Contender], cfg: Config, shards: str, seed: int, val: list[torch.Tensor],
          eval_interval: int, progress) -> None:
    """``cfg.train.steps`` steps of every contender on one stream, alternating step by step."""
    pad_id = _vocab(cfg).pad_id
    accumulation = cfg.train.global_batch // cfg.train.micro_batch
    batches = iter(_loader(cfg, shards, "train", seed=seed, loop=True))
    for step in range(1, cfg.train.steps + 1):
        micro = [next(batches).long() for _ in range(accumulation)]
        for c in contenders:
            if c.only_steps is not None and step not in c.only_steps:
                continue
            loss = c.step(micro, pad_id)
            last = step == cfg.train.steps
            bpb = c.bits_per_byte(val, pad_id) if (step % eval_interval == 0 or last) and c.only_steps is None else None
            c.curve.append((step, c.seconds, loss, bpb))
        progress.update(1)


def _terrabyte(cfg: Config, seed: int) -> Contender:
    torch.manual_seed(seed)
    return Contender(REFERENCE, TerraByte(**cfg.model.kwargs()), _terrabyte_nats, cfg)


@dataclass(frozen=True)
class Baselines:
    """Which baselines train beside TerraByte, and what the flat ones are made of."""

    names: tuple = ()  # from BASELINES
    dim: int = 256
    depth: int = 6
    tokens: BytePairTokens = None  # the BPE baseline's tokenizer, trained once per run
    patch_budget: float = 2.0  # patching contenders: most patches per row / fixed patches per row

    def build(self, name: str, cfg: Config, seed: int) -> Contender:
        torch.manual_seed(seed)
        if name in PATCHINGS:
            model = TerraByte(**patched_model_args(cfg, name, self.patch_budget))
            return Contender(NAMES[name], model, _terrabyte_nats, cfg)
        if name == "megabyte":
            return Contender(NAMES[name], build_megabyte(cfg), _megabyte_nats, cfg)
        m = cfg.model
        dim_head = m.dim_head if isinstance(m.dim_head, int) else m.dim_head[0]
        if name == "bytes":
            model = TokenGPT(num_tokens=m.num_tokens, dim=self.dim, depth=self.depth, max_len=m.seq_len, dim_head=dim_head)
            return Contender(NAMES[name], model, _terrabyte_nats, cfg)
        tokens, byte_vocab = self.tokens, _vocab(cfg)
        model = TokenGPT(num_tokens=tokens.vocab.num_tokens, dim=self.dim, depth=self.depth, max_len=m.seq_len,
                         dim_head=dim_head)

        def bpe_nats(model, x: torch.Tensor, pad_id: int):
            # summed over the tokens, counted over the bytes they encode: bits per byte, like the rest
            ids = tokens.encode_rows(x, byte_vocab)
            predicted = int((ids != tokens.vocab.pad_id).sum())
            return (cross_entropy(model(ids), ids, tokens.vocab.pad_id, reduction="sum"), predicted,
                    int((x != pad_id).sum()))

        return Contender(NAMES[name], model, bpe_nats, cfg)


@dataclass
class SeedResult:
    seed: int
    curves: dict  # name -> curve
    params: dict  # name -> parameter count
    seconds_per_step: dict  # name -> mean training seconds per step
    final_bpb: dict  # name -> validation bpb after the steps
    equal_time: dict = field(default_factory=dict)  # name -> (steps, bpb) in TerraByte's training time
    flops_per_step: dict = field(default_factory=dict)  # name -> training FLOPs per step
    equal_flops: dict = field(default_factory=dict)  # name -> (steps, bpb) in TerraByte's training FLOPs
    budget_curves: dict = field(default_factory=dict)  # name -> curves of its runs retrained for a budget


# training steps whose FLOPs are counted and averaged, spread over the run: a BPE step's tokens vary
# with its text (seed 1's first 8 steps cost 1.7x the FLOPs of 8 spread ones), a byte model's do not
FLOPS_STEPS = 8


def spread(count: int, steps: int) -> frozenset:
    """``count`` steps of 1..steps spread evenly over them, the first included: where a baseline is
    timed (``--calibrate-steps``) and its FLOPs counted, so neither rests on one stretch of text."""
    count = min(count, steps)
    return frozenset(1 + (i * steps) // count for i in range(count))


def _sample_steps(cfg: Config, shards: str, seed: int, count: int = FLOPS_STEPS) -> list[list[torch.Tensor]]:
    """``count`` training steps of the stream spread over the run (``spread``), each a list of
    micro-batches."""
    accumulation = cfg.train.global_batch // cfg.train.micro_batch
    batches = iter(_loader(cfg, shards, "train", seed=seed, loop=True))
    wanted, out = spread(count, cfg.train.steps), []
    for step in range(1, max(wanted) + 1):
        micro = [next(batches).long() for _ in range(accumulation)]
        if step in wanted:
            out.append(micro)
    return out


def mean_step_flops(model, nats, steps: list[list[torch.Tensor]], pad_id: int) -> int:
    """Training FLOPs per step, the mean over ``steps``."""
    return sum(train_step_flops(model, nats, step, pad_id) for step in steps) // len(steps)


def _learns_its_patches(model) -> bool:
    patcher = getattr(model, "patcher", None)
    return patcher is not None and patcher.entropy_model is not None


def run_seed(cfg: Config, shards: str, seed: int, baselines: Baselines, eval_interval: int,
             val: list[torch.Tensor], equal_time: bool = True, equal_flops: bool = True,
             calibrate_steps: int = 0) -> SeedResult:
    from tqdm.auto import tqdm

    contenders = [_terrabyte(cfg, seed)] + [baselines.build(n, cfg, seed) for n in baselines.names]
    for c in contenders[1:]:
        c.only_steps = spread(calibrate_steps, cfg.train.steps) if calibrate_steps else None
    pad_id = _vocab(cfg).pad_id
    first = _sample_steps(cfg, shards, seed)
    for c in contenders:
        c.flops_per_step = mean_step_flops(c.model, c.nats, first, pad_id)
    with tqdm(total=cfg.train.steps, desc=f"seed {seed}", unit="step", file=sys.stderr) as bar:
        train(contenders, cfg, shards, seed, val, eval_interval, bar)
    for c in contenders:
        if _learns_its_patches(c.model):
            # its patches shorten as the entropy model learns: the mean of the counts before and after
            c.flops_per_step = (c.flops_per_step + mean_step_flops(c.model, c.nats, first, pad_id)) // 2
    steps = cfg.train.steps
    result = SeedResult(seed, {c.name: c.curve for c in contenders}, {c.name: c.params for c in contenders},
                        {c.name: c.seconds / len(c.curve) for c in contenders}, {c.name: c.curve[-1][3] for c in contenders},
                        flops_per_step={c.name: c.flops_per_step for c in contenders})
    reference = contenders[0]
    budgets = []
    if equal_time:
        budgets.append((result.equal_time, lambda c: reference.seconds / (c.seconds / len(c.curve))))
    if equal_flops:
        budgets.append((result.equal_flops, lambda c: reference.flops_per_step * steps / c.flops_per_step))
    for name, c in zip(baselines.names, contenders[1:]):
        # steps -> bpb of a run with a schedule over them (a calibrated baseline has none yet)
        scored = {} if c.only_steps is not None else {steps: result.final_bpb[c.name]}
        for table, steps_in_budget in budgets:
            n = max(1, round(steps_in_budget(c)))
            if n not in scored:
                again = baselines.build(name, with_sections(cfg, train={"steps": n}), seed)
                with tqdm(total=n, desc=f"seed {seed}, {c.name}, {n} steps", unit="step", file=sys.stderr) as bar:
                    train([again], again.cfg, shards, seed, val, eval_interval, bar)
                scored[n] = again.curve[-1][3]
                result.budget_curves.setdefault(c.name, []).append(again.curve)
            table[c.name] = (n, scored[n])
    for table, _ in budgets:
        table[reference.name] = (steps, result.final_bpb[reference.name])
    return result


# ---------------------------------------------------------------- report


def _mean_spread(values: list[float]) -> str:
    mean = sum(values) / len(values)
    return f"{mean:.3f}" if len(values) == 1 else f"{mean:.3f} ± {(max(values) - min(values)) / 2:.3f}"


def _budget_cells(results: list[SeedResult], name: str, key: str) -> tuple[str, str]:
    runs = [getattr(r, key)[name] for r in results if name in getattr(r, key)]
    if not runs:
        return "", ""
    return _mean_spread([b for _, b in runs]), " / ".join(str(s) for s, _ in runs)


def format_table(results: list[SeedResult], steps: int) -> str:
    names = list(results[0].final_bpb)
    seeds = ", ".join(str(r.seed) for r in results)
    lines = [f"| model | parameters | GFLOP/step | s/step | val bpb @ {steps} steps (seeds {seeds}) | per seed "
             f"| val bpb @ equal wall-clock | steps in that time | val bpb @ equal FLOPs | steps in those FLOPs |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name in names:
        finals = [r.final_bpb[name] for r in results]
        per_seed = "—" if None in finals else " / ".join(f"{b:.3f}" for b in finals)
        sps = _mean_spread([r.seconds_per_step[name] for r in results])
        flops = [r.flops_per_step[name] for r in results if name in r.flops_per_step]
        gflops = f"{sum(flops) / len(flops) / 1e9:.2f}" if flops else ""
        eq_time = _budget_cells(results, name, "equal_time")
        eq_flops = _budget_cells(results, name, "equal_flops")
        lines.append(f"| {name} | {results[0].params[name] / 1e6:.2f}M | {gflops} | {sps} | "
                     f"{'—' if None in finals else _mean_spread(finals)} | {per_seed} | {eq_time[0]} | "
                     f"{eq_time[1]} | {eq_flops[0]} | {eq_flops[1]} |")
    lines.append("")
    for other in names[1:]:
        parts = [] if any(r.final_bpb[other] is None for r in results) else [
            f"{_mean_spread([r.final_bpb[REFERENCE] - r.final_bpb[other] for r in results])} at equal steps"]
        for key, label in (("equal_time", "wall-clock"), ("equal_flops", "FLOPs")):
            if all(other in getattr(r, key) for r in results):
                d = [getattr(r, key)[REFERENCE][1] - getattr(r, key)[other][1] for r in results]
                parts.append(f"{_mean_spread(d)} at equal {label}")
        lines.append(f"{REFERENCE} - {other}: " + ", ".join(parts) + " bpb.")
    if len(names) > 1:
        lines.append("(negative: TerraByte better; ± is half the spread over seeds. FLOPs: forward + backward of "
                     f"a training step counted by torch.utils.flop_counter, the mean over {FLOPS_STEPS} steps spread "
                     "over the run, the same way for every model.)")
    return "\n".join(lines) + "\n"


def plot(results: list[SeedResult], path: Path) -> bool:
    """Training loss and validation bits per byte against steps, seconds and training FLOPs, every
    model and seed; False without matplotlib."""
    plt = pyplot()
    if plt is None:
        return False
    fig, (by_step, by_time, by_flops) = plt.subplots(1, 3, figsize=(17, 4.5))
    colors = {}
    for r in results:
        # the runs beside TerraByte (solid), then the baselines retrained for its budgets (dashed; a
        # calibrated baseline has only these)
        runs = [(name, name, curve, "o-") for name, curve in r.curves.items()]
        runs += [(name, f"{name}, {curve[-1][0]} steps", curve, "s--")
                 for name, curves in r.budget_curves.items() for curve in curves]
        for name, label, curve, style in runs:
            color = colors.setdefault(name, f"C{len(colors)}")
            steps, seconds, losses, bpbs = zip(*curve)
            flops = [step * r.flops_per_step.get(name, 0) for step in steps]
            # the BPE baseline's training loss is per token: only validation points are per byte
            bits = [loss / math.log(2) for loss in losses]
            val = [(s, t, f, b) for s, t, f, b in zip(steps, seconds, flops, bpbs) if b is not None]
            for i, ax in enumerate((by_step, by_time, by_flops)):
                x = (steps, seconds, flops)[i]
                if name != NAMES["bpe"] and style == "o-":
                    ax.plot(x, bits, color=color, alpha=0.35, lw=0.8)
                if val:
                    ax.plot([v[i] for v in val], [v[3] for v in val], style, color=color,
                            label=f"{label} seed {r.seed} (val)")
    for ax, xlabel in ((by_step, "optimizer step"), (by_time, "training seconds"),
                       (by_flops, "training FLOPs (forward + backward)")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("bits per byte (train: faint, validation: dots)")
        ax.grid(alpha=0.3)
        ax.set_ylim(top=min(6.0, ax.get_ylim()[1]))
    by_step.legend(fontsize=7)
    save_figure(fig, path)
    return True


def _parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds {text!r} must be comma-separated integers, e.g. 0,1") from None
    if not seeds:
        raise ConfigError("--seeds needs at least one seed")
    return seeds


def _parse_baselines(text: str, flag: str = "--baselines", known: tuple = BASELINES) -> tuple:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ConfigError(f"{flag} {text!r}: unknown {unknown}; choose from {','.join(known)}")
    return tuple(dict.fromkeys(names))


def _patching_note(cfg: Config, patchings: tuple, budget: float) -> str:
    if not patchings:
        return ""
    shapes = ", ".join(f"{NAMES[p]}: max_seq_len {list(patched_model_args(cfg, p, budget)['max_seq_len'])}"
                       for p in patchings)
    note = (" Entropy patches shorten as their model learns: their FLOPs per step are the mean of "
            f"{FLOPS_STEPS} steps' counts (spread over the run) before and after training." if "entropy" in patchings else "")
    return (f" TerraByte is model.patching={cfg.model.patching}; beside it, on the same {cfg.model.seq_len}-byte rows, "
            f"{shapes}.{note}")


def merge(paths: list[str]) -> list[SeedResult]:
    """The seeds of earlier runs (their quality.json files), in seed order; one steps count."""
    results = []
    for path in paths:
        try:
            results += [SeedResult(**r) for r in json.loads(Path(path).read_text())]
        except (OSError, ValueError, TypeError) as exc:
            raise ConfigError(f"--merge {path}: not a quality.json written by this benchmark ({exc})") from None
    steps = {len(r.curves["TerraByte"]) for r in results}
    if len(steps) != 1:
        raise ConfigError(f"--merge: the runs trained for different numbers of steps {sorted(steps)}")
    return sorted(results, key=lambda r: r.seed)


def run(args) -> int:
    if args.merge:
        results = merge(args.merge)
        table = format_table(results, len(results[0].curves["TerraByte"]))
        png = Path(args.dir) / "quality.png"
        table += f"\nLoss curves: {png}\n" if plot(results, png) else f"\n(no PNG: `{PLOT_INSTALL}`)\n"
        emit(table, args.out)
        return 0
    overrides = [a for a in (args.overrides or []) if a != "--"]
    cfg = load_config(args.config, overrides)
    if args.steps is not None:
        if args.steps < 1:
            raise ConfigError(f"--steps must be at least 1, got {args.steps}")
        cfg = with_sections(cfg, train={"steps": args.steps})
    seeds = _parse_seeds(args.seeds)
    eval_interval = args.eval_interval or cfg.train.eval_interval
    if eval_interval < 1:
        raise ConfigError(f"--eval-interval must be at least 1, got {eval_interval}")
    if args.threads:
        torch.set_num_threads(args.threads)
    names = () if args.no_baseline else _parse_baselines(args.baselines)
    patchings = tuple(p for p in _parse_baselines(args.patching, "--patching", PATCHINGS) if p != cfg.model.patching)
    if args.calibrate_steps < 0 or args.calibrate_steps >= cfg.train.steps:
        raise ConfigError(f"--calibrate-steps must be 0 (off) or 1..{cfg.train.steps - 1}, got {args.calibrate_steps}")
    if args.patch_budget < 1:
        raise ConfigError(f"--patch-budget must be at least 1, got {args.patch_budget}")
    if "megabyte" in names and megabyte_class() is None:
        logger.warning("MEGABYTE-pytorch is not installed: training without it. To compare, install it "
                       "with `%s`", PEER_INSTALL)
        names = tuple(n for n in names if n != "megabyte")
    work = Path(args.dir)
    shards = _shards(cfg, work)
    val = validation_batches(cfg, shards)
    baselines = Baselines(names + patchings, args.baseline_dim, args.baseline_depth, patch_budget=args.patch_budget)
    bpe_note = ""
    if "bpe" in names:
        if args.bpe_train_bytes < 1:
            raise ConfigError(f"--bpe-train-bytes must be at least 1, got {args.bpe_train_bytes}")
        docs = training_documents(_loader(cfg, shards, "train", seed=cfg.run.seed, loop=False), _vocab(cfg),
                                  args.bpe_train_bytes)
        tokens = BytePairTokens(docs, args.bpe_vocab)
        baselines = dataclasses.replace(baselines, tokens=tokens)
        bpe_note = (f" BPE GPT: {tokens.vocab.num_tokens:,}-token byte-level BPE trained on the first "
                    f"{sum(map(len, docs)):,} training bytes, {tokens.bytes_per_token(val, _vocab(cfg)):.2f} "
                    f"validation bytes per token.")
    results = [run_seed(cfg, shards, s, baselines, eval_interval, val, equal_time=not args.no_equal_time,
                        equal_flops=not args.no_equal_flops, calibrate_steps=args.calibrate_steps) for s in seeds]

    val_bytes = sum(int((x != _vocab(cfg).pad_id).sum()) for x in val)
    header = (f"### {datetime.date.today().isoformat()} — {describe_machine()}\n\n"
              f"`terrabyte bench quality --config {args.config} --steps {cfg.train.steps} --seeds {args.seeds}"
              + (f" -- {' '.join(overrides)}" if overrides else "") + "`: "
              f"batch {cfg.train.global_batch} x {cfg.model.seq_len} B, AdamW lr {cfg.optim.lr:g} "
              f"({cfg.optim.warmup_steps} warm-up steps, {cfg.optim.schedule} to {cfg.optim.min_lr_ratio:g}), "
              f"clip {cfg.train.grad_clip:g}; validation: {val_bytes:,} bytes."
              + (f" Flat baselines: {args.baseline_depth} blocks x {args.baseline_dim}." if {"bytes", "bpe"} & set(names)
                 else "") + bpe_note + _patching_note(cfg, patchings, args.patch_budget) + "\n\n")
    table = header + format_table(results, cfg.train.steps)
    png = work / "quality.png"
    if plot(results, png):
        table += f"\nLoss curves: {png}\n"
    else:
        table += f"\n(no PNG: matplotlib is not installed; `{PLOT_INSTALL}`)\n"
    sys.stdout.write(table)
    atomic_write(work / "quality.json", json.dumps([dataclasses.asdict(r) for r in results], indent=1))
    if args.out:
        atomic_write(args.out, table)
    return 0
