"""Layer-streamed evaluation of a Sparse Expansion model: memory bounded by one layer's experts.

    stream = LayerStream(model, handle, counters)        # handle: artifacts.experts.apply_experts_streamed_
    final = stream.run(batches, rows)                    # batches: LongTensor (b, s) each, right-padded
    logits = final.logits(i, batches[i])                 # the model's logits for batch i
    final.close()

All inputs go through the embeddings first; then, for each decoder layer, its experts are decoded from
the artifact into the routed modules, every batch runs through the layer (`LayerRunner`, with the
arguments the model itself passes its layers), and the experts are dropped. The hidden states between
layers live on the CPU (in RAM, or in a memory-mapped file when they exceed `max_memory`). The head
(final norm, LM head) is the model's own forward with the layers passing `final` through
(`LayerRunner.head`), so the logits are those of a full forward of the expanded model.

Counting follows the in-memory mode exactly (`counting.TokenCounter`): each layer's values are
committed with the rows of their batch (`rows[i]`: the real length of each row, 0 for a row not
counted; None: every position counts, as a forward without attention mask), tokens once per batch.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from sparse_ffn.artifacts.experts import load_layer_experts, unload_layer_experts
from sparse_ffn.artifacts.provenance import freed_blocks_kept
from sparse_ffn.calibrate.layer_runner import LayerRunner
from sparse_ffn.core.experts import ExpertsHandle
from sparse_ffn.core.hidden_states import DEFAULT_HIDDEN_MEMORY, HiddenStates
from sparse_ffn.core.perplexity import model_device

class FinalStates:
    """The last decoder layer's output for every batch of a `LayerStream.run`; `logits(i, ids)` runs the
    head on batch i (ids must be the batch it was computed for)."""

    def __init__(self, runner: LayerRunner, hidden: HiddenStates, batches: list[Tensor], device: torch.device,
                 autocast: Callable[[], Any]) -> None:
        self.runner, self.hidden, self.batches, self.device, self.autocast = runner, hidden, batches, device, autocast

    def __len__(self) -> int:
        return len(self.batches)

    def logits(self, i: int, ids: Tensor) -> Tensor:
        if i >= len(self.batches) or not torch.equal(ids.cpu(), self.batches[i]):
            raise RuntimeError(f"layer-streamed evaluation: model call {i} is not the batch recorded for it "
                               f"(the harness batched differently in its second pass)")
        with self.autocast():
            return self.runner.head(ids.to(self.device), self.hidden.batches[i].to(self.device)).logits

    def close(self) -> None:
        self.hidden.close()


class LayerStream:
    """Runs batches through `handle`'s model one decoder layer at a time (see the module docstring).

    handle: from `apply_experts_streamed_` (routed modules installed, experts on disk). counters: the
    TokenCounters to commit per layer (sparsity, expert usage). max_memory: hidden-state bytes kept in
    RAM (above: memory-mapped file). autocast: a context factory the layer runs happen in (lm-eval's
    mixed precision)."""

    def __init__(self, model: nn.Module, handle: ExpertsHandle, counters: Sequence[Any] = (), *,
                 max_memory: int | None = DEFAULT_HIDDEN_MEMORY,
                 autocast: Callable[[], Any] = contextlib.nullcontext) -> None:
        self.model, self.handle, self.counters = model, handle, list(counters)
        self.max_memory, self.autocast = max_memory, autocast
        self.runner = LayerRunner(model, handle.layers)
        self.device = model_device(model)
        self.last_hidden: HiddenStates | None = None  # of the last run (tests read .mapped)

    def run(self, batches: Sequence[Tensor], rows: Sequence[list[int]] | None = None,
            progress: bool = False) -> FinalStates:
        """Stream `batches` (LongTensor (b, s) each) through every layer; `rows[i]`: per row of batch i
        its counted length (0: not counted); None: all positions of every row count."""
        batches = [b.detach().cpu() for b in batches]
        if rows is None:
            rows = [[b.shape[1]] * b.shape[0] for b in batches]
        if len(rows) != len(batches):
            raise ValueError(f"{len(rows)} row lists for {len(batches)} batches")
        width = self.model.get_input_embeddings().weight.shape[1] if batches else 1
        dtype = self.model.get_input_embeddings().weight.dtype
        hidden = None
        try:
            # every layer reads and decodes stacks of the same sizes: the heap keeps them for the next one
            with torch.no_grad(), self.autocast(), freed_blocks_kept():
                for i, ids in enumerate(batches):
                    h = self.runner.capture(ids.to(self.device))
                    if hidden is None:
                        width, dtype = h.shape[-1], h.dtype
                        hidden = HiddenStates([tuple(b.shape) for b in batches], width, dtype, self.max_memory)
                    hidden.batches[i].copy_(h)
                if hidden is None:
                    hidden = HiddenStates([], width, dtype, self.max_memory)
                counted = [[False] * len(batches) for _ in self.counters]
                layers = range(len(self.handle.layers))
                if progress:
                    from tqdm.auto import tqdm

                    layers = tqdm(layers, desc="experts: streamed layers", unit="layer", leave=False)
                for layer in layers:
                    self._run_layer(layer, batches, rows, hidden, counted)
        except BaseException:
            if hidden is not None:
                hidden.close()
            raise
        self.last_hidden = hidden
        return FinalStates(self.runner, hidden, batches, self.device, self.autocast)

    def _run_layer(self, layer: int, batches: list[Tensor], rows: Sequence[list[int]], hidden: HiddenStates,
                   counted: list[list[bool]]) -> None:
        load_layer_experts(self.handle, layer)
        try:
            for i, ids in enumerate(batches):
                self.runner.prepare(ids.to(self.device))
                shape = tuple(ids.shape)
                for c in self.counters:
                    c.begin_forward(None, shape)
                out = self.runner.run(layer, hidden.batches[i].to(self.device))
                hidden.batches[i].copy_(out)
                for j, c in enumerate(self.counters):
                    counted[j][i] |= c.commit_rows(list(rows[i]), tokens=not counted[j][i])
        finally:
            unload_layer_experts(self.handle, layer)

