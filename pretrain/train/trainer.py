"""The training loop: data, model, DeepSpeed engine, evaluation, checkpoints, monitoring.

``python -m terrabyte.pretrain --config tiny [--section.key value ...]`` runs one rank of it; the
launchers (deepspeed, torchrun, mpirun, srun) start one such process per rank.
"""
from __future__ import annotations

import logging
import math
import os
import signal
import sys
import time
import warnings
from pathlib import Path

import torch

from terrabyte.data_pipeline.basics.errors import ConfigError, DataError, TerrabyteError
from terrabyte.data_pipeline.read.batch import ByteBatch

from ..checkpoint import store as ckpt
from ..checkpoint.resume import load as load_checkpoint, plan_resume
from ..checkpoint.weights import WEIGHTS_FILE, export_safetensors, full_state_dict
from ..engine import engine as eng
from .config import Config, load_config
from .dry_run import check_fits, flops_per_byte, meta_model
from .metrics import MetricLogger, bits_per_byte, flatten, peak_memory_gib, peak_tflops
from ..model.patching import Patcher
from ..model.terrabyte import TerraByte
from ..parallel.layout import plan_layout

log = logging.getLogger(__name__)

# Exit code after a requested stop (SIGUSR1/SIGTERM) was checkpointed: EX_TEMPFAIL, "try again".
EXIT_PREEMPTED = 75


def setup_logging(level: str, rank: int) -> None:
    # DeepSpeed 0.19 calls collectives that torch 2.13 marks deprecated, once per step
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO) if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s",
        force=True,
    )
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def resolve_data(cfg: Config, rank: int) -> Path | str:
    """The shard directory: ``data.path``, or the standard-library corpus built once into the run."""
    from terrabyte.data_pipeline.stdlib_corpus import ensure_default_shards

    if cfg.data.path and cfg.data.path.startswith(("pipe:", "http://", "https://")):
        if cfg.data.path.startswith("pipe:") and not cfg.data.allow_pipe:
            raise ConfigError(f"data.path {cfg.data.path!r} runs a shell command: set --data.allow_pipe true to "
                              "allow it, or use a local path or http(s) URL")
        return cfg.data.path  # the loader reads the manifest and shards through it
    if cfg.data.path:
        path = Path(cfg.data.path)
        if not (path / "manifest.json").is_file():
            raise FileNotFoundError(f"data.path {path} has no manifest.json (build shards with `terrabyte shards build`)")
        return path
    target = Path(cfg.run.dir) / "data"
    if rank == 0:
        ensure_default_shards(target)
    eng.barrier()
    return target


def resolve_sources(cfg: Config):
    """``data.sources`` as a Mixture whose every source is a built shard directory, or None for one
    source (``data.path``); a missing one is named in one line."""
    if cfg.data.sources is None:
        return None
    from terrabyte.data_pipeline.read.mixture import parse_mixture

    mixture = parse_mixture(cfg.data.sources, cfg.data.schedule)
    for src in mixture.sources:
        if src.path.startswith("pipe:") and not cfg.data.allow_pipe:
            raise ConfigError(f"data source {src.name!r}: path {src.path!r} runs a shell command: set "
                              "--data.allow_pipe true to allow it, or use a local path or http(s) URL")
        if "://" not in src.path and not src.path.startswith("pipe:") and not (Path(src.path) / "manifest.json").is_file():
            raise FileNotFoundError(f"data source {src.name!r}: {src.path} has no manifest.json (build shards with "
                                    "`terrabyte shards build`)")
    return mixture


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.stop_requested = False
        # installed first: a stop asked for while the model is being built waits for the first step
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._request_stop)
        self.rank, self.world = eng.init_distributed()
        setup_logging(cfg.logging.level, self.rank)
        # the parallel degrees against the world size and the batch, before any work
        self.layout = plan_layout(cfg, self.world, self.rank)
        self.accumulation = self.layout.accumulation
        self.run_dir = Path(cfg.run.dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(cfg.run.seed)

        meta = meta_model(cfg)  # sizes and FLOPs, counted before ZeRO-3 partitions the real one
        if self.layout.pipeline == 1:
            # a context that cannot fit stops here, before data or model exist (dry_run.py); ZeRO-3
            # splits the states over data x sequence ranks, AutoTP over its peers
            zero = self.layout.dp * self.layout.sequence if cfg.parallel.zero_stage == 3 else 1
            check_fits(cfg, eng.compute_device(), zero * self.layout.tensor, self.layout.sequence, meta)
        self.mixture = resolve_sources(cfg)
        self.data_path = resolve_data(cfg, self.rank) if self.mixture is None else None
        self.model_config = cfg.model.kwargs()
        model = eng.build_model(cfg, self.layout)  # under ZeRO-3, partitioned as it is built
        self.flops_per_byte = sum(flops_per_byte(meta, cfg))
        self.peak_tflops = peak_tflops(cfg.logging.peak_tflops, eng.use_bf16(cfg))
        self.vocab = model.vocab
        self.resume = plan_resume(cfg, self.run_dir, self.layout)  # checks the checkpoint first
        self.initialised = self._init_from(model)
        self.engine = eng.wrap(model, cfg, self.layout, universal=bool(self.resume and self.resume.universal))
        del model  # a pipeline stage keeps only its own layers
        self.train_loader = self._loader("train", loop=True)
        # (source name, batches) per source: name None for a one-source run
        self.val_sets = [(None, self._validation_batches(self.data_path))] if self.mixture is None else \
            [(s.name, self._validation_batches(s.path, s.name)) for s in self.mixture.sources]
        self.metrics = MetricLogger(self.run_dir / "tensorboard", enabled=cfg.logging.tensorboard and self.rank == 0)
        self.step = 0
        self.bad_streak = 0  # steps in a row skipped for a non-finite loss
        self.last_saved: int | None = None
        self.loader_wait = 0.0
        self._resume()

    # ------------------------------------------------------------------ set-up

    def _loader(self, split: str, loop: bool, rank: int | None = None, world: int | None = None, path=None):
        from terrabyte.data_pipeline.read.loader import ByteLoader
        from terrabyte.data_pipeline.read.mixture import MixtureLoader

        mixed = path is None and self.mixture is not None
        return (MixtureLoader if mixed else ByteLoader)(
            self.mixture if mixed else str(path or self.data_path),
            **({} if mixed else {"split": split, "loop": loop}),
            seq_len=self.cfg.model.seq_len,
            global_batch=self.cfg.train.global_batch,
            micro_batch=self.cfg.train.micro_batch,
            dp_rank=self.layout.dp_rank if rank is None else rank,
            dp_world=self.layout.dp if world is None else world,
            seed=self.cfg.run.seed,
            num_workers=self.cfg.data.num_workers,
            vocab=self.vocab,
            on_error=self.cfg.data.on_error,
            allow_pipe=self.cfg.data.allow_pipe,
            max_member_bytes=self.cfg.data.max_member_bytes,
            # ByteBatches: one byte per byte on the host, widened to int64 ids on the device (to_ids)
            dtype=torch.uint8,
        )

    def _validation_batches(self, path, name: str | None = None) -> list[ByteBatch]:
        """The first ``val_sequences`` validation sequences of ``path``, dealt round-robin to data-parallel ranks.

        Every rank gets the same number of full micro-batches (padding with all-pad rows, which score
        nothing) because each forward under ZeRO-3 is a collective and a pipeline's shapes are fixed.
        """
        wanted = self.cfg.data.val_sequences
        rows: list[ByteBatch] = []
        try:
            for batch in self._loader("val", loop=False, rank=0, world=1, path=path):
                rows.extend(batch)
                if len(rows) >= wanted:
                    break
        except (TerrabyteError, OSError) as e:
            if name is None:
                raise
            raise type(e)(f"data source {name!r}: {e}") from None
        if not rows:
            what = f"data {path}" if name is None else f"data source {name!r} ({path})"
            raise DataError(f"{what} has no validation sequences (raise the builder's --val-fraction)")
        rows = rows[:wanted]
        dp, mb = self.layout.dp, self.cfg.train.micro_batch
        mine = rows[self.layout.dp_rank :: dp]
        per_rank = math.ceil(len(rows) / dp / mb) * mb
        pad = rows[0].padding()
        mine += [pad] * (per_rank - len(mine))
        return [ByteBatch.stack(mine[i : i + mb]) for i in range(0, len(mine), mb)]

    def _init_from(self, model: TerraByte) -> bool:
        """Copy ``train.init_from``'s weights into the plain model on every rank, before the engine
        wraps (and ZeRO-3 partitions) it; a run that resumes keeps its own checkpoint instead."""
        source = self.cfg.train.init_from
        if not source:
            return False
        if self.resume is not None:
            log.info("resuming %s: --init-from %s is not used again", self.run_dir, source)
            return False
        from ..checkpoint.pretrained import init_from

        init_from(model, source, strict=self.cfg.train.init_from_strict, trust=self.cfg.train.init_from_trust)
        return True

    def _resume(self) -> None:
        state = load_checkpoint(self.engine, self.resume)
        if state is None:
            log.info("fresh run in %s", self.run_dir)
            return
        self.step = self.last_saved = int(state["step"])
        self.train_loader.load_state_dict(state["loader"])
        ckpt.restore_rng(state["rng"])
        log.info("resumed from step %d in %s", self.step, self.run_dir)

    def _request_stop(self, signum, _frame) -> None:
        log.warning("received %s: checkpointing at the next step boundary", signal.Signals(signum).name)
        self.stop_requested = True

    # ------------------------------------------------------------------ steps

    def device(self) -> torch.device:
        return self.engine.device

    def train_step(self, batches) -> tuple[float, int]:
        """One optimizer step over ``accumulation`` micro-batches; returns (mean loss, bytes scored), both
        over all ranks."""
        micro = []
        for _ in range(self.accumulation):
            waited = time.perf_counter()
            x = next(batches)
            self.loader_wait += time.perf_counter() - waited
            micro.append(x.to_ids(self.device(), non_blocking=True))
        total_loss = eng.train_batch(self.engine, micro)  # plain, pipeline, tensor or sequence parallel
        total_tokens = sum(int((x != self.vocab.pad_id).sum()) for x in micro)
        # the global mean, so the logged loss does not depend on how the batch is split over ranks;
        # every rank of a replica (pipeline stage, tensor/sequence peer) saw the same bytes
        loss_sum, tokens = eng.all_reduce_sum([total_loss / self.accumulation, total_tokens])
        return loss_sum / self.world, int(tokens) // self.layout.replica

    def _patch_values(self) -> dict:
        """Where patches follow the data: the last micro-batch's mean patch length and boundary rate
        on this rank (a collapse to ~1-byte patches or a stall at the cap shows here) and the entropy
        model's auxiliary bits per byte."""
        patcher = next((m for m in self.engine.module.modules() if isinstance(m, Patcher)), None)
        if patcher is None or not patcher.dynamic:
            return {}
        values = {f"patch/{k}": v for k, v in patcher.last_stats.items()}
        if patcher.last_bits_per_byte is not None:
            values["patch/entropy_model_bits_per_byte"] = patcher.last_bits_per_byte
        return values

    @torch.no_grad()
    def evaluate(self) -> float:
        """Validation bits per byte over the fixed validation sequences, summed over ranks; with
        ``data.sources``, each source's (in ``self.val_by_source``) weighted by the weights that
        apply at this step."""
        self.engine.eval()
        sums = []
        for _, batches in self.val_sets:
            nats, count = 0.0, 0
            for x in batches:
                batch_nats, batch_count = eng.score(self.engine, x.to_ids(self.device()), self.vocab.pad_id)
                nats += batch_nats
                count += batch_count
            sums += [nats, count]
        self.engine.train()
        sums = eng.all_reduce_sum(sums)
        bpb = [bits_per_byte(n / max(c, 1)) for n, c in zip(sums[::2], sums[1::2])]
        self.val_by_source = {name: v for (name, _), v in zip(self.val_sets, bpb)}
        if self.mixture is None:
            return bpb[0]
        return sum(w * v for w, v in zip(self.mixture.weights_at(self.step), bpb))

    def _log_validation(self, value: float, note: str = "") -> None:
        """The total into TensorBoard and the log, and each source's (one line each) under data.sources."""
        values = {"val/bits_per_byte": value}
        log.info("step %d%s: validation bits-per-byte %.4f%s", self.step, note, value,
                 "" if self.mixture is None else " (weighted over data.sources)")
        for name, v in self.val_by_source.items():
            if name is not None:
                values[f"val/{name}/bpb"] = v
                log.info("step %d%s: validation bits-per-byte %.4f on data source %r", self.step, note, v, name)
        self.metrics.scalars(self.step, values)

    @torch.no_grad()
    def sample(self) -> str | None:
        """Generate ``train.sample_bytes`` after the configured prompt (rank 0's text; all ranks gather)."""
        n = self.cfg.train.sample_bytes
        if n <= 0:
            return None
        text = None
        # a plain copy on rank 0: generation runs on one rank, which sharded modules cannot do alone
        state = full_state_dict(self.engine)
        if self.rank == 0:
            model = TerraByte(**self.model_config)
            model.load_state_dict(state)
            model.to(self.device()).eval()
            prompt = torch.tensor([list(self.cfg.train.sample_prompt.encode())], device=self.device())
            gen = torch.Generator(device=self.device()).manual_seed(self.cfg.run.seed)
            out = model.generate(prime=prompt, max_new_bytes=n, temperature=0.8, generator=gen)
            data = self.vocab.data_bytes(out[0, prompt.shape[1] :].tolist())
            text = data.decode("utf-8", errors="replace")
        return text

    def save(self) -> None:
        if self.step == self.last_saved:
            # e.g. a stop signal right after a resume: that checkpoint already holds this state, and
            # rewriting the folder `latest` points to could destroy the only good one
            log.info("checkpoint step%d already holds this state: not saved again", self.step)
            return
        loader = self.train_loader.state_dict()
        # members any rank found corrupt (data.on_error skip): resume positions depend on them
        bad = sorted({m for part in eng.all_gather_objects(loader.pop("bad_members", [])) for m in part})
        if bad:
            loader["bad_members"] = bad
        state = {"step": self.step, "loader": loader, "rng": ckpt.rng_state()}
        ckpt.save(self.engine, self.run_dir, self.step, state, self.cfg.checkpoint.keep, self.model_config)
        self.last_saved = self.step

    def _check_nonfinite(self) -> str | None:
        """Count steps skipped for a NaN/inf loss (decided on all ranks together); after
        ``train.max_nonfinite_steps`` in a row, the message to stop with. No checkpoint is written during
        such a run of steps."""
        if not eng.last_step_skipped(self.engine):
            self.bad_streak = 0
            return None
        self.bad_streak += 1
        limit = self.cfg.train.max_nonfinite_steps
        log.warning("step %d: non-finite loss, update skipped (%d in a row, %d in all)",
                    self.step, self.bad_streak, eng.skipped_steps(self.engine))
        if self.bad_streak >= limit:
            saved = f"step {self.last_saved}" if self.last_saved is not None else "none yet"
            return (
                f"training stopped: the loss was NaN/inf in {limit} steps in a row (steps "
                f"{self.step - limit + 1}-{self.step}; train.max_nonfinite_steps={limit}); the last checkpoint "
                f"({saved}) is unaffected: lower optim.lr (or train.grad_clip), then resume"
            )
        return None

    # ------------------------------------------------------------------ loop

    def train(self) -> int:
        from tqdm.auto import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        cfg = self.cfg
        if self.rank == 0:
            log.info("TensorBoard: tensorboard --logdir %s", self.run_dir / "tensorboard")
            self.metrics.hparams(flatten(cfg.to_dict()), ["val/bits_per_byte", "train/loss"])
        batches = iter(self.train_loader)
        bar = tqdm(total=cfg.train.steps, initial=self.step, disable=self.rank != 0, desc="pretrain", unit="step")
        last_val = None
        if self.initialised and self.step == 0:
            # where the trained weights start on this run's data: the fine-tuning baseline
            self._log_validation(self.evaluate(), f" (--init-from {cfg.train.init_from})")
        window_start, window_bytes, window_loss, window_steps = time.perf_counter(), 0, 0.0, 0
        with logging_redirect_tqdm():
            while self.step < cfg.train.steps:
                if eng.all_reduce_max(int(self.stop_requested)):
                    self.save()
                    log.warning("stopped at step %d after a signal; checkpoint saved", self.step)
                    # Python restores the default actions at shutdown: a second signal then would
                    # kill the rank and turn exit code 75 into a crash
                    for sig in (signal.SIGUSR1, signal.SIGTERM):
                        signal.signal(sig, signal.SIG_IGN)
                    bar.close()
                    self.metrics.close()
                    return EXIT_PREEMPTED
                loss, scored = self.train_step(batches)
                self.step += 1
                bar.update(1)
                stop = self._check_nonfinite()
                if stop:
                    bar.close()
                    self.metrics.close()
                    raise TerrabyteError(stop)
                window_bytes += scored
                window_loss += loss
                window_steps += 1
                if self.step % cfg.train.log_interval == 0 or self.step == cfg.train.steps:
                    elapsed = time.perf_counter() - window_start
                    mean_loss = window_loss / window_steps
                    bytes_per_second = window_bytes / elapsed
                    values = {
                        "train/loss": mean_loss,
                        "train/bits_per_byte": bits_per_byte(mean_loss),
                        "train/lr": self.engine.get_lr()[0],
                        "train/grad_norm": self.engine.get_global_grad_norm(),
                        "train/bytes_per_second": bytes_per_second,
                        "perf/model_tflops_per_rank": bytes_per_second * self.flops_per_byte / self.world / 1e12,
                        "perf/peak_memory_gib": peak_memory_gib(),
                        "perf/loader_wait_fraction": self.loader_wait / elapsed,
                    }
                    if self.peak_tflops:
                        values["perf/mfu"] = values["perf/model_tflops_per_rank"] / self.peak_tflops
                    values["train/skipped_steps"] = eng.skipped_steps(self.engine)
                    skipped = getattr(self.train_loader, "skipped", None)
                    if skipped is not None:
                        values["data/skipped_members"] = skipped
                    for name, epoch in getattr(self.train_loader, "source_epochs", {}).items():
                        values[f"data/{name}/epoch"] = epoch  # how often a small source has looped
                    values.update(self._patch_values())
                    self.loader_wait = 0.0
                    self.metrics.scalars(self.step, values)
                    bar.set_postfix(loss=f"{mean_loss:.3f}", bpb=f"{values['train/bits_per_byte']:.2f}")
                    window_start, window_bytes, window_loss, window_steps = time.perf_counter(), 0, 0.0, 0
                if self.step % cfg.train.eval_interval == 0 or self.step == cfg.train.steps:
                    last_val = self.evaluate()
                    self._log_validation(last_val)
                    text = self.sample()
                    if text is not None:
                        self.metrics.text(self.step, "samples", cfg.train.sample_prompt + text)
                        log.info("sample at step %d: %r", self.step, cfg.train.sample_prompt + text)
                    self.metrics.flush()
                if (self.step % cfg.checkpoint.interval == 0 or self.step == cfg.train.steps) and not self.bad_streak:
                    self.save()
        bar.close()
        if cfg.checkpoint.export:
            export_safetensors(self.engine, self.run_dir / WEIGHTS_FILE, self.model_config, self.step)
            log.info("exported %s", self.run_dir / WEIGHTS_FILE)
        self.metrics.close()
        if last_val is not None:
            log.info("done: %d steps, validation bits-per-byte %.4f", self.step, last_val)
        return 0


def adopt_local_rank(flag: int | None) -> None:
    """DeepSpeed's launcher passes ``--local_rank=N`` (torch's ``--local-rank N``) besides setting
    LOCAL_RANK; the engine picks the device from the environment, so the flag goes there."""
    if flag is None:
        return
    env = os.environ.get("LOCAL_RANK")
    if flag < 0 or (env is not None and env != str(flag)):
        raise ConfigError(f"--local_rank {flag} " + (f"disagrees with LOCAL_RANK={env} in the environment: "
                          "pass one of them" if flag >= 0 else "must be 0 or more"))
    os.environ["LOCAL_RANK"] = str(flag)


def parse(argv: list[str] | None = None):
    """(flags, config) of ``terrabyte pretrain``'s command line; a launcher's local rank is adopted."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="terrabyte pretrain",
        description="Pretrain a TerraByte model. Any config key can be overridden as --section.key VALUE.",
    )
    parser.add_argument("--config", default="tiny", help="config name in configs/ or a YAML path (default: tiny)")
    parser.add_argument("--dry-run", action="store_true", help="print model size and cost estimates, do not train")
    parser.add_argument("--memory", type=float, default=None, metavar="GIB",
                        help="with --dry-run: check the estimate against this much device memory and print "
                             "the largest model.chunk_bytes that fits")
    parser.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, default=None, metavar="N",
                        help="this rank's device on its node, as the deepspeed launcher passes it "
                             "(default: $LOCAL_RANK)")
    parser.add_argument("--init-from", default=None, metavar="PATH",
                        help="start a fresh run from trained weights: an exported .safetensors, a save_pretrained "
                             "directory or a run directory (its newest checkpoint); same as --train.init_from")
    parser.add_argument("--init-from-strict", default=None, metavar="true|false",
                        help="false: load the tensors whose name and shape match and list the rest "
                             "(default true: any mismatch stops the run)")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="with --init-from: read a DeepSpeed checkpoint whose files hold pickled objects besides "
                             "tensors (this runs code they name: only for checkpoints you trust); same as "
                             "--train.init_from_trust true")
    args, overrides = parser.parse_known_args(argv)
    adopt_local_rank(args.local_rank)
    if args.init_from is not None:
        overrides += ["--train.init_from", args.init_from]
    if args.init_from_strict is not None:
        overrides += ["--train.init_from_strict", args.init_from_strict]
    if args.trust_checkpoint:
        overrides += ["--train.init_from_trust", "true"]
    return args, load_config(args.config, overrides)


def main(argv: list[str] | None = None) -> int:
    args, cfg = parse(argv)
    if args.memory is not None and (not args.dry_run or args.memory <= 0):
        raise ConfigError(f"--memory {args.memory:g} needs --dry-run and a positive number of GiB")
    if args.dry_run:
        from .dry_run import describe
        from ..parallel.pipeline import describe_pipeline

        text = describe(cfg, args.memory)
        if cfg.parallel.pipeline_stages > 1:
            text += "\n\n" + describe_pipeline(cfg)
        sys.stdout.write(text + "\n")
        return 0
    return Trainer(cfg).train()
