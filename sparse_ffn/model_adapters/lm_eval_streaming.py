"""The lm-eval adapter's layer-streamed request methods (experts_streaming=True): HFLM's own
loglikelihood / loglikelihood_rolling code runs twice on the same requests.

1. *Recording*: every model call records its batch (the inputs exactly as HFLM builds and pads them)
   and returns placeholder logits; each scored row records its counted length (the adapter's
   real-token rules: `_select_cont_toks`). Nothing is cached or reported from this pass.
2. The recorded batches go through the model layer by layer (`streaming.LayerStream`): one layer's
   experts in memory at a time; sparsity and expert usage are committed there, with the recorded rows.
3. *Replay*: HFLM runs again; its i-th model call gets the logits of recorded batch i (checked equal),
   computed by the model's own head from the streamed hidden states. Its answers are the results.

HFLM batches deterministically (sorted requests, fixed batch size; batch_size=auto is refused), so both
passes make the same calls.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from sparse_ffn.model_adapters.streaming import FinalStates, LayerStream


def make_stream(lm: Any, max_memory: int | None) -> LayerStream:
    """The LayerStream of an adapter (`lm`: SparseFFNLM with streamed experts): its counters, HFLM's
    mixed-precision autocast; hidden states kept in RAM up to `max_memory` (default 4 GiB)."""
    from sparse_ffn.model_adapters.streaming import DEFAULT_HIDDEN_MEMORY

    def autocast() -> Any:
        dtype = getattr(lm, "mixed_precision_dtype", None)
        return torch.autocast(device_type=lm.device.type, dtype=dtype, enabled=dtype is not None)

    return LayerStream(lm.model, lm.experts, lm.applied.counters(),
                       max_memory=DEFAULT_HIDDEN_MEMORY if max_memory is None else max_memory, autocast=autocast)


class StreamedPass:
    """The state of one pass: recording (batches, rows) or replaying (`final`)."""

    def __init__(self, vocab: int, final: FinalStates | None = None) -> None:
        self.vocab = vocab
        self.final = final
        self.batches: list[Tensor] = []
        self.rows: list[list[int]] = []
        self.calls = 0

    @property
    def recording(self) -> bool:
        return self.final is None

    def model_call(self, inps: Tensor) -> Tensor:
        if self.recording:
            self.batches.append(inps.detach().cpu())
            self.rows.append([])
            return torch.zeros(inps.shape[0], inps.shape[1], 1)
        i, self.calls = self.calls, self.calls + 1
        return self.final.logits(i, inps)

    def mark_row(self, length: int, counted: bool) -> None:
        self.rows[-1].append(length if counted else 0)

    def placeholder(self, contlen: int) -> Tensor:
        """(contlen, vocab) zeros without memory (an expanded scalar), for HFLM's argmax and gather."""
        return torch.zeros(()).expand(contlen, self.vocab)


def streamed_call(lm: Any, method: Callable, requests: list, disable_tqdm: bool) -> list:
    """`method(requests)` (an HFLM loglikelihood method) evaluated layer by layer (module docstring)."""
    from lm_eval.api.model import CacheHook

    vocab = max(len(lm.tokenizer), int(getattr(lm.model.config, "vocab_size", 0) or 0))
    recording = StreamedPass(vocab)
    hook, lm.cache_hook = lm.cache_hook, CacheHook(None)
    lm.streamed_pass = recording
    try:
        method(requests, disable_tqdm=True)
    finally:
        lm.streamed_pass, lm.cache_hook = None, hook
    if len(recording.rows) != len(recording.batches) or \
            any(len(r) != b.shape[0] for r, b in zip(recording.rows, recording.batches)):
        raise RuntimeError("layer-streamed evaluation: a recorded batch has rows that were never scored")
    final = lm.stream.run(recording.batches, recording.rows, progress=not disable_tqdm and lm.rank == 0)
    replay = StreamedPass(vocab, final)
    lm.streamed_pass = replay
    try:
        res = method(requests, disable_tqdm=disable_tqdm)
    finally:
        lm.streamed_pass = None
        final.close()
    if replay.calls != len(final):
        raise RuntimeError(f"layer-streamed evaluation: {replay.calls} model calls replayed, {len(final)} recorded")
    return res
