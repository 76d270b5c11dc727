"""TerraByte: a MEGABYTE-style hierarchical byte transformer, generalised to N stages.

MEGABYTE (Yu et al. 2023, "Predicting Million-byte Sequences with Multiscale Transformers",
arXiv:2305.07185) splits a byte sequence into patches: a large *global* transformer runs once per
patch, a small *local* transformer runs once per byte inside a patch. Here the hierarchy has any
number of stages >= 2. ``max_seq_len=(16, 8, 4)`` means 16 patches of 8 sub-patches of 4 bytes;
stage 0 is the coarsest, the last stage works on single bytes.

Data flow for stage s with units of ``unit_sizes[s]`` bytes, grouped ``max_seq_len[s]`` per parent
unit of the stage above:

    input[i] = embed_s(unit i-1)  +  ctx_{s-1}[i]
    ctx_s    = to_next_s(stage_s(input))            one vector per child position of stage s+1

where unit -1 is the last unit of the previous parent (the stream shifted by one unit, as in
MEGABYTE's local model), or the learned start token at the very start of the sequence. So the
output at position i has seen only units < i of its own parent, the unit just before the parent,
and, through ctx, all earlier parents. The last stage's output at byte position j is the prediction of byte j itself
from bytes < j: strictly causal, no shift in the loss.

Below stage 0 the forward runs in chunks of patches (``TerraByte.lower``: each chunk through every
lower stage, its logits and its loss, recomputed in backward), so activation memory is O(global
stage) + O(one chunk) whatever the context. Every layout runs this one walk (``TerraByte.patches``
decides which positions form a patch, ``forward_patches`` runs a range of them); parallelism changes
only the range and modules, from outside (the ``parallel`` package).

This file holds the chunked execution and ``TerraByte`` with its forward and loss; the layers are in
``layers.py``, one level of the hierarchy in ``stage.py``. Cached decoding and sampling
(``model.generate``, ``init_cache``, ``forward_cached``) live in the ``decode`` package, which this
file imports and which imports nothing from ``model``.
"""
from __future__ import annotations

import functools
import logging
import math
from typing import Callable, ContextManager, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from terrabyte.data_pipeline.basics.errors import ConfigError
from terrabyte.data_pipeline.basics.vocab import Vocab

from ..decode import cache, generate as generation, plans, sample as sampler
from .args import MODEL_KEYS, ModelArgs
from .hub import HubMixin
from .layers import _ff_hidden, as_is, build_attention, init_fan_in
from .patching import Patcher, PatchLayout
from .stage import Stage, _inner_before, chunk_plan, cross_entropy, units_before

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- Chunked execution
#
# Below the global stage every patch is independent once stage 0's output for it is known, so the
# lower stages, the logits and the loss run over a few patches at a time: under autograd each chunk
# but the last is recomputed in backward (its activations are dropped after its forward), so
# activation memory is O(global stage) + O(one chunk), the (n, vocab) logits never exist and the
# loss is summed chunk by chunk (the tiled loss of ALST, with torch.utils.checkpoint). The plain
# forward, the pipeline's last layer, sequence parallelism (a rank's own patches) and evaluation
# all run ``TerraByte.lower``; stage 0's embedding runs in chunks the same way (``embed_patches``).

# CUDA caps a grid's y and z axes at 65,535 and flash-attn, SDPA and our sparse kernel put the batch
# (times heads) there: no chunk may hand a kernel more sequences x heads than this
MAX_KERNEL_BATCH = 65535
# what one chunk's activations may take when ``chunk_bytes`` is left automatic (counted in fp32)
AUTO_CHUNK_ACTIVATION_BYTES = 1 << 30
# checkpoint_activations=None ("auto"): a training step checkpoints the global stage's blocks when
# their activations without it would take more than this share of the memory available on the
# device (the rest: the chunks below, the backward's transients, the allocator's slack, others)
AUTO_CHECKPOINT_SHARE = 0.5
# glibc's mmap threshold, pinned (see pin_malloc_threshold)
MALLOC_MMAP_THRESHOLD = 128 << 10
REDUCTIONS = ("mean", "sum", "none")


def block_activation_values(stage: "Stage") -> int:
    """Values autograd keeps per token per block: norm inputs, q/k/v, attention output, feed-forward."""
    inner = stage.heads * stage.dim_head
    hidden = stage.layers["0"].ff.up_proj.out_features if stage.depth else 0
    return 4 * stage.dim + 4 * inner + 3 * hidden


@functools.lru_cache(maxsize=None)
def pin_malloc_threshold() -> bool:
    """Pin glibc's mmap threshold (as ``MALLOC_MMAP_THRESHOLD_`` does) for this process; True if set.

    glibc raises the threshold after each large free (up to 32 MiB), so a long step's later
    tensors land on the heap, between blocks that stay alive, and the holes freed there are never
    given back: a 16 MiB step on CPU held about 1 KB of RSS per context byte beyond its live
    tensors. With the threshold pinned, every large tensor is its own mapping, returned on free.
    Off glibc (or where the call is unavailable) nothing changes."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(-3, MALLOC_MMAP_THRESHOLD))  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def available_memory_bytes(device: torch.device) -> int:
    """Memory a step may still take on ``device``: free CUDA memory plus what torch's allocator
    holds unused, or the host's MemAvailable."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _recompute_if(recompute: bool, fn: Callable, *args) -> Tensor:
    if recompute and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


# ---------------------------------------------------------------------------- The model

class TerraByte(nn.Module, HubMixin):
    """Hierarchical byte transformer. See the module docstring for the data flow.

    Ids come from ``Vocab(num_tokens)``: data values are 0..num_tokens-1; PAD = num_tokens,
    EOS = num_tokens + 1, BOS = num_tokens + 2; vocab_size = num_tokens + 3. Loss ignores PAD only,
    so byte 0 is data.

    ``TerraByte.from_pretrained(path_or_repo_id)``, ``model.save_pretrained(dir)`` and
    ``model.push_to_hub(repo_id)`` come from ``hub.HubMixin`` (huggingface_hub's conventions).
    """

    def __init__(self, args: Optional[ModelArgs] = None, /, *,
                 whole: Optional[Callable[[nn.Module], ContextManager]] = None, **kwargs):
        """The arguments are ``ModelArgs``' fields, as keywords (``TerraByte(num_tokens=256, dim=...)``)
        or as one ``ModelArgs``; what is not given takes ``ModelArgs``' default. ``whole``: how
        ``init_weights`` reaches each module's parameters (see there); by default they are whole.
        ``checkpoint_activations``: True or False, or None (automatic: each training step checkpoints
        the global stage's blocks when its activations would not fit otherwise, ``auto_checkpoint``)."""
        if args is None:
            unknown = sorted(set(kwargs) - set(MODEL_KEYS))
            if unknown:
                raise TypeError(f"TerraByte got unknown argument(s) {unknown}; known: {list(MODEL_KEYS)}")
            args = ModelArgs(**kwargs)
        elif kwargs:
            raise TypeError("TerraByte takes a ModelArgs or keyword arguments, not both")
        # the arguments as given, JSON-ready: what save_pretrained writes to config.json
        config = {k: list(v) if isinstance(v, tuple) else v for k, v in vars(args).items()}
        super().__init__()
        self.config = config
        # the submodules' own initialisers draw from whichever generator their device has (none on
        # meta): init_weights starts from the CPU generator's state as found here, so the weights
        # depend on the seed alone, wherever and however the modules are allocated
        rng = torch.get_rng_state()
        a = args.checked()
        num_tokens, max_seq_len, dim, depth, heads, dim_head = (a.num_tokens, a.max_seq_len, a.dim, a.depth, a.heads,
                                                                a.dim_head)
        stages = len(max_seq_len)

        self.vocab = Vocab(num_tokens)
        self.max_seq_len = max_seq_len
        self.num_stages = stages
        self.dims = dim
        # bytes per unit at each stage: (16, 8, 4) -> (32, 4, 1)
        self.unit_sizes = tuple(math.prod(max_seq_len[s + 1:]) for s in range(stages))
        # bytes per row: what max_seq_len[0] fixed patches hold, or less (model.context_bytes) where
        # patches follow the data and are shorter than unit_sizes[0]
        self.context_length = a.seq_len
        self.tie_embeddings = a.tie_embeddings

        self.stages = nn.ModuleList()
        for s in range(stages):
            last = s == stages - 1
            self.stages.append(Stage(
                dim=dim[s], depth=depth[s], seq_len=max_seq_len[s], unit_size=self.unit_sizes[s],
                vocab_size=self.vocab_size, byte_dim=dim[-1], heads=heads[s], dim_head=dim_head[s],
                ff_hidden=_ff_hidden(dim[s], a.ff_mult[s]),
                attend_factory=functools.partial(build_attention, a.attention[s], dropout=a.attn_dropout,
                                                 flash=a.flash_attn),
                ff_dropout=a.ff_dropout, rotary=a.rotary,
                next_dim=None if last else dim[s + 1], next_seq_len=None if last else max_seq_len[s + 1],
                embed_groups=max_seq_len[s + 1:] or (1,) if a.unit_embedding == "grouped" else None,
                ngram_sizes=a.ngram_sizes, ngram_buckets=a.ngram_buckets,
            ))
        self.to_logits = nn.Linear(dim[-1], self.vocab_size, bias=False)
        if a.tie_embeddings:
            self.to_logits.weight = self.stages[-1].embed.token_emb.weight
        # which bytes form a global patch; owns the entropy scheme's byte model
        self.patcher = Patcher(a.patching, self.unit_sizes[0], self.unit_sizes[1], self.vocab_size, self.pad_id,
                               self.eos_id, threshold=a.patch_threshold, budget=max_seq_len[0],
                               row_bytes=self.context_length)
        self.auto_checkpoint_activations = a.checkpoint_activations is None
        self.checkpoint_activations = bool(a.checkpoint_activations)
        self.chunk_bytes = self._resolve_chunk_bytes(a.chunk_bytes)
        pin_malloc_threshold()
        self._plans = None  # (parameter key, decode plans), see _decode_plans
        torch.set_rng_state(rng)
        self.init_weights(whole)

    @classmethod
    def from_config(cls, cfg: dict) -> "TerraByte":
        """Build from a plain dict (e.g. YAML); lists become per-stage tuples."""
        known = set(MODEL_KEYS)
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise ConfigError(f"model config has unknown key(s) {unknown}; known keys: {sorted(known)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()})

    # the special ids, read from the vocabulary
    num_tokens = property(lambda self: self.vocab.num_tokens)
    pad_id = property(lambda self: self.vocab.pad_id)
    eos_id = property(lambda self: self.vocab.eos_id)
    bos_id = property(lambda self: self.vocab.bos_id)
    vocab_size = property(lambda self: self.vocab.size)

    @property
    def checkpoint_activations(self) -> bool:
        return self._checkpoint_activations

    @checkpoint_activations.setter
    def checkpoint_activations(self, value: bool) -> None:
        self._checkpoint_activations = bool(value)
        for stage in self.stages:
            stage.checkpoint_activations = bool(value)

    @torch.no_grad()
    def init_weights(self, whole: Optional[Callable[[nn.Module], ContextManager]] = None) -> None:
        """(Re)initialise every parameter and buffer; call after ``to_empty`` on a meta-built model.

        ``whole(module)``: a context in which ``module``'s own parameters (not its children's) are
        whole, entered around each write in turn. By default they already are; a model built
        partitioned (ZeRO-3's ``zero.Init``, ``engine.build_model``) gathers one module at a time
        (as fp32 CPU tensors, the ones a plain build draws into), so no rank ever holds the whole
        model, and the random draws come in the same order: the same seed gives the same weights
        however the model is built."""
        whole = whole or as_is
        last_dim = self.dims[-1]
        for s, stage in enumerate(self.stages):
            is_last = s == self.num_stages - 1
            # a tied table doubles as the output layer: keep its logits O(1) with std dim^-0.5
            stage.init_weights(emb_std=last_dim ** -0.5 if (is_last and self.tie_embeddings) else 1.0, whole=whole)
        if not self.tie_embeddings:
            with whole(self.to_logits):
                init_fan_in(self.to_logits)
        if self.patcher.entropy_model is not None:
            self.patcher.entropy_model.init_weights(whole)

    # ---------------------------------------------------------------- chunk size

    def lower_block_values_per_byte(self) -> float:
        """Values the lower stages' blocks keep for backward per byte of a chunk."""
        return sum(self.stages[s].depth * block_activation_values(self.stages[s]) / self.stages[s].unit_size
                   for s in range(1, self.num_stages))

    def auto_chunk_bytes(self) -> int:
        """Bytes per lower-stage chunk whose activations take about AUTO_CHUNK_ACTIVATION_BYTES."""
        per_byte = self.lower_block_values_per_byte() + 2 * self.vocab_size  # and the logits, their gradient
        return int(AUTO_CHUNK_ACTIVATION_BYTES / (4 * per_byte))

    def max_chunk_bytes(self) -> int:
        """The largest chunk whose kernel calls stay within MAX_KERNEL_BATCH sequences x heads."""
        return min(MAX_KERNEL_BATCH // self.stages[s].heads * self.unit_sizes[s - 1]
                   for s in range(1, self.num_stages))

    def _resolve_chunk_bytes(self, chunk_bytes: Optional[int]) -> int:
        patch = self.unit_sizes[0]
        if chunk_bytes is None:
            chunk_bytes = min(self.auto_chunk_bytes(), self.max_chunk_bytes()) // patch * patch
            return max(patch, min(chunk_bytes, math.prod(self.max_seq_len)))
        limit = self.max_chunk_bytes() // patch * patch
        if chunk_bytes > limit:
            logger.warning("model.chunk_bytes=%d would give a kernel more than %d sequences x heads; using %d",
                           chunk_bytes, MAX_KERNEL_BATCH, limit)
            chunk_bytes = limit
        return max(patch, min(chunk_bytes, math.prod(self.max_seq_len)))

    def global_activation_bytes(self, batch: int, checkpoint: bool, bytes_per_value: int = 4,
                                patches: Optional[int] = None, sequence: int = 1) -> float:
        """What a training step keeps for stage 0 over ``batch`` rows of ``patches`` patches (default:
        the whole context) until its backward: each block's activations, or with ``checkpoint`` each
        block's input; its output; one chunk of byte embeddings. ``sequence``: ranks the patches are
        split over."""
        stage = self.stages[0]
        tokens = batch * (self.max_seq_len[0] if patches is None else patches) // sequence
        per_block = tokens * block_activation_values(stage)
        kept = tokens * stage.dim * stage.depth if checkpoint else per_block * stage.depth
        embedding = 3 * batch * self.patches_per_chunk(batch) * self.unit_sizes[0] * self.dims[-1]
        return (kept + tokens * stage.dim + embedding) * bytes_per_value

    def global_backward_bytes(self, batch: int, checkpoint: bool, bytes_per_value: int = 4,
                              patches: Optional[int] = None, sequence: int = 1) -> float:
        """What stage 0's backward adds to what it kept, one block at a time: the gradients of the
        block's activations, and under checkpointing the block's recomputed activations too. It runs
        after the lower stages' chunks are done, so a step's peak is the kept part plus the larger of
        this and the chunks."""
        stage = self.stages[0]
        tokens = batch * (self.max_seq_len[0] if patches is None else patches) // sequence
        return (2 if checkpoint else 1) * tokens * block_activation_values(stage) * bytes_per_value

    def auto_checkpoint(self, ids: Tensor, patches: Optional[int] = None) -> bool:
        """Whether this step checkpoints the global stage's blocks: as set, or when automatic, when
        its activations without checkpointing would take more than AUTO_CHECKPOINT_SHARE of the
        memory available on the device. ``patches``: the step's patches per row (default: fixed
        patches of ids)."""
        if not self.auto_checkpoint_activations:
            return self.checkpoint_activations
        if not (self.training and torch.is_grad_enabled()):
            return False
        half = ids.is_cuda and torch.is_autocast_enabled("cuda") or self.to_logits.weight.element_size() < 4
        patches = ids.shape[1] // self.unit_sizes[0] if patches is None else patches
        width = 2 if half else 4
        need = (self.global_activation_bytes(ids.shape[0], False, width, patches=patches)
                + self.global_backward_bytes(ids.shape[0], False, width, patches=patches))
        budget = AUTO_CHECKPOINT_SHARE * available_memory_bytes(ids.device)
        on = need > budget
        if on != self.checkpoint_activations:
            logger.info("activation checkpointing %s: the global stage's activations without it, %.2f GB, %s %.0f%% of "
                        "the %.2f GB available", "on" if on else "off", need / 1e9, "exceed" if on else "fit in",
                        100 * AUTO_CHECKPOINT_SHARE, budget / AUTO_CHECKPOINT_SHARE / 1e9)
        return on

    def patches_per_chunk(self, rows: int = 1) -> int:
        """Global patches per chunk when ``rows`` rows are embedded together (at least one)."""
        return max(1, self.chunk_bytes // (self.unit_sizes[0] * rows))

    # ---------------------------------------------------------------- input handling

    def _check_ids(self, ids: Tensor) -> None:
        if ids.dtype in (torch.bool,) or ids.is_floating_point() or ids.is_complex():
            raise ConfigError(f"input ids must be an integer tensor, got dtype {ids.dtype}")
        if ids.numel() == 0:
            return
        lo, hi = torch.aminmax(ids)
        lo, hi = int(lo), int(hi)
        if lo < 0 or hi >= self.vocab_size:
            bad = lo if lo < 0 else hi
            raise ConfigError(
                f"input contains id {bad}, outside data values 0..{self.num_tokens - 1} and specials "
                f"PAD={self.pad_id}, EOS={self.eos_id}, BOS={self.bos_id} (num_tokens={self.num_tokens})"
            )

    def _flatten_input(self, x: Tensor) -> Tensor:
        """(b, n) or (b, k, *max_seq_len[1:]) -> (b, n) checked ids."""
        if x.ndim == self.num_stages + 1:
            if tuple(x.shape[2:]) != self.max_seq_len[1:] or x.shape[1] > self.max_seq_len[0]:
                raise ConfigError(
                    f"input shape {tuple(x.shape)} must be (batch, k<={self.max_seq_len[0]}, "
                    f"*{self.max_seq_len[1:]}) or (batch, n)"
                )
            x = x.reshape(x.shape[0], -1)
        elif x.ndim != 2:
            raise ConfigError(
                f"input has {x.ndim} dims; give (batch, n) or (batch, k, *{self.max_seq_len[1:]})"
            )
        n = x.shape[1]
        if n > self.context_length:
            raise ConfigError(
                f"sequence length {n} exceeds the model context of {self.context_length} bytes"
            )
        self._check_ids(x)
        return x

    # ---------------------------------------------------------------- the walk of every layout
    #
    # patches -> embed_patches -> stage 0's blocks and norm -> lower. The plain forward runs it over
    # every patch, a sequence-parallel rank over its own run of patches (with its attention swapped
    # from outside), a pipeline layer one step of it on its part of the model.

    def patches(self, ids: Tensor, multiple: int = 1) -> PatchLayout:
        """The global stage's units of ids (b, n) as a ``PatchLayout``: units (b, P, patch) ids, each
        patch's bytes first, PAD after them, and (for patches that follow the data) the bytes before
        each patch and each byte's slot. Fixed patches: every ``patch`` bytes, PAD filling the last.
        ``multiple``: P rounded up to a multiple of it (all-PAD patches after a row's last).

        The one place that decides which positions form a patch: every layout groups its rows here,
        and every step of the walk takes this grouping."""
        if self.patcher.dynamic:
            return self.patcher.layout(ids, multiple=multiple)
        patch, n = self.unit_sizes[0], ids.shape[1]
        padded = max(patch, patch * multiple * math.ceil(n / (patch * multiple)))
        if padded != n:
            ids = F.pad(ids, (0, padded - n), value=self.pad_id)
        return PatchLayout(ids.view(ids.shape[0], -1, patch))

    def patcher_loss(self, ids: Tensor, lo: int = 0, hi: Optional[int] = None) -> Optional[Tensor]:
        """The entropy model's auxiliary loss over bytes [lo, hi) of ids (b, n) as a gradient carrier:
        its summed nats minus themselves detached, 0 in value (the main loss reads as before) with
        the auxiliary loss's gradient, which reaches only the entropy model. None without an
        entropy model, outside training or without autograd. Its bits per byte are kept in
        ``patcher.last_bits_per_byte`` for logging."""
        if self.patcher.entropy_model is None or not (self.training and torch.is_grad_enabled()):
            return None
        nats = self.patcher.aux_nats(ids, lo, hi)
        count = (ids[:, lo:hi] != self.pad_id).sum().clamp(min=1)
        self.patcher.last_bits_per_byte = float(nats.detach() / count) / math.log(2)
        return nats - nats.detach()

    def embed_patches(self, units: Tensor, start: int, end: int) -> Tensor:
        """Stage 0's input tokens for patches [start, end) of units (b, P, patch): (b, end - start,
        dim0), embedded a chunk of patches at a time (the byte embeddings of a patch are patch x
        byte_dim values: never all at once)."""
        stage, per_chunk = self.stages[0], self.patches_per_chunk(units.shape[0])
        pieces = []
        for lo in range(start, end, per_chunk):
            hi = min(lo + per_chunk, end)
            pieces.append(_recompute_if(hi < end, functools.partial(stage.inputs, start=lo, end=hi), units))
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)

    def global_stage(self, units: Tensor, start: int = 0, end: Optional[int] = None) -> Tensor:
        """Stage 0 over patches [start, end) of units (b, P, patch): (b, end - start, dim0), normalised,
        at their own rotary positions."""
        end = units.shape[1] if end is None else end
        return self.stages[0](self.embed_patches(units, start, end), start=start)

    def lower(self, h0: Tensor, layout: PatchLayout, first_patch: int, reduction: str) -> Tensor:
        """Stages 1.., the head and the loss for patches [first_patch, first_patch + p) of every row,
        chunk by chunk (see "Chunked execution").

        h0: (b, p, dim0) stage 0's normalised output for those patches; layout: the whole rows'
        ``patches`` (the bytes before a patch may lie outside the range). Of stage 0 only
        ``to_next`` is used.
        Returns for ``reduction`` "sum" the 0-dim fp32 nats over non-PAD bytes, "none" the nats (b, p *
        patch), "logits" (b, p * patch, vocab)."""
        b, p, _ = h0.shape
        units = layout.units
        patch = units.shape[-1]
        chunks = chunk_plan(b, p, self.patches_per_chunk())
        run = functools.partial(self._lower_chunk, reduction=reduction)
        outs = []
        for k, (r0, r1, q0, q1) in enumerate(chunks):
            lo, hi = first_patch + q0, first_patch + q1
            before, starts = self._before(layout, r0, r1, lo, hi)  # (R, u1), (R,)
            rows = h0[r0:r1, q0:q1].reshape(-1, h0.shape[-1])  # (R, dim0)
            chunk_ids = units[r0:r1, lo:hi].reshape(-1, patch)  # (R, patch)
            outs.append(_recompute_if(k < len(chunks) - 1, run, rows, chunk_ids, before, starts))
        if reduction == "sum":
            return torch.stack(outs).sum()
        out = torch.cat(outs)
        return out.view(b, p * patch, *out.shape[1:])

    def _before(self, layout: PatchLayout, r0: int, r1: int, lo: int, hi: int) -> tuple[Tensor, Tensor]:
        """The bytes before patches [lo, hi) of rows [r0, r1) and whether each starts its row, for
        the first lower stage: ((R, unit_sizes[1]), (R,)), R = (r1 - r0) * (hi - lo)."""
        if layout.before is None:  # fixed patches: the previous patch's end
            return units_before(layout.units[r0:r1], self.stages[1].unit_size, lo, hi)
        before = layout.before[r0:r1, lo:hi]
        starts = torch.zeros(before.shape[:2], dtype=torch.bool, device=before.device)
        if lo == 0:
            starts[:, 0] = True
        return before.reshape(-1, before.shape[-1]), starts.reshape(-1)

    def _lower_chunk(self, rows: Tensor, chunk_ids: Tensor, before: Tensor, starts: Tensor, *,
                     reduction: str) -> Tensor:
        """One chunk of R patches through stages 1.. and the head. rows (R, dim0): stage 0's output
        for them; chunk_ids (R, patch); before (R, unit_sizes[1]) and starts (R,) as ``units_before``."""
        stages = self.stages
        ctx = stages[0].project_down(rows[:, None])  # (R, seq_len1, dim1)
        patch_before, patch_starts = before, starts
        for s in range(1, self.num_stages):
            stage = stages[s]
            if s > 1:
                before, starts = _inner_before(chunk_ids, patch_before, patch_starts, stages[s - 1].unit_size,
                                               stage.unit_size)
            units = chunk_ids.view(-1, stage.seq_len, stage.unit_size)  # (B_s, positions, unit bytes)
            h = stage(stage.inputs(units, ctx, before=before, starts=starts), checkpoint_blocks=False)
            if stage.to_next is not None:
                ctx = stage.project_down(h)  # (B_s * positions, next_seq_len, next_dim)
        logits = self.to_logits(h).view(-1, self.vocab_size)  # (R * patch, vocab)
        if reduction == "logits":
            return logits
        nats = cross_entropy(logits, chunk_ids.reshape(-1).long(), self.pad_id, reduction="none")
        return nats.sum() if reduction == "sum" else nats

    def forward_patches(self, layout: PatchLayout, start: int = 0, end: Optional[int] = None, *,
                        reduction: str) -> Tensor:
        """Patches [start, end) of every row of a ``patches`` layout through the whole model, as
        ``lower`` returns them for ``reduction``."""
        return self.lower(self.global_stage(layout.units, start, end), layout, start, reduction)

    def forward(self, x: Tensor, return_loss=False) -> Tensor:
        """x: (b, n) or (b, k, *max_seq_len[1:]) ids (any integer dtype).

        Returns logits of shape x.shape + (vocab_size,) (logits[..., j, :] predicts byte j from
        bytes < j), or with ``return_loss`` the cross-entropy over non-PAD targets: True or "mean"
        the mean, "sum" the sum, "none" per byte (x.shape, 0 at PAD). The loss never builds the
        logits of more than one chunk (``chunk_bytes``). In training, the "mean" and "sum" losses
        carry the entropy model's auxiliary gradient (``patcher_loss``), not its value.
        """
        reduction = "mean" if return_loss is True else return_loss
        if reduction is not False and reduction not in REDUCTIONS:
            raise ConfigError(f"return_loss={return_loss!r} must be a bool or one of {REDUCTIONS}")
        in_shape = x.shape
        ids = self._flatten_input(x)
        n = ids.shape[1]
        if reduction and n == 0:
            raise ConfigError("cannot compute a loss on an empty sequence")
        layout = self.patches(ids)
        if self.auto_checkpoint_activations:
            self.checkpoint_activations = self.auto_checkpoint(ids, layout.patches)
        out = self.forward_patches(layout, reduction={False: "logits", "mean": "sum"}.get(reduction, reduction))
        if reduction in ("mean", "sum"):
            aux = self.patcher_loss(ids)
            out = out if aux is None else out + aux
            return out / (ids != self.pad_id).sum() if reduction == "mean" else out
        out = layout.scatter_back(out, n)
        return out.reshape(in_shape) if reduction == "none" else out.reshape(*in_shape, self.vocab_size)

    # ---------------------------------------------------------------- cached decoding (the decode package)

    def train(self, mode: bool = True) -> "TerraByte":
        self._plans = None  # training changes the weights the fused decode copies were made from
        return super().train(mode)

    # the decode package's entry points as methods: model.generate(prime, ...), model.init_cache(b),
    # model.forward_cached(new_tokens, cache); generate steps through self._advance
    generate = generation.generate
    init_cache = cache.init_cache
    forward_cached = generation.forward_cached
    _advance = generation.advance
    _decode_plans = plans.decode_plans
    _sample = staticmethod(sampler.sample)

