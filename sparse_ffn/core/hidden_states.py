"""Per-batch activations kept between layer-by-layer passes (layer-streamed evaluation, sequential
calibration): in RAM, or in one memory-mapped file on disk when they exceed a byte budget. Torch only."""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Sequence

import torch

DEFAULT_HIDDEN_MEMORY = 4 * 2 ** 30  # hidden states above this go to a memory-mapped file


def mapped_or_empty(numel: int, dtype: torch.dtype, mapped: bool, directory: str | None = None) -> torch.Tensor:
    """A flat tensor of `numel`: in RAM, or (`mapped`) a memory-mapped temporary file in `directory`
    (default: the system's temp dir), unlinked at once so nothing is left behind, even by a killed run;
    the disk space is freed with the last reference to the tensor."""
    if not mapped:
        return torch.empty(max(1, numel), dtype=dtype)
    where = tempfile.mkdtemp(prefix="sparse-ffn-cache-", dir=directory)
    try:
        return torch.from_file(os.path.join(where, "cache.bin"), shared=True, size=max(1, numel), dtype=dtype)
    finally:
        shutil.rmtree(where, ignore_errors=True)


class HiddenStates:
    """One (b, s, d) CPU tensor per batch: in RAM, or views of one memory-mapped file (`mapped`)."""

    def __init__(self, shapes: Sequence[tuple[int, int]], width: int, dtype: torch.dtype,
                 max_memory: int | None = DEFAULT_HIDDEN_MEMORY) -> None:
        sizes = [b * s * width for b, s in shapes]
        total = sum(sizes) * torch.empty((), dtype=dtype).element_size()
        self.nbytes = total
        self.mapped = max_memory is not None and total > max_memory  # kept after `close`
        flat = mapped_or_empty(sum(sizes), dtype, self.mapped)
        self.batches, start = [], 0
        for (b, s), n in zip(shapes, sizes):
            self.batches.append(flat[start:start + n].view(b, s, width))
            start += n

    def close(self) -> None:
        self.batches = []
