"""Reference implementations the data tests check the library against (not part of the library).

`ByteLoader` reads members through `segments.TokenReader` straight into its lane buffer and cuts
micro-batches out of it; these are the plain, one-sequence-at-a-time versions of the same stream:
a member's tokens, generic packing and batching, and the per-position document index a
document-masking trainer would compute from EOS.
"""
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch

from terrabyte.data_pipeline.read import fetch, segments, unpack


def member_tokens(s: fetch.Sample, eos_id: int, order_seed: Sequence[int] | None = None) -> np.ndarray:
    """A parsed member as one uint16 token array (documents, EOS after each ending document)."""
    return segments.member_segments(s, eos_id, order_seed).tokens(eos_id)


def unbundle(samples: Iterable[fetch.Sample], eos_id: int) -> Iterator[segments.Segments]:
    """Samples -> Segments (documents in stored order, EOS after each ending document)."""
    for s in samples:
        yield segments.member_segments(unpack.parse_meta(s), eos_id)


def pack(members: Iterable[segments.Segments], seq_len: int, eos_id: int, pad_id: int | None = None,
         skip: int = 0, limit: int | None = None) -> Iterator[np.ndarray]:
    """Packs a stream of members into int64 arrays of exactly seq_len (EOS between documents);
    the final partial one is padded with pad_id, or dropped when pad_id is None."""
    reader = segments.TokenReader(members, eos_id, skip, limit)
    while True:
        row = np.empty(seq_len, dtype=np.int64)
        n = reader.fill(row)
        if n < seq_len:
            if n and pad_id is not None:
                row[n:] = pad_id
                yield row
            return
        yield row


def batch(seqs: Iterable[np.ndarray], n: int) -> Iterator[torch.Tensor]:
    """Groups n sequences into an int64 tensor (n, seq_len); a final short group is dropped."""
    group = []
    for s in seqs:
        group.append(s)
        if len(group) == n:
            yield torch.from_numpy(np.stack(group).astype(np.int64, copy=False))
            group = []


def document_ids(tokens: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Per-position document index within each row (EOS belongs to the document it ends), for
    attention masks that keep packed documents apart: attend only where ids are equal."""
    is_eos = (tokens == eos_id).long()
    return torch.cumsum(is_eos, dim=-1) - is_eos
