"""The flat baselines of ``terrabyte bench quality``: one transformer over bytes, one over BPE tokens.

Both are a plain decoder-only transformer built from TerraByte's own layers (the same pre-norm
``Block``: RMSNorm, rotary positions, SDPA, SwiGLU; the same initialisation), so the comparison
isolates the hierarchy and the unit of prediction, not layer details.

- Byte GPT: predicts every id of the byte stream, as TerraByte does.
- BPE GPT: a byte-level BPE tokenizer (Hugging Face ``tokenizers``) is trained on the run's own
  training bytes; each packed sequence is cut at its EOS ids, each document encoded, and the model
  predicts BOS-prefixed token ids (EOS kept as a token). Its loss is summed over the tokens of a
  sequence and divided by that sequence's bytes (data bytes plus EOS, exactly what TerraByte's
  bits per byte divides by), so both score the same bytes in bits per byte.
- FLOPs are counted the same way for every model of the benchmark, TerraByte included:
  ``torch.utils.flop_counter.FlopCounterMode`` over the forward and backward of a training step
  (matrix products and attention as PyTorch dispatches them, recomputed chunks included;
  element-wise work, embedding lookups and the optimizer not counted), averaged over steps spread
  over the run (``quality.FLOPS_STEPS``, ``quality.spread``): a BPE step's tokens vary with its text.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import Tensor, nn

from terrabyte.data_pipeline.basics.errors import ConfigError
from terrabyte.data_pipeline.basics.vocab import Vocab

from ..model.layers import NORM_EPS, Block, DenseAttention, Rotary, _ff_hidden, init_fan_in, trunc_normal


class TokenGPT(nn.Module):
    """A flat causal transformer over ``Vocab(num_tokens)`` ids: ``model(ids)`` gives the logits
    that predict each id of ``ids`` (b, n) from the ids before it, the first from BOS."""

    def __init__(self, *, num_tokens: int, dim: int, depth: int, max_len: int, dim_head: int = 32, ff_mult=4):
        super().__init__()
        if dim % dim_head:
            raise ConfigError(f"baseline dim {dim} must be a multiple of its head width {dim_head}")
        self.vocab = Vocab(num_tokens)
        self.max_len = max_len
        self.embed = nn.Embedding(self.vocab.size, dim)
        self.rotary = Rotary(dim_head, max_len)
        self.blocks = nn.ModuleList(Block(dim, dim // dim_head, dim_head, _ff_hidden(dim, ff_mult), DenseAttention(), 0.0)
                                    for _ in range(depth))
        self.norm = nn.RMSNorm(dim, eps=NORM_EPS)
        self.to_logits = nn.Linear(dim, self.vocab.size, bias=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        # TerraByte's own rules (Stage.init_weights): unit-RMS embeddings, residual writes scaled
        # by 1/sqrt(2 depth), fan-in logits
        trunc_normal(self.embed.weight, 1.0)
        for block in self.blocks:
            block.init_weights(residual_scale=1 / math.sqrt(2 * len(self.blocks)))
        self.norm.reset_parameters()
        init_fan_in(self.to_logits)

    def forward(self, ids: Tensor) -> Tensor:
        b, n = ids.shape
        if n > self.max_len:
            raise ConfigError(f"baseline got {n} ids, more than its max_len {self.max_len}")
        bos = torch.full((b, 1), self.vocab.bos_id, dtype=ids.dtype, device=ids.device)
        x = self.embed(torch.cat([bos, ids[:, :-1]], dim=1))  # (b, n, dim): id i sees ids < i
        freqs = self.rotary.freqs[:n]
        for block in self.blocks:
            x = block(x, freqs)
        return self.to_logits(self.norm(x))  # (b, n, vocab)


class BytePairTokens:
    """A byte-level BPE tokenizer trained on byte documents, and the packed rows it encodes.

    Documents reach the tokenizer as Latin-1 text (one character per byte, so any bytes are
    lossless: ``decode(encode(doc)) == doc``, checked in the tests); its byte-level pre-tokenizer
    and decoder are the GPT-2 scheme."""

    def __init__(self, documents: Iterable[bytes], vocab_size: int):
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        if vocab_size < 257:
            raise ConfigError(f"--bpe-vocab {vocab_size} must be at least 257 (the 256 bytes and one merge)")
        self.tokenizer = Tokenizer(models.BPE())
        self.tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        self.tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False)
        self.tokenizer.train_from_iterator((d.decode("latin-1") for d in documents), trainer=trainer)
        self.vocab = Vocab(self.tokenizer.get_vocab_size())

    def encode(self, doc: bytes) -> list[int]:
        return self.tokenizer.encode(doc.decode("latin-1")).ids

    def decode(self, ids: list[int]) -> bytes:
        return self.tokenizer.decode(ids).encode("latin-1")

    def encode_rows(self, rows: Tensor, byte_vocab: Vocab) -> Tensor:
        """(b, n) byte ids with EOS and PAD -> (b, m) token ids, EOS kept, PAD-filled to the longest."""
        encoded = []
        for row in rows.tolist():
            ids, doc = [], []
            for t in row:
                if t == byte_vocab.eos_id:
                    ids += self.encode(bytes(doc)) + [self.vocab.eos_id]
                    doc = []
                elif byte_vocab.is_data(t):
                    doc.append(t)
            encoded.append(ids + (self.encode(bytes(doc)) if doc else []))
        width = max(1, max(len(ids) for ids in encoded))
        out = torch.full((len(encoded), width), self.vocab.pad_id, dtype=torch.long)
        for i, ids in enumerate(encoded):
            out[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out

    def bytes_per_token(self, rows: list[Tensor], byte_vocab: Vocab) -> float:
        tokens = sum(int((self.encode_rows(x, byte_vocab) != self.vocab.pad_id).sum()) for x in rows)
        return sum(int((x != byte_vocab.pad_id).sum()) for x in rows) / max(tokens, 1)


def training_documents(batches: Iterable[Tensor], byte_vocab: Vocab, max_bytes: int) -> list[bytes]:
    """The first ``max_bytes`` data bytes of a training stream, as the documents its EOS ids cut."""
    docs, doc, total = [], [], 0
    for batch in batches:
        for row in batch.tolist():
            for t in row:
                if t == byte_vocab.eos_id:
                    docs.append(bytes(doc))
                    doc = []
                elif byte_vocab.is_data(t):
                    doc.append(t)
                    total += 1
            if total >= max_bytes:
                return docs + [bytes(doc)]
    return docs + [bytes(doc)]


def train_step_flops(model: nn.Module, nats, micro_batches: list[Tensor], pad_id: int) -> int:
    """FLOPs of one training step's forward and backward (see the module docstring); leaves no
    gradient and no change to the random state behind."""
    from torch.utils.flop_counter import FlopCounterMode

    rng = torch.get_rng_state()
    model.train()
    with FlopCounterMode(display=False) as counter:
        for x in micro_batches:
            total, count, _ = nats(model, x, pad_id)
            (total / max(count, 1)).backward()
    model.zero_grad(set_to_none=True)
    torch.set_rng_state(rng)
    return int(counter.get_total_flops())
