"""How well the model learns: ``terrabyte bench quality``.

Trains TerraByte and, when it is installed, MEGABYTE-pytorch (lucidrains' reference implementation)
on the same ``ByteLoader`` stream of the config's data (the standard-library shards of the default
run unless ``data.path`` is set), for the same number of steps with the same optimizer settings as
``terrabyte pretrain`` (AdamW, decay on matrices only, warm-up then the config's schedule, gradient
clipping), and scores both on the same validation bytes: the first ``data.val_sequences`` packed
validation sequences, exactly what the trainer scores.

Method:
- Both models see every batch: each step trains one, then the other, so load from other processes
  on the machine slows both alike and their seconds per step compare.
- "Equal steps": validation bits per byte after ``--steps`` steps.
- "Equal time": TerraByte trained again, alone, for as many steps as fit in MEGABYTE-pytorch's
  measured training time at TerraByte's measured speed (its learning-rate schedule spans those
  steps), so each model gets a complete schedule in the same wall-clock budget.
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

from terrabyte.data_pipeline.errors import ConfigError
from terrabyte.data_pipeline.system import atomic_write, describe_machine

from .args import Config, load_config
from .bench_model import megabyte_class
from .engine import lr_lambda, param_groups
from .model import TerraByte, cross_entropy

logger = logging.getLogger(__name__)

PEER_INSTALL = "pip install megabyte-pytorch --no-deps beartype"
PLOT_INSTALL = "pip install matplotlib"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="tiny", help="config name or YAML path (default: tiny)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per model (default: the config's train.steps)")
    parser.add_argument("--seeds", default="0,1", help="comma-separated seeds (default: 0,1)")
    parser.add_argument("--eval-interval", type=int, default=None,
                        help="steps between validation points on the curves (default: the config's train.eval_interval)")
    parser.add_argument("--no-baseline", action="store_true", help="train TerraByte only, even if MEGABYTE-pytorch is installed")
    parser.add_argument("--no-equal-time", action="store_true", help="skip the equal-wall-clock TerraByte runs")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--dir", default="runs/bench_quality", help="where the default shards, the curves and the PNG go")
    parser.add_argument("--out", metavar="FILE", help="also write the markdown table to FILE")
    parser.add_argument("--merge", nargs="+", metavar="JSON", default=None,
                        help="train nothing: print one table from earlier runs' quality.json files "
                             "(e.g. one process per seed, run side by side)")
    parser.add_argument("overrides", nargs=argparse.REMAINDER,
                        help="config overrides after `--`, e.g. -- --model.heads 8,8 --optim.lr 3e-3")


# ---------------------------------------------------------------- models


def build_megabyte(cfg: Config):
    """MEGABYTE-pytorch with the config's shapes: same dims, depths, patching, heads of the same
    width (its heads are one number for all stages: the global stage's), rotary positions and SDPA.
    Its vocabulary covers our PAD and EOS ids, with PAD as its ignored id."""
    m = cfg.model
    heads = m.heads if isinstance(m.heads, int) else m.heads[0]
    dim_head = m.dim_head if isinstance(m.dim_head, int) else m.dim_head[0]
    ff_mult = m.ff_mult if isinstance(m.ff_mult, (int, float)) else m.ff_mult[0]
    ff_mult = int(ff_mult) if float(ff_mult).is_integer() else ff_mult  # it sizes nn.Linear with dim * mult
    vocab = _vocab(cfg)
    return megabyte_class()(num_tokens=vocab.size, dim=tuple(m.dim), depth=tuple(m.depth),
                            max_seq_len=tuple(m.max_seq_len), dim_head=dim_head, heads=heads, ff_mult=ff_mult,
                            pad_id=vocab.pad_id, rel_pos=True, flash_attn=True)


def _megabyte_nats(model, x: torch.Tensor, pad_id: int) -> tuple[torch.Tensor, int]:
    # its loss is the mean over non-PAD targets of bytes 0..n-1, each from the bytes before it
    count = int((x != pad_id).sum())
    return model(x, return_loss=True) * count, count


def _terrabyte_nats(model, x: torch.Tensor, pad_id: int) -> tuple[torch.Tensor, int]:
    return cross_entropy(model(x), x, pad_id, reduction="sum"), int((x != pad_id).sum())


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
    curve: list = field(default_factory=list)  # (step, seconds so far, train loss, val bpb or None)

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
            nats, count = self.nats(self.model, x, pad_id)
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
            n, c = self.nats(self.model, x, pad_id)
            nats, count = nats + float(n), count + c
        return nats / count / math.log(2)


# ---------------------------------------------------------------- data


def _shards(cfg: Config, work_dir: Path) -> str:
    if cfg.data.path:
        return cfg.data.path
    from terrabyte.data_pipeline.stdlib_corpus import ensure_default_shards

    return ensure_default_shards(str(work_dir / "data"))


def _loader(cfg: Config, shards: str, split: str, seed: int, loop: bool):
    from terrabyte.data_pipeline.loader import ByteLoader

    return ByteLoader(shards, split=split, seq_len=cfg.model.seq_len, global_batch=cfg.train.global_batch,
                      micro_batch=cfg.train.micro_batch, seed=seed, loop=loop, vocab=_vocab(cfg))


def _vocab(cfg: Config):
    from terrabyte.data_pipeline.vocab import Vocab

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


def _with(cfg: Config, **sections) -> Config:
    """A copy of ``cfg`` with some keys of some sections replaced, e.g. train={"steps": 10}."""
    return dataclasses.replace(cfg, **{name: dataclasses.replace(getattr(cfg, name), **values)
                                       for name, values in sections.items()})


def train(contenders: list[Contender], cfg: Config, shards: str, seed: int, val: list[torch.Tensor],
          eval_interval: int, progress) -> None:
    """``cfg.train.steps`` steps of every contender on one stream, alternating step by step."""
    pad_id = _vocab(cfg).pad_id
    accumulation = cfg.train.global_batch // cfg.train.micro_batch
    batches = iter(_loader(cfg, shards, "train", seed=seed, loop=True))
    for step in range(1, cfg.train.steps + 1):
        micro = [next(batches).long() for _ in range(accumulation)]
        for c in contenders:
            loss = c.step(micro, pad_id)
            bpb = c.bits_per_byte(val, pad_id) if step % eval_interval == 0 or step == cfg.train.steps else None
            c.curve.append((step, c.seconds, loss, bpb))
        progress.update(1)


def _terrabyte(cfg: Config, seed: int) -> Contender:
    torch.manual_seed(seed)
    return Contender("TerraByte", TerraByte(**cfg.model.kwargs()), _terrabyte_nats, cfg)


def _megabyte(cfg: Config, seed: int) -> Contender:
    torch.manual_seed(seed)
    return Contender("MEGABYTE-pytorch", build_megabyte(cfg), _megabyte_nats, cfg)


@dataclass
class SeedResult:
    seed: int
    curves: dict  # name -> curve
    params: dict  # name -> parameter count
    seconds_per_step: dict  # name -> mean training seconds per step
    final_bpb: dict  # name -> validation bpb after the steps
    equal_time: dict = field(default_factory=dict)  # "TerraByte" -> (steps, bpb)


def run_seed(cfg: Config, shards: str, seed: int, baseline: bool, equal_time: bool, eval_interval: int,
             val: list[torch.Tensor]) -> SeedResult:
    from tqdm.auto import tqdm

    contenders = [_terrabyte(cfg, seed)] + ([_megabyte(cfg, seed)] if baseline else [])
    with tqdm(total=cfg.train.steps, desc=f"seed {seed}", unit="step", file=sys.stderr) as bar:
        train(contenders, cfg, shards, seed, val, eval_interval, bar)
    steps = cfg.train.steps
    result = SeedResult(seed, {c.name: c.curve for c in contenders}, {c.name: c.params for c in contenders},
                        {c.name: c.seconds / steps for c in contenders}, {c.name: c.curve[-1][3] for c in contenders})
    if baseline and equal_time:
        tb, mb = contenders
        budget = max(1, round(steps * mb.seconds / tb.seconds))
        longer = _with(cfg, train={"steps": budget})
        again = _terrabyte(longer, seed)
        with tqdm(total=budget, desc=f"seed {seed}, equal time", unit="step", file=sys.stderr) as bar:
            train([again], longer, shards, seed, val, max(budget, 1), bar)
        result.equal_time["TerraByte"] = (budget, again.curve[-1][3])
        result.equal_time["MEGABYTE-pytorch"] = (steps, result.final_bpb["MEGABYTE-pytorch"])
    return result


# ---------------------------------------------------------------- report


def _mean_spread(values: list[float]) -> str:
    mean = sum(values) / len(values)
    return f"{mean:.3f}" if len(values) == 1 else f"{mean:.3f} ± {(max(values) - min(values)) / 2:.3f}"


def format_table(results: list[SeedResult], steps: int) -> str:
    names = list(results[0].final_bpb)
    seeds = ", ".join(str(r.seed) for r in results)
    lines = [f"| model | parameters | s/step | val bpb @ {steps} steps (seeds {seeds}) | per seed "
             f"| val bpb @ equal wall-clock | steps in that time |",
             "|---|---|---|---|---|---|---|"]
    for name in names:
        per_seed = " / ".join(f"{r.final_bpb[name]:.3f}" for r in results)
        sps = _mean_spread([r.seconds_per_step[name] for r in results])
        timed = [r.equal_time[name] for r in results if name in r.equal_time]
        eq_bpb = _mean_spread([b for _, b in timed]) if timed else ""
        eq_steps = " / ".join(str(s) for s, _ in timed) if timed else ""
        lines.append(f"| {name} | {results[0].params[name] / 1e6:.2f}M | {sps} | "
                     f"{_mean_spread([r.final_bpb[name] for r in results])} | {per_seed} | {eq_bpb} | {eq_steps} |")
    if len(names) == 2:
        a, b = names
        d_steps = [r.final_bpb[a] - r.final_bpb[b] for r in results]
        line = f"\n{a} - {b}: {_mean_spread(d_steps)} bpb at equal steps"
        if all(a in r.equal_time for r in results):
            d_time = [r.equal_time[a][1] - r.equal_time[b][1] for r in results]
            line += f", {_mean_spread(d_time)} bpb at equal wall-clock"
        lines.append(line + " (negative: TerraByte better); ± is half the spread over seeds.")
    return "\n".join(lines) + "\n"


def plot(results: list[SeedResult], path: Path) -> bool:
    """Training loss against steps and against seconds, every model and seed; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = {}
    for r in results:
        for name, curve in r.curves.items():
            color = colors.setdefault(name, f"C{len(colors)}")
            steps, seconds, losses, bpbs = zip(*curve)
            bits = [loss / math.log(2) for loss in losses]
            label = f"{name} seed {r.seed}"
            by_step.plot(steps, bits, color=color, alpha=0.35, lw=0.8)
            by_time.plot(seconds, bits, color=color, alpha=0.35, lw=0.8)
            val = [(s, t, b) for s, t, b in zip(steps, seconds, bpbs) if b is not None]
            by_step.plot([v[0] for v in val], [v[2] for v in val], "o-", color=color, label=label + " (val)")
            by_time.plot([v[1] for v in val], [v[2] for v in val], "o-", color=color, label=label + " (val)")
    for ax, xlabel in ((by_step, "optimizer step"), (by_time, "training seconds")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("bits per byte (train: faint, validation: dots)")
        ax.grid(alpha=0.3)
        ax.set_ylim(top=min(6.0, ax.get_ylim()[1]))
    by_step.legend(fontsize=7)
    save_figure(fig, path)
    return True


def save_figure(fig, path: Path) -> None:
    """Write a finished matplotlib figure as the house PNG (parent folders made) and free it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds {text!r} must be comma-separated integers, e.g. 0,1") from None
    if not seeds:
        raise ConfigError("--seeds needs at least one seed")
    return seeds


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
        sys.stdout.write(table)
        if args.out:
            atomic_write(args.out, table)
        return 0
    overrides = [a for a in (args.overrides or []) if a != "--"]
    cfg = load_config(args.config, overrides)
    if args.steps is not None:
        if args.steps < 1:
            raise ConfigError(f"--steps must be at least 1, got {args.steps}")
        cfg = _with(cfg, train={"steps": args.steps})
    seeds = _parse_seeds(args.seeds)
    eval_interval = args.eval_interval or cfg.train.eval_interval
    if eval_interval < 1:
        raise ConfigError(f"--eval-interval must be at least 1, got {eval_interval}")
    if args.threads:
        torch.set_num_threads(args.threads)
    baseline = not args.no_baseline
    if baseline and megabyte_class() is None:
        logger.warning("MEGABYTE-pytorch is not installed: training TerraByte alone. To compare, install it "
                       "with `%s`", PEER_INSTALL)
        baseline = False
    work = Path(args.dir)
    shards = _shards(cfg, work)
    val = validation_batches(cfg, shards)
    results = [run_seed(cfg, shards, s, baseline, not args.no_equal_time, eval_interval, val) for s in seeds]

    val_bytes = sum(int((x != _vocab(cfg).pad_id).sum()) for x in val)
    header = (f"### {datetime.date.today().isoformat()} — {describe_machine()}\n\n"
              f"`terrabyte bench quality --config {args.config} --steps {cfg.train.steps} --seeds {args.seeds}"
              + (f" -- {' '.join(overrides)}" if overrides else "") + "`: "
              f"batch {cfg.train.global_batch} x {cfg.model.seq_len} B, AdamW lr {cfg.optim.lr:g} "
              f"({cfg.optim.warmup_steps} warm-up steps, {cfg.optim.schedule} to {cfg.optim.min_lr_ratio:g}), "
              f"clip {cfg.train.grad_clip:g}; validation: {val_bytes:,} bytes.\n\n")
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
