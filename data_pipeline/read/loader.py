"""ByteLoader: packed byte sequences from Terrabyte shards, with exact and elastic resume.

The training order is a pure function of (manifest, seed, epoch, seq_len, global_batch):

1. Each epoch, shuffle units (members; the chunks of one large document stay together, in order)
   with `numpy.random.default_rng([seed, epoch])`; documents inside a bundled member are shuffled
   with `default_rng([seed, epoch, member])`. Concatenate: document bytes, EOS after each document.
2. Cut that stream into `global_batch` contiguous lanes of equal length. Global step g is sequence
   g of every lane (tokens [g*seq_len, (g+1)*seq_len) of each lane): `global_batch` sequences.
3. Data-parallel rank r owns lanes [r*B/W, (r+1)*B/W); its k-th micro-batch of a step holds lanes
   [k*micro_batch, (k+1)*micro_batch) of those. Every rank yields exactly `steps_per_epoch *
   grad_accum` micro-batches per epoch, whatever the shard sizes.

A lane is a contiguous range of the stream, so its members are read and decompressed once each;
resuming seeks with the member offsets stored in the manifest (no re-reading). The state is
(epoch, step, micro): restarting yields byte-identical batches, and restarting with another
`dp_world` (same global batch) continues the same global sequence of samples, since the lanes do not
depend on the world size. `num_workers` threads only prefetch and decompress members; results are
consumed in a fixed order, so batches never depend on it.

Batches stay one byte per byte on the host: the lane buffer is uint8 with the EOS positions on
the side, and `dtype=torch.uint8` yields them as `ByteBatch`es (batch.py) that the trainer widens
on the device (`batch.to_ids(device)`), so a gigabyte sequence costs a gigabyte of host memory,
not eight. int64 / int32 batches are the same widened on the host. A document cut into several
members (a continued document) is one run of bytes in the stream: no EOS between its parts.

`split_documents` and `count_sequences` are the other read-side entry points by path: the whole
documents of a split (for `terrabyte eval`) and the validation pass's length.
"""
from __future__ import annotations

import hashlib
import logging
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import numpy as np
import torch

from ..basics.errors import CheckpointError, ConfigError, DataError
from ..basics.vocab import BYTES, Vocab
from . import epochs, fetch, segments, unpack
from .batch import ByteBatch
from .fetch import ErrorCounter, ShardFiles
from .manifest import load_dictionary, load_manifest, shard_list

logger = logging.getLogger(__name__)

STATE_VERSION = 1
HOLD_BYTES = 256 << 20  # members held across lane boundaries, at most
BLOCK_BYTES = 4 << 20  # per-rank uint8 lane buffer, a block of steps; small enough to stay in cache


_DTYPES = (torch.uint8, torch.int64, torch.int32)


def _manifest_id(manifest: dict, split: str) -> int:
    """A short fingerprint of the split's shards (resuming on rebuilt data is refused)."""
    h = hashlib.sha256()
    for s in manifest["shards"]:
        if s["split"] == split:
            h.update(s["sha256"].encode())
    return int.from_bytes(h.digest()[:6], "big")


def _split_tokens(manifest: dict, split: str) -> int:
    return sum(sum(s["index"]["raw"]) + sum(s["index"]["ends"]) for s in manifest["shards"] if s["split"] == split)


def count_sequences(path: str, split: str = "val", seq_len: int = 2048) -> int:
    """Number of seq_len sequences (the last one padded) in a full non-looping pass of a split."""
    man = load_manifest(path)
    shard_list(man, split)  # raises if the split is empty
    return -(-_split_tokens(man, split) // seq_len)


def split_documents(path: str, split: str = "val") -> Iterator[tuple[str, bytes]]:
    """(path, bytes) of every document of a split of the build at `path`, in stored order (shards
    in manifest order, members in tar order; chunks of large documents joined). `split` "all"
    means every split the manifest has, in sorted order. Shards are read sequentially as tar
    files, so `path` must be a local build; a bad member raises a DataError naming it."""
    man = load_manifest(path)
    zdict = load_dictionary(man)
    splits = sorted({s["split"] for s in man["shards"]}) if split == "all" else [split]
    for name in splits:
        urls = [s["url"] for s in shard_list(man, name)]
        yield from unpack.documents(unpack.decompress(fetch.tar_members(urls), zdict))


class ByteLoader:
    """Iterates micro-batches (micro_batch, seq_len) holding data values 0..vocab.num_tokens-1
    (bytes), `eos_id` after each document and (loop=False only) `pad_id`: with
    `dtype=torch.uint8` as `ByteBatch`es, one byte per byte until `to_ids(device)` widens them
    on the device (what the trainer uses); with torch.int64 / torch.int32 as id tensors widened on
    the host. The ids come from `vocab` (default `BYTES`: pad 256, EOS 257); `eos_id` / `pad_id`,
    when given, override it.

    loop=True (training): endless epochs, order as in the module docstring; a corpus too small for
    one global step raises ConfigError. loop=False (validation): the split once, unshuffled; each
    rank reads a contiguous range; the last sequence is padded with `pad_id` and every rank yields
    the same number of full micro-batches (rows past the end of the data are all `pad_id`). Each
    `iter()` of a non-looping loader is a fresh pass.
    """

    def __init__(self, path: str, split: str = "train", seq_len: int = 2048, global_batch: int = 8,
                 micro_batch: int = 4, dp_rank: int = 0, dp_world: int = 1, seed: int = 0, num_workers: int = 0,
                 eos_id: int | None = None, pad_id: int | None = None, loop: bool = True,
                 on_error: str = "raise", shuffle: bool = True, prefetch: int = 2, allow_pipe: bool = False,
                 dtype: torch.dtype = torch.int64, vocab: Vocab = BYTES,
                 max_member_bytes: int = unpack.MAX_MEMBER_BYTES):
        for name, v in (("seq_len", seq_len), ("global_batch", global_batch), ("micro_batch", micro_batch),
                        ("dp_world", dp_world), ("prefetch", prefetch)):
            if int(v) < 1:
                raise ConfigError(f"ByteLoader: {name}={v} must be >= 1")
        if not 0 <= dp_rank < dp_world:
            raise ConfigError(f"ByteLoader: dp_rank={dp_rank} must be in [0, dp_world={dp_world})")
        if global_batch % (dp_world * micro_batch):
            raise ConfigError(f"ByteLoader: global_batch={global_batch} is not a multiple of "
                              f"dp_world*micro_batch={dp_world}*{micro_batch}")
        if on_error not in ("raise", "skip"):
            raise ConfigError(f"ByteLoader: on_error={on_error!r} must be 'raise' or 'skip'")
        if num_workers < 0:
            raise ConfigError(f"ByteLoader: num_workers={num_workers} must be >= 0")
        if dtype not in _DTYPES:
            raise ConfigError(f"ByteLoader: dtype={dtype} must be torch.uint8 (ByteBatch), torch.int64 or torch.int32")
        self.dtype = dtype
        self.path, self.split, self.seq_len = path, split, int(seq_len)
        self.global_batch, self.micro_batch = int(global_batch), int(micro_batch)
        self.dp_rank, self.dp_world, self.seed = int(dp_rank), int(dp_world), int(seed)
        self.vocab = vocab
        self.eos_id = int(vocab.eos_id if eos_id is None else eos_id)
        self.pad_id = int(vocab.pad_id if pad_id is None else pad_id)
        self.loop, self.on_error = bool(loop), on_error
        self.shuffle, self.prefetch, self.num_workers = bool(shuffle) and bool(loop), int(prefetch), int(num_workers)
        self.grad_accum = self.global_batch // (self.dp_world * self.micro_batch)

        self.manifest = load_manifest(path, allow_pipe=allow_pipe)
        self.table = epochs.member_table(shard_list(self.manifest, split))
        self.total_tokens = int(self.table.tokens.sum())
        self.manifest_id = _manifest_id(self.manifest, split)
        self.zdict = load_dictionary(self.manifest)
        if self.loop:
            _, self.steps_per_epoch = epochs.lanes(self.total_tokens, self.global_batch, self.seq_len)
            if self.steps_per_epoch == 0:
                raise ConfigError(
                    f"split {split!r} of {path!r} has {self.total_tokens} tokens, fewer than global_batch*seq_len = "
                    f"{self.global_batch}*{self.seq_len}: use a smaller batch or sequence, or more data")
        else:
            n = -(-self.total_tokens // self.seq_len)
            self.eval_batches = -(-n // (self.dp_world * self.micro_batch))
        self.errors = ErrorCounter()
        self.bad_members: set[int] = set()  # members found corrupt (on_error="skip"); part of the state
        self.max_member_bytes = int(max_member_bytes)
        self._member_tokens = self.table.tokens
        self._files = ShardFiles()
        self._pool = unpack.BufferPool()
        # Members some lane still holds: neighbouring lanes that start inside the same member reuse
        # it instead of decompressing it again (weak: costs no memory of its own).
        self._members = weakref.WeakValueDictionary()
        # The member where lane j starts is where lane j-1 ends, many steps later: hold it (up to
        # HOLD_BYTES of them) instead of decompressing it twice.
        self._held: dict = {}
        self._cache_lock = threading.Lock()  # _members and _held: used by the main and prefetch threads
        self._executor = ThreadPoolExecutor(self.num_workers, thread_name_prefix="byteloader") if self.num_workers else None
        self._epoch = self._step = self._micro = 0
        self._generation = 0  # bumped by load_state_dict: stale iterators stop

    # -- public API -----------------------------------------------------------------------------

    def __len__(self) -> int:
        """Micro-batches per epoch on this rank (loop=True) or in one pass (loop=False)."""
        return self.steps_per_epoch * self.grad_accum if self.loop else self.eval_batches

    def __iter__(self) -> Iterator[torch.Tensor | ByteBatch]:
        self._generation += 1
        if self.loop:
            return self._iter_train(self._generation)
        it = self._iter_eval(self._generation)
        return it if self.dtype == torch.uint8 else (b.to_ids(dtype=self.dtype) for b in it)

    @property
    def skipped(self) -> int:
        """Members skipped so far under on_error="skip" (for logging and TensorBoard)."""
        return self.errors.skipped

    def state_dict(self) -> dict:
        """Position after the last yielded micro-batch, plus the settings it is only valid for."""
        return {"version": STATE_VERSION, "epoch": self._epoch, "step": self._step, "micro": self._micro,
                "seed": self.seed, "seq_len": self.seq_len, "global_batch": self.global_batch,
                "dp_world": self.dp_world, "micro_batch": self.micro_batch, "manifest": self.manifest_id,
                **({"bad_members": sorted(self.bad_members)} if self.bad_members else {})}

    def load_state_dict(self, state: dict):
        """Continue where `state` stopped. A different dp_world/micro_batch is fine at a step
        boundary (micro == 0); seed, seq_len, global_batch and the data must match."""
        try:
            epoch, step, micro = int(state["epoch"]), int(state["step"]), int(state["micro"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"loader state {state!r} lacks integer epoch/step/micro") from None
        for key in ("seed", "seq_len", "global_batch", "manifest"):
            if key in state and int(state[key]) != getattr(self, "manifest_id" if key == "manifest" else key):
                what = "the shards were rebuilt" if key == "manifest" else f"{key} changed to {getattr(self, key)}"
                raise ConfigError(f"cannot resume data loader: saved {key}={state[key]} but {what}; "
                                  "exact resume needs the same data order settings")
        if micro and (state.get("dp_world", self.dp_world) != self.dp_world
                      or state.get("micro_batch", self.micro_batch) != self.micro_batch):
            raise ConfigError(f"cannot resume mid-step (micro={micro}) with a different dp_world/micro_batch; "
                              "save loader state at optimizer-step boundaries")
        limit = self.steps_per_epoch if self.loop else self.eval_batches
        if step < 0 or epoch < 0 or not 0 <= micro < max(self.grad_accum, 1) or (step >= limit and limit):
            raise CheckpointError(f"loader state epoch={epoch} step={step} micro={micro} is out of range for this data")
        self._epoch, self._step, self._micro = epoch, step, micro
        # where the lanes are depends on which members were skipped before this point
        self.bad_members = {int(m) for m in state.get("bad_members", ())}
        self.errors.skipped = len(self.bad_members)
        self._generation += 1

    def close(self):
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None
        self._files.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    # -- internals ------------------------------------------------------------------------------

    def _load_member(self, i: int, order_seed) -> segments.Segments | None:
        """read -> decompress -> parse -> segments for member i (runs on a prefetch thread)."""
        if i in self.bad_members:
            return None
        try:
            s = fetch.read_member(self.table, self._files, i)
            s = unpack.parse_meta(unpack.decompress_sample(s, self.zdict, self._pool, self.max_member_bytes))
            segs = segments.member_segments(s, self.eos_id, order_seed)
            if s.buffer is not None:
                self._pool.own(segs, s.buffer)
            return segs
        except DataError as e:
            if self.on_error != "skip":
                raise
            with self._cache_lock:
                new = i not in self.bad_members
                self.bad_members.add(i)
            if new:  # counted once, however many lanes and epochs meet it
                self.errors.add(str(e))
            return None

    def _range_reader(self, order: np.ndarray, cum: np.ndarray, start: int, stop: int, epoch: int,
                      hold_first: bool = False, delivered: int = 0):
        """A TokenReader over tokens [start, stop) of the epoch stream without the members found
        corrupt (on_error="skip"), from the `delivered`-th such token on; members prefetched in order.
        It never reads past `stop`: a range that skipped members shortened ends early and the caller
        pads it. Members already known to be bad (`bad_members`, saved in the state) take no room,
        so a resumed lane continues at exactly the token the uninterrupted one had reached.
        `hold_first`: keep the first member for the lane before this one (it ends there)."""
        if stop <= start:
            return segments.TokenReader((), self.eos_id)
        first_j, first_offset = epochs.locate(cum, start)
        last, last_offset = epochs.locate(cum, stop - 1)
        n = last - first_j + 1  # members k = 0..n-1 are order[first_j + k]; of each, tokens [lo, hi)
        with self._cache_lock:
            bad = set(self.bad_members)
        if bad:
            positions = order[first_j:last + 1]
            lo = np.zeros(n, dtype=np.int64)
            lo[0] = first_offset
            hi = self._member_tokens[positions]
            hi[-1] = last_offset + 1
            known_bad = np.isin(positions, np.fromiter(bad, dtype=np.int64))
            room = np.concatenate([[0], np.cumsum(np.where(known_bad, 0, hi - lo))])
            limit = int(room[-1]) - delivered
            if limit <= 0:
                return segments.TokenReader((), self.eos_id)
            k0 = int(np.searchsorted(room, delivered, side="right")) - 1
            lo0 = int(lo[k0]) + delivered - int(room[k0])
            todo = [k for k in range(k0, n) if not known_bad[k]]
        else:  # every member takes its room: the stream position alone says where to begin (once per lane epoch)
            limit = stop - start - delivered
            if limit <= 0:
                return segments.TokenReader((), self.eos_id)
            k0, lo0 = epochs.locate(cum, start + delivered)
            k0 -= first_j
            todo = range(k0, n)
        seed = self.seed

        def hold(k, key, segs):  # (under self._cache_lock)
            if hold_first and k == 0 and first_offset:
                if sum(len(h.raw) * h.raw.itemsize for h in self._held.values()) < HOLD_BYTES:
                    self._held[key] = segs

        def cached(k):  # a member another lane still holds: no thread hand-off needed
            key = (epoch, int(order[first_j + k]))
            with self._cache_lock:
                segs = self._held.pop(key, None) or self._members.get(key)
                if segs is not None:
                    hold(k, key, segs)
            return segs

        def load(k):
            segs = cached(k)
            if segs is None:
                m = int(order[first_j + k])
                segs = self._load_member(m, (seed, epoch, m) if self.shuffle else None)
                if segs is not None:
                    with self._cache_lock:
                        self._members[(epoch, m)] = segs
                        hold(k, (epoch, m), segs)
            return k, segs

        def ready(k):
            segs = cached(k)
            return None if segs is None else (k, segs)

        loaded = fetch.prefetch_map(load, todo, self._executor, self.prefetch, ready=ready)
        tokens = self._member_tokens
        members = (segs.window(lo0 if k == k0 else 0,  # (the manifest's token count, as `cum` counts them)
                               last_offset + 1 if k == n - 1 else int(tokens[order[first_j + k]]))
                   for k, segs in loaded if segs is not None)
        return segments.TokenReader(members, self.eos_id, limit=limit)

    def _epoch_stream(self, epoch: int):
        order = epochs.epoch_order(self.table, self.seed, epoch, self.shuffle)
        cum = np.concatenate([[0], np.cumsum(self.table.tokens[order])])
        return order, cum

    def _advance(self, per_step: int, steps: int):
        self._micro += 1
        if self._micro == per_step:
            self._micro = 0
            self._step += 1
            if self._step == steps:
                self._step = 0
                self._epoch += 1

    def _iter_train(self, generation: int):
        B, W, m, L, A = self.global_batch, self.dp_world, self.micro_batch, self.seq_len, self.grad_accum
        per_rank = B // W
        # Each lane is read BLOCK steps at a time into a reused uint8 buffer (one fill call per lane
        # per block, not per row), its EOS positions on the side; a micro-batch is then one gather
        # into a fresh, small array, so a yielded batch is never overwritten. The small arrays reuse
        # freed, cache-hot memory and a small lane buffer (BLOCK_BYTES) is still in cache when it is
        # copied (BENCHMARKS.md, "The lane buffer's size"). A step larger than BLOCK_BYTES (long
        # sequences) gets a fresh buffer instead, and its micro-batches are views of it: no copy.
        block_steps = self._block_steps(per_rank)
        fresh = per_rank * L > BLOCK_BYTES
        lanebuf = None if fresh else unpack.fresh_buffer(per_rank * block_steps * L).reshape(per_rank, block_steps, L)
        wide = {torch.int64: np.int64, torch.int32: np.int32}.get(self.dtype)
        while generation == self._generation:
            epoch, step0, micro0 = self._epoch, self._step, self._micro
            # lanes of micro-batches already yielded at step0 start one step later
            firsts = [step0 + (1 if j // m < micro0 else 0) for j in range(per_rank)]
            readers, steps = self._open_epoch(epoch, firsts)
            for b0 in range(step0, steps, block_steps):
                nb = min(block_steps, steps - b0)
                if fresh:
                    lanebuf = unpack.fresh_buffer(per_rank * L).reshape(per_rank, 1, L)
                marks, rowlen, slots = self._fill_block(lanebuf, readers, firsts, b0, nb, epoch)
                eos, bounds = _batch_eos(marks, nb, m, L)
                any_short = bool((rowlen < L).any())  # (never in a block without skipped members)
                if slots is not None:  # flat[step, lane]: the row of lanebuf (lane, slot rows) where it sits
                    flat = (slots + np.arange(per_rank, dtype=np.int64)[:, None] * lanebuf.shape[1]).T.copy()
                    allrows = lanebuf.reshape(-1, L)
                for s in range(nb):
                    g = b0 + s
                    for k in range(micro0 if g == step0 else 0, A):
                        if generation != self._generation:
                            return
                        if slots is None:
                            rows = lanebuf[k * m:(k + 1) * m, s]
                        else:  # the lane's rows sit grouped by source: one gather (a copy, as below)
                            rows = allrows.take(flat[s, k * m:(k + 1) * m], axis=0)
                        q = s * A + k
                        where = eos[bounds[q]:bounds[q + 1]]
                        # a lane that skipped members ran short: the rest of it is padding
                        lengths = rowlen[k * m:(k + 1) * m, s]
                        short = any_short and bool((lengths < L).any())
                        if wide is not None:  # int64/int32 ids widened on the host: cast, then EOS in
                            ids = rows.astype(wide)
                            ids.reshape(-1)[where] = self.eos_id
                            if short:
                                ids[np.arange(L)[None, :] >= lengths[:, None]] = self.pad_id
                            batch = torch.from_numpy(ids)
                        else:
                            batch = ByteBatch(torch.from_numpy(rows if fresh or slots is not None else rows.copy()),
                                              torch.from_numpy(where),
                                              torch.from_numpy(lengths) if short else None, self.eos_id, self.pad_id)
                        self._advance(A, steps)  # before yield: state = batches handed out
                        yield batch

    def _block_steps(self, per_rank: int) -> int:
        """Steps of every lane filled at once: a BLOCK_BYTES lane buffer, at most 64 steps."""
        return max(1, min(64, BLOCK_BYTES // (per_rank * self.seq_len)))

    def _open_epoch(self, epoch: int, firsts: list) -> tuple[list, int]:
        """This rank's lane readers for `epoch`, lane j from its step firsts[j] on; and steps per epoch."""
        order, cum = self._epoch_stream(epoch)
        lane_list, steps = epochs.lanes(self.total_tokens, self.global_batch, self.seq_len)
        per_rank = len(firsts)
        mine = lane_list[self.dp_rank * per_rank:(self.dp_rank + 1) * per_rank]
        with self._cache_lock:
            self._held.clear()
        return [self._range_reader(order, cum, lane.start, lane.stop, epoch, hold_first=(j > 0 and first == 0),
                                   delivered=first * self.seq_len)
                for j, (lane, first) in enumerate(zip(mine, firsts))], steps

    def _fill_block(self, lanebuf: np.ndarray, readers, firsts, b0: int, nb: int, epoch: int):
        """Steps [b0, b0+nb) of every lane into lanebuf[lane, :nb]; steps before firsts[j] (micro-batches
        yielded before a resume) are left unwritten. Returns the EOS positions in the block (one int64
        array, lane by lane, each lane's ascending, lane-block coordinates step * seq_len + column) with
        how many belong to each lane, the data tokens of
        each (lane, step) row (fewer than seq_len only for a lane that skipped corrupt members), and
        None: each step's row is where it belongs (a mixture's rows are not, `mixture.py`)."""
        L = self.seq_len
        lanes = lanebuf.reshape(len(readers), -1)  # each lane's steps back to back
        eos, counts, filled = [], [], np.full(len(readers), nb * L, dtype=np.int64)
        for j, reader in enumerate(readers):
            s0 = max(b0, firsts[j]) - b0  # first step of this block the lane still owes
            before = len(eos)
            if s0 < nb:
                got = reader.fill(lanes[j, s0 * L:nb * L], eos, s0 * L)
                if got != (nb - s0) * L and self.on_error != "skip":
                    raise DataError(f"lane {self.dp_rank * len(readers) + j} of epoch {epoch} ran short before "
                                    f"step {b0 + nb}: shards changed since the manifest was written?")
                filled[j] = s0 * L + got
            counts.append(len(eos) - before)
        marks = (np.asarray(eos, dtype=np.int64), counts)
        return marks, np.clip(filled[:, None] - np.arange(nb, dtype=np.int64) * L, 0, L), None

    def _iter_eval(self, generation: int):
        m, L = self.micro_batch, self.seq_len
        rows_per_rank = self.eval_batches * m
        first_row = self.dp_rank * rows_per_rank + self._step * m
        last_row = (self.dp_rank + 1) * rows_per_rank
        order, cum = self._epoch_stream(0)
        start, stop = min(first_row * L, self.total_tokens), min(self.total_tokens, last_row * L)
        reader = self._range_reader(order, cum, start, stop, 0)
        for _ in range(self._step, self.eval_batches):
            out = unpack.fresh_buffer(m * L) if m * L > BLOCK_BYTES else np.empty(m * L, dtype=np.uint8)
            eos: list = []
            n = reader.fill(out, eos)  # this rank's rows are contiguous in the stream
            out[n:] = 0  # past the end of the data: pad
            lengths = np.clip(n - np.arange(m, dtype=np.int64) * L, 0, L)
            batch = ByteBatch(torch.from_numpy(out.reshape(m, L)), torch.from_numpy(np.asarray(eos, dtype=np.int64)),
                              torch.from_numpy(lengths), self.eos_id, self.pad_id)
            if generation != self._generation:
                return
            self._step += 1
            if self._step == self.eval_batches:
                self._step = 0  # the next iter() is a fresh pass
            yield batch


def _batch_eos(marks: tuple, nb: int, m: int, seq_len: int) -> tuple[np.ndarray, list]:
    """The EOS positions of a block's micro-batches, computed for the whole block at once (per
    batch, a slice): `marks` is (the block's EOS positions lane by lane, how many per lane); lane j's
    mark p (step p // seq_len) belongs to micro-batch (step, j // m) at flat position
    (j % m) * seq_len + p % seq_len. Returns the positions ordered by batch (step *
    lanes / m + k) and the bounds of each batch's slice."""
    pos, counts = marks
    lanes = len(counts)
    per_step = lanes // m
    if not len(pos):
        return np.zeros(0, dtype=np.int64), [0] * (nb * per_step + 1)
    lane = np.repeat(np.arange(lanes, dtype=np.int64), counts)
    step, col = np.divmod(pos, seq_len)
    batch = step * per_step + lane // m
    flat = (lane % m) * seq_len + col
    order = np.lexsort((flat, batch))
    bounds = np.searchsorted(batch[order], np.arange(nb * per_step + 1)).tolist()
    return flat[order], bounds
