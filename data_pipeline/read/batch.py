"""`ByteBatch`: a micro-batch of packed byte sequences at one byte per byte, widened on the device.

Token ids do not fit a byte: the specials sit above the data values (PAD = num_tokens, EOS =
num_tokens + 1, see ../basics/vocab.py). An int64 (or int32) batch costs 8 (4) bytes of host memory and
transfer per byte, which at billion-byte sequences is 8 GiB per sequence. So the loader hands the
bytes over as they are, uint8, plus the few places where a special id goes:

    data     uint8 (rows, seq_len): the data bytes; 0 where a special id goes
    eos      int64 (n,): flat positions (row * seq_len + col), ascending, that hold `eos_id`
    lengths  int64 (rows,): tokens of each row before its padding, the rest of the row being
             `pad_id`; None when no row is padded (every training batch)

and `to_ids(device)` moves them (data at one byte per byte) and widens them to the id tensor on
the device, where the widening is a cheap kernel: bit-identical to what the loader's int64
batches hold (tests/unit/test_data_loader.py checks it across settings).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch

_NUMPY = {torch.int64: np.int64, torch.int32: np.int32}


@dataclass(frozen=True)
class ByteBatch:
    data: torch.Tensor
    eos: torch.Tensor
    lengths: torch.Tensor | None
    eos_id: int
    pad_id: int

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    @property
    def device(self) -> torch.device:
        return self.data.device

    def __len__(self) -> int:
        return self.data.shape[0]

    def numel(self) -> int:
        return self.data.numel()

    def to(self, device, non_blocking: bool = False) -> "ByteBatch":
        """The same batch on `device`, still one byte per byte."""
        lengths = None if self.lengths is None else self.lengths.to(device, non_blocking=non_blocking)
        return ByteBatch(self.data.to(device, non_blocking=non_blocking), self.eos.to(device, non_blocking=non_blocking),
                         lengths, self.eos_id, self.pad_id)

    def pin_memory(self) -> "ByteBatch":
        """Page-locked host copies, so that `to_ids(device, non_blocking=True)` overlaps compute."""
        return ByteBatch(self.data.pin_memory(), self.eos.pin_memory(),
                         None if self.lengths is None else self.lengths.pin_memory(), self.eos_id, self.pad_id)

    def to_ids(self, device=None, dtype: torch.dtype = torch.int64, non_blocking: bool = False) -> torch.Tensor:
        """The (rows, seq_len) id tensor on `device` (default: where the batch is): bytes widened
        to `dtype` there, EOS and PAD written in."""
        if dtype in _NUMPY and (device is None or str(device) == "cpu") and self.data.is_cpu:
            return torch.from_numpy(self._host_ids(_NUMPY[dtype]))
        b = self if device is None else self.to(device, non_blocking=non_blocking)
        ids = b.data.to(dtype)
        flat = ids.view(-1)
        if b.eos.numel():
            flat.index_fill_(0, b.eos, self.eos_id)
        rows, seq_len = ids.shape
        if b.lengths is not None and rows and bool((b.lengths < seq_len).any()):
            cols = torch.arange(seq_len, device=ids.device)
            ids.masked_fill_(cols[None, :] >= b.lengths[:, None], self.pad_id)
        return ids

    ids = to_ids

    def _host_ids(self, np_dtype) -> np.ndarray:
        """to_ids on the host, in numpy (the int64/int32 loaders, once per micro-batch): a few
        microseconds less per batch than torch's small-tensor calls, which shows at MB/s rates."""
        out = self.data.numpy().astype(np_dtype)
        flat = out.reshape(-1)
        if self.eos.numel():
            flat[self.eos.numpy()] = self.eos_id
        if self.lengths is not None:
            lengths = self.lengths.numpy()
            seq_len = out.shape[1]
            if (lengths < seq_len).any():
                out[np.arange(seq_len)[None, :] >= lengths[:, None]] = self.pad_id
        return out

    def __iter__(self) -> Iterator["ByteBatch"]:
        """Its rows, each a one-row ByteBatch (views of the same bytes)."""
        seq_len = self.data.shape[1]
        bounds = torch.searchsorted(self.eos, torch.arange(len(self) + 1, device=self.eos.device) * seq_len).tolist()
        for r in range(len(self)):
            yield ByteBatch(self.data[r:r + 1], self.eos[bounds[r]:bounds[r + 1]] - r * seq_len,
                            None if self.lengths is None else self.lengths[r:r + 1], self.eos_id, self.pad_id)

    @staticmethod
    def stack(batches: Sequence["ByteBatch"]) -> "ByteBatch":
        """The rows of `batches` (same seq_len and special ids) as one batch."""
        first = batches[0]
        seq_len = first.data.shape[1]
        eos, row = [], 0
        for b in batches:
            eos.append(b.eos + row * seq_len)
            row += len(b)
        lengths = None
        if any(b.lengths is not None for b in batches):
            lengths = torch.cat([torch.full((len(b),), seq_len, dtype=torch.int64) if b.lengths is None else b.lengths
                                 for b in batches])
        return ByteBatch(torch.cat([b.data for b in batches]), torch.cat(eos), lengths, first.eos_id, first.pad_id)

    def padding(self, rows: int = 1) -> "ByteBatch":
        """`rows` rows of nothing but `pad_id`, shaped like this batch's rows."""
        return ByteBatch(torch.zeros(rows, self.data.shape[1], dtype=torch.uint8), torch.zeros(0, dtype=torch.int64),
                         torch.zeros(rows, dtype=torch.int64), self.eos_id, self.pad_id)
