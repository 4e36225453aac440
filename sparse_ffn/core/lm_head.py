"""The LM head applied a few positions at a time, so that perplexity never holds (batch, seq, vocab) logits.

Why: on CPU a (4, 512, 49152) float32 logits tensor (400 MB) and its per-row log-softmax temporaries
are above glibc's largest mmap threshold (32 MiB), so every batch maps, zero-fills and unmaps them
afresh: measured on SmolLM2 at 2 threads, 0.8M page faults and 3-6 s of system time per 16 x 512-token
pass, 10-25% of the pass. Chunks of at most `CHUNK_BYTES` of logits are reused from the heap instead.

    with HeadInChunks(model) as head:
        out = model(input_ids=ids).logits            # the head's input (hidden states) once deferred
        nll = head.token_nll(out, ids)                # (batch, seq - 1) float32, -log p of ids[:, 1:]

The head is deferred (its module returns its input, then runs in chunks) only for a model whose logits
are its output embeddings' output unchanged (no soft-capping, scaling or slicing after the head): that
is checked exactly on the model's first batch (its logits against the head's own output, captured by a
hook) and remembered per model. Otherwise the full logits are used as before.
"""

from __future__ import annotations

import weakref
from typing import Callable

import torch
from torch import Tensor, nn

CHUNK_BYTES = 16 * 2**20  # logits per chunk: under glibc's mmap threshold cap, so freed chunks are reused
_PLAIN_HEAD: "weakref.WeakKeyDictionary[nn.Module, nn.Module]" = weakref.WeakKeyDictionary()


def output_head(model: nn.Module) -> nn.Module | None:
    """The model's output embeddings module (the LM head), or None when it has none."""
    try:
        head = model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    return head if isinstance(head, nn.Module) else None


def chunked_token_nll(head: Callable[[Tensor], Tensor], hidden: Tensor, ids: Tensor, vocab: int) -> Tensor:
    """-log p(ids[:, j+1] | position j) as float32 (batch, seq - 1), from last hidden states (batch, seq, d)
    with `head` applied to at most CHUNK_BYTES // (4 * vocab) positions at a time."""
    step = max(1, CHUNK_BYTES // (4 * max(1, vocab)))
    seq = ids.shape[1] - 1
    out = torch.empty(ids.shape[0], seq, dtype=torch.float32, device=hidden.device)
    for row in range(ids.shape[0]):
        for s in range(0, seq, step):
            e = min(s + step, seq)
            logits = head(hidden[row, s:e]).float()  # on the head's device (one GPU of a device_map: not hidden's)
            nll = nn.functional.cross_entropy(logits, ids[row, s + 1:e + 1].to(logits.device), reduction="none")
            out[row, s:e] = nll.to(out.device)
    return out


class HeadInChunks:
    """Context in which `model`'s forward returns the head's input where the head is plain (see the
    module docstring); `token_nll(out, ids)` turns either kind of output into token NLLs."""

    def __init__(self, model: nn.Module) -> None:
        self.model, self.head = model, output_head(model)
        self.deferred, self.forward, self.captured, self.hook = False, None, None, None
        self.instance_forward = None  # a forward set on the module itself (accelerate's hook), restored on exit
        self.vocab = int(getattr(self.head, "out_features", 0) or 0)

    def __enter__(self) -> "HeadInChunks":
        if self.head is None or self.vocab <= 0:
            return self
        self.forward = self.head.forward  # the bound method, or a wrapper (accelerate's) that loads weights
        self.instance_forward = vars(self.head).get("forward")
        if _PLAIN_HEAD.get(self.model) is self.head:
            self.defer()
        else:
            self.hook = self.head.register_forward_hook(self.capture)
        return self

    def capture(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        self.captured = (args[0] if args else None, output)

    def defer(self) -> None:
        self.head.forward = lambda hidden, *args, **kwargs: hidden
        self.deferred = True

    def token_nll(self, out: Tensor, ids: Tensor) -> Tensor:
        """(batch, seq - 1) float32 NLLs from the model's output `out` (logits, or hidden states when the
        head is deferred); ids: (batch, seq) on out's device."""
        if self.deferred:
            return chunked_token_nll(self.forward, out, ids, self.vocab)
        if self.captured is not None:  # the first batch: is the model's output the head's own?
            hidden, head_out = self.captured
            self.hook.remove()
            self.hook, self.captured = None, None
            if hidden is not None and (out is head_out or (out.shape == head_out.shape and out.dtype == head_out.dtype
                                                           and torch.equal(out, head_out))):
                _PLAIN_HEAD[self.model] = self.head
                self.defer()
                return chunked_token_nll(self.forward, hidden, ids, self.vocab)
        return torch.stack([nn.functional.cross_entropy(out[row, :-1].float(), ids[row, 1:], reduction="none")
                            for row in range(ids.shape[0])])

    def __exit__(self, *exc) -> None:
        if self.hook is not None:
            self.hook.remove()
        if self.deferred:
            if self.instance_forward is None:
                del self.head.forward
            else:
                self.head.forward = self.instance_forward
            self.deferred = False
        self.captured = None
