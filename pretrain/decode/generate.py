"""Cached forward and generation: ``forward_cached`` and ``advance`` bring every stage up to the
bytes so far through its cache, ``generate`` samples byte after byte from them."""
from __future__ import annotations

import logging
import math
from typing import Callable, Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from terrabyte.data_pipeline.basics.errors import ConfigError

from .cache import PatchedCache, TerraByteCache, check_chunk_bytes, init_cache, prefill_patches
from .plans import stage_decode
from .sample import sample

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# The cached forward
# --------------------------------------------------------------------------------------------

@torch.no_grad()
def forward_cached(model: nn.Module, new_tokens: Tensor, cache: TerraByteCache) -> Tensor:
    """Append ``new_tokens`` (b, m) to the cached sequence; return logits (b, vocab_size) of the
    next byte. m may be 0 (logits for the first byte of an empty cache) or more (a prompt, which
    goes through in pieces of ``cache.prefill_chunk_bytes``)."""
    if new_tokens.ndim != 2 or new_tokens.shape[0] != cache.batch_size:
        raise ConfigError(
            f"new tokens have shape {tuple(new_tokens.shape)}; expected (batch={cache.batch_size}, m)"
        )
    model._check_ids(new_tokens)
    t = cache.length + new_tokens.shape[1]
    if t >= model.context_length:
        raise ConfigError(
            f"cached sequence would hold {t} bytes, leaving no room in the model context of "
            f"{model.context_length} bytes; start a new cache"
        )
    return model._advance(new_tokens, cache)


def advance(model: nn.Module, new_tokens: Tensor, cache: TerraByteCache) -> Tensor:
    """Append ids (unchecked) and return logits for the next byte.

    Each stage computes only the positions it has not computed yet: the stage-s position of
    the unit holding the next byte, for the parent unit that holds it (a new parent resets
    that stage's cache). With one new byte that is one token for the last stage, plus one token
    for each stage whose unit boundary the byte completes.

    A long input goes through in pieces that end on multiples of ``prefill_patches`` global
    patches, so memory stays O(KV cache) + O(one piece): only the global stage runs the pieces
    before the last (the lower stages and the logits restart in the last piece's new parent units
    anyway), and every stage returns just its last position's output.
    """
    m = new_tokens.shape[1]
    if m == 0 and cache.logits is not None:
        return cache.logits
    if isinstance(cache, PatchedCache):
        return _advance_patched(model, new_tokens, cache)
    t = cache.length + m
    cache.tokens.narrow(1, cache.length, m).copy_(new_tokens)
    _advance_to(model, cache, t)
    return cache.logits


def _advance_to(model: nn.Module, cache: TerraByteCache, t: int) -> None:
    """Bring every stage up to byte t, its tokens already written: a long way in pieces."""
    if t - cache.length > model.unit_sizes[0]:  # decode steps skip the piece arithmetic
        step = prefill_patches(model, cache) * model.unit_sizes[0]
        for piece_end in range((cache.length // step + 1) * step, t, step):
            cache.length = piece_end
            _advance_stages(model, cache, 1)
    cache.length = t
    _advance_stages(model, cache, model.num_stages)


def _advance_patched(model: nn.Module, new_tokens: Tensor, cache: PatchedCache) -> Tensor:
    """``advance`` where patches follow the data: place the new bytes in each row's virtual stream,
    decide where the next byte goes (``Patcher``'s rules: the same starts the forward takes), and
    bring each row's cache up to that slot. One new byte decides from the last bytes only
    (``Patcher.start_next``); more (a prompt) take the whole row's starts at once."""
    patcher, (b, m) = model.patcher, new_tokens.shape
    L, u1 = model.unit_sizes[0], model.unit_sizes[1]
    t0, t = cache.length, cache.length + m
    cache.stream.narrow(1, t0, m).copy_(new_tokens)
    if m == 1 and t0 > 0:
        for r, row in enumerate(cache.rows):
            row.tokens[0, cache.slot[r]] = new_tokens[r, 0]
        start = patcher.start_next(cache.stream[:, :t], cache.count, cache.last)
        cache.slot = torch.where(start, cache.count * L, cache.slot + 1)
        before = F.pad(cache.stream[:, max(0, t - u1):t], (max(0, u1 - t), 0), value=model.pad_id)
        for r in start.nonzero().flatten().tolist():
            cache.rows[r].patch_before[0, cache.count[r]] = before[r]
        cache.count, cache.last = cache.count + start, torch.where(start, t, cache.last)
    else:
        # the next byte's place from the whole row: a placeholder at t, which no start reads
        lay = patcher.layout(F.pad(cache.stream[:, :t], (0, 1), value=model.pad_id))
        cache.slot = lay.index[:, t]
        units = lay.units.reshape(b, -1).scatter(1, cache.slot[:, None], model.pad_id)
        for r, row in enumerate(cache.rows):
            row.tokens[0, :units.shape[1]] = units[r]
            row.patch_before[0, :lay.patches] = lay.before[r]
        cache.count = cache.slot // L + 1  # patches up to byte t's
        cache.last = t - cache.slot % L
    cache.length = t
    for r, row in enumerate(cache.rows):
        _advance_to(model, row, int(cache.slot[r]))
    cache.logits = torch.cat([row.logits for row in cache.rows])
    return cache.logits


def _advance_stages(model: nn.Module, cache: TerraByteCache, stages: int) -> None:
    """Bring the first ``stages`` stages up to byte ``cache.length`` (tokens already written)."""
    t, b = cache.length, cache.batch_size
    for s in range(stages):
        stage, st = model.stages[s], cache.stages[s]
        size = stage.unit_size
        parent = 0 if s == 0 else (t // model.unit_sizes[s - 1]) * model.unit_sizes[s - 1]
        pos = (t - parent) // size  # position whose output predicts the unit holding byte t
        if st.parent != parent:
            st.parent, st.length = parent, 0
        lo = st.length
        if lo > pos:
            continue  # nothing new at this stage; its ctx is current
        # positions lo .. pos are new; they read the parent's complete units (those before pos)
        units = cache.tokens.narrow(1, parent, pos * size).view(b, pos, size)
        ctx = None if s == 0 else cache.stages[s - 1].ctx.narrow(1, lo, pos + 1 - lo)
        # position 0 reads the unit just before the parent (none before the first: the start token);
        # a patch of a virtual stream (PatchedCache) reads the real bytes before it
        before = None
        if lo == 0 and parent > 0:
            if cache.patch_before is not None and parent % model.unit_sizes[0] == 0:
                before = cache.patch_before[:, parent // model.unit_sizes[0], -size:]
            else:
                before = cache.tokens.narrow(1, parent - size, size)
        x = stage.inputs(units, ctx, start=lo, end=pos + 1, embed=st.plan.embed,
                         before=before)  # (b, pos + 1 - lo, dim)
        out = stage_decode(st.plan, x, st.kv, lo)  # (b, rows of w_out)
        st.length = pos + 1
        if stage.to_next is not None:
            st.ctx = out.view(b, stage.next_seq_len, -1)  # (b, next_seq_len, next_dim)
        else:
            cache.logits = out


# --------------------------------------------------------------------------------------------
# Generation and sampling
# --------------------------------------------------------------------------------------------

@torch.no_grad()
def generate(
    model: nn.Module,
    prime: Optional[Tensor] = None,
    *,
    max_new_bytes: Optional[int] = None,
    temperature: float = 1.0,
    filter_thres: Optional[float] = 0.9,
    top_p: Optional[float] = None,
    stop_bytes: Iterable[int] = (),
    callback: Optional[Callable[[Tensor], None]] = None,
    batch_size: int = 1,
    sliding_window: bool = False,
    generator: Optional[torch.Generator] = None,
    ignore_eos: bool = False,
    prefill_chunk_bytes: Optional[int] = None,
    prime_lengths: Optional[Sequence[int]] = None,
    stop_sequences: Iterable[bytes] = (),
) -> Tensor:
    """Sample continuations with the KV cache. Returns (b, n_prime + new) ids.

    Prompts of different lengths decode as one batch: ``prime`` holds them left-aligned (any
    filler after each), ``prime_lengths`` their lengths. The batch prefills the shortest length
    together; each longer row then takes its own prompt bytes step by step (forced, not sampled)
    while the others sample, so every row sees exactly its own prompt at its own positions (what
    it would see alone: greedy outputs equal single-prompt ones) and gets up to ``max_new_bytes``
    after it. Row i's output is ``out[i, :prime_lengths[i]]`` then its new bytes, then PAD.
    ``stop_sequences`` (byte strings) end a row once its new bytes end with one (kept, like stop
    bytes).

    temperature 0 is greedy; filter_thres keeps the top (1 - filter_thres) of logits by count
    (0.9 keeps 10%; None or 0 keeps all); top_p is a nucleus filter. A sequence ends after
    sampling EOS or one of ``stop_bytes`` (kept in the output; later positions are PAD).
    Generation stops after ``max_new_bytes`` (default: until the context is full), when all
    sequences ended, or at the context end unless ``sliding_window`` re-primes the cache with the
    most recent bytes (dropping whole top-level patches). ``callback(new_ids)`` gets (b,) ids
    after each step. ``ignore_eos`` keeps going after EOS (benchmarks need a fixed length).
    The prompt is prefilled in pieces of ``prefill_chunk_bytes`` (whole global patches; None sizes
    them from PREFILL_MEMORY_BYTES), in memory O(KV cache) + O(one piece), with the same result.
    Each step goes through ``model._advance``, where a test can intercept it.
    """
    device = model.to_logits.weight.device
    if prime is None:
        prime = torch.empty((batch_size, 0), dtype=torch.long, device=device)
    if prime.ndim != 2:
        raise ConfigError(f"prime has shape {tuple(prime.shape)}; expected (batch, n)")
    model._check_ids(prime)
    b, n = prime.shape
    lengths = _prime_lengths(prime_lengths, b, n, device)
    stop_seqs = _stop_sequences(stop_sequences, device)
    T, patch = model.context_length, model.unit_sizes[0]
    check_chunk_bytes(prefill_chunk_bytes)
    if temperature < 0:
        raise ConfigError(f"temperature={temperature} must be >= 0")
    if filter_thres is not None and not 0.0 <= filter_thres < 1.0:
        raise ConfigError(f"filter_thres={filter_thres} must be in [0, 1)")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ConfigError(f"top_p={top_p} must be in (0, 1]")
    stop = sorted({*(() if ignore_eos else (model.eos_id,)), *(int(v) for v in stop_bytes)})
    for v in stop:
        if not 0 <= v < model.vocab_size:
            raise ConfigError(f"stop byte {v} is outside 0..{model.vocab_size - 1}")
    if max_new_bytes is None:
        if sliding_window:
            raise ConfigError("sliding_window=True needs max_new_bytes (otherwise it never ends)")
        max_new_bytes = max(T - n, 0)
    if max_new_bytes < 0:
        raise ConfigError(f"max_new_bytes={max_new_bytes} must be >= 0")

    window = 0  # offset in `out` where the cached context starts
    if n >= T:
        if not sliding_window:
            raise ConfigError(
                f"prompt has {n} bytes but the model context is {T} bytes (prod(max_seq_len)) and "
                f"needs room to generate; shorten the prompt or pass sliding_window=True"
            )
        window = math.ceil((n - T + 1) / patch) * patch  # keep patch alignment with the stream

    first = int(lengths.min()) if b else n  # prefilled together; longer prompts are forced after it
    total = n - first + max_new_bytes  # steps until the longest prompt has its new bytes
    out = torch.full((b, n + max_new_bytes), model.pad_id, dtype=torch.long, device=device)
    out[:, :n] = prime
    positions = torch.arange(n + max_new_bytes, device=device)
    out.masked_fill_(positions >= lengths[:, None], model.pad_id)
    if max_new_bytes == 0:
        return out
    # PAD and BOS are never sampled: an additive -inf bias is one op per step
    banned = torch.zeros(model.vocab_size, device=device)
    banned[[model.pad_id, model.bos_id]] = float("-inf")
    is_stop = torch.zeros(model.vocab_size, dtype=torch.bool, device=device)
    is_stop[stop] = True
    done = torch.zeros(b, dtype=torch.bool, device=device)

    ragged = first < n
    if ragged and window > first:
        raise ConfigError(f"prompts of different lengths ({first}..{n} bytes) must all fit the model context "
                          f"of {T} bytes with room to generate")
    ends = stop or ragged or stop_seqs
    cache = init_cache(model, b, device=device, prefill_chunk_bytes=prefill_chunk_bytes)
    logits = model._advance(out[:, window:first], cache)
    steps = 0
    for steps in range(1, total + 1):
        pos = first + steps - 1  # the position this step fills
        tok = sample(logits.float() + banned, temperature, filter_thres, top_p, generator)
        if ragged:
            forced = pos < lengths
            tok = torch.where(forced, prime[:, min(pos, n - 1)], tok)
        if ends:
            tok = tok.masked_fill(done, model.pad_id)
            sampled = ~forced if ragged else torch.ones_like(done)
            done |= sampled & (is_stop[tok] | (pos + 1 - lengths >= max_new_bytes))
        out[:, pos] = tok
        if stop_seqs:
            done |= sampled & _ends_with(out, pos, stop_seqs, lengths)
        if callback is not None:
            callback(tok)
        if steps == total or (ends and bool(done.all())):
            break
        if cache.length + 1 >= T:
            if not sliding_window:
                logger.info("context of %d bytes is full; stopping after %d new bytes", T, steps)
                break
            # drop half the context (whole top-level patches) and re-prime: one full pass per
            # T/2 generated bytes instead of one per patch
            window += T // 2 if isinstance(cache, PatchedCache) else patch * max(1, model.max_seq_len[0] // 2)
            cache.reset()
            logits = model._advance(out[:, window:pos + 1], cache)
        else:
            logits = model._advance(tok[:, None], cache)
    return out[:, :max(n, first + steps)]


def _prime_lengths(lengths: Optional[Sequence[int]], b: int, n: int, device) -> Tensor:
    if lengths is None:
        return torch.full((b,), n, dtype=torch.long, device=device)
    lengths = torch.as_tensor(lengths, dtype=torch.long, device=device).reshape(-1)
    if lengths.numel() != b or (b and (int(lengths.min()) < 0 or int(lengths.max()) > n)):
        raise ConfigError(f"prime_lengths {lengths.tolist()} must give one length in 0..{n} per prompt ({b} prompts)")
    return lengths


def _stop_sequences(sequences: Iterable[bytes], device) -> list[Tensor]:
    out = []
    for seq in sequences:
        if isinstance(seq, str):
            seq = seq.encode()
        if not seq:
            raise ConfigError("a stop sequence must not be empty")
        out.append(torch.tensor(list(seq), dtype=torch.long, device=device))
    return out


def _ends_with(out: Tensor, pos: int, sequences: list[Tensor], lengths: Tensor) -> Tensor:
    """(b,) rows whose new bytes (after their prompt) end at ``pos`` with one of ``sequences``."""
    hit = torch.zeros(out.shape[0], dtype=torch.bool, device=out.device)
    for seq in sequences:
        start = pos + 1 - len(seq)
        if start >= 0:
            hit |= (out[:, start:pos + 1] == seq).all(dim=1) & (start >= lengths)
    return hit
