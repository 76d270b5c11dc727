"""Weighted mixtures of shard directories (`data.sources`), as resumable as one source.

The source of every training sequence is a pure function of (seed, weights, global step, lane):
global sequence i = step * global_batch + lane draws u = splitmix64(seed, i) / 2**64 and takes the
source whose slice of the cumulative (normalised) weights holds u. Weights come from `data.sources`,
or from the last `data.schedule` entry whose step is <= the step. No draw depends on the
data-parallel size, the workers or on which sequences came before, so any position can be
recomputed.

Each source keeps the lanes it would have alone (`loader.py`: `global_batch` contiguous ranges of
its own epoch stream). Lane b of the mixture takes its next sequence from lane b of the drawn
source: after step g, lane b of source s has delivered `count(s, b, g)` sequences (the draws of s
at lane b before g, counted with numpy on resume), which fixes that source's epoch and position.
A source loops on its own: when one of its lanes reaches the end of its epoch it starts the
source's next epoch (shuffled with the same seed and epoch number as a one-source run), whatever
the other sources do. With one source of weight 1 the batches equal `ByteLoader`'s.

A block of steps is filled one (lane, source) run at a time, each run one `TokenReader.fill` into
the lane buffer, rows grouped by source; `slots` tells the batch cutter where each step's row is,
and the cutter's gather is the copy a one-source batch makes anyway (so a mixture costs no extra
pass over the bytes, BENCHMARKS.md).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from ..basics.errors import CheckpointError, ConfigError, DataError, TerrabyteError
from ..basics.vocab import BYTES, Vocab
from . import fetch, unpack
from .loader import BLOCK_BYTES, ByteLoader

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Source:
    name: str
    path: str
    weight: float


@dataclass(frozen=True)
class Mixture:
    """Sources and the weights of each phase: phase 0 from step 0, phase p from steps[p]."""

    sources: tuple
    steps: tuple  # first step of each phase, steps[0] == 0
    weights: tuple  # one tuple of raw weights (one per source) per phase

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.sources]

    def active(self) -> list[bool]:
        """Sources drawn at some step (a weight > 0 in some phase); the others serve validation only."""
        return [any(w[i] > 0 for w in self.weights) for i in range(len(self.sources))]

    def weights_at(self, step: int) -> list[float]:
        """The normalised weights that apply to `step`."""
        w = self.weights[int(np.searchsorted(self.steps, step, side="right")) - 1]
        return [x / sum(w) for x in w]

    def fingerprint(self) -> str:
        return json.dumps({"sources": [[s.name, s.weight] for s in self.sources],
                           "schedule": [[a, list(w)] for a, w in zip(self.steps, self.weights)]}, sort_keys=True)


def _number(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ConfigError(f"{where} must be a finite number >= 0, got {value!r}")
    return float(value)


def parse_mixture(sources, schedule=None) -> Mixture:
    """`data.sources` (a list of {name, path, weight}) and `data.schedule` (a list of {step,
    weights: {name: weight}}) -> Mixture; one ConfigError naming the entry for anything wrong. A
    schedule entry changes the weights of the sources it names; the others keep theirs."""
    if not isinstance(sources, (list, tuple)) or not sources:
        raise ConfigError(f"data.sources must be a non-empty list of {{name, path, weight}}, got {sources!r}")
    parsed, seen = [], set()
    for i, s in enumerate(sources):
        where = f"data.sources[{i}]"
        if not isinstance(s, dict) or set(s) - {"name", "path", "weight"} or not {"name", "path"} <= set(s):
            raise ConfigError(f"{where} must be a mapping with keys name, path and weight, got {s!r}")
        name, path = s["name"], s["path"]
        if not isinstance(name, str) or not name or any(c in name for c in "/ \t\n") or name in seen:
            why = "is used twice" if name in seen else "must be a non-empty word without '/' or spaces"
            raise ConfigError(f"{where}: source name {name!r} {why} (names key TensorBoard tags val/<name>/bpb)")
        if not isinstance(path, str) or not path:
            raise ConfigError(f"{where} ({name}): path must be a shard directory, got {path!r}")
        seen.add(name)
        parsed.append(Source(name, path, _number(s.get("weight", 1.0), f"{where} ({name}): weight")))
    steps, weights = [0], [tuple(s.weight for s in parsed)]
    if sum(weights[0]) == 0 and not schedule:
        raise ConfigError("data.sources: every weight is 0; give at least one source a weight > 0 "
                          "(weight 0 keeps a source for validation only)")
    for i, entry in enumerate(schedule or []):
        where = f"data.schedule[{i}]"
        if not isinstance(entry, dict) or set(entry) != {"step", "weights"} or not isinstance(entry["weights"], dict):
            raise ConfigError(f"{where} must be a mapping {{step: N, weights: {{name: weight, ...}}}}, got {entry!r}")
        step = entry["step"]
        if isinstance(step, bool) or not isinstance(step, int) or step <= steps[-1] and not (step == 0 == i):
            raise ConfigError(f"{where}: step {step!r} must be an integer above the previous entry's ({steps[-1]})")
        w = list(weights[-1])
        for name, value in entry["weights"].items():
            if name not in seen:
                raise ConfigError(f"{where}: no source named {name!r} in data.sources (have: {', '.join(sorted(seen))})")
            w[[s.name for s in parsed].index(name)] = _number(value, f"{where}: weight of {name}")
        if step == 0:
            steps, weights = [0], []
        else:
            steps.append(step)
        weights.append(tuple(w))
    for step, w in zip(steps, weights):
        if sum(w) == 0:
            raise ConfigError(f"data.schedule: every weight is 0 from step {step} on; give a source a weight > 0")
    return Mixture(tuple(parsed), tuple(steps), tuple(weights))


# ---------------------------------------------------------------------------------------------
# The draw: counter-based, computable at any (step, lane)
# ---------------------------------------------------------------------------------------------

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def draw_sources(mix: Mixture, seed: int, steps: np.ndarray, lanes: np.ndarray, global_batch: int) -> np.ndarray:
    """Source index of sequence (step, lane) for every step x lane: shape (len(steps), len(lanes))."""
    key = _splitmix64(np.asarray([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))
    index = (steps.astype(np.uint64)[:, None] * np.uint64(global_batch) + lanes.astype(np.uint64)[None, :])
    u = (_splitmix64(index ^ key) >> np.uint64(11)).astype(np.float64) * 2.0 ** -53  # uniform in [0, 1)
    # cumulative weights of each phase, without the last bound (1): the source is how many bounds u passed
    cum = np.asarray([np.cumsum(w)[:-1] / sum(w) for w in mix.weights]).reshape(len(mix.weights), -1)
    phase = np.searchsorted(np.asarray(mix.steps), steps, side="right") - 1
    return (u[:, :, None] >= cum[phase][:, None, :]).sum(axis=2)


def count_draws(mix: Mixture, seed: int, stop: np.ndarray, lanes: np.ndarray, global_batch: int,
                chunk: int = 1 << 20) -> np.ndarray:
    """counts[s, j]: how many of the steps [0, stop[j]) drew source s at lane lanes[j]."""
    n = len(mix.sources)
    counts = np.zeros((n, len(lanes)), dtype=np.int64)
    per = max(1, chunk // max(len(lanes), 1))  # steps per numpy pass, about `chunk` draws
    for a in range(0, int(stop.max(initial=0)), per):
        steps = np.arange(a, min(a + per, int(stop.max())), dtype=np.int64)
        d = draw_sources(mix, seed, steps, lanes, global_batch)
        d = np.where(steps[:, None] < stop[None, :], d, n)  # steps a lane has not reached: no source
        for s in range(n):
            counts[s] += (d == s).sum(axis=0)
    return counts


# ---------------------------------------------------------------------------------------------
# The loader
# ---------------------------------------------------------------------------------------------


class _LaneStream:
    """Lane `lane` of one source, looping over its epochs, from its k-th sequence on."""

    def __init__(self, mixer: "MixtureLoader", source: int, j: int, k: int):
        self.mixer, self.source, self.j = mixer, source, j
        self.child = mixer.children[source]
        self.steps = self.child.steps_per_epoch
        self.epoch, within = divmod(int(k), self.steps)
        self._open(within)

    def _open(self, within: int):
        child, L = self.child, self.mixer.seq_len
        order, cum = self.mixer._stream(self.source, self.epoch)
        start = self.mixer.lane_ids[self.j] * (child.total_tokens // child.global_batch)  # as epochs.lanes cuts
        self.reader = child._range_reader(order, cum, start, start + self.steps * L, self.epoch,
                                          hold_first=(self.j > 0 and within == 0), delivered=within * L)
        self.left = self.steps - within
        if self.j == 0:
            self.mixer._note_epoch(self.source, self.epoch)

    def fill(self, out: np.ndarray, rows: int, eos: list, base: int, lengths: np.ndarray) -> bool:
        """The next `rows` sequences into out[:rows * seq_len]; EOS positions appended to eos
        (plus `base`); a row's data tokens into `lengths` only when it came short. Returns whether
        every row is full."""
        L = self.mixer.seq_len
        full, r = True, 0
        while r < rows:
            if self.left == 0:
                self.epoch += 1
                self._open(0)
            n = min(rows - r, self.left)
            got = self.reader.fill(out[r * L:(r + n) * L], eos, base + r * L)
            if got != n * L:
                full = False
                lengths[r:r + n] = np.clip(got - np.arange(n, dtype=np.int64) * L, 0, L)
            self.left -= n
            r += n
        return full


class MixtureLoader(ByteLoader):
    """ByteLoader's training iteration over several sources mixed by weight (module docstring).
    Same arguments as ByteLoader, with a Mixture in place of the path; loop=True only (validation
    reads each source with its own ByteLoader)."""

    def __init__(self, mixture: Mixture, seq_len: int = 2048, global_batch: int = 8, micro_batch: int = 4,
                 dp_rank: int = 0, dp_world: int = 1, seed: int = 0, num_workers: int = 0, on_error: str = "raise",
                 prefetch: int = 2, allow_pipe: bool = False, dtype: torch.dtype = torch.int64, vocab: Vocab = BYTES,
                 max_member_bytes: int = unpack.MAX_MEMBER_BYTES, eos_id: int | None = None, pad_id: int | None = None):
        self.mixture = mixture
        self.children: list[ByteLoader | None] = []
        active = mixture.active()
        builders = {}
        for src, used in zip(mixture.sources, active):
            if not used:  # validation only: its train split may be empty or small
                self.children.append(None)
                continue
            try:
                child = ByteLoader(src.path, split="train", seq_len=seq_len, global_batch=global_batch,
                                   micro_batch=micro_batch, dp_rank=dp_rank, dp_world=dp_world, seed=seed,
                                   eos_id=eos_id, pad_id=pad_id, loop=True, on_error=on_error, prefetch=prefetch,
                                   allow_pipe=allow_pipe, dtype=dtype, vocab=vocab, max_member_bytes=max_member_bytes)
            except (TerrabyteError, OSError) as e:
                raise type(e)(f"data source {src.name!r} ({src.path}): {e}") from None
            builders[src.name] = str(child.manifest.get("builder", {}).get("version", "?")).split(".")[0]
            self.children.append(child)
        if len(set(builders.values())) > 1:
            first = next(iter(builders))
            odd = next(n for n, v in builders.items() if v != builders[first])
            raise ConfigError(f"data source {odd!r} was built by shard format {builders[odd]}.x, source {first!r} by "
                              f"{builders[first]}.x: rebuild one of them with the same `terrabyte shards build`")
        base = next(c for c in self.children if c is not None)
        # the settings ByteLoader's iteration reads, as the children checked them
        for attr in ("dtype", "seq_len", "global_batch", "micro_batch", "dp_rank", "dp_world", "seed", "vocab",
                     "eos_id", "pad_id", "loop", "on_error", "shuffle", "prefetch", "grad_accum", "max_member_bytes"):
            setattr(self, attr, getattr(base, attr))
        self.num_workers = int(num_workers)
        if self.num_workers < 0:
            raise ConfigError(f"ByteLoader: num_workers={num_workers} must be >= 0")
        self._executor = ThreadPoolExecutor(self.num_workers, thread_name_prefix="byteloader") \
            if self.num_workers else None
        # one thread pool and one buffer pool for all sources: a member buffer one source frees, another reuses
        buffers = unpack.BufferPool()
        for c in self.children:
            if c is not None:
                c._executor, c.num_workers, c._pool = self._executor, self.num_workers, buffers
        self.path, self.split = ",".join(s.path for s in mixture.sources), "train"
        # a mixture's "epoch" only numbers its steps: one epoch = as many sequences as its drawn sources hold
        self.steps_per_epoch = sum(c.steps_per_epoch for c in self.children if c is not None)
        ids = [f"{s.name}:{c.manifest_id if c is not None else '-'}" for s, c in zip(mixture.sources, self.children)]
        self.manifest_id = int.from_bytes(hashlib.sha256((mixture.fingerprint() + "|".join(ids)).encode())
                                          .digest()[:6], "big")
        self.lane_ids: list[int] = []
        self.source_epochs: dict[str, int] = {}
        self._streams_cache: dict = {}
        self.bad_members: set = set()  # the children keep theirs
        self.errors = fetch.ErrorCounter()
        self._epoch = self._step = self._micro = 0
        self._generation = 0
        self._continues = None  # (generation, epoch) whose streams the last epoch's carry on into
        for i, (src, c) in enumerate(zip(mixture.sources, self.children)):
            shares = [w[i] / sum(w) for w in mixture.weights]
            if c is not None:
                logger.info("data source %r: %s train tokens, %s of the sequences, one pass every ~%d steps at its "
                            "largest share", src.name, f"{c.total_tokens:,}", " then ".join(f"{x:.1%}" for x in shares),
                            c.steps_per_epoch / max(shares))
            else:
                logger.info("data source %r: weight 0 throughout, validation only", src.name)

    # -- ByteLoader's hooks -----------------------------------------------------------------------

    def _block_steps(self, per_rank: int) -> int:
        """A block per drawn source of what one source fills at once: a lane's block is filled in
        one run per source, and each run then copies as many rows per call as a one-source fill (the
        per-call cost is what a mixture adds, BENCHMARKS.md); the lane buffer grows to
        `sources * BLOCK_BYTES` per rank."""
        steps = super()._block_steps(per_rank)
        if per_rank * self.seq_len > BLOCK_BYTES:  # one step at a time in a fresh buffer, as ByteLoader
            return steps
        return steps * sum(c is not None for c in self.children)

    def _open_epoch(self, epoch: int, firsts: list) -> tuple[list, int]:
        """Placeholder readers (one per lane): the (lane, source) streams open when a draw first
        reaches them, each at the count of its draws before the lane's first step; at the start of
        the next mixture epoch they simply run on."""
        per_rank = len(firsts)
        P = self.steps_per_epoch
        if self._continues == (self._generation, epoch) and not any(firsts):
            self._continues = (self._generation, epoch + 1)
            return [None] * per_rank, P  # the streams run on across the mixture's epochs: nothing to count
        self._continues = (self._generation, epoch + 1)
        self.lane_ids = list(range(self.dp_rank * per_rank, (self.dp_rank + 1) * per_rank))
        counts = count_draws(self.mixture, self.seed, np.asarray(firsts, dtype=np.int64) + epoch * P,
                             np.asarray(self.lane_ids, dtype=np.int64), self.global_batch)
        self._counts = counts  # sequences each (source, lane) delivered before its first step
        self._lane_streams: dict = {}
        return [None] * per_rank, P

    def _lane_stream(self, s: int, j: int) -> _LaneStream:
        st = self._lane_streams.get((s, j))
        if st is None:
            st = self._lane_streams[(s, j)] = _LaneStream(self, s, j, int(self._counts[s, j]))
        return st

    def _fill_block(self, lanebuf: np.ndarray, readers, firsts, b0: int, nb: int, epoch: int):
        L, P, S = self.seq_len, self.steps_per_epoch, len(self.children)
        per_rank = len(readers)
        lanes = lanebuf.reshape(per_rank, -1)
        steps = np.arange(epoch * P + b0, epoch * P + b0 + nb, dtype=np.int64)
        drawn = draw_sources(self.mixture, self.seed, steps, np.asarray(self.lane_ids, dtype=np.int64),
                             self.global_batch).T  # (lane, step)
        owed = np.maximum(np.asarray(firsts, dtype=np.int64) - b0, 0)  # steps yielded before a resume: not filled
        drawn[np.arange(nb)[None, :] < owed[:, None]] = -1
        # each lane's rows grouped by source (steps ascending within), after the -1 rows left unwritten
        order = np.argsort(drawn, axis=1, kind="stable")  # order[j, slot] = step
        slots = np.empty_like(order)
        np.put_along_axis(slots, order, np.arange(nb, dtype=np.int64)[None, :], axis=1)
        runs = (drawn[:, :, None] == np.arange(S)).sum(axis=1).tolist()  # [lane][source]: rows of the block
        by_slot = np.full((per_rank, nb), L, dtype=np.int64)
        short, eos, ends = False, [], []  # EOS positions of all lanes, lane-slot coordinates; where each lane's end
        lane_stream = self._lane_streams
        for j in range(per_rank):
            at = int(owed[j])
            for s, n in enumerate(runs[j]):
                if n:
                    st = lane_stream.get((s, j)) or self._lane_stream(s, j)
                    if not st.fill(lanes[j, at * L:(at + n) * L], n, eos, at * L, by_slot[j, at:at + n]):
                        if self.on_error != "skip":
                            raise DataError(
                                f"lane {self.lane_ids[j]} of data source {self.mixture.sources[s].name!r} ran short "
                                f"before step {epoch * P + b0 + nb}: shards changed since the manifest was written?")
                        short = True
                    at += n
            ends.append(len(eos))
        # slot coordinates -> step coordinates, as the batch cutter expects them, for all lanes at once
        p = np.asarray(eos, dtype=np.int64)
        counts = np.diff(ends, prepend=0)
        lane = np.repeat(np.arange(per_rank), counts)
        marks = (order[lane, p // L] * L + p % L, counts)
        rowlen = np.take_along_axis(by_slot, slots, axis=1) if short else by_slot
        return marks, rowlen, slots

    def _stream(self, s: int, epoch: int):
        """Source s's epoch order and cumulative tokens (kept for the two newest epochs of each source)."""
        key = (s, epoch)
        hit = self._streams_cache.get(key)
        if hit is None:
            hit = self._streams_cache[key] = self.children[s]._epoch_stream(epoch)
            for old in [k for k in self._streams_cache if k[0] == s and k[1] < epoch - 1]:
                del self._streams_cache[old]
                child = self.children[s]
                with child._cache_lock:  # members held for a lane of an epoch no lane reads any more
                    for h in [h for h in child._held if h[0] < epoch - 1]:
                        del child._held[h]
        return hit

    def _note_epoch(self, s: int, epoch: int):
        name = self.mixture.sources[s].name
        if epoch > self.source_epochs.get(name, 0):
            logger.info("data source %r starts epoch %d (it loops on its own; the others go on)", name, epoch)
        self.source_epochs[name] = epoch

    # -- state --------------------------------------------------------------------------------

    @property
    def skipped(self) -> int:
        return sum(c.skipped for c in self.children if c is not None)

    def state_dict(self) -> dict:
        state = super().state_dict()
        state.pop("bad_members", None)
        bad = [f"{src.name}:{m}" for src, c in zip(self.mixture.sources, self.children) if c is not None
               for m in sorted(c.bad_members)]
        state["mixture"] = self.mixture.fingerprint()
        return {**state, **({"bad_members": bad} if bad else {})}

    def load_state_dict(self, state: dict):
        if "mixture" in state and state["mixture"] != self.mixture.fingerprint():
            raise ConfigError("cannot resume data loader: data.sources or data.schedule changed since the checkpoint "
                              f"(saved {state['mixture']}, now {self.mixture.fingerprint()}); the draws of the steps "
                              "done depend on them")
        if "mixture" not in state:
            raise CheckpointError("cannot resume a data.sources mixture from a one-source (data.path) checkpoint")
        bad = state.get("bad_members", ())
        super().load_state_dict({k: v for k, v in state.items() if k != "bad_members"})
        names = {src.name: c for src, c in zip(self.mixture.sources, self.children)}
        for c in self.children:
            if c is not None:
                c.bad_members = set()
        for item in bad:
            name, _, m = str(item).rpartition(":")
            if names.get(name) is None:
                raise CheckpointError(f"loader state names a bad member {item!r} of no drawn data source")
            names[name].bad_members.add(int(m))
        for c in self.children:
            if c is not None:
                c.errors.skipped = len(c.bad_members)
        self.bad_members = set()

    def close(self):
        for c in getattr(self, "children", ()):
            if c is not None:
                c.close()  # shuts the shared pool down too
        self._executor = None
