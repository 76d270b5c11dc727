"""The byte vocabulary: data values first, then the special ids above them.

One object tells the model, the loader and the trainer which id is padding, which separates
documents and which starts a sequence. Data values are ``0 .. num_tokens - 1`` (0..255 for bytes),
so byte 0 is data, not padding, unlike MEGABYTE-pytorch's ``pad_id=0``.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Vocab:
    num_tokens: int = 256
    """Data values: 256 for bytes."""

    @property
    def pad_id(self) -> int:
        """Fills a sequence to whole patches; never a target of the loss, never sampled."""
        return self.num_tokens

    @property
    def eos_id(self) -> int:
        """Ends a document in a packed sequence; sampling it stops generation."""
        return self.num_tokens + 1

    @property
    def bos_id(self) -> int:
        """Reserved for the start of a sequence; never sampled."""
        return self.num_tokens + 2

    @property
    def size(self) -> int:
        """Rows of the embedding and columns of the logits."""
        return self.num_tokens + 3

    def is_data(self, token: int) -> bool:
        return 0 <= token < self.num_tokens

    def data_bytes(self, tokens) -> bytes:
        """The data values of a sequence of ids as bytes, specials dropped (byte vocabularies only)."""
        return bytes(t for t in tokens if 0 <= t < self.num_tokens)


BYTES = Vocab(256)
