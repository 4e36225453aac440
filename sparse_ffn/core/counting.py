"""Counting over the real tokens of forward passes: the protocol shared by `masking.SparsityStats` and
`experts.ExpertUsageStats`, and the sum of their counts over the ranks of a multi-process run.

A counter holds, per *slot* (a layer, a (layer, router) pair, ...), a vector of `width` integers and
the number of tokens counted. Each forward pass leaves per-position values (batch, seq) per slot as
*pending* (`record`); layouts that flatten (batch, seq), e.g. OPT's FFN, are reshaped to the input's
shape. What gets committed:

- "auto" mode: at the end of the forward, the positions the attention mask marks real (all positions
  when there is no mask);
- "rows" mode: at the next `flush`, the first `length` positions of each row named with
  `mark_row(length)`, in batch order; rows marked `counted=False` or never marked (padding,
  duplicates, batch-size probes) are dropped.

`enabled = False` drops everything. Counts stay on the device (no host sync per forward) until read.
"""

from __future__ import annotations

import math
from typing import Callable, Hashable, Literal

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

Slot = Hashable


def prefix_mask(lengths: list[int], shape: tuple[int, int], device: torch.device | str = "cpu") -> Tensor:
    """Bool (batch, seq) = `shape`: row r is True on its first lengths[r] positions; rows beyond
    len(lengths) are all False."""
    positions = torch.arange(shape[1], device=device)
    valid = torch.zeros(shape, dtype=torch.bool, device=device)
    valid[: len(lengths)] = positions[None, :] < torch.tensor(lengths, device=device)[:, None]
    return valid


class TokenCounter:
    """Per-slot integer counts over committed tokens (see the module docstring for the protocol).

    Subclasses declare their slots (`declare`) and say how a slot's pending values add to its counts
    (`_tally`).
    """

    def __init__(self) -> None:
        self.mode: Literal["auto", "rows"] = "auto"
        self.enabled = True
        self.widths: dict[Slot, int] = {}  # slot -> numbers per slot
        self.reset()

    def declare(self, slot: Slot, width: int) -> None:
        self.widths[slot] = width
        self._counts.setdefault(slot, 0)

    def reset(self) -> None:
        self._counts: dict[Slot, Tensor | int] = {s: 0 for s in self.widths}  # (width,) int64 per slot
        self._tokens: Tensor | int = 0
        self._pending: dict[Slot, Tensor] = {}
        self._valid: Tensor | None = None
        self._shape: tuple[int, ...] | None = None
        self._rows: list[int] = []

    def _tally(self, slot: Slot, values: Tensor, weight: Tensor | None) -> Tensor:
        """The (width,) int64 increment of `slot` from per-position `values` (batch, seq), each position
        weighted by `weight` (0/1 int64 (batch, seq), on values' device; None = all)."""
        raise NotImplementedError

    # -- called by the hooks ---------------------------------------------------------------------
    def begin_forward(self, valid: Tensor | None, shape: tuple[int, ...] | None = None) -> None:
        """A forward pass starts on inputs of `shape` (batch, seq); `valid` is their attention mask."""
        self.flush()
        self._valid = valid
        self._shape = shape if shape is not None else (tuple(valid.shape) if valid is not None else None)

    def record(self, slot: Slot, values: Tensor) -> None:
        if self.enabled:
            self._pending[slot] = values

    def end_forward(self) -> None:
        if self.mode == "auto":
            self._commit(self._valid)

    # -- called by the evaluation loop -----------------------------------------------------------
    def mark_row(self, length: int, counted: bool = True) -> None:
        """The next batch row of the last forward has `length` real tokens (rows mode); `counted=False`
        drops it (a duplicate or padding row)."""
        self._rows.append(length if counted else 0)

    def flush(self) -> None:
        """Commit the marked rows of the last forward (rows mode) and drop everything else pending."""
        if self.mode == "rows" and self._rows and self._pending:
            ref = self._batched(next(iter(self._pending.values())))
            self._commit(prefix_mask(self._rows, tuple(ref.shape[:2]), ref.device), tokens=sum(self._rows))
        self._pending, self._rows, self._valid = {}, [], None

    def commit_rows(self, lengths: list[int], *, tokens: bool = True) -> bool:
        """Commit what is pending now as `flush` does in rows mode for rows marked `lengths` (0 = not
        counted), without marks: a layer-streamed evaluation runs one layer of a batch at a time and
        commits each layer's values with the same rows. tokens=False adds the counts but not the tokens
        (already counted with an earlier layer of the batch). Returns whether anything was pending."""
        had = bool(self._pending)
        if had:
            ref = self._batched(next(iter(self._pending.values())))
            self._commit(prefix_mask(lengths, tuple(ref.shape[:2]), ref.device), tokens=sum(lengths) if tokens else 0)
        self._pending, self._rows, self._valid = {}, [], None
        return had

    def _batched(self, values: Tensor) -> Tensor:
        """`values` as (batch, seq, ...) of the forward's input shape (undoes OPT-style flattening)."""
        shape = self._shape
        if shape is not None and tuple(values.shape[:len(shape)]) != tuple(shape) \
                and values.numel() == math.prod(shape):
            return values.reshape(shape)
        return values[None] if values.dim() == 1 else values

    def _commit(self, valid: Tensor | None, tokens: int | Tensor | None = None) -> None:
        if not self._pending:
            return
        weights: dict[torch.device, Tensor] = {}
        values = None
        for slot, values in self._pending.items():
            values = self._batched(values)
            weight = None
            if valid is not None:
                weight = weights.get(values.device)
                if weight is None:
                    weight = weights[values.device] = valid.to(device=values.device, dtype=torch.int64)
            t = self._tally(slot, values, weight)
            prev = self._counts.get(slot, 0)
            self._counts[slot] = t + (prev.to(t.device) if isinstance(prev, Tensor) else prev)
        if tokens is None:
            tokens = values.numel() if valid is None else valid.sum(dtype=torch.int64)
        self._tokens = self._tokens + tokens
        self._pending = {}

    # -- saving, restoring, summing over ranks ---------------------------------------------------
    def checkpoint(self) -> tuple[dict[Slot, Tensor | int], Tensor | int]:
        """The committed counts, to `restore` (if the work that follows fails half-way) or to sum the
        work since then over ranks (`sum_across_ranks`)."""
        self.flush()
        return dict(self._counts), self._tokens

    def restore(self, saved: tuple[dict[Slot, Tensor | int], Tensor | int]) -> None:
        self.flush()
        self._counts, self._tokens = dict(saved[0]), saved[1]

    def _slots(self) -> list[tuple[Slot, int]]:
        """(slot, width) in an order that is the same in every process (not the declaration order: that
        may follow set iteration, which differs between processes)."""
        return sorted(self.widths.items(), key=lambda item: repr(item[0]))

    def _flat(self, saved: tuple[dict[Slot, Tensor | int], Tensor | int]) -> Tensor:
        """Every slot's counts (in `_slots` order) then the token count, one int64 CPU vector."""
        counts, tokens = saved
        parts = []
        for slot, width in self._slots():
            c = counts.get(slot, 0)
            parts.append(c.detach().to("cpu", torch.int64).reshape(width) if isinstance(c, Tensor)
                         else torch.full((width,), int(c), dtype=torch.int64))
        parts.append(torch.tensor([int(tokens)], dtype=torch.int64))
        return torch.cat(parts)

    def sum_across_ranks(self, since: tuple[dict[Slot, Tensor | int], Tensor | int],
                         all_reduce: Callable[[Tensor], Tensor]) -> None:
        """Replace what was counted since the checkpoint `since` by its sum over every rank.

        Every rank calls this at the same point with the same slots; `all_reduce` takes an int64 CPU
        vector and returns its element-wise sum over ranks (CPU). Exact: integer counts.
        """
        base = self._flat(since)
        total = base + all_reduce(self._flat(self.checkpoint()) - base)
        counts, start = {}, 0
        for slot, width in self._slots():
            counts[slot] = total[start:start + width]
            start += width
        self._counts, self._tokens = counts, int(total[-1])

    # -- reading ---------------------------------------------------------------------------------
    def totals(self) -> tuple[dict[Slot, list[int]], int]:
        """({slot: counts as `width` Python ints}, tokens counted)."""
        flat = self._flat(self.checkpoint()).tolist()
        out, start = {}, 0
        for slot, width in self._slots():
            out[slot] = flat[start:start + width]
            start += width
        return out, flat[-1]


def forward_inputs(args: tuple, kwargs: dict) -> tuple[Tensor | None, tuple[int, ...] | None]:
    """(valid, shape) of a causal LM's forward call: the attention mask's last `seq` columns as bool
    (batch, seq) (None without a 2-D mask) and the input's (batch, seq) (None when not found)."""
    ids = kwargs.get("input_ids", args[0] if args else None)
    if ids is None:
        embeds = kwargs.get("inputs_embeds")
        shape = tuple(embeds.shape[:-1]) if embeds is not None else None
    else:
        shape = tuple(ids.shape)
    mask = kwargs.get("attention_mask")
    valid = None
    if mask is not None and shape is not None and mask.dim() == 2 and len(shape) == 2:
        valid = mask[:, -shape[1]:].bool()
    return valid, shape


def count_forwards(model: nn.Module, counter: TokenCounter) -> list[RemovableHandle]:
    """Install the model-level hooks that open and close `counter`'s forward passes (`begin_forward`
    with the call's attention mask and input shape, `end_forward` after it); returns their handles."""

    def begin(module: nn.Module, args: tuple, kwargs: dict) -> None:
        counter.begin_forward(*forward_inputs(args, kwargs))

    return [model.register_forward_pre_hook(begin, with_kwargs=True),
            model.register_forward_hook(lambda m, a, o: counter.end_forward())]
