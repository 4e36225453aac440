"""Running a model's decoder layers one at a time, as sequential (SparseGPT-style) calibration does."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from sparse_ffn.errors import UserError


class _Stop(Exception):
    pass


class LayerRunner:
    """Calls a model's decoder layers one at a time with the arguments the model itself passes them.

    `capture(ids)` runs the model with every decoder layer replaced by a stub that records its
    arguments (and stops at the last layer), giving layer 0's hidden-state input and, per layer, the
    other positional and keyword arguments. Those depend only on the input shape (no attention mask:
    calibration windows, right-padded lm-eval batches), so they are kept per (batch, seq) shape, the
    last `max_shapes` of them. `run(l, h)` calls layer l on h; `head(ids, h)` gives the model's output
    (logits) for `ids` with the last layer's output taken to be h.
    """

    def __init__(self, model: nn.Module, layers: nn.ModuleList, max_shapes: int = 8) -> None:
        self.model, self.layers = model, layers
        self.max_shapes = max_shapes
        # (batch, seq) -> per layer (positional?, args, kwargs)
        self._calls: dict[tuple[int, int], list[tuple[bool, tuple, dict]]] = {}
        self._tuple_out: int | None = None  # the layers' outputs: None = a tensor, n = a tuple of n

    def prepare(self, ids: Tensor) -> None:
        """Make sure the per-layer arguments for `ids`' shape are at hand (capturing them if not)."""
        if tuple(ids.shape) not in self._calls:
            self.capture(ids)

    def capture(self, ids: Tensor) -> Tensor:
        """Layer 0's input for `ids` (batch, seq); records the per-layer arguments for this batch size."""
        calls: list[Any] = [None] * len(self.layers)
        last = len(self.layers) - 1

        def stub(i: int):
            def forward(*args: Any, **kwargs: Any) -> Any:
                positional = bool(args)
                hidden = args[0] if positional else kwargs.pop("hidden_states")
                calls[i] = (positional, args[1:] if positional else (), kwargs, hidden)
                if i == last:
                    raise _Stop
                return hidden
            return forward

        for i, layer in enumerate(self.layers):
            layer.forward = stub(i)
        try:
            with torch.no_grad():
                self.model(input_ids=ids, use_cache=False)
        except _Stop:
            pass
        finally:
            for layer in self.layers:
                del layer.forward
        if any(c is None for c in calls):
            raise UserError(f"{type(self.model).__name__}: the model did not call every decoder layer once "
                            f"per forward; sequential calibration is not supported for this family")
        while len(self._calls) >= self.max_shapes:
            del self._calls[next(iter(self._calls))]
        self._calls[tuple(ids.shape)] = [(p, a, k) for p, a, k, _ in calls]
        return calls[0][3]

    def run(self, layer: int, hidden: Tensor) -> Tensor:
        positional, args, kwargs = self._calls[tuple(hidden.shape[:2])][layer]
        with torch.no_grad():
            out = self.layers[layer](hidden, *args, **kwargs) if positional else \
                self.layers[layer](hidden_states=hidden, **kwargs)
        if isinstance(out, (tuple, list)):
            self._tuple_out = len(out)
            return out[0]
        self._tuple_out = None
        return out

    def head(self, ids: Tensor, last: Tensor) -> Any:
        """The model's own forward on `ids` (use_cache=False) with every decoder layer passing its input
        through, except the last, which returns `last` (its output, e.g. from layer-by-layer runs): the
        final norm and LM head run exactly as in a full forward. Call `run` once first (output kind)."""
        final = len(self.layers) - 1
        wrap = self._tuple_out

        def stub(i: int):
            def forward(*args: Any, **kwargs: Any) -> Any:
                h = last if i == final else (args[0] if args else kwargs["hidden_states"])
                return h if wrap is None else (h,) + (None,) * (wrap - 1)
            return forward

        for i, layer in enumerate(self.layers):
            layer.forward = stub(i)
        try:
            with torch.no_grad():
                return self.model(input_ids=ids, use_cache=False)
        finally:
            for layer in self.layers:
                del layer.forward

    def self_check(self, ids: Tensor) -> None:
        """UserError unless running the layers one by one reproduces the model's hidden states on `ids`."""
        with torch.no_grad():
            ref = self.model(input_ids=ids, use_cache=False, output_hidden_states=True).hidden_states
        if ref is None or len(ref) != len(self.layers) + 1:
            raise UserError(f"{type(self.model).__name__}: hidden states not available to check the "
                            f"layer-by-layer run; sequential calibration is not supported for this family")
        h = self.capture(ids)
        worst = 0.0
        for layer in range(len(self.layers) - 1):  # the last entry is after the final norm
            h = self.run(layer, h)
            scale = float(ref[layer + 1].abs().max()) or 1.0
            worst = max(worst, float((h - ref[layer + 1]).abs().max()) / scale)
        tol = 1e-3 if h.dtype == torch.float32 else 3e-2
        if not worst <= tol:
            raise UserError(f"{type(self.model).__name__}: running its decoder layers one at a time does not "
                            f"reproduce the model (relative difference {worst:.2e}); sequential calibration "
                            f"is not supported for this family")
